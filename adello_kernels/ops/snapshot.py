"""`adello::snapshot`: an opaque copy of a state tensor, read before `ADELLOLoss` updates it in
place.

Why an op and not `Tensor.clone`: under `torch.compile`, AOTAutograd's min-cut partitioner may
recompute cheap values for the backward (e.g. the logit adjustment built from `prior_ulb` and
`step`) from the module's buffers, which by then hold this step's *updated* prior and step, so the
reference backend's gradients come out wrong (seen with torch 2.13 / inductor). A clone is
recomputed too; a custom op is not, so its output is saved as it was in the forward. A fused
step's own backward only scales gradients saved by the forward, but the imbalance-aware
temperature's pre-pass reads the prior that the fused step op then updates in place, and a
compiled graph gave it the updated one (seen with torch 2.13): compiled steps snapshot the state
for every backend.
"""
from __future__ import annotations

import torch

# Defined here, implemented in C++ (csrc/snapshot.cpp: a clone for the CPU and CUDA keys) so that
# no adello:: op has a Python function as its CUDA kernel; `register_python_fallback` is used only
# when the extension is not built.
_lib = torch.library.Library("adello", "FRAGMENT")  # kept alive for the process
_lib.define("snapshot(Tensor x) -> Tensor")
snapshot = torch.ops.adello.snapshot.default


@torch.library.register_fake("adello::snapshot")
def _(x):
    return torch.empty_like(x)


def register_python_fallback() -> None:
    """A PyTorch clone as the kernel (call only when adello_kernels._C is unavailable)."""
    for key in ("CPU", "CUDA"):
        _lib.impl("snapshot", lambda x: x.clone(), key)
