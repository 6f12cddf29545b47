"""The fused ADELLO row op as `torch.library` ops: one schema, one fake, one autograd, several
kernels.

Schema (shared by every fused backend; docs/contract.md, Op schemas):

    flexda_fwd(Tensor logits_lb,      [B, C] fp32/bf16/fp16/fp64
               Tensor labels_lb,      [B]    int64 in [0, C)
               Tensor logits_ulb_w,   [N, C] same dtype as logits_lb
               Tensor logits_ulb_s,   [N, C] same dtype as logits_lb
               Tensor adj_lb,         [C]    acc dtype: ds, added to logits_lb
               Tensor adj_ulb,        [C]    acc dtype: du, added to logits_ulb_s
               Tensor hparams,        [5]    acc dtype: (lambda_u, lambda_d, distill_gate, T,
                                             prior_em)
               float threshold,
               Tensor? prior_weight=None,  [N] acc: per-row weights of the batch prior (below)
               bool distill_all=False)     distillation on every row, not only M = 0 (below)
      -> (Tensor loss,                0-d    acc: L_s + lambda_u L_u + [gate] lambda_d L_d
          Tensor terms,               [3]    acc: (L_s, L_u, [gate] L_d), unweighted
          Tensor mask,                [N]    acc: 0/1
          Tensor pseudo_labels,       [N]    int64
          Tensor prior_batch,         [C]    acc: mean_i softmax(logits_ulb_w[i]); with
                                             prior_em != 0: mean_i softmax(logits_ulb_w[i] + du);
                                             with prior_weight: the weighted mean (below)
          Tensor grad_lb,             [B, C] logits dtype: dloss/dlogits_lb
          Tensor grad_ulb_s)          [N, C] logits dtype: dloss/dlogits_ulb_s

acc dtype is fp64 for fp64 logits, fp32 otherwise. hparams lives on the logits' device so that a
step-dependent gate or a frozen temperature never needs a host sync. When distill_gate == 0 the
distillation term is skipped (terms[2] = 0 and it adds nothing to the gradient).

prior_em selects the batch prior the running estimate is updated with (docs/method.md, Prior
estimator): 0 the raw weak-view softmax (the released method), else the posteriors adjusted to
the current estimate (one EM step of Saerens et al. 2002), softmax(z_w + du), which every kernel
forms from the weak row's exps it already has: pw_c r_c / sum_c pw_c r_c with r_c = exp(du_c).

distill_all (the released `distill_all` without `distill_complement`): the distillation term and
its gradient cover every row, L_d = (1/N) sum_i H(q_i, softmax(a_i / T)), so a row with M = 1
has both terms; False (the default) distils the rows with M = 0 only.

prior_weight w (finite, >= 0; None: every row weighs 1) weights the rows of the batch prior:
prior_batch = sum_{i: w_i > 0} w_i p_i / W, W = sum_i w_i, where p_i is row i's softmax (raw or
EM). A row of weight 0 is left out entirely (its NaN, if any, never reaches the prior); with
W = 0 the prior is NaN (no estimate; the step op then leaves Q unchanged). The losses and
gradients do not depend on w. This is the released `lb_in_ulb_mask` selection (w = the truly
unlabeled rows), computed in the same pass as the unweighted prior.

Because every normaliser (1/B, 1/N) is static, the forward writes the gradients of `loss`, and the
backward only scales them by the incoming grad (docs/method.md, Gradients). The other outputs are
non-differentiable.

Ops sharing the schema:
    adello::flexda_fwd         CPU kernel (csrc/cpu) and CUDA kernel (csrc/cuda), from
                               adello_kernels._C
    adello::flexda_fwd_triton  Triton kernel (adello_kernels/ops/flexda_triton.py)
"""
from __future__ import annotations

import torch

SCHEMA = ("(Tensor logits_lb, Tensor labels_lb, Tensor logits_ulb_w, Tensor logits_ulb_s, "
          "Tensor adj_lb, Tensor adj_ulb, Tensor hparams, float threshold, "
          "Tensor? prior_weight=None, bool distill_all=False) -> "
          "(Tensor loss, Tensor terms, Tensor mask, Tensor pseudo_labels, Tensor prior_batch, "
          "Tensor grad_lb, Tensor grad_ulb_s)")

OP_NAMES = ("flexda_fwd", "flexda_fwd_triton")

# The slots of `hparams`, named once for every backend (the C++/CUDA kernels read the same layout
# from csrc/adello_hparams.h; tests/test_ops.py checks that the two agree).
HP_LAMBDA_U, HP_LAMBDA_D, HP_GATE, HP_TEMPERATURE, HP_PRIOR_EM = 0, 1, 2, 3, 4
NUM_HPARAMS = 5
HPARAM_SLOTS = {"lambda_u": HP_LAMBDA_U, "lambda_d": HP_LAMBDA_D, "gate": HP_GATE,
                "temperature": HP_TEMPERATURE, "prior_em": HP_PRIOR_EM}

_lib = torch.library.Library("adello", "DEF")  # kept alive for the process
for _name in OP_NAMES:
    _lib.define(_name + SCHEMA)


def _fake(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, adj_lb, adj_ulb, hparams, threshold,
          prior_weight=None, distill_all=False):
    acc = torch.float64 if logits_lb.dtype == torch.float64 else torch.float32
    n, c = logits_ulb_w.shape
    new = logits_lb.new_empty
    return (new((), dtype=acc), new((3,), dtype=acc), new((n,), dtype=acc),
            new((n,), dtype=torch.int64), new((c,), dtype=acc),
            torch.empty_like(logits_lb, memory_format=torch.contiguous_format),
            torch.empty_like(logits_ulb_s, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    _loss, terms, mask, pseudo_labels, prior_batch, grad_lb, grad_ulb_s = output
    ctx.mark_non_differentiable(terms, mask, pseudo_labels, prior_batch, grad_lb, grad_ulb_s)
    ctx.set_materialize_grads(False)  # no zero [N, C] tensors for the outputs nobody differentiates
    ctx.save_for_backward(grad_lb, grad_ulb_s)


def _scale(saved: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    # dL/dz = saved gradient of the loss * incoming grad. The usual incoming grad is exactly 1
    # (loss.backward()): on a CPU, outside a compiled graph, reading it costs nothing, and when
    # the graph is not retained the saved gradient is released after this backward, so it is
    # handed on as it is (a detached alias that becomes its only owner), saving a full read and
    # write of it. With retain_graph the product is a fresh tensor, so the caller can never
    # change what a later backward reads.
    # Only for a plain eager tensor: under tracing (fake / functional tensor subclasses) the
    # value is unknown, and the multiply is what gets traced.
    if (type(grad_loss) is torch.Tensor and saved.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not torch._C._autograd._get_current_graph_task_keep_graph()
            and bool(grad_loss == 1)):
        return saved.detach()
    return saved * grad_loss.to(saved.dtype)


def _input_grads(ctx, grad_loss, need_lb: bool, need_s: bool, nargs: int):
    # z_w, the [C]/[NUM_HPARAMS] vectors and the prior weights get no gradient (stop-gradient /
    # no dependence). nargs: 10, or fewer from a caller that left out the defaulted trailing
    # prior_weight, distill_all.
    if grad_loss is None:
        return (None,) * nargs
    # The saved gradients are values, not functions of the logits: a graph of this backward
    # (create_graph=True) would carry a second derivative of 0. Refuse it rather than be wrong.
    if torch.is_grad_enabled():
        raise RuntimeError("adello fused kernels give first-order gradients only; for "
                           "create_graph=True (higher-order gradients) use backend='reference'")
    grad_lb, grad_ulb_s = ctx.saved_tensors
    g_lb = _scale(grad_lb, grad_loss) if need_lb else None
    g_s = _scale(grad_ulb_s, grad_loss) if need_s else None
    return (g_lb, None, None, g_s) + (None,) * (nargs - 4)


def _backward(ctx, grad_loss, *_unused):
    return _input_grads(ctx, grad_loss, ctx.needs_input_grad[0], ctx.needs_input_grad[3],
                        len(ctx.needs_input_grad))


for _name in OP_NAMES:
    torch.library.register_fake("adello::" + _name)(_fake)
    torch.library.register_autograd("adello::" + _name, _backward, setup_context=_setup_context)


class FusedStep(torch.autograd.Function):
    """The same autograd as registered above, as a plain autograd.Function: the fast path that
    `flexda_loss` and the GPU backends of `ADELLOLoss` call (register_autograd's generic wrapper
    costs ~80 us per forward and more per backward, as much as the whole kernel at CIFAR shapes;
    `ADELLOLoss(backend="cpu")` goes further, to one op with a C++ autograd: ops/step.py). Under
    torch.compile it is traced like any autograd.Function around the op."""

    @staticmethod
    def forward(ctx, op, *args):
        out = op(*args)
        _setup_context(ctx, args, out)
        return out

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        # needs_input_grad[0] is `op`; the op's arguments follow.
        return (None,) + _input_grads(ctx, grad_loss, ctx.needs_input_grad[1],
                                      ctx.needs_input_grad[4], len(ctx.needs_input_grad) - 1)


def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True when `adello::<op_name>` has a kernel registered for `dispatch_key` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("adello::" + op_name, dispatch_key)
