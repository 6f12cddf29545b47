// The autograd of adello::flexda_step, in C++ for every device (registered at the Autograd alias
// key: CPU and CUDA tensors alike), so that neither the forward nor the backward of a training
// step enters Python. Schema and semantics: adello_kernels/ops/step.py.
//
// Forward: redispatch below autograd to the device kernel, save the two gradient outputs, bump
// the version counters of the state it mutated (this kernel skips ADInplaceOrView, which would
// otherwise do it), mark every output but `loss` non-differentiable.
//
// Backward: every normaliser of the loss is static (docs/method.md, Gradients), so
// dloss/dlogits_lb = grad_lb and dloss/dlogits_ulb_s = grad_ulb_s exactly, and the input
// gradients are those times the incoming grad g. The weak view, priors, step and temperature
// get none.
//   - Plain eager g, graph not retained: the saved gradients are released after this node, so
//     they are scaled in place by adello::scale_grads_ (one launch for both on a GPU, which
//     returns at once when g == 1 -- the usual loss.backward()) and handed on as they are.
//   - retain_graph, or g under tracing / a functorch transform: a fresh product g * saved, so
//     a caller can never change what a later backward reads, and the multiply is what gets
//     recorded.
//   - create_graph=True: refused (the saved gradients are values, so a graph of this backward
//     would carry a second derivative of 0).
#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

namespace adello {
namespace {

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                           at::Tensor, at::Tensor, at::Tensor>;
using StepFn = Outputs(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                       const at::Tensor&, int64_t, double, double, int64_t, double, double,
                       double, bool, double, double, bool, bool,
                       const std::optional<at::Tensor>&, int64_t,
                       const std::optional<at::Tensor>&, bool);
constexpr size_t kNumInputs = 25;  // tensors and scalars of the schema, in order
constexpr size_t kLogitsLb = 0, kLogitsUlbS = 3;

// True for an ordinary tensor of a real device: no tracing (Python / functionalization / fake)
// or functorch keys, whose values are unknown or must be recorded. (Bitwise: DispatchKeySet's
// operator- keeps the backend bits.)
bool is_plain(const at::Tensor& t) {
  static const c10::DispatchKeySet kPlain({
      c10::DispatchKey::CPU, c10::DispatchKey::CUDA, c10::DispatchKey::AutogradCPU,
      c10::DispatchKey::AutogradCUDA, c10::DispatchKey::ADInplaceOrView,
      c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA});
  return (t.key_set().raw_repr() & ~kPlain.raw_repr()) == 0;
}

class FlexdaStep : public torch::autograd::Function<FlexdaStep> {
 public:
  static torch::autograd::variable_list forward(
      torch::autograd::AutogradContext* ctx, const at::Tensor& logits_lb,
      const at::Tensor& labels_lb, const at::Tensor& logits_ulb_w,
      const at::Tensor& logits_ulb_s, const at::Tensor& prior_lb, at::Tensor prior_ulb,
      at::Tensor step, at::Tensor skipped_updates, const at::Tensor& temperature,
      int64_t total_steps, double alpha_min, double power, int64_t distill_start,
      double lambda_u, double lambda_d, double eps, bool flexda, double threshold,
      double prior_momentum, bool update, bool prior_em,
      const std::optional<at::Tensor>& prior_target, int64_t alpha_epoch_steps,
      const std::optional<at::Tensor>& prior_weight, bool distill_all) {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("adello::flexda_step", "")
                               .typed<StepFn>();
    Outputs out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = op.call(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb, prior_ulb, step,
                    skipped_updates, temperature, total_steps, alpha_min, power, distill_start,
                    lambda_u, lambda_d, eps, flexda, threshold, prior_momentum, update,
                    prior_em, prior_target, alpha_epoch_steps, prior_weight, distill_all);
    }
    if (update) {
      for (const at::Tensor* s : {&prior_ulb, &step, &skipped_updates}) {
        torch::autograd::impl::bump_version(*s);
      }
    }
    auto& [loss, loss_sup, loss_unsup, loss_distill, mask, pseudo_labels, prior_batch, grad_lb,
           grad_ulb_s] = out;
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
    const at::Tensor& g = grad_outputs[0];
    if (!g.defined()) return grads;  // loss was not used
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "adello::flexda_step: the fused kernels give first-order gradients only; for "
                "create_graph=True (higher-order gradients) use backend='reference'");
    const auto saved = ctx->get_saved_variables();
    const bool need_lb = ctx->needs_input_grad(kLogitsLb);
    const bool need_s = ctx->needs_input_grad(kLogitsUlbS);
    if (!need_lb && !need_s) return grads;
    if (is_plain(g) && !g.requires_grad() && g.numel() == 1 &&
        !torch::autograd::get_current_graph_task_keep_graph()) {
      static const auto scale = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("adello::scale_grads_", "")
                                    .typed<void(at::Tensor&, at::Tensor&, const at::Tensor&)>();
      at::Tensor lb = need_lb ? saved[0].detach() : at::empty({0}, saved[0].options());
      at::Tensor s = need_s ? saved[1].detach() : at::empty({0}, saved[1].options());
      scale.call(lb, s, g);
      if (need_lb) grads[kLogitsLb] = lb;
      if (need_s) grads[kLogitsUlbS] = s;
      return grads;
    }
    if (need_lb) grads[kLogitsLb] = saved[0] * g.to(saved[0].scalar_type());
    if (need_s) grads[kLogitsUlbS] = saved[1] * g.to(saved[1].scalar_type());
    return grads;
  }
};

Outputs flexda_step_autograd(const at::Tensor& logits_lb, const at::Tensor& labels_lb,
                             const at::Tensor& logits_ulb_w, const at::Tensor& logits_ulb_s,
                             const at::Tensor& prior_lb, at::Tensor& prior_ulb, at::Tensor& step,
                             at::Tensor& skipped_updates, const at::Tensor& temperature,
                             int64_t total_steps, double alpha_min, double power,
                             int64_t distill_start, double lambda_u, double lambda_d, double eps,
                             bool flexda, double threshold, double prior_momentum, bool update,
                             bool prior_em, const std::optional<at::Tensor>& prior_target,
                             int64_t alpha_epoch_steps,
                             const std::optional<at::Tensor>& prior_weight, bool distill_all) {
  const auto out = FlexdaStep::apply(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, prior_lb,
                                     prior_ulb, step, skipped_updates, temperature, total_steps,
                                     alpha_min, power, distill_start, lambda_u, lambda_d, eps,
                                     flexda, threshold, prior_momentum, update, prior_em,
                                     prior_target, alpha_epoch_steps, prior_weight, distill_all);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8]};
}

}  // namespace
}  // namespace adello

TORCH_LIBRARY_IMPL(adello, Autograd, m) {
  m.impl("flexda_step", &adello::flexda_step_autograd);
}
