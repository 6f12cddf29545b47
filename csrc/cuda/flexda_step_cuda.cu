// adello::flexda_step and adello::scale_grads_ for the CUDA dispatch key (schemas and semantics:
// adello_kernels/ops/step.py).
//
//   flexda_step   2 launches: the row kernel, which runs the step's prologue in every block from
//                 the state tensors on the device, and the finalize kernel, which reduces the
//                 per-block partials and, when `update`, applies the prior update and advances
//                 the counters (csrc/cuda/flexda_kernels.cuh). No host read of device values.
//                 `prior_em` (a host bool, a kernel argument: StepArgs::prior_em) selects the
//                 EM batch prior exactly as hparams[kHpPriorEm] does for flexda_fwd; the
//                 epilogue updates Q with whichever batch prior the rows produced.
//                 `prior_weight` ([N], acc dtype, on the device) weights the batch prior's rows
//                 as for flexda_fwd; the finalize kernel finds W == 0 on the device and then
//                 leaves Q and skipped_updates alone (step still advances): no host read.
//   scale_grads_  1 launch for both gradients (below); with flexda_step, forward + backward +
//                 prior update of one training step are 3 launches.
#include "flexda_kernels.cuh"

namespace adello {
namespace {

// ------------------------------------------------------------------------------------------------
// scale_grads_: grad_lb *= g and grad_ulb_s *= g, one grid over both tensors.
//
// Work items, in order: the 16-byte vectors of grad_lb, those of grad_ulb_s (a tensor whose data
// pointer is not 16-byte aligned contributes none), then the elements of both not covered by a
// vector, one item each; a grid-stride loop walks them. Every block first reads g (0-d, on the
// device, any float dtype) and returns at once when it is exactly 1 (the loss.backward() case:
// no memory traffic beyond one load per block). The product is g rounded to the gradient dtype
// times the element, computed in acc_t and rounded once, as `saved * grad.to(saved.dtype)`.
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct ScaleParams {
  scalar_t* a; int64_t na, va;  // elements, 16-byte vectors
  scalar_t* b; int64_t nb, vb;
  const void* g; int g_kind;
  int64_t items;
};

template <typename scalar_t>
__global__ void __launch_bounds__(256) scale_grads_kernel(const ScaleParams<scalar_t> p) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  constexpr int V = 16 / int(sizeof(scalar_t));
  using IO = VecIO<scalar_t, V>;
  const double g = load_as_double(p.g, p.g_kind, 0);
  if (g == 1.0) return;
  const acc_t gs = static_cast<acc_t>(static_cast<scalar_t>(g));
  const int64_t vec_items = p.va + p.vb;
  const int64_t tail_a = p.na - p.va * V;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.items;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (i < vec_items) {
      scalar_t* ptr = i < p.va ? p.a + i * V : p.b + (i - p.va) * V;
      acc_t x[V];
      IO::load(x, ptr, 1, 0, V, true, acc_t(0));
#pragma unroll
      for (int v = 0; v < V; ++v) x[v] *= gs;
      IO::store(ptr, 0, V, true, x);
    } else {
      const int64_t k = i - vec_items;
      scalar_t* ptr = k < tail_a ? p.a + p.va * V + k : p.b + p.vb * V + (k - tail_a);
      *ptr = static_cast<scalar_t>(static_cast<acc_t>(*ptr) * gs);
    }
  }
}

void check_grad(const at::Tensor& t, const char* name, const at::Tensor& grad_loss) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "adello::scale_grads_: ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == grad_loss.device(), "adello::scale_grads_: ", name, " is on ",
                    t.device(), " but grad_loss is on ", grad_loss.device());
}

void scale_grads_cuda(at::Tensor& grad_lb, at::Tensor& grad_ulb_s, const at::Tensor& grad_loss) {
#ifndef ADELLO_CUDA_EMULATION
  TORCH_CHECK_VALUE(grad_loss.is_cuda(), "adello::scale_grads_: grad_loss must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(grad_loss.device());
  const AdelloStream stream = c10::cuda::getCurrentCUDAStream();
#else
  const AdelloStream stream = 0;
#endif
  TORCH_CHECK_VALUE(grad_loss.numel() == 1 && at::isFloatingType(grad_loss.scalar_type()),
                    "adello::scale_grads_: grad_loss must be a 0-d float tensor, got ",
                    grad_loss.scalar_type(), " ", grad_loss.sizes());
  check_grad(grad_lb, "grad_lb", grad_loss);
  check_grad(grad_ulb_s, "grad_ulb_s", grad_loss);
  TORCH_CHECK_VALUE(grad_lb.scalar_type() == grad_ulb_s.scalar_type(),
                    "adello::scale_grads_: grad_lb (", grad_lb.scalar_type(),
                    ") and grad_ulb_s (", grad_ulb_s.scalar_type(), ") must share a dtype");
  const at::ScalarType dtype = grad_lb.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                        dtype == at::kDouble,
                    "adello::scale_grads_: grad_lb must be a float tensor, got ", dtype);
  if (grad_lb.numel() == 0 && grad_ulb_s.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "adello_scale_grads_cuda", [&] {
    constexpr int V = 16 / int(sizeof(scalar_t));
    ScaleParams<scalar_t> p{};
    auto vectors = [](const at::Tensor& t) -> int64_t {
      return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t.numel() / V : 0;
    };
    p.a = grad_lb.numel() ? grad_lb.data_ptr<scalar_t>() : nullptr;
    p.na = grad_lb.numel();
    p.va = p.na ? vectors(grad_lb) : 0;
    p.b = grad_ulb_s.numel() ? grad_ulb_s.data_ptr<scalar_t>() : nullptr;
    p.nb = grad_ulb_s.numel();
    p.vb = p.nb ? vectors(grad_ulb_s) : 0;
    p.g = grad_loss.const_data_ptr();
    p.g_kind = float_kind(grad_loss.scalar_type());
    p.items = p.va + p.vb + (p.na - p.va * V) + (p.nb - p.vb * V);
    constexpr int kThreads = 256;
    // Enough blocks to fill any current GPU several times over (a grid-stride loop does the rest).
    const int64_t blocks = std::min<int64_t>((p.items + kThreads - 1) / kThreads,
                                             2 * int64_t(ADELLO_GRID_CAP));
    auto* kernel = &scale_grads_kernel<scalar_t>;
    ADELLO_LAUNCH(kernel, static_cast<int>(blocks), kThreads, 0, stream, p);
  });
}

// ------------------------------------------------------------------------------------------------
// flexda_step
// ------------------------------------------------------------------------------------------------

void check_state_vector(const at::Tensor& v, const char* name, int64_t C, const at::Tensor& like) {
  TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == C, "adello::flexda_step: ", name,
                    " must have shape [", C, "], got ", v.sizes());
  TORCH_CHECK_VALUE(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble,
                    "adello::flexda_step: ", name, " must be float32 or float64, got ",
                    v.scalar_type());
  TORCH_CHECK_VALUE(v.device() == like.device(), "adello::flexda_step: ", name, " is on ",
                    v.device(), " but the logits are on ", like.device());
}

void check_counter(const at::Tensor& v, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(v.numel() == 1 && v.scalar_type() == at::kLong && v.device() == like.device(),
                    "adello::flexda_step: ", name, " must be a 0-d int64 tensor on ",
                    like.device(), ", got ", v.scalar_type(), " ", v.sizes(), " on ", v.device());
}

using StepOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                               at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

StepOutputs flexda_step_cuda(const at::Tensor& logits_lb, const at::Tensor& labels_lb,
                             const at::Tensor& logits_ulb_w, const at::Tensor& logits_ulb_s,
                             const at::Tensor& prior_lb, at::Tensor& prior_ulb, at::Tensor& step,
                             at::Tensor& skipped_updates, const at::Tensor& temperature,
                             int64_t total_steps, double alpha_min, double power,
                             int64_t distill_start, double lambda_u, double lambda_d, double eps,
                             bool flexda, double threshold, double prior_momentum, bool update,
                             bool prior_em, const std::optional<at::Tensor>& prior_target,
                             int64_t alpha_epoch_steps,
                             const std::optional<at::Tensor>& prior_weight,
                             bool distill_all) {
  constexpr const char* kOp = "adello::flexda_step";
#ifndef ADELLO_CUDA_EMULATION
  TORCH_CHECK_VALUE(logits_lb.is_cuda(), kOp, ": logits_lb must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(logits_lb.device());
  const AdelloStream stream = c10::cuda::getCurrentCUDAStream();
#else
  const AdelloStream stream = 0;
#endif
  const at::ScalarType acc = check_logits(kOp, logits_lb, labels_lb, logits_ulb_w, logits_ulb_s);
  const int64_t C = logits_lb.size(1);
  check_state_vector(prior_lb, "prior_lb", C, logits_lb);
  check_state_vector(prior_ulb, "prior_ulb", C, logits_lb);
  check_counter(step, "step", logits_lb);
  check_counter(skipped_updates, "skipped_updates", logits_lb);
  TORCH_CHECK_VALUE(temperature.numel() == 1 && at::isFloatingType(temperature.scalar_type()) &&
                        temperature.device() == logits_lb.device(),
                    kOp, ": temperature must be a 0-d float tensor on ", logits_lb.device());
  TORCH_CHECK_VALUE(total_steps > 0, kOp, ": total_steps must be positive, got ", total_steps);
  TORCH_CHECK_VALUE(alpha_epoch_steps >= 1 && alpha_epoch_steps <= total_steps, kOp,
                    ": alpha_epoch_steps must lie in [1, total_steps], got ", alpha_epoch_steps);
  const bool has_target = prior_target.has_value() && prior_target->defined();
  if (has_target) check_state_vector(*prior_target, "prior_target", C, logits_lb);
  TORCH_CHECK_VALUE(prior_momentum >= 0.0 && prior_momentum < 1.0, kOp,
                    ": prior_momentum must lie in [0, 1), got ", prior_momentum);
  const at::Tensor* weight = prior_weight_arg(kOp, prior_weight, logits_ulb_w, acc);

  StepArgs st{};
  st.prior_lb = prior_lb.const_data_ptr();
  st.prior_lb_s = prior_lb.stride(0);
  st.prior_lb_kind = float_kind(prior_lb.scalar_type());
  st.prior_ulb = prior_ulb.data_ptr();
  st.prior_ulb_s = prior_ulb.stride(0);
  st.prior_ulb_kind = float_kind(prior_ulb.scalar_type());
  const at::Tensor& target = has_target ? *prior_target : prior_ulb;
  st.prior_target = target.const_data_ptr();
  st.prior_target_s = target.stride(0);
  st.prior_target_kind = float_kind(target.scalar_type());
  st.step = step.data_ptr<int64_t>();
  st.skipped = skipped_updates.data_ptr<int64_t>();
  st.temperature = temperature.const_data_ptr();
  st.temperature_kind = float_kind(temperature.scalar_type());
  st.total_steps = total_steps;
  st.alpha_epoch_steps = alpha_epoch_steps;
  st.distill_start = distill_start;
  st.alpha_min = alpha_min;
  st.power = power;
  st.lambda_u = lambda_u;
  st.lambda_d = lambda_d;
  st.eps = eps;
  st.momentum = prior_momentum;
  st.flexda = flexda;
  st.update = update;
  st.prior_em = prior_em;  // read by every row block as flexda_fwd reads hparams[kHpPriorEm]
  FlexdaOutputs o = flexda_launch<true>(logits_lb, labels_lb, logits_ulb_w, logits_ulb_s, nullptr,
                                        nullptr, nullptr, st, threshold, weight, distill_all,
                                        stream);
  return {o.loss, o.terms[0], o.terms[1], o.terms[2], o.mask, o.pseudo, o.prior, o.grad_lb,
          o.grad_s};
}

}  // namespace
}  // namespace adello

#ifndef ADELLO_CUDA_EMULATION
TORCH_LIBRARY_IMPL(adello, CUDA, m) {
  m.impl("flexda_step", &adello::flexda_step_cuda);
  m.impl("scale_grads_", &adello::scale_grads_cuda);
}
#endif
