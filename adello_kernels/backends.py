"""Which implementations of the ADELLO step exist in this process, and which one `auto` picks.

    reference  pure PyTorch (adello_kernels/reference.py), any device
    cpu        fused C++ kernel (csrc/cpu), from the compiled extension adello_kernels._C
    cuda       fused CUDA kernel (csrc/cuda), same extension, built when a CUDA toolkit was found
    triton     fused Triton kernel (adello_kernels/ops/flexda_triton.py); CUDA tensors, or CPU
               tensors when TRITON_INTERPRET=1 was set before triton was imported
"""
from __future__ import annotations

import functools
import importlib.util
import warnings

import torch

from .ops import flexda as _ops  # defines the adello:: ops before the extension registers kernels

BACKENDS = ("reference", "cpu", "cuda", "triton")


@functools.lru_cache(maxsize=None)
def _load_extension() -> bool:
    ok = _import_extension()
    if not ok:  # the PyTorch versions of the small state ops take the CPU key instead
        from .ops.state import register_cpu_fallbacks
        register_cpu_fallbacks()
    return ok


def _import_extension() -> bool:
    if importlib.util.find_spec(__package__ + "._C") is None:  # not built (e.g. no compiler)
        warnings.warn("adello_kernels._C is not built: the cpu and cuda backends are unavailable, "
                      "the reference backend works", stacklevel=4)
        return False
    try:
        from . import _C  # noqa: F401  registers the C++/CUDA kernels of adello::flexda_fwd
    except ImportError as exc:  # built against another torch, or a missing CUDA runtime
        warnings.warn(f"adello_kernels._C failed to load ({exc}): the cpu and cuda backends are "
                      "unavailable, the reference backend works", stacklevel=4)
        return False
    return True


@functools.lru_cache(maxsize=None)
def _load_triton() -> bool:
    """Import the Triton kernels (registers adello::flexda_fwd_triton's kernels); False when
    triton is missing or there is nothing it can run on here."""
    try:
        from .ops import flexda_triton
    except ImportError:
        return False
    return flexda_triton.is_usable()


def triton_interpreted() -> bool:
    """True when the Triton kernels were built for the interpreter (TRITON_INTERPRET=1 at import)."""
    if not _load_triton():
        return False
    from .ops import flexda_triton
    return flexda_triton.INTERPRETED


@functools.lru_cache(maxsize=None)  # what is built and importable does not change in a process
def _backend_devices(name: str) -> tuple[str, ...]:
    """Device types on which `name` runs in this process (empty: unavailable)."""
    if name == "reference":
        return ("cpu", "cuda")
    if name == "cpu":
        return ("cpu",) if _load_extension() and _ops.has_kernel("flexda_fwd", "CPU") else ()
    if name == "cuda":
        ok = (_load_extension() and _ops.has_kernel("flexda_fwd", "CUDA")
              and torch.cuda.is_available())
        return ("cuda",) if ok else ()
    if name == "triton":
        if not _load_triton():
            return ()
        if triton_interpreted():
            return ("cpu",)
        return ("cuda",) if torch.cuda.is_available() else ()
    return ()


def available_backends() -> list[str]:
    """Backends that can run in this process, e.g. ['reference', 'cpu']."""
    return [b for b in BACKENDS if _backend_devices(b)]


# Fastest first, per device type; `auto` takes the first one available for the tensors' device.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


@torch.compiler.assume_constant_result  # evaluated once while tracing: no graph break
def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` ('auto' or a name) on `device`; ValueError if none."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if device.type in _backend_devices(name):
                return name
        return "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected 'auto' or one of "
                         f"{BACKENDS}")
    if device.type not in _backend_devices(backend):
        raise ValueError(f"backend: {backend!r} is not available for {device.type} tensors here "
                         f"(available: {available_backends()})")
    return backend


def fused_op(backend: str):
    """The torch.library op (overload) implementing a fused backend."""
    ops = torch.ops.adello
    return ops.flexda_fwd_triton.default if backend == "triton" else ops.flexda_fwd.default
