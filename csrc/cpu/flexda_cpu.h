// Fused CPU kernel of adello::flexda_fwd: one ADELLO step (FlexDA + consistency distillation).
//
// The C++ entry point, callable without Python (the C++ smoke test does). The op schema is defined
// in adello_kernels/ops/flexda.py; csrc/cpu/flexda_cpu.cpp registers this function as its CPU
// kernel. Arguments and results are those of the schema (docs/contract.md):
//
//   logits_lb [B, C], labels_lb [B] int64, logits_ulb_w [N, C], logits_ulb_s [N, C]
//     (fp32, bf16, fp16 or fp64, all three logits the same dtype; any strides)
//   adj_lb [C], adj_ulb [C], hparams [5] = (lambda_u, lambda_d, distill_gate, T, prior_em) in
//     acc dtype
//     (fp64 for fp64 logits, fp32 otherwise); threshold tau in (0, 1]
//   -> loss 0-d, terms [3] = (L_s, L_u, gate ? L_d : 0), mask [N], pseudo_labels [N] int64,
//      prior_batch [C] (acc dtype; mean of softmax(z_w), or of softmax(z_w + du) when
//      prior_em != 0), grad_lb [B, C], grad_ulb_s [N, C] (logits dtype)
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "../adello_hparams.h"

namespace adello {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
flexda_fwd_cpu(const at::Tensor& logits_lb, const at::Tensor& labels_lb,
               const at::Tensor& logits_ulb_w, const at::Tensor& logits_ulb_s,
               const at::Tensor& adj_lb, const at::Tensor& adj_ulb, const at::Tensor& hparams,
               double threshold, const std::optional<at::Tensor>& prior_weight = std::nullopt,
               bool distill_all = false);

// The instruction set the kernel runs with in this process: "avx512", "avx2" or "generic".
// Follows torch's CPU capability (at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=avx2 or
// =default selects the narrower code), limited to what this build compiled.
const char* flexda_cpu_isa();

// The logit adjustments ds = adj_lb, du = adj_ulb of docs/method.md for alpha, in double, with
// the build's widest instruction set ([C] each; workspace: [C] scratch). The target prior Qa is
// flattened from `prior_target` (the released "adello_gt" mode), which may be prior_ulb itself.
void flexda_cpu_adjustments(const double* prior_lb, const double* prior_ulb,
                            const double* prior_target, int64_t C, double alpha, double eps,
                            double* workspace, double* adj_lb, double* adj_ulb);

// The O(C) prologue of adello::flexda_step (csrc/cpu/step_prologue_cpu.cpp): alpha_t from the
// step (per epoch of alpha_epoch_steps steps), then (adj_lb, adj_ulb, hparams) in `dtype` (ds,
// du computed in double, rounded once; Qa from prior_target when given, else from prior_ulb).
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_prologue_cpu(
    const at::Tensor& prior_lb, const at::Tensor& prior_ulb, const at::Tensor& step,
    const at::Tensor& temperature, int64_t total_steps, double alpha_min, double power,
    int64_t distill_start, double lambda_u, double lambda_d, double eps, bool flexda,
    bool prior_em, const std::optional<at::Tensor>& prior_target, int64_t alpha_epoch_steps,
    at::ScalarType dtype);

// The epilogue of adello::flexda_step (csrc/cpu/step_epilogue_cpu.cpp), in place: Q <- m Q +
// (1 - m) prior_batch unless prior_batch is not finite (then skipped_updates += 1) or
// `no_rows` (every prior weight is 0: nothing to estimate from, nothing counted); step += 1.
void step_epilogue_cpu(at::Tensor& prior_ulb, at::Tensor& step, at::Tensor& skipped_updates,
                       const at::Tensor& prior_batch, double momentum, bool no_rows = false);

}  // namespace adello
