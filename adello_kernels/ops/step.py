"""`adello::flexda_step`: one whole `ADELLOLoss` training step as one op, for every fused backend.

    flexda_step(Tensor logits_lb,          [B, C] fp32/bf16/fp16/fp64
                Tensor labels_lb,          [B]    int64 (outside [0, C): that row is NaN, below)
                Tensor logits_ulb_w,       [N, C] same dtype as logits_lb
                Tensor logits_ulb_s,       [N, C] same dtype as logits_lb
                Tensor prior_lb,           [C]    fp32 P_L
                Tensor(a!) prior_ulb,      [C]    fp32 Q_{t-1}; Q_t on return when `update`
                Tensor(b!) step,           0-d    int64 t; t + 1 on return when `update`
                Tensor(c!) skipped_updates,0-d    int64; + 1 when `update` and the batch prior
                                                  is not finite (Q is then left unchanged)
                Tensor temperature,        0-d    float T (read only)
                int total_steps, float alpha_min, float power, int distill_start,
                float lambda_u, float lambda_d, float eps, bool flexda, float threshold,
                float prior_momentum, bool update, bool prior_em=False,
                Tensor? prior_target=None,  [C]  float R: Qa is flattened from it (the released
                                                  "adello_gt" mode); None: from Q
                int alpha_epoch_steps=1,          n in [1, total_steps]: alpha from
                                                  floor(t / n) over floor(total_steps / n)
                Tensor? prior_weight=None,  [N]   acc: per-row weights of the batch prior
                                                  (ops/flexda.py); all 0: Q is left as it is
                bool distill_all=False)           distillation on every row (ops/flexda.py)
      -> (Tensor loss,            0-d    acc: L_s + lambda_u L_u + [t >= t0] lambda_d L_d
          Tensor loss_sup,        0-d    acc: L_s
          Tensor loss_unsup,      0-d    acc: L_u
          Tensor loss_distill,    0-d    acc: [t >= t0] L_d
          Tensor mask,            [N]    acc: 0/1
          Tensor pseudo_labels,   [N]    int64
          Tensor prior_batch,     [C]    acc: mean_i softmax(logits_ulb_w[i]), or with
                                         prior_em mean_i softmax(logits_ulb_w[i] + du)
          Tensor grad_lb,         [B, C] logits dtype: dloss/dlogits_lb
          Tensor grad_ulb_s)      [N, C] logits dtype: dloss/dlogits_ulb_s

What one call does, in order (the math: docs/method.md; the contract: docs/contract.md):

1. Prologue, from the state as it is on entry (Q_{t-1}, t): alpha_t = alpha_schedule(t,
   epoch_steps=alpha_epoch_steps), then
   ds = log(P_L + eps) - log(Qa + eps), du = log(Q + eps) - log(Qa + eps) with
   Qa = R^alpha_t / sum(R^alpha_t), R = prior_target or Q, computed in float64 and rounded
   once to the acc dtype
   (both 0 when `flexda` is off); the distillation gate [t >= distill_start]; T; prior_em.
2. The fused rows (as adello::flexda_fwd, ops/flexda.py) and the fixed-order reduce.
3. Epilogue, only when `update`: Q <- m Q + (1 - m) prior_batch (the raw or, with `prior_em`,
   the EM batch prior; weighted with `prior_weight`: ops/flexda.py) unless prior_batch has a
   non-finite entry (then skipped_updates += 1) or every prior weight is 0 (then nothing is
   counted: the batch has no row to estimate from, as the released code's lb_in_ulb_mask
   selection); step += 1. Every read of the state in 1-2
   happens before this write. `update=False` (used when the batch prior is all-reduced across
   ranks first) leaves all three state tensors untouched.

acc dtype: fp64 for fp64 logits, fp32 otherwise. Everything is decided on the device: no host
sync, no data-dependent shape, capturable in a CUDA graph.

Labels outside [0, C) are not checked here (validation is the caller's, and costs a host sync
on a GPU): every backend gives that labeled row a NaN cross-entropy and a NaN gradient row, so
`loss` and `loss_sup` are NaN, and the other rows are unaffected.

Only `loss` is differentiable. Since every normaliser is static, the forward writes the
gradients of `loss`; the backward only multiplies them by the incoming grad. With a plain eager
incoming grad and a graph that is not retained, the saved gradients are scaled in place by
`adello::scale_grads_` (one launch for both on a GPU, which returns at once when the grad is
exactly 1) and handed on as the input gradients; with retain_graph, or under tracing, the
product is a fresh tensor. A backward with create_graph=True raises (first-order only).

Ops sharing the schema:
    adello::flexda_step         CPU kernel (csrc/cpu/flexda_step_cpu.cpp) and CUDA kernel
                                (csrc/cuda/), both from adello_kernels._C, autograd in C++
                                (csrc/flexda_step_autograd.cpp)
    adello::flexda_step_triton  Triton kernels (adello_kernels/ops/flexda_triton.py)

    scale_grads_(Tensor(a!) grad_lb, Tensor(b!) grad_ulb_s, Tensor grad_loss) -> ()
        grad_lb *= grad_loss and grad_ulb_s *= grad_loss in place (grad_loss: 0-d, on the same
        device; a tensor with no elements is skipped). CPU and CUDA kernels from _C.
"""
from __future__ import annotations

import torch

SCHEMA = (
    "(Tensor logits_lb, Tensor labels_lb, Tensor logits_ulb_w, Tensor logits_ulb_s, "
    "Tensor prior_lb, Tensor(a!) prior_ulb, Tensor(b!) step, Tensor(c!) skipped_updates, "
    "Tensor temperature, int total_steps, float alpha_min, float power, int distill_start, "
    "float lambda_u, float lambda_d, float eps, bool flexda, float threshold, "
    "float prior_momentum, bool update, bool prior_em=False, Tensor? prior_target=None, "
    "int alpha_epoch_steps=1, Tensor? prior_weight=None, bool distill_all=False) -> "
    "(Tensor loss, Tensor loss_sup, "
    "Tensor loss_unsup, Tensor loss_distill, Tensor mask, Tensor pseudo_labels, "
    "Tensor prior_batch, Tensor grad_lb, Tensor grad_ulb_s)")
STEP_OP_NAMES = ("flexda_step", "flexda_step_triton")

_lib = torch.library.Library("adello", "FRAGMENT")  # kept alive for the process
for _name in STEP_OP_NAMES:
    _lib.define(_name + SCHEMA)
_lib.define("scale_grads_(Tensor(a!) grad_lb, Tensor(b!) grad_ulb_s, Tensor grad_loss) -> ()")

flexda_step = torch.ops.adello.flexda_step.default
scale_grads_ = torch.ops.adello.scale_grads_.default


def _fake(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb, prior_ulb, step,
          skipped_updates, temperature, total_steps, alpha_min, power, distill_start, lambda_u,
          lambda_d, eps, flexda, threshold, prior_momentum, update, prior_em=False,
          prior_target=None, alpha_epoch_steps=1, prior_weight=None, distill_all=False):
    acc = torch.float64 if logits_lb.dtype == torch.float64 else torch.float32
    n, c = logits_ulb_w.shape
    new = logits_lb.new_empty
    return (new((), dtype=acc), new((), dtype=acc), new((), dtype=acc), new((), dtype=acc),
            new((n,), dtype=acc), new((n,), dtype=torch.int64), new((c,), dtype=acc),
            torch.empty_like(logits_lb, memory_format=torch.contiguous_format),
            torch.empty_like(logits_ulb_s, memory_format=torch.contiguous_format))


for _name in STEP_OP_NAMES:
    torch.library.register_fake("adello::" + _name)(_fake)


@torch.library.register_fake("adello::scale_grads_")
def _(grad_lb, grad_ulb_s, grad_loss):
    return None
