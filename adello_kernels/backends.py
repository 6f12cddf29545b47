"""The one table of backends: which implementations of the ADELLO step exist, on which devices
they run in this process, which op each calls, and which one `auto` picks.

Everything that chooses or lists a backend reads this file: `flexda_loss`, `ADELLOLoss`, the
benchmarks, the training driver's `--backend` flag and the tests.

    reference  pure PyTorch (adello_kernels/reference.py), any device; autograd; the oracle
    cpu        fused C++ kernels (csrc/cpu), from the compiled extension adello_kernels._C
    cuda       fused CUDA kernels (csrc/cuda), same extension, built with a CUDA toolkit
    triton     fused Triton kernels (adello_kernels/ops/flexda_triton.py); CUDA tensors, or CPU
               tensors when TRITON_INTERPRET=1 was set before triton was imported

Each fused backend implements two ops of one schema each (docs/contract.md): the row op
(`fwd_op`, adello::flexda_fwd*, which `flexda_loss` calls with explicit adjustments) and the
whole-step op (`step`, adello::flexda_step*, which `ADELLOLoss` calls once per training step).
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .ops import flexda as _ops  # defines the adello:: ops before the extension registers kernels
from .ops import step as _step_ops  # noqa: F401  the step schemas, defined before any kernel


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    fwd_op: Optional[str]       # adello::<fwd_op>, the row op; None for the reference
    step_op: Optional[str]      # adello::<step_op>, the whole-step op; None for the reference
    kernel_devices: tuple       # device types it can serve when its kernels are present

    @property
    def fused(self) -> bool:
        return self.fwd_op is not None


TABLE = {
    "reference": Backend("reference", "pure PyTorch, autograd (the oracle)", None, None,
                         ("cpu", "cuda")),
    "cpu": Backend("cpu", "fused C++ (csrc/cpu)", "flexda_fwd", "flexda_step", ("cpu",)),
    "cuda": Backend("cuda", "fused CUDA C++ (csrc/cuda)", "flexda_fwd", "flexda_step",
                    ("cuda",)),
    "triton": Backend("triton", "fused Triton (ops/flexda_triton.py)", "flexda_fwd_triton",
                      "flexda_step_triton", ("cuda",)),
}
BACKENDS = tuple(TABLE)
# Fastest first, per device type; `auto` takes the first one available for the tensors' device.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


@functools.lru_cache(maxsize=None)
def _load_extension() -> bool:
    """Import adello_kernels._C (registers the C++/CUDA kernels); False with a one-line warning
    when it is not built or does not load."""
    ok = _import_extension()
    if not ok:  # the one small op that has a PyTorch fallback
        from .ops.snapshot import register_python_fallback
        register_python_fallback()
    return ok


def _import_extension() -> bool:
    if importlib.util.find_spec(__package__ + "._C") is None:  # not built (e.g. no compiler)
        warnings.warn("adello_kernels._C is not built: the cpu and cuda backends are unavailable, "
                      "the reference backend works", stacklevel=4)
        return False
    # setup.py records the torch it compiled against; the C++ ABI is only stable within one.
    try:
        from ._build_info import TORCH_VERSION as built_with
    except ImportError:  # built by CMake or an older setup.py: nothing to compare
        built_with = torch.__version__
    mismatch = "" if built_with == torch.__version__ else (
        f"; it was built against torch {built_with} but torch {torch.__version__} is imported: "
        "reinstall adello-kernels with this torch installed (pip install --force-reinstall "
        "--no-deps <source>, or pip install -e . for a checkout)")
    try:
        from . import _C  # noqa: F401  registers the C++/CUDA kernels of the adello:: ops
    except ImportError as exc:  # built against another torch, or a missing CUDA runtime
        warnings.warn(f"adello_kernels._C failed to load ({exc}){mismatch}: the cpu and cuda "
                      "backends are unavailable, the reference backend works", stacklevel=4)
        return False
    if mismatch:
        warnings.warn(f"adello_kernels._C loaded{mismatch}", stacklevel=4)
    return True


@functools.lru_cache(maxsize=None)
def _load_triton() -> bool:
    """Import the Triton kernels (registers the kernels of the *_triton ops); False when triton
    is missing or there is nothing it can run on here."""
    try:
        from .ops import flexda_triton
    except ImportError:
        return False
    return flexda_triton.is_usable()


def triton_interpreted() -> bool:
    """True when the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 set
    before import)."""
    if not _load_triton():
        return False
    from .ops import flexda_triton
    return flexda_triton.INTERPRETED


@functools.lru_cache(maxsize=None)  # what is built and importable does not change in a process
def _backend_devices(name: str) -> tuple[str, ...]:
    """Device types on which `name` runs in this process (empty: unavailable)."""
    b = TABLE.get(name)
    if b is None:
        return ()
    if not b.fused:
        return b.kernel_devices
    if name == "triton":
        if not _load_triton():
            return ()
        if triton_interpreted():
            return ("cpu",)
        return ("cuda",) if torch.cuda.is_available() else ()
    if not _load_extension():
        return ()
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return tuple(d for d in b.kernel_devices
                 if _ops.has_kernel(b.fwd_op, keys[d]) and _ops.has_kernel(b.step_op, keys[d])
                 and (d != "cuda" or torch.cuda.is_available()))


def available_backends() -> list[str]:
    """Backends that can run in this process, e.g. ['reference', 'cpu']."""
    return [b for b in BACKENDS if _backend_devices(b)]


@torch.compiler.assume_constant_result  # evaluated once while tracing: no graph break
def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` ('auto' or a name) on `device`; ValueError if none."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if device.type in _backend_devices(name):
                return name
        return "reference"
    if backend not in TABLE:
        raise ValueError(f"backend: unknown backend {backend!r}; expected 'auto' or one of "
                         f"{BACKENDS}")
    if device.type not in _backend_devices(backend):
        raise ValueError(f"backend: {backend!r} is not available for {device.type} tensors here "
                         f"(available: {available_backends()})")
    return backend


def fused_op(backend: str):
    """The row op (`flexda_fwd` schema) of a fused backend, as a torch.library overload."""
    return getattr(torch.ops.adello, TABLE[backend].fwd_op).default


def step_function(backend: str) -> Callable:
    """The whole-step callable of a fused backend (`flexda_step` schema, differentiable).

    For cpu and cuda it is the op itself (its autograd is C++); for triton, the Python function
    of ops/flexda_triton.py that routes the op through an autograd.Function."""
    if backend == "triton":
        from .ops.flexda_triton import flexda_step_triton
        return flexda_step_triton
    return getattr(torch.ops.adello, TABLE[backend].step_op).default


__all__ = ["AUTO_ORDER", "BACKENDS", "TABLE", "Backend", "available_backends", "fused_op",
           "resolve_backend", "step_function"]
