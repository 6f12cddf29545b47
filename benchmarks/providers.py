"""Benchmark shapes and providers, declared once for `compare.py` and the pytest-benchmark suite.

One step = `ADELLOLoss` forward + backward (gradients of the loss w.r.t. the labeled and
strong-view logits) + prior update, exactly what a training loop runs per iteration.

Providers (each kernel issue adds its backend with one line in PROVIDERS):
    eager    ADELLOLoss(backend="reference"), plain PyTorch: what users run without this library
    compile  torch.compile(ADELLOLoss(backend="reference")): what users get from the compiler
    cpu / triton / cuda   ADELLOLoss(backend=...), the fused kernels
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import adello_kernels as ak


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    b: int
    n: int
    c: int
    gpu_only: bool = False

    def step_bytes(self, itemsize: int) -> int:
        """Compulsory traffic of one step: read z_l, z_w, z_s once, write both gradients once."""
        return itemsize * self.c * (2 * self.b + 3 * self.n)


SHAPES = {s.name: s for s in [
    Shape("cifar100", 64, 128, 100),
    Shape("imagenet127", 256, 512, 127),
    Shape("imagenet127-large", 1024, 2048, 127),
    Shape("large-c", 512, 1024, 8192),
    Shape("bandwidth", 65536, 65536, 1000, gpu_only=True),
]}


def shapes_for(device: str) -> list[Shape]:
    return [s for s in SHAPES.values() if device == "cuda" or not s.gpu_only]


def _criterion(backend: str, shape: Shape, device: str) -> ak.ADELLOLoss:
    prior = torch.linspace(1.0, 0.01, shape.c, device=device)
    # 10k steps in: alpha < 1 and a non-uniform prior, so every adjustment is exercised.
    crit = ak.ADELLOLoss(prior / prior.sum(), 262_144, backend=backend, validate=False)
    crit.step.fill_(10_000)
    return crit


def _compiled(backend: str) -> Callable[[Shape, str], torch.nn.Module]:
    def make(shape: Shape, device: str):
        return torch.compile(_criterion(backend, shape, device), fullgraph=True)
    return make


def _plain(backend: str) -> Callable[[Shape, str], torch.nn.Module]:
    return lambda shape, device: _criterion(backend, shape, device)


# name -> (backend that must be available, factory(shape, device) -> callable criterion)
PROVIDERS: dict[str, tuple[str, Callable]] = {
    "eager": ("reference", _plain("reference")),
    "compile": ("reference", _compiled("reference")),
    "cpu": ("cpu", _plain("cpu")),
    "triton": ("triton", _plain("triton")),
    "cuda": ("cuda", _plain("cuda")),
}
BASELINES = ("eager", "compile")


# The device each fused backend is benchmarked on (Triton on CPU is the interpreter: a
# correctness tool, not a provider to time).
FUSED_DEVICE = {"cpu": "cpu", "cuda": "cuda", "triton": "cuda"}


def providers_for(device: str) -> list[str]:
    """Providers that can run on `device` in this process."""
    avail = ak.available_backends()
    return [name for name, (backend, _) in PROVIDERS.items()
            if backend in avail and FUSED_DEVICE.get(backend, device) == device]


def make_inputs(shape: Shape, device: str, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, dtype=dtype, generator=gen)
    z_l = (torch.randn(shape.b, shape.c, **kw) * 4).requires_grad_()
    z_w = torch.randn(shape.n, shape.c, **kw) * 4
    z_s = (torch.randn(shape.n, shape.c, **kw) * 4).requires_grad_()
    y = torch.randint(0, shape.c, (shape.b,), device=device, generator=gen)
    return z_l, y, z_w, z_s


def make_step(provider: str, shape: Shape, device: str, dtype=torch.float32):
    """A zero-argument function running one full step with fresh-per-run gradients."""
    crit = PROVIDERS[provider][1](shape, device)
    z_l, y, z_w, z_s = make_inputs(shape, device, dtype)

    def step():
        out = crit(z_l, y, z_w, z_s)
        return torch.autograd.grad(out.loss, (z_l, z_s))

    return step
