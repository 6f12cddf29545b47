// adello::flexda_fwd for the CPU dispatch key: argument checks, output allocation, the choice of
// the vectorised kernel (flexda_cpu_kernel_impl.h, one build per instruction set) and the
// registration. The schema lives in adello_kernels/ops/flexda.py; the math in docs/method.md
// and beside the kernel.
#include "flexda_cpu.h"

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include "flexda_cpu_kernel.h"

namespace adello {
namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

// torch's CPU capability (honours ATEN_CPU_CAPABILITY), limited to the builds this library has.
Isa select_isa() {
  static const Isa isa = [] {
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512" && flexda_cpu::kernels_avx512().f32 != nullptr) return Isa::kAvx512;
    if ((cap == "AVX512" || cap == "AVX2") && flexda_cpu::kernels_avx2().f32 != nullptr) {
      return Isa::kAvx2;
    }
    return Isa::kGeneric;
  }();
  return isa;
}

flexda_cpu::KernelTable kernel_table() {
  switch (select_isa()) {
    case Isa::kAvx512: return flexda_cpu::kernels_avx512();
    case Isa::kAvx2: return flexda_cpu::kernels_avx2();
    default: return flexda_cpu::kernels_generic();
  }
}

// Gradient outputs come from a small cache of recently freed buffers. Every training step
// allocates the same two [B, C] / [N, C] gradients; at large shapes the system allocator maps
// fresh pages for them each time (glibc serves >= 32 MB with mmap), and the kernel's first
// touch of each 4 KiB page then costs a page fault that zeroes it: for the 32 MB strong-view
// gradient at the large-c shape, more time than the kernel's own work. A buffer freed by the
// previous step (the saved gradient, or the .grad it became) is reused as it is.
// At most kMaxBuffers buffers / kMaxBytes bytes are kept; ADELLO_CPU_GRAD_CACHE=0 disables it.
class GradBufferCache final : public c10::Allocator {
 public:
  static GradBufferCache* get() {
    static GradBufferCache* cache = new GradBufferCache();  // leaked: frees may come at exit
    return cache;
  }

  bool enabled() const { return enabled_; }

  c10::DataPtr allocate(size_t nbytes) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (size_t j = free_.size(); j-- > 0;) {
        if (free_[j]->nbytes == nbytes) {
          Block* b = free_[j];
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(j));
          cached_bytes_ -= nbytes;
          return {b->ptr, b, &release, c10::Device(c10::DeviceType::CPU)};
        }
      }
    }
    Block* b = new Block{c10::alloc_cpu(nbytes), nbytes};
    return {b->ptr, b, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }

 private:
  struct Block {
    void* ptr;
    size_t nbytes;
  };
  static constexpr size_t kMaxBuffers = 4;
  static constexpr size_t kMaxBytes = size_t(512) << 20;

  GradBufferCache() {
    const char* env = std::getenv("ADELLO_CPU_GRAD_CACHE");
    enabled_ = env == nullptr || std::strcmp(env, "0") != 0;
  }

  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    GradBufferCache* cache = get();
    {
      std::lock_guard<std::mutex> lock(cache->mu_);
      if (cache->free_.size() == kMaxBuffers) {  // evict the oldest
        Block* old = cache->free_.front();
        cache->free_.erase(cache->free_.begin());
        cache->cached_bytes_ -= old->nbytes;
        c10::free_cpu(old->ptr);
        delete old;
      }
      if (cache->cached_bytes_ + b->nbytes <= kMaxBytes) {
        cache->free_.push_back(b);
        cache->cached_bytes_ += b->nbytes;
        return;
      }
    }
    c10::free_cpu(b->ptr);
    delete b;
  }

  std::mutex mu_;
  std::vector<Block*> free_;  // oldest first
  size_t cached_bytes_ = 0;
  bool enabled_ = true;
};

// A contiguous [rows, C] gradient: from the cache when it is large enough to matter.
at::Tensor empty_grad(int64_t rows, int64_t cols, const at::TensorOptions& opts) {
  constexpr int64_t kMinBytes = int64_t(1) << 20;  // smaller ones stay in malloc's own free lists
  GradBufferCache* cache = GradBufferCache::get();
  if (!cache->enabled() ||
      rows * cols * static_cast<int64_t>(c10::elementSize(opts.dtype().toScalarType())) <
          kMinBytes) {
    return at::empty({rows, cols}, opts);
  }
  return at::detail::empty_generic({rows, cols}, cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   opts.dtype().toScalarType(), c10::MemoryFormat::Contiguous);
}

void check_logits(const at::Tensor& x, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(x.device().is_cpu(), "flexda_fwd (CPU): ", name, " must be a CPU tensor, got ",
              x.device());
  TORCH_CHECK(x.dim() == 2, "flexda_fwd: ", name, " must be 2-d, got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "flexda_fwd: ", name, " has dtype ",
              x.scalar_type(), " but logits_lb has ", ref.scalar_type());
  TORCH_CHECK(x.size(1) == ref.size(1), "flexda_fwd: ", name, " has ", x.size(1),
              " classes but logits_lb has ", ref.size(1));
}

void check_vector(const at::Tensor& x, const char* name, int64_t n, at::ScalarType acc) {
  TORCH_CHECK(x.device().is_cpu(), "flexda_fwd (CPU): ", name, " must be a CPU tensor, got ",
              x.device());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, "flexda_fwd: ", name, " must have shape (", n,
              ",), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == acc, "flexda_fwd: ", name, " must be ", acc, ", got ",
              x.scalar_type());
}

}  // namespace

void flexda_cpu_adjustments(const double* prior_lb, const double* prior_ulb,
                            const double* prior_target, int64_t C, double alpha, double eps,
                            double* workspace, double* adj_lb, double* adj_ulb) {
  kernel_table().adjust(prior_lb, prior_ulb, prior_target, C, alpha, eps, workspace, adj_lb,
                        adj_ulb);
}

const char* flexda_cpu_isa() {
  switch (select_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
flexda_fwd_cpu(const at::Tensor& logits_lb, const at::Tensor& labels_lb,
               const at::Tensor& logits_ulb_w, const at::Tensor& logits_ulb_s,
               const at::Tensor& adj_lb, const at::Tensor& adj_ulb, const at::Tensor& hparams,
               double threshold, const std::optional<at::Tensor>& prior_weight,
               bool distill_all) {
  // Second line of defence: flexda_loss validates with ValueErrors naming the argument.
  const auto dtype = logits_lb.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 ||
                  dtype == at::kHalf,
              "flexda_fwd: logits must be float32, float64, bfloat16 or float16, got ", dtype);
  check_logits(logits_lb, "logits_lb", logits_lb);
  check_logits(logits_ulb_w, "logits_ulb_w", logits_lb);
  check_logits(logits_ulb_s, "logits_ulb_s", logits_lb);
  TORCH_CHECK(logits_ulb_s.size(0) == logits_ulb_w.size(0), "flexda_fwd: logits_ulb_s has ",
              logits_ulb_s.size(0), " rows but logits_ulb_w has ", logits_ulb_w.size(0));
  const int64_t B = logits_lb.size(0), N = logits_ulb_w.size(0), C = logits_lb.size(1);
  TORCH_CHECK(B >= 1 && N >= 1 && C >= 1, "flexda_fwd: needs B, N, C >= 1, got B=", B, " N=", N,
              " C=", C);
  TORCH_CHECK(labels_lb.device().is_cpu() && labels_lb.scalar_type() == at::kLong &&
                  labels_lb.dim() == 1 && labels_lb.size(0) == B,
              "flexda_fwd: labels_lb must be a CPU int64 tensor of shape (", B, ",), got ",
              labels_lb.scalar_type(), " ", labels_lb.sizes(), " on ", labels_lb.device());
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  check_vector(adj_lb, "adj_lb", C, acc);
  check_vector(adj_ulb, "adj_ulb", C, acc);
  check_vector(hparams, "hparams", kNumHParams, acc);
  TORCH_CHECK(threshold > 0.0 && threshold <= 1.0, "flexda_fwd: threshold must lie in (0, 1], "
              "got ", threshold);
  const bool weighted = prior_weight.has_value() && prior_weight->defined();
  if (weighted) check_vector(*prior_weight, "prior_weight", N, acc);

  // Strided inputs are copied once; contiguous ones (the usual case) are used as they are.
  const at::Tensor zl = logits_lb.contiguous(), zw = logits_ulb_w.contiguous(),
                   zs = logits_ulb_s.contiguous(), y = labels_lb.contiguous(),
                   ds = adj_lb.contiguous(), du = adj_ulb.contiguous(),
                   w = weighted ? prior_weight->contiguous() : at::Tensor();
  // hparams is on the CPU, so reading it here costs no device sync.
  const at::Tensor hp = hparams.contiguous();
  double h[kNumHParams];
  for (int j = 0; j < kNumHParams; ++j) {
    h[j] = acc == at::kDouble ? hp.const_data_ptr<double>()[j]
                              : static_cast<double>(hp.const_data_ptr<float>()[j]);
  }
  TORCH_CHECK(!(h[kHpTemperature] <= 0.0), "flexda_fwd: the temperature hparams[",
              kHpTemperature, "] must be positive, got ", h[kHpTemperature]);

  // Labels are not range-checked here (that is the caller's validation): a label outside
  // [0, C) makes its row's cross-entropy and gradient row NaN, as on every backend.
  const int64_t* labels = y.const_data_ptr<int64_t>();

  const auto acc_opts = zl.options().dtype(acc);
  at::Tensor loss = at::empty({}, acc_opts);
  at::Tensor terms = at::empty({3}, acc_opts);
  at::Tensor mask = at::empty({N}, acc_opts);
  at::Tensor pseudo_labels = at::empty({N}, zl.options().dtype(at::kLong));
  at::Tensor prior_batch = at::empty({C}, acc_opts);
  at::Tensor grad_lb = empty_grad(B, C, zl.options());
  at::Tensor grad_ulb_s = empty_grad(N, C, zl.options());

  flexda_cpu::Args args;
  args.logits_lb = zl.const_data_ptr();
  args.labels_lb = labels;
  args.logits_ulb_w = zw.const_data_ptr();
  args.logits_ulb_s = zs.const_data_ptr();
  args.adj_lb = ds.const_data_ptr();
  args.adj_ulb = du.const_data_ptr();
  args.prior_weight = weighted ? w.const_data_ptr() : nullptr;
  args.B = B;
  args.N = N;
  args.C = C;
  args.lambda_u = h[kHpLambdaU];
  args.lambda_d = h[kHpLambdaD];
  args.gate = h[kHpGate] != 0.0;
  args.temperature = h[kHpTemperature];
  args.prior_em = h[kHpPriorEm] != 0.0;
  args.distill_all = distill_all;
  args.threshold = threshold;
  args.loss = loss.data_ptr();
  args.terms = terms.data_ptr();
  args.mask = mask.data_ptr();
  args.pseudo_labels = pseudo_labels.data_ptr<int64_t>();
  args.prior_batch = prior_batch.data_ptr();
  args.grad_lb = grad_lb.data_ptr();
  args.grad_ulb_s = grad_ulb_s.data_ptr();

  const flexda_cpu::KernelTable table = kernel_table();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "flexda_fwd_cpu", [&] {
    table.get<scalar_t>()(args);
  });
  return {loss, terms, mask, pseudo_labels, prior_batch, grad_lb, grad_ulb_s};
}

}  // namespace adello

TORCH_LIBRARY_IMPL(adello, CPU, m) {
  m.impl("flexda_fwd", &adello::flexda_fwd_cpu);
}
