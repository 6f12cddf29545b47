// The O(C) prologue of adello::flexda_step on the CPU (csrc/cpu/flexda_step_cpu.cpp calls it
// before the row kernel; the op: adello_kernels/ops/step.py). At the small shapes of CIFAR
// training the fused row kernel takes tens of microseconds, so doing this with ~25 small tensor
// ops would dominate a step.
//
//   alpha_t = 1 - (1 - alpha_min) * clamp(u / U, 0, 1) ** power,  u = floor(t / n),
//             U = floor(T_max / n), n = alpha_epoch_steps (1: the per-step schedule t / T_max)
//   Qa      = R ** alpha_t / sum(R ** alpha_t)                (0 ** 0 = 1, as torch.pow)
//             R = prior_target when given (the released "adello_gt" mode), else Q
//   ds      = log(P_L + eps) - log(Qa + eps)                  (labeled-logit adjustment)
//   du      = log(Q + eps)   - log(Qa + eps)                  (strong-logit adjustment)
//   hparams = (lambda_u, lambda_d, [t >= t0], T, prior_em)
// computed in double (vectorised: flexda_cpu_adjustments, in the kernel's ISA builds) and rounded
// once to the accumulate dtype; flexda = false gives ds = du = 0. Reading the 0-d `step` and
// `temperature` here is a plain memory read: they are CPU tensors.
#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include "flexda_cpu.h"

namespace adello {
namespace {

// x (a 1-d CPU float tensor) as doubles, into out[0, numel).
void read_doubles(const at::Tensor& x, const char* name, double* out) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 1, "flexda_step: ", name,
              " must be a 1-d CPU tensor, got ", x.sizes(), " on ", x.device());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flexda_step_prologue", [&] {
    const scalar_t* p = x.const_data_ptr<scalar_t>();
    const int64_t stride = x.stride(0);
    for (int64_t i = 0; i < x.numel(); ++i) out[i] = static_cast<double>(p[i * stride]);
  });
}

// The value of a 0-d (or one-element) CPU tensor, read in place (no dispatcher call).
double read_scalar(const at::Tensor& x) {
  double v = 0.0;
  AT_DISPATCH_ALL_TYPES(x.scalar_type(), "flexda_step_prologue", [&] {
    v = static_cast<double>(*x.const_data_ptr<scalar_t>());
  });
  return v;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> step_prologue_cpu(
    const at::Tensor& prior_lb, const at::Tensor& prior_ulb, const at::Tensor& step,
    const at::Tensor& temperature, int64_t total_steps, double alpha_min, double power,
    int64_t distill_start, double lambda_u, double lambda_d, double eps, bool flexda,
    bool prior_em, const std::optional<at::Tensor>& prior_target, int64_t alpha_epoch_steps,
    at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "flexda_step: dtype must be float32 or float64, got ", dtype);
  TORCH_CHECK(total_steps > 0, "flexda_step: total_steps must be positive");
  TORCH_CHECK(alpha_epoch_steps >= 1 && alpha_epoch_steps <= total_steps,
              "flexda_step: alpha_epoch_steps must lie in [1, total_steps], got ",
              alpha_epoch_steps);
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong && step.device().is_cpu(),
              "flexda_step: step must be a 0-d int64 CPU tensor");
  TORCH_CHECK(temperature.numel() == 1 && temperature.device().is_cpu(),
              "flexda_step: temperature must be a 0-d CPU tensor");
  const int64_t c = prior_ulb.numel();
  TORCH_CHECK(prior_lb.numel() == c, "flexda_step: prior_lb has ", prior_lb.numel(),
              " classes but prior_ulb has ", c);
  const bool has_target = prior_target.has_value() && prior_target->defined();
  if (has_target) {
    TORCH_CHECK(prior_target->numel() == c, "flexda_step: prior_target has ",
                prior_target->numel(), " classes but prior_ulb has ", c);
  }
  const int64_t t = *step.const_data_ptr<int64_t>();
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  at::Tensor adj_lb = at::empty({c}, opts);
  at::Tensor adj_ulb = at::empty({c}, opts);
  at::Tensor hparams = at::empty({kNumHParams}, opts);

  // P_L, Q, a workspace and ds, du in double, rounded once into the outputs.
  // (The target prior, when given, in a sixth row after ds, du.)
  std::vector<double> buf(flexda ? (has_target ? 6 : 5) * c : 0);
  if (flexda) {
    double *p_l = buf.data(), *q = p_l + c, *work = q + c, *ds = work + c, *du = ds + c;
    double* r = q;
    read_doubles(prior_lb, "prior_lb", p_l);
    read_doubles(prior_ulb, "prior_ulb", q);
    if (has_target) {
      r = du + c;
      read_doubles(*prior_target, "prior_target", r);
    }
    // floor division of non-negative t (a negative step counts as 0 after the clamp anyway)
    const int64_t u = t >= 0 ? t / alpha_epoch_steps : 0;
    const double frac = std::min(
        std::max(static_cast<double>(u) / static_cast<double>(total_steps / alpha_epoch_steps),
                 0.0),
        1.0);
    const double alpha = 1.0 - (1.0 - alpha_min) * std::pow(frac, power);
    flexda_cpu_adjustments(p_l, q, r, c, alpha, eps, work, ds, du);
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "flexda_step_prologue", [&] {
    scalar_t* ds = adj_lb.data_ptr<scalar_t>();
    scalar_t* du = adj_ulb.data_ptr<scalar_t>();
    if (flexda) {
      std::copy(buf.begin() + 3 * c, buf.begin() + 4 * c, ds);  // narrowed once
      std::copy(buf.begin() + 4 * c, buf.begin() + 5 * c, du);
    } else {
      std::fill(ds, ds + c, scalar_t(0));
      std::fill(du, du + c, scalar_t(0));
    }
    scalar_t* hp = hparams.data_ptr<scalar_t>();
    hp[kHpLambdaU] = static_cast<scalar_t>(lambda_u);
    hp[kHpLambdaD] = static_cast<scalar_t>(lambda_d);
    hp[kHpGate] = t >= distill_start ? scalar_t(1) : scalar_t(0);
    hp[kHpTemperature] = static_cast<scalar_t>(read_scalar(temperature));
    hp[kHpPriorEm] = prior_em ? scalar_t(1) : scalar_t(0);
  });
  return {adj_lb, adj_ulb, hparams};
}

}  // namespace adello
