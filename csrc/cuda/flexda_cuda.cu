// adello::flexda_fwd for the CUDA dispatch key: the fused rows and the deterministic reduce
// (csrc/cuda/flexda_kernels.cuh), with the adjustments and hyperparameters given as tensors
// (hparams, csrc/adello_hparams.h, is read on the device, prior_em included: no host sync),
// and the optional [N] prior weights of the batch prior (prior_weight, read on the device).
// The op's contract: adello_kernels/ops/flexda.py.
#include "flexda_kernels.cuh"

namespace adello {
namespace {

void check_vector(const at::Tensor& v, const char* name, int64_t size, at::ScalarType acc,
                  const at::Tensor& like) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == size, "adello::flexda_fwd: ", name,
                    " must have shape [", size, "], got ", v.sizes());
  TORCH_CHECK_VALUE(v.scalar_type() == acc, "adello::flexda_fwd: ", name, " must be ", acc,
                    " (the accumulate dtype of ", like.scalar_type(), " logits), got ",
                    v.scalar_type());
  TORCH_CHECK_VALUE(v.device() == like.device(), "adello::flexda_fwd: ", name, " is on ",
                    v.device(), " but the logits are on ", like.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
flexda_fwd_cuda(const at::Tensor& logits_lb, const at::Tensor& labels_lb,
                const at::Tensor& logits_ulb_w, const at::Tensor& logits_ulb_s,
                const at::Tensor& adj_lb, const at::Tensor& adj_ulb, const at::Tensor& hparams,
                double threshold, const std::optional<at::Tensor>& prior_weight,
                bool distill_all) {
  constexpr const char* kOp = "adello::flexda_fwd";
#ifndef ADELLO_CUDA_EMULATION
  TORCH_CHECK_VALUE(logits_lb.is_cuda(), kOp, ": logits_lb must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits_lb.device());
  const AdelloStream stream = c10::cuda::getCurrentCUDAStream();
#else
  const AdelloStream stream = 0;
#endif
  const at::ScalarType acc = check_logits(kOp, logits_lb, labels_lb, logits_ulb_w, logits_ulb_s);
  const int64_t C = logits_lb.size(1);
  check_vector(adj_lb, "adj_lb", C, acc, logits_lb);
  check_vector(adj_ulb, "adj_ulb", C, acc, logits_lb);
  check_vector(hparams, "hparams", kNumHParams, acc, logits_lb);
  const at::Tensor* weight = prior_weight_arg(kOp, prior_weight, logits_ulb_w, acc);
  FlexdaOutputs o = flexda_launch<false>(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s,
                                         &adj_lb, &adj_ulb, &hparams, StepArgs{}, threshold,
                                         weight, distill_all, stream);
  return {o.loss, o.terms[0], o.mask, o.pseudo, o.prior, o.grad_lb, o.grad_s};
}

}  // namespace
}  // namespace adello

#ifndef ADELLO_CUDA_EMULATION
TORCH_LIBRARY_IMPL(adello, CUDA, m) { m.impl("flexda_fwd", &adello::flexda_fwd_cuda); }
#endif
