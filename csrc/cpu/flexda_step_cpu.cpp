// adello::flexda_step and adello::scale_grads_ for CPU tensors (schema, outputs and why:
// adello_kernels/ops/step.py). The autograd of flexda_step is device-generic C++:
// csrc/flexda_step_autograd.cpp.
//
//   flexda_step   step_prologue_cpu (alpha_t, ds, du, hparams from the state tensors and
//                 prior_em), then
//                 flexda_fwd_cpu (the fused rows, gradients written in the forward), then, when
//                 `update`, step_epilogue_cpu (prior EMA unless not finite, step += 1).
//   scale_grads_  both gradients times the incoming grad, in place; nothing to do when it is 1.
#include <array>
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "flexda_cpu.h"

namespace adello {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor>;

Outputs flexda_step_cpu(const at::Tensor& logits_lb, const at::Tensor& labels_lb,
                        const at::Tensor& logits_ulb_w, const at::Tensor& logits_ulb_s,
                        const at::Tensor& prior_lb, at::Tensor& prior_ulb, at::Tensor& step,
                        at::Tensor& skipped_updates, const at::Tensor& temperature,
                        int64_t total_steps, double alpha_min, double power,
                        int64_t distill_start, double lambda_u, double lambda_d, double eps,
                        bool flexda, double threshold, double prior_momentum, bool update,
                        bool prior_em, const std::optional<at::Tensor>& prior_target,
                        int64_t alpha_epoch_steps,
                        const std::optional<at::Tensor>& prior_weight, bool distill_all) {
  TORCH_CHECK(prior_momentum >= 0.0 && prior_momentum < 1.0,
              "flexda_step: prior_momentum must lie in [0, 1), got ", prior_momentum);
  TORCH_CHECK(skipped_updates.numel() == 1 && skipped_updates.scalar_type() == at::kLong,
              "flexda_step: skipped_updates must be a 0-d int64 tensor");
  const auto acc = logits_lb.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // Every read of the state (Q_{t-1}, t, T) happens here, before the epilogue writes it.
  const auto [adj_lb, adj_ulb, hparams] =
      step_prologue_cpu(prior_lb, prior_ulb, step, temperature, total_steps, alpha_min, power,
                        distill_start, lambda_u, lambda_d, eps, flexda, prior_em, prior_target,
                        alpha_epoch_steps, acc);
  auto [loss, terms, mask, pseudo_labels, prior_batch, grad_lb, grad_ulb_s] =
      flexda_fwd_cpu(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, adj_lb, adj_ulb, hparams,
                     threshold, prior_weight, distill_all);
  if (update) {
    // every prior weight 0: the batch has no row to estimate from (checked by the kernel's
    // wrapper above: a [N] CPU tensor of the acc dtype)
    bool no_rows = false;
    if (prior_weight.has_value() && prior_weight->defined()) {
      no_rows = true;
      AT_DISPATCH_FLOATING_TYPES(prior_weight->scalar_type(), "flexda_step_cpu", [&] {
        const at::Tensor w = prior_weight->contiguous();
        const scalar_t* p = w.const_data_ptr<scalar_t>();
        for (int64_t i = 0; i < w.numel() && no_rows; ++i) no_rows = !(p[i] > scalar_t(0));
      });
    }
    step_epilogue_cpu(prior_ulb, step, skipped_updates, prior_batch, prior_momentum, no_rows);
  }
  // The three terms as separate 0-d tensors (an op's outputs may not alias one another).
  std::array<at::Tensor, 3> t;
  AT_DISPATCH_FLOATING_TYPES(acc, "flexda_step_cpu", [&] {
    const scalar_t* src = terms.const_data_ptr<scalar_t>();
    for (size_t j = 0; j < t.size(); ++j) {
      t[j] = at::empty({}, terms.options());
      *t[j].data_ptr<scalar_t>() = src[j];
    }
  });
  return {loss, t[0], t[1], t[2], mask, pseudo_labels, prior_batch, grad_lb, grad_ulb_s};
}

// Reading the 0-d grad on the CPU is a memory read, not a sync: when it is exactly 1 (the usual
// loss.backward()) the saved gradients already are the answer.
void scale_grads_cpu(at::Tensor& grad_lb, at::Tensor& grad_ulb_s, const at::Tensor& grad_loss) {
  TORCH_CHECK(grad_loss.numel() == 1, "scale_grads_: grad_loss must have one element, got ",
              grad_loss.numel());
  if (grad_loss.item<double>() == 1.0) return;
  for (at::Tensor* g : {&grad_lb, &grad_ulb_s}) {
    if (g->numel() > 0) g->mul_(grad_loss.to(g->scalar_type()));
  }
}

}  // namespace
}  // namespace adello

TORCH_LIBRARY_IMPL(adello, CPU, m) {
  m.impl("flexda_step", &adello::flexda_step_cpu);
  m.impl("scale_grads_", &adello::scale_grads_cpu);
}
