"""`adello::flexda_step`: a whole `ADELLOLoss` forward on the CPU as one op, its autograd in C++.

    flexda_step(Tensor logits_lb,    [B, C] fp32/bf16/fp16/fp64
                Tensor labels_lb,    [B]    int64 in [0, C)
                Tensor logits_ulb_w, [N, C] same dtype as logits_lb
                Tensor logits_ulb_s, [N, C] same dtype as logits_lb
                Tensor prior_lb,     [C]    P_L (float)
                Tensor prior_ulb,    [C]    Q_{t-1} (float), read only
                Tensor step,         0-d    int64 t
                Tensor temperature,  0-d    float T
                int total_steps, float alpha_min, float power, int distill_start,
                float lambda_u, float lambda_d, float eps, bool flexda, float threshold)
      -> (Tensor loss,            0-d    acc: L_s + lambda_u L_u + [t >= t0] lambda_d L_d
          Tensor loss_sup,        0-d    acc: L_s
          Tensor loss_unsup,      0-d    acc: L_u
          Tensor loss_distill,    0-d    acc: [t >= t0] L_d
          Tensor mask,            [N]    acc: 0/1
          Tensor pseudo_labels,   [N]    int64
          Tensor prior_batch,     [C]    acc: mean_i softmax(logits_ulb_w[i])
          Tensor grad_lb,         [B, C] logits dtype: dloss/dlogits_lb
          Tensor grad_ulb_s)      [N, C] logits dtype: dloss/dlogits_ulb_s

It is `adello_prepare` (ops/state.py: alpha_t, ds, du, hparams) followed by `flexda_fwd`
(ops/flexda.py) in one call, with the same outputs split into separate 0-d loss terms. Why a
separate op: at CIFAR shapes the fused kernel takes ~50 us on a 2-core CPU, and the Python glue
of a prologue op, an autograd.Function (Python forward and backward) and the packaging of its
outputs cost more than that. Here everything runs in C++ (csrc/cpu/flexda_step_cpu.cpp): the CPU
kernel, and an AutogradCPU kernel (a torch::autograd::Function) whose backward scales the saved
gradients by the incoming grad without entering Python. Only `loss` is differentiable.

CPU only: `ADELLOLoss(backend="cpu")` calls it; the other fused backends keep the prologue op and
the Python autograd of ops/flexda.py. Its fake (below) makes it traceable by torch.compile, which
differentiates through the C++ autograd kernel.
"""
from __future__ import annotations

import torch

_lib = torch.library.Library("adello", "FRAGMENT")  # noqa: kept alive for the process
_lib.define(
    "flexda_step(Tensor logits_lb, Tensor labels_lb, Tensor logits_ulb_w, Tensor logits_ulb_s, "
    "Tensor prior_lb, Tensor prior_ulb, Tensor step, Tensor temperature, int total_steps, "
    "float alpha_min, float power, int distill_start, float lambda_u, float lambda_d, float eps, "
    "bool flexda, float threshold) -> (Tensor loss, Tensor loss_sup, Tensor loss_unsup, "
    "Tensor loss_distill, Tensor mask, Tensor pseudo_labels, Tensor prior_batch, Tensor grad_lb, "
    "Tensor grad_ulb_s)")
flexda_step = torch.ops.adello.flexda_step.default


@torch.library.register_fake("adello::flexda_step")
def _fake(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb, prior_ulb, step,
          temperature, total_steps, alpha_min, power, distill_start, lambda_u, lambda_d, eps,
          flexda, threshold):
    acc = torch.float64 if logits_lb.dtype == torch.float64 else torch.float32
    n, c = logits_ulb_w.shape
    new = logits_lb.new_empty
    return (new((), dtype=acc), new((), dtype=acc), new((), dtype=acc), new((), dtype=acc),
            new((n,), dtype=acc), new((n,), dtype=torch.int64), new((c,), dtype=acc),
            torch.empty_like(logits_lb, memory_format=torch.contiguous_format),
            torch.empty_like(logits_ulb_s, memory_format=torch.contiguous_format))
