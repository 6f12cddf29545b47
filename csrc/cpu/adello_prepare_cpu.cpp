// adello::adello_prepare for the CPU dispatch key: the O(C) prologue of one ADELLOLoss step in a
// single call (the schema and a PyTorch implementation used on other devices live in
// adello_kernels/ops/state.py). At the small shapes of CIFAR training the fused row kernel takes
// tens of microseconds, so the ~25 small tensor ops this replaces would otherwise dominate a step.
//
//   alpha_t = 1 - (1 - alpha_min) * clamp(t / T_max, 0, 1) ** power
//   Qa      = Q ** alpha_t / sum(Q ** alpha_t)                (0 ** 0 = 1, as torch.pow)
//   ds      = log(P_L + eps) - log(Qa + eps)                  (labeled-logit adjustment)
//   du      = log(Q + eps)   - log(Qa + eps)                  (strong-logit adjustment)
//   hparams = (lambda_u, lambda_d, [t >= t0], T)
// computed in double and rounded once to the accumulate dtype; flexda = false gives ds = du = 0.
// Reading the 0-d `step` and `temperature` here is a plain memory read: they are CPU tensors.
#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "flexda_cpu.h"

namespace adello {
namespace {

template <typename T>
void read_vector(const at::Tensor& x, std::vector<double>& out) {
  const auto xc = x.contiguous();
  const T* p = xc.data_ptr<T>();
  for (int64_t i = 0; i < xc.numel(); ++i) out[i] = static_cast<double>(p[i]);
}

std::vector<double> as_doubles(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 1, "adello_prepare: ", name,
              " must be a 1-d CPU tensor, got ", x.sizes(), " on ", x.device());
  std::vector<double> out(x.numel());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adello_prepare", [&] {
    read_vector<scalar_t>(x, out);
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> adello_prepare_cpu(
    const at::Tensor& prior_lb, const at::Tensor& prior_ulb, const at::Tensor& step,
    const at::Tensor& temperature, int64_t total_steps, double alpha_min, double power,
    int64_t distill_start, double lambda_u, double lambda_d, double eps, bool flexda,
    at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "adello_prepare: dtype must be float32 or float64, got ", dtype);
  TORCH_CHECK(total_steps > 0, "adello_prepare: total_steps must be positive");
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong && step.device().is_cpu(),
              "adello_prepare: step must be a 0-d int64 CPU tensor");
  TORCH_CHECK(temperature.numel() == 1 && temperature.device().is_cpu(),
              "adello_prepare: temperature must be a 0-d CPU tensor");
  const std::vector<double> p_l = as_doubles(prior_lb, "prior_lb");
  const std::vector<double> q = as_doubles(prior_ulb, "prior_ulb");
  const int64_t c = static_cast<int64_t>(q.size());
  TORCH_CHECK(static_cast<int64_t>(p_l.size()) == c, "adello_prepare: prior_lb has ", p_l.size(),
              " classes but prior_ulb has ", c);

  const int64_t t = step.item<int64_t>();
  const auto opts = at::TensorOptions().dtype(dtype).device(at::kCPU);
  at::Tensor adj_lb = at::empty({c}, opts);
  at::Tensor adj_ulb = at::empty({c}, opts);
  at::Tensor hparams = at::empty({4}, opts);

  AT_DISPATCH_FLOATING_TYPES(dtype, "adello_prepare", [&] {
    scalar_t* ds = adj_lb.data_ptr<scalar_t>();
    scalar_t* du = adj_ulb.data_ptr<scalar_t>();
    if (!flexda) {
      for (int64_t i = 0; i < c; ++i) ds[i] = du[i] = scalar_t(0);
    } else {
      const double frac = std::min(std::max(static_cast<double>(t) / total_steps, 0.0), 1.0);
      const double alpha = 1.0 - (1.0 - alpha_min) * std::pow(frac, power);
      std::vector<double> q_alpha(c);
      double z = 0.0;
      for (int64_t i = 0; i < c; ++i) z += (q_alpha[i] = std::pow(q[i], alpha));
      for (int64_t i = 0; i < c; ++i) {
        const double log_qa = std::log(q_alpha[i] / z + eps);
        ds[i] = static_cast<scalar_t>(std::log(p_l[i] + eps) - log_qa);
        du[i] = static_cast<scalar_t>(std::log(q[i] + eps) - log_qa);
      }
    }
    scalar_t* hp = hparams.data_ptr<scalar_t>();
    hp[0] = static_cast<scalar_t>(lambda_u);
    hp[1] = static_cast<scalar_t>(lambda_d);
    hp[2] = t >= distill_start ? scalar_t(1) : scalar_t(0);
    hp[3] = static_cast<scalar_t>(temperature.item<double>());
  });
  return {adj_lb, adj_ulb, hparams};
}

TORCH_LIBRARY_IMPL(adello, CPU, m) {
  m.impl("adello_prepare", &adello_prepare_cpu);
}

}  // namespace adello
