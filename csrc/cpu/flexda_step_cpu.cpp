// adello::flexda_step for CPU tensors: one ADELLOLoss forward in one call, with its autograd in
// C++ (schema, outputs and why: adello_kernels/ops/step.py).
//
//   CPU kernel          adello_prepare_cpu (alpha_t, ds, du, hparams from the state tensors),
//                       then flexda_fwd_cpu (the fused rows, gradients written in the forward).
//   AutogradCPU kernel  FlexdaStep, a torch::autograd::Function: the forward redispatches below
//                       autograd and saves the two gradient outputs; the backward returns
//                       grad_out * saved, since every normaliser is static (SPEC.md section 2):
//                       dloss/dlogits_lb = grad_lb, dloss/dlogits_ulb_s = grad_ulb_s, and the
//                       weak view, priors, step and temperature get no gradient.
#include <array>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "flexda_cpu.h"

namespace adello {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor>;
constexpr size_t kNumInputs = 17;  // tensors and scalars of the schema, in order

Outputs flexda_step_cpu(const at::Tensor& logits_lb, const at::Tensor& labels_lb,
                        const at::Tensor& logits_ulb_w, const at::Tensor& logits_ulb_s,
                        const at::Tensor& prior_lb, const at::Tensor& prior_ulb,
                        const at::Tensor& step, const at::Tensor& temperature,
                        int64_t total_steps, double alpha_min, double power,
                        int64_t distill_start, double lambda_u, double lambda_d, double eps,
                        bool flexda, double threshold) {
  const auto acc = logits_lb.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto [adj_lb, adj_ulb, hparams] =
      adello_prepare_cpu(prior_lb, prior_ulb, step, temperature, total_steps, alpha_min, power,
                         distill_start, lambda_u, lambda_d, eps, flexda, acc);
  auto [loss, terms, mask, pseudo_labels, prior_batch, grad_lb, grad_ulb_s] =
      flexda_fwd_cpu(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, adj_lb, adj_ulb, hparams,
                     threshold);
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

// grad_out * saved. loss.backward() feeds exactly 1, and when the graph is not retained the
// saved gradient is released right after this node runs: it is then handed on as it is (a
// detached alias that becomes its only owner), which saves a full read and write of it. With
// retain_graph the product is a fresh tensor, so the caller can never change what a later
// backward reads. Only for a plain CPU tensor that is not itself differentiated: under tracing
// (fake or functional tensors) or a functorch transform the value is unknown, and the multiply
// is what must be recorded.
at::Tensor scale_saved(const at::Tensor& saved, const at::Tensor& grad_out) {
  static const c10::DispatchKeySet kPlainCpu({c10::DispatchKey::CPU,
                                              c10::DispatchKey::AutogradCPU,
                                              c10::DispatchKey::ADInplaceOrView,
                                              c10::DispatchKey::AutocastCPU});
  // (Bitwise: DispatchKeySet's operator- keeps the backend bits.)
  const bool plain = (grad_out.key_set().raw_repr() & ~kPlainCpu.raw_repr()) == 0;
  if (plain && !grad_out.requires_grad() && grad_out.numel() == 1 &&
      !torch::autograd::get_current_graph_task_keep_graph() && grad_out.item<double>() == 1.0) {
    return saved.detach();
  }
  return saved * grad_out.to(saved.scalar_type());
}

class FlexdaStep : public torch::autograd::Function<FlexdaStep> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& logits_lb,
      const at::Tensor& labels_lb, const at::Tensor& logits_ulb_w,
      const at::Tensor& logits_ulb_s, const at::Tensor& prior_lb, const at::Tensor& prior_ulb,
      const at::Tensor& step, const at::Tensor& temperature, int64_t total_steps,
      double alpha_min, double power, int64_t distill_start, double lambda_u, double lambda_d,
      double eps, bool flexda, double threshold) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("adello::flexda_step", "")
                               .typed<decltype(flexda_step_cpu)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, loss_sup, loss_unsup, loss_distill, mask, pseudo_labels, prior_batch, grad_lb,
          grad_ulb_s] = op.call(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb,
                                prior_ulb, step, temperature, total_steps, alpha_min, power,
                                distill_start, lambda_u, lambda_d, eps, flexda, threshold);
    ctx->save_for_backward({grad_lb, grad_ulb_s});
    ctx->mark_non_differentiable({loss_sup, loss_unsup, loss_distill, mask, pseudo_labels,
                                  prior_batch, grad_lb, grad_ulb_s});
    ctx->set_materialize_grads(false);  // no zero tensors for the non-differentiable outputs
    return {loss, loss_sup, loss_unsup, loss_distill, mask, pseudo_labels, prior_batch, grad_lb,
            grad_ulb_s};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    torch::autograd::variable_list grads(kNumInputs);
    const at::Tensor& grad_loss = grad_outputs[0];
    if (!grad_loss.defined()) return grads;  // loss was not used
    // The saved gradients are values, not functions of the logits: a graph of this backward
    // (create_graph=True) would carry a second derivative of 0. Refuse it rather than be wrong.
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "adello::flexda_step: the fused kernels give first-order gradients only; for "
                "create_graph=True (higher-order gradients) use backend='reference'");
    const auto saved = ctx->get_saved_variables();
    if (ctx->needs_input_grad(0)) grads[0] = scale_saved(saved[0], grad_loss);
    if (ctx->needs_input_grad(3)) grads[3] = scale_saved(saved[1], grad_loss);
    return grads;
  }
};

Outputs flexda_step_autograd(const at::Tensor& logits_lb, const at::Tensor& labels_lb,
                             const at::Tensor& logits_ulb_w, const at::Tensor& logits_ulb_s,
                             const at::Tensor& prior_lb, const at::Tensor& prior_ulb,
                             const at::Tensor& step, const at::Tensor& temperature,
                             int64_t total_steps, double alpha_min, double power,
                             int64_t distill_start, double lambda_u, double lambda_d, double eps,
                             bool flexda, double threshold) {
  const auto out = FlexdaStep::apply(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb,
                                     prior_ulb, step, temperature, total_steps, alpha_min, power,
                                     distill_start, lambda_u, lambda_d, eps, flexda, threshold);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
}

}  // namespace
}  // namespace adello

TORCH_LIBRARY_IMPL(adello, CPU, m) {
  m.impl("flexda_step", &adello::flexda_step_cpu);
}

TORCH_LIBRARY_IMPL(adello, AutogradCPU, m) {
  m.impl("flexda_step", &adello::flexda_step_autograd);
}
