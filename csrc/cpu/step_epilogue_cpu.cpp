// The O(C) epilogue of adello::flexda_step on the CPU (csrc/cpu/flexda_step_cpu.cpp calls it
// after the row kernel when `update`), in place; the same update as ops/state.py update_prior_.
//
//   ok   = all(isfinite(prior_batch))
//   Q_t  = ok ? m * Q_{t-1} + (1 - m) * prior_batch : Q_{t-1}     (a non-finite step is skipped)
//   skipped_updates += !ok;  step += 1
// and when `no_rows` (prior weights given, none positive) only step += 1.
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include "flexda_cpu.h"

namespace adello {

void step_epilogue_cpu(at::Tensor& prior_ulb, at::Tensor& step, at::Tensor& skipped_updates,
                       const at::Tensor& prior_batch, double momentum, bool no_rows) {
  TORCH_CHECK(prior_ulb.device().is_cpu() && prior_ulb.dim() == 1 && prior_ulb.is_contiguous(),
              "flexda_step: prior_ulb must be a contiguous 1-d CPU tensor");
  TORCH_CHECK(prior_batch.device().is_cpu() && prior_batch.sizes() == prior_ulb.sizes(),
              "flexda_step: prior_batch must be a CPU tensor shaped like prior_ulb");
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong &&
                  skipped_updates.numel() == 1 && skipped_updates.scalar_type() == at::kLong,
              "flexda_step: step and skipped_updates must be 0-d int64 tensors");
  if (no_rows) {
    step.data_ptr<int64_t>()[0] += 1;
    return;
  }
  const at::Tensor pb = prior_batch.contiguous();
  const int64_t c = prior_ulb.numel();
  AT_DISPATCH_FLOATING_TYPES(prior_ulb.scalar_type(), "flexda_step_epilogue", [&] {
    using q_t = scalar_t;
    q_t* q = prior_ulb.data_ptr<q_t>();
    AT_DISPATCH_FLOATING_TYPES(pb.scalar_type(), "flexda_step_epilogue", [&] {
      const scalar_t* p = pb.data_ptr<scalar_t>();
      bool ok = true;
      for (int64_t i = 0; i < c; ++i) ok = ok && std::isfinite(static_cast<double>(p[i]));
      if (ok) {
        const q_t m = static_cast<q_t>(momentum);
        const q_t one_minus_m = static_cast<q_t>(1.0 - momentum);
        for (int64_t i = 0; i < c; ++i) q[i] = m * q[i] + one_minus_m * static_cast<q_t>(p[i]);
      } else {
        skipped_updates.data_ptr<int64_t>()[0] += 1;
      }
    });
  });
  step.data_ptr<int64_t>()[0] += 1;
}


}  // namespace adello
