"""The CPU emulation of the CUDA kernels (tests/cuda_emulator.cpp), built once per process.

    from cuda_emu import emulator_ops
    ops = emulator_ops()          # torch.ops.adello_cuda_emu; pytest.skip() without a compiler
    ops.flexda_fwd(...)           # the schema of adello::flexda_fwd  (adello_kernels/ops/flexda.py)
    ops.flexda_step(...)          # the schema of adello::flexda_step  (adello_kernels/ops/step.py)
    ops.scale_grads_(...)         # the schema of adello::scale_grads_ (adello_kernels/ops/step.py)

Every op runs the production CUDA source (csrc/cuda/) compiled for the CPU: the kernels, their
launch configuration, workspace layout and finalize step, on CPU tensors. The grid is capped at
EMULATOR_GRID_CAP blocks per role so that a few dozen rows already loop inside warps and blocks,
and the shared-memory budget for the step's logit adjustments is EMULATOR_ADJ_SMEM_BYTES so that
the looped kernel's recompute path runs at small class counts (see cuda_emulator.cpp).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import shutil

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATOR_SOURCE = os.path.join(HERE, "cuda_emulator.cpp")
KERNEL_SOURCES = sorted(glob.glob(os.path.join(HERE, "..", "csrc", "cuda", "*.cu"))
                        + glob.glob(os.path.join(HERE, "..", "csrc", "cuda", "*.cuh"))
                        + [os.path.join(HERE, "..", "csrc", "adello_hparams.h")])
EMULATOR_GRID_CAP = 4
EMULATOR_ADJ_SMEM_BYTES = 16384


def _digest() -> str:
    h = hashlib.sha1()
    for f in [EMULATOR_SOURCE] + KERNEL_SOURCES:
        with open(f, "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=None)
def _build() -> None:
    # Once per process: the library registers the adello_cuda_emu ops, and a second library of
    # another source version could not register them again.
    from torch.utils.cpp_extension import load
    digest = _digest()
    # The kernel files are #included, which the JIT's own version check does not see: their hash
    # goes into the flags, so an edited kernel is rebuilt (in the next process).
    load(name="adello_cuda_emulator", sources=[EMULATOR_SOURCE], is_python_module=False,
         extra_cflags=["-O1", "-std=c++20", f"-DADELLO_GRID_CAP={EMULATOR_GRID_CAP}",
                       f"-DADELLO_ADJ_SMEM_BYTES={EMULATOR_ADJ_SMEM_BYTES}",
                       f"-DADELLO_SRC_{digest}"])


def emulator_ops():
    """torch.ops.adello_cuda_emu, building the emulator on first use (~30-60 s). Calls
    pytest.skip when no C++ compiler is available."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        import pytest
        pytest.skip("no C++ compiler to build the CUDA-kernel emulator")
    _build()
    return torch.ops.adello_cuda_emu
