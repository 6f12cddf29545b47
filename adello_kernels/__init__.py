"""adello-kernels: fused kernels for ADELLO (FlexDA + complementary consistency distillation),
the long-tailed semi-supervised learning method of Sanchez Aimar et al., ECCV 2024.

    import adello_kernels as ak
    out = ak.flexda_loss(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb, prior_ulb,
                         alpha)
    crit = ak.ADELLOLoss(prior_lb, total_steps)          # stateful: prior, step, temperature
"""
from . import backends as _backends
from .backends import available_backends
from .functional import flexda_loss
from .module import ADELLOLoss
from .reference import FlexDAOutput, alpha_schedule

_backends._load_extension()  # register the compiled kernels now (one-line warning if not built)
_backends._load_triton()     # and the Triton ones, when triton is installed

__version__ = "0.1.0"
__all__ = ["ADELLOLoss", "FlexDAOutput", "alpha_schedule", "available_backends", "flexda_loss"]
