// The fused row kernels of adello::flexda_fwd (flexda_cuda.cu) and adello::flexda_step
// (flexda_step_cuda.cu), shared by both. Contracts: adello_kernels/ops/flexda.py and
// adello_kernels/ops/step.py; the math: docs/method.md; the oracle: adello_kernels/reference.py.
//
// Two launches per call on the current stream, both graph-capturable (no host sync, no host read
// of device values, memory only from torch's caching allocator):
//
//   1. flexda_rows_kernel / flexda_looped_kernel: every row of the step in one grid.
//        blocks [0, G_u)          unlabeled row pairs (weak row i and strong row i together)
//        blocks [G_u, G_u + G_l)  labeled rows
//      Each row writes its gradient row, and for unlabeled rows the mask and pseudo-label. The
//      per-row losses (registers) and the per-class sums of the batch prior's rows (per-thread
//      shared-memory slots, or the block's workspace row in the looped regime) are summed in row
//      order, then per block in a fixed order, into a small workspace of per-block partials.
//      The batch prior's row is softmax(z_w) (raw), or with hparams[kHpPriorEm] != 0 (flexda_fwd)
//      / prior_em (flexda_step) the EM row softmax(z_w + du) (see "EM batch prior" below).
//      flexda_step (STEP = true): every block first runs the O(C) prologue itself, from the state
//      tensors on the device: alpha_t from `step`, sum_c Q_c^alpha_t (a fixed-order block
//      reduction), then its own adjustment vector (ds for a labeled block, du for an unlabeled
//      one) in double, rounded once to acc_t, into dynamic shared memory; the gate from `step`,
//      T from `temperature`. No prologue launch, and the whole grid reads the state before the
//      finalize kernel (next in stream order) writes it. Why per block rather than once: a
//      separate prologue kernel is a launch plus a global round trip of ds/du, and a grid-wide
//      handoff inside one kernel needs co-resident blocks. The price is O(C) double math per
//      block (one pow and two logs per class): at the bandwidth shape (B = N = 65536, C = 1000,
//      64 rows per block) that is, by instruction count, a few percent of the block's row work,
//      and only the first wave's prologues are not overlapped with other blocks' streaming.
//   2. flexda_finalize_kernel: sums the partials in a fixed order -> loss, the three terms,
//      prior_batch; for flexda_step with `update`, also the epilogue (the prior update, step and
//      skipped-update counters), see flexda_finalize_kernel.
//   No float atomics anywhere: every sum has an order fixed by (B, N, C) only, so results are
//   bit-identical run to run (and across GPUs of any SM count).
//
// Row regimes (chosen on the host from C and the dtype, see choose_config):
//   C <= 1024: a warp per row (a 2-warp group for 512 < C <= 1024, see choose_config), the row
//              held in registers, reductions by warp shuffles (and one shared-memory step).
//   C <= 8192: a block of 128/256/512 threads per row, the row in registers, block reductions.
//   larger C : a block of 512 threads per row, looping over the row in chunks (online max/sum-exp,
//              see flexda_looped_kernel); the batch-prior partial lives in the workspace row of the
//              block instead of registers.
//   fp64 uses the warp regime up to C = 512 and the looped kernel beyond (register budget).
// Loads are 16-byte vectors when the row pointer is aligned and the column stride is 1 (checked
// per row at run time; otherwise scalar strided loads of the same elements), so unaligned and
// non-contiguous inputs need no copy.
//
// Labels outside [0, C) (validation off): that labeled row's cross-entropy is NaN and its
// gradient row is all NaN, without reading outside the row; the other rows are unaffected.
//
// EM batch prior (prior_em; a uniform branch on a device value, no host read): every weak row's
// contribution is pe_c = ew_c r_c / sum_c ew_c r_c = softmax(z_w + du)_c, with ew_c = exp(z_w,c -
// max z_w) the exps the weak pass already has and r_c = exp(du_c), du the acc_t strong-view
// adjustment exactly as the kernel adds it to the strong row (for flexda_step the prologue's
// copy, or the per-element recompute in the looped kernel beyond ADELLO_ADJ_SMEM_BYTES).
// r_c is computed per element where it is used (one expf of a value already in registers or
// shared memory), not cached: in a memory-bound kernel the MUFU has slack, a cached r would
// cost C more acc_t of shared memory per block (or EPT more registers per thread), and the same
// exp_acc of the same du gives the same bits wherever it is recomputed. The register tiers sum
// ew r together with ew (one pair reduce instead of the raw single sum), then add
// (ew r) / sum(ew r) to the prior slots, recomputing r there; the looped kernel keeps
// sum exp(z_w - m) r online next to sum exp(z_w - m) in its weak pass and multiplies pass 3's
// exps by r. A NaN weak logit makes both sums NaN, so the row's prior (and the batch prior) is
// NaN as in raw mode. With flexda off du = 0 and r = 1, so em forms the raw sums (the emulator
// test checks that em then gives the raw bits). Raw mode's arithmetic is unchanged.
//
// Prior weights (the optional [N] prior_weight of both ops; FlexdaParams::weight, nullptr when
// absent, and then every sum is formed exactly as without the feature, to the bit): each
// unlabeled row loads its weight w_i once (every thread of the row's group, one broadcast
// address) and folds it into the per-row scale of its prior contribution (kp = inv_sw * w_i raw,
// inv_se * w_i EM), so the per-element work is unchanged. A row with !(w_i > 0) adds nothing
// at all to the partial (not 0 * p_i: a NaN weak row's NaN must not reach the prior) and
// nothing to the block's weight sum wsum[block] (rows in loop order, groups in group order).
// The finalize kernel sums wsum in one fixed order in every block: W; prior_batch = (sum of
// partials) / W, all NaN when W == 0, and the step epilogue then leaves Q and skipped_updates
// alone (step += 1). The losses, mask, pseudo-labels and gradients never read the weight.
//
// Numerics: every quantity is accumulated in acc_t (fp32 for fp32/bf16/fp16 logits, fp64 for fp64);
// gradients are rounded once to the logits' dtype on store. expf/logf, not __expf/__logf:
// __expf(x) = ex2.approx(x * log2e) errs by up to 2 + floor(1.17|x|) ulp, i.e. ~3.6e-7 relative
// at x = -1 (1.3e-7 of the largest term, since e^-1 = 0.37) and below 1e-7 of the largest term
// anywhere else. That alone would fit the 1e-6 fp32 gradient budget, but the budget must also
// absorb the fp32 rounding of a = z_s + du (~1e-6 relative near |a| ~ 20) and of the sums;
// expf (2 ulp, full range) still issues one MUFU.EX2 plus a few FMAs of range reduction, cheap
// next to the MUFU, and keeps the kernel's own error at the 1e-7 level. Divisions by T are
// multiplications by 1/T applied to (a - max): ~2 ulp relative error of the exponent argument,
// i.e. |x| * 1.2e-7 relative error of exp(x), at most ~5e-8 of the largest term.
#pragma once

#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "../adello_hparams.h"

#ifndef ADELLO_CUDA_EMULATION
// c10's stream/guard headers, not ATen/cuda/CUDAContext.h: that one pulls in cuSPARSE/cuBLAS
// headers, which a bare CUDA toolkit (nvcc + cudart only) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define ADELLO_LAUNCH(kernel, grid, block, smem, stream, params) \
  do {                                                          \
    kernel<<<(grid), (block), (smem), (stream)>>>(params);      \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                             \
  } while (0)
// Dynamic shared memory beyond the default 48 KB needs the kernel's opt-in (a host attribute
// call, not a stream operation: allowed during graph capture).
#define ADELLO_ALLOW_SMEM(kernel, bytes)                                                   \
  C10_CUDA_CHECK(cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, \
                                      static_cast<int>(bytes)))
#define ADELLO_DYNAMIC_SMEM(name)            \
  extern __shared__ uint4 adello_dyn_smem[]; \
  unsigned char* name = reinterpret_cast<unsigned char*>(adello_dyn_smem)
using AdelloStream = cudaStream_t;
#endif
// (ADELLO_CUDA_EMULATION: tests/cuda_emulator.cpp includes the .cu files after defining the CUDA
// built-ins, ADELLO_LAUNCH, ADELLO_ALLOW_SMEM and ADELLO_DYNAMIC_SMEM for threads on the CPU, so
// the kernels' logic runs in CI without a GPU. Only the guarded host-side spots differ.)

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

// Shared-memory budget for the step's adjustment vector in the looped kernel (larger C
// recomputes each adjustment per element instead). 96 KB keeps two 512-thread blocks per SM on
// H100/H200 (228 KB) and fits A100's 163 KB opt-in limit. The emulator lowers it to test the
// recompute path at small C.
#ifndef ADELLO_ADJ_SMEM_BYTES
#define ADELLO_ADJ_SMEM_BYTES (96 * 1024)
#endif

namespace adello {
namespace {

// ------------------------------------------------------------------------------------------------
// Scalar helpers (overloads so one kernel body serves fp32 and fp64 accumulation)
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
// fmax ignores a NaN operand; a NaN logit still poisons the row through exp(NaN - m) in the sums.
// fmax is symmetric, which the butterfly reductions below rely on.
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }
template <typename A>
__device__ __forceinline__ A neg_inf() { return static_cast<A>(-INFINITY); }
template <typename A>
__device__ __forceinline__ A quiet_nan() { return static_cast<A>(NAN); }
// x - x is 0 exactly for finite x and NaN for +-inf and NaN (no fast-math anywhere).
template <typename A>
__device__ __forceinline__ bool is_finite(A x) { return x - x == A(0); }
// A product and a sum rounded separately (never contracted to an FMA): the prior update, and
// merges that must give the same bits in either operand order.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// ------------------------------------------------------------------------------------------------
// Kernel arguments
// ------------------------------------------------------------------------------------------------

// dtypes of the state tensors, read through a tag so that they add no template instances.
enum FloatKind : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

__device__ __forceinline__ double load_as_double(const void* ptr, int kind, int64_t i) {
  switch (kind) {
    case kF64: return static_cast<const double*>(ptr)[i];
    case kF16: return static_cast<double>(static_cast<float>(static_cast<const c10::Half*>(ptr)[i]));
    case kBF16:
      return static_cast<double>(static_cast<float>(static_cast<const c10::BFloat16*>(ptr)[i]));
    default: return static_cast<double>(static_cast<const float*>(ptr)[i]);
  }
}

// The state and scalar arguments of adello::flexda_step (read on the device).
struct StepArgs {
  const void* prior_lb;  int64_t prior_lb_s;  int prior_lb_kind;   // [C] P_L, fp32/fp64
  void* prior_ulb;       int64_t prior_ulb_s; int prior_ulb_kind;  // [C] Q, fp32/fp64, in place
  // [C] R, the prior the target Qa is flattened from: a fixed prior ("adello_gt"), or Q itself
  // (then these repeat prior_ulb's pointer, stride and kind)
  const void* prior_target; int64_t prior_target_s; int prior_target_kind;
  int64_t* step;                                                   // 0-d t, in place
  int64_t* skipped;                                                // 0-d, in place
  const void* temperature; int temperature_kind;                   // 0-d T, any float dtype
  int64_t total_steps, distill_start;
  int64_t alpha_epoch_steps;  // n >= 1: alpha from u = floor(t / n) over U = floor(T / n)
  double alpha_min, power, lambda_u, lambda_d, eps, momentum;
  bool flexda, update;
  bool prior_em;  // the EM batch prior (flexda_fwd: hparams[kHpPriorEm] != 0)
  bool adj_smem;  // the adjustment vector lives in dynamic shared memory (else recomputed)
};

template <typename scalar_t, typename acc_t>
struct FlexdaParams {
  const scalar_t* z_l;  int64_t z_l_rs, z_l_cs;   // [B, C] labeled logits (any strides)
  const int64_t* y;     int64_t y_s;              // [B] labels
  const scalar_t* z_w;  int64_t z_w_rs, z_w_cs;   // [N, C] weak view
  const scalar_t* z_s;  int64_t z_s_rs, z_s_cs;   // [N, C] strong view
  const acc_t* ds;      int64_t ds_s;             // [C] labeled adjustment (flexda_fwd)
  const acc_t* du;      int64_t du_s;             // [C] strong adjustment (flexda_fwd)
  const acc_t* hp;      int64_t hp_s;             // [kNumHParams] on device (flexda_fwd)
  StepArgs st;                                    // flexda_step: the state instead of ds/du/hp
  acc_t tau;                                      // threshold, compared in acc_t
  int64_t B, N;
  int C;
  int G_u, G_l;                                   // blocks for unlabeled / labeled rows
  acc_t* mask;                                    // [N]
  int64_t* pseudo;                                // [N]
  scalar_t* g_lb;                                 // [B, C] contiguous
  scalar_t* g_s;                                  // [N, C] contiguous
  acc_t* partial;                                 // [G_u, C] per-block sums of softmax(z_w)
  acc_t* loss_l;                                  // [G_l] per-block sums of labeled CE
  acc_t* loss_u;                                  // [G_u] per-block sums of M * CE
  acc_t* loss_d;                                  // [G_u] per-block sums of (1 - M) * H
  acc_t* finite;                                  // [G_u] 1 when the block's partial is finite
  const acc_t* weight;  int64_t weight_s;         // [N] prior weights, or nullptr (all 1)
  acc_t* wsum;                                    // [G_u] per-block sums of the weights > 0
};

template <typename acc_t>
struct FinalizeParams {
  const acc_t* partial; const acc_t* loss_l; const acc_t* loss_u; const acc_t* loss_d;
  const acc_t* finite;
  const acc_t* wsum;  // [G_u] per-block weight sums, read only when `weighted`
  bool weighted;      // prior weights given: prior_batch = partial sums / W (W = sum of wsum)
  const acc_t* hp; int64_t hp_s;
  StepArgs st;
  int G_u, G_l, C;
  int64_t B, N;
  acc_t* loss; acc_t* term[3]; acc_t* prior;
};

// Hyperparameters are read on the device (no host sync for a step-dependent gate or a frozen T).
template <typename acc_t>
struct Hyper {
  acc_t lambda_u, lambda_d, inv_t;
  bool gate, t_is_one;
  bool prior_em;  // the batch prior's rows are softmax(z_w + du), not softmax(z_w)
};

template <typename acc_t>
__device__ __forceinline__ Hyper<acc_t> make_hyper(acc_t lambda_u, acc_t lambda_d, bool gate,
                                                   acc_t t, bool prior_em) {
  Hyper<acc_t> h;
  h.lambda_u = lambda_u;
  h.lambda_d = lambda_d;
  h.gate = gate;
  h.prior_em = prior_em;
  h.t_is_one = t == acc_t(1);      // T == 1: q = softmax(z_w) is reused from the weak pass
  h.inv_t = acc_t(1) / t;
  return h;
}

// flexda_fwd: from the hparams vector (layout: csrc/adello_hparams.h).
template <typename acc_t>
__device__ __forceinline__ Hyper<acc_t> read_hyper(const acc_t* hp, int64_t s) {
  // as the reference: gate != 0 and prior_em != 0 (NaN counts as on)
  return make_hyper(hp[kHpLambdaU * s], hp[kHpLambdaD * s], hp[kHpGate * s] != acc_t(0),
                    hp[kHpTemperature * s], hp[kHpPriorEm * s] != acc_t(0));
}

// flexda_step: from the scalar arguments and the state, rounded as the CPU prologue rounds them
// (each value to acc_t once).
template <typename acc_t>
__device__ __forceinline__ Hyper<acc_t> step_hyper(const StepArgs& s) {
  return make_hyper(static_cast<acc_t>(s.lambda_u), static_cast<acc_t>(s.lambda_d),
                    *s.step >= s.distill_start,
                    static_cast<acc_t>(load_as_double(s.temperature, s.temperature_kind, 0)),
                    s.prior_em);
}

// ------------------------------------------------------------------------------------------------
// The step prologue (every block of flexda_step runs it; all threads of the block take part)
//
//   alpha_t = 1 - (1 - alpha_min) * clamp(u / U, 0, 1) ** power,  u = floor(t / n),
//             U = floor(total_steps / n), n = alpha_epoch_steps (1: t / total_steps)
//   S       = sum_c R_c ** alpha_t                      (0 ** 0 = 1, as torch.pow and C pow)
//   adj_c   = log(num_c + eps) - log(R_c ** alpha_t / S + eps),  num = P_L (ds) or Q (du)
//             R = the target prior of StepArgs (a fixed prior, or Q itself)
// in double, rounded once to acc_t; 0 when flexda is off.
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ double step_alpha(const StepArgs& s) {
  const int64_t t = *s.step;
  const int64_t u = t >= 0 ? t / s.alpha_epoch_steps : 0;  // floor for t >= 0; t < 0 clamps to 0
  const double frac = fmin(fmax(static_cast<double>(u) /
                                    static_cast<double>(s.total_steps / s.alpha_epoch_steps),
                                0.0), 1.0);
  return 1.0 - (1.0 - s.alpha_min) * pow(frac, s.power);
}

template <typename acc_t>
__device__ __forceinline__ acc_t step_adjustment(const StepArgs& s, bool labeled, int c,
                                                 double alpha, double sum) {
  if (!s.flexda) return acc_t(0);
  const double q = load_as_double(s.prior_ulb, s.prior_ulb_kind, c * s.prior_ulb_s);
  const double num = labeled ? load_as_double(s.prior_lb, s.prior_lb_kind, c * s.prior_lb_s) : q;
  const double r = load_as_double(s.prior_target, s.prior_target_kind, c * s.prior_target_s);
  const double qa = pow(r, alpha) / sum;
  return static_cast<acc_t>(log(num + s.eps) - log(qa + s.eps));
}

// The 32-bit-word shuffle of any trivially copyable value (defined below for the reductions).
template <typename T>
__device__ __forceinline__ T shfl_xor_any(T v, int offset);

// Fixed-order block sum of one value per thread (double in the prologue, acc_t for the prior
// weights in the finalize kernel): butterfly within each warp (both lanes of a pair hold the
// same bits after every level), then the warps' values in warp order. Every thread gets the sum;
// every block of a launch that calls it with the same values gets the same bits.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* buf /* [32], shared */) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += shfl_xor_any(v, o);
  __syncthreads();
  if (threadIdx.x % 32 == 0) buf[threadIdx.x / 32] = v;
  __syncthreads();
  A s = buf[0];
  const int warps = static_cast<int>(blockDim.x / 32);
  for (int w = 1; w < warps; ++w) s += buf[w];
  return s;
}

// Runs the prologue for this block. Returns the block's adjustment vector in `dyn` (stride 1)
// when s.adj_smem, else nullptr (the caller recomputes step_adjustment per element); `alpha` and
// `sum` are set either way.
template <typename acc_t>
__device__ __forceinline__ const acc_t* step_prologue(const StepArgs& s, bool labeled, int C,
                                                      unsigned char* dyn, double* red,
                                                      double& alpha, double& sum) {
  alpha = step_alpha(s);
  sum = 1.0;
  if (s.flexda) {
    double part = 0.0;
    for (int c = threadIdx.x; c < C; c += blockDim.x)
      part += pow(load_as_double(s.prior_target, s.prior_target_kind, c * s.prior_target_s),
                  alpha);
    sum = block_sum(part, red);
  }
  if (!s.adj_smem) return nullptr;
  acc_t* adj = reinterpret_cast<acc_t*>(dyn);
  for (int c = threadIdx.x; c < C; c += blockDim.x)
    adj[c] = step_adjustment<acc_t>(s, labeled, c, alpha, sum);
  __syncthreads();
  return adj;
}

// ------------------------------------------------------------------------------------------------
// Vectorised row access. A chunk is V consecutive columns; it is read with 16-byte (or V-element,
// if smaller) accesses when the row pointer is aligned to that width, the column stride is 1 and
// the chunk lies inside the row; otherwise element by element with the column stride, padding
// columns >= C with `pad`.
// ------------------------------------------------------------------------------------------------

template <int BYTES> struct RawVec;
template <> struct RawVec<16> { using type = uint4; };
template <> struct RawVec<8> { using type = uint2; };
template <> struct RawVec<4> { using type = uint32_t; };

template <typename T, int V>
struct VecIO {
  static constexpr int kBytes = V * int(sizeof(T)) < 16 ? V * int(sizeof(T)) : 16;
  static constexpr int kPer = kBytes / int(sizeof(T));  // elements per access
  static constexpr int kAccesses = V / kPer;
  static_assert(kPer * kAccesses == V, "chunk must be a whole number of accesses");
  using Raw = typename RawVec<kBytes>::type;

  static __device__ __forceinline__ bool aligned(const void* ptr) {
    return reinterpret_cast<uintptr_t>(ptr) % kBytes == 0;
  }

  template <typename A>
  static __device__ __forceinline__ void load(A* dst, const T* row, int64_t cs, int col0, int C,
                                              bool vec_ok, A pad) {
    if (vec_ok && col0 + V <= C) {
#pragma unroll
      for (int i = 0; i < kAccesses; ++i) {
        const Raw raw = *reinterpret_cast<const Raw*>(row + col0 + i * kPer);
        T tmp[kPer];
        memcpy(tmp, &raw, kBytes);
#pragma unroll
        for (int e = 0; e < kPer; ++e) dst[i * kPer + e] = static_cast<A>(tmp[e]);
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        const int c = col0 + v;
        dst[v] = c < C ? static_cast<A>(row[c * cs]) : pad;
      }
    }
  }

  template <typename A>
  static __device__ __forceinline__ void store(T* row, int col0, int C, bool vec_ok,
                                               const A* src) {
    if (vec_ok && col0 + V <= C) {
#pragma unroll
      for (int i = 0; i < kAccesses; ++i) {
        T tmp[kPer];
#pragma unroll
        for (int e = 0; e < kPer; ++e) tmp[e] = static_cast<T>(src[i * kPer + e]);
        Raw raw;
        memcpy(&raw, tmp, kBytes);
        *reinterpret_cast<Raw*>(row + col0 + i * kPer) = raw;
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (col0 + v < C) row[col0 + v] = static_cast<T>(src[v]);
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Group all-reduce: TPR threads (a warp, or a whole block when TPR > 32) combine one value each
// and all get the same result. Determinism: the xor butterfly combines lane i with lane i^o; with
// a commutative combine (a + b == b + a bitwise, fmax, the symmetric arg-max below) both lanes of
// each pair hold identical bits after every level, so every lane ends with the same value, and
// the cross-warp stage reads the per-warp values in a fixed order.
// ------------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ T shfl_xor_any(T v, int offset) {
  static_assert(sizeof(T) % 4 == 0, "shuffled in 32-bit words");
  constexpr int kWords = sizeof(T) / 4;
  unsigned w[kWords];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], offset);
  T r;
  memcpy(&r, w, sizeof(T));
  return r;
}

template <int TPR>
struct Group {
  static_assert(TPR == 32 || (TPR % 32 == 0 && TPR <= 1024), "a warp or a whole block");
  static constexpr int kWarps = TPR / 32;
  static constexpr int kMaxBytes = 64;  // largest value type reduced
  static constexpr int kSmemBytes = TPR > 32 ? kWarps * kMaxBytes : 16;

  template <typename T, typename Combine>
  static __device__ __forceinline__ T allreduce(T v, Combine comb, unsigned char* smem) {
    static_assert(sizeof(T) <= kMaxBytes, "enlarge kMaxBytes");
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = comb(v, shfl_xor_any(v, o));
    if constexpr (TPR > 32) {  // one group per block: the block is the group
      T* buf = reinterpret_cast<T*>(smem);
      __syncthreads();  // the previous reduction's readers are done with buf
      if (threadIdx.x % 32 == 0) buf[threadIdx.x / 32] = v;
      __syncthreads();
      v = buf[0];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) v = comb(v, buf[w]);
    }
    return v;
  }
};

struct SumOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return a + b; }
};
struct MaxOp {
  template <typename A>
  __device__ __forceinline__ A operator()(A a, A b) const { return max_acc(a, b); }
};

template <typename A>
struct Pair { A a, b; };
struct PairSumOp {
  template <typename A>
  __device__ __forceinline__ Pair<A> operator()(Pair<A> x, Pair<A> y) const {
    return {x.a + y.a, x.b + y.b};
  }
};
template <typename A>
struct Quad { A a, b, c, d; };
struct QuadSumOp {
  template <typename A>
  __device__ __forceinline__ Quad<A> operator()(Quad<A> x, Quad<A> y) const {
    return {x.a + y.a, x.b + y.b, x.c + y.c, x.d + y.d};
  }
};

// Pseudo-label = torch.max semantics: the first index of the maximum, NaN counting as the maximum
// (first NaN wins). A strict total order on (value, index), so the combine is symmetric. Padding
// columns carry (-inf, INT_MAX) and never win against a real column, so yhat is always in [0, C).
template <typename A>
struct ArgMax { A v; int i; };

template <typename A>
__device__ __forceinline__ bool beats(A v1, int i1, A v0, int i0) {
  const bool n1 = v1 != v1, n0 = v0 != v0;
  if (n1 || n0) return n1 && (!n0 || i1 < i0);
  return v1 > v0 || (v1 == v0 && i1 < i0);
}
struct ArgMaxOp {
  template <typename A>
  __device__ __forceinline__ ArgMax<A> operator()(ArgMax<A> x, ArgMax<A> y) const {
    return beats(y.v, y.i, x.v, x.i) ? y : x;
  }
};

// ------------------------------------------------------------------------------------------------
// Register regime: a group of TPR threads owns a row; thread t holds EPT elements per view,
// element j = k * V + v at column (k * TPR + t) * V + v (chunks of V interleaved across the group
// so that every access of the group is coalesced).
// ------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, int TPR, int EPT>
struct RowTile {
  static constexpr int kVecMax = 16 / int(sizeof(scalar_t));
  static constexpr int V = kVecMax < EPT ? kVecMax : EPT;
  static constexpr int K = EPT / V;
  static_assert(K * V == EPT, "EPT must be a multiple of the vector width");
  using IO = VecIO<scalar_t, V>;
  using AccIO = VecIO<acc_t, V>;

  static __device__ __forceinline__ int col(int t, int j) { return ((j / V) * TPR + t) * V + j % V; }

  static __device__ __forceinline__ void load(acc_t (&x)[EPT], const scalar_t* row, int64_t cs,
                                              int C, int t) {
    const bool vec = cs == 1 && IO::aligned(row);
#pragma unroll
    for (int k = 0; k < K; ++k) IO::load(&x[k * V], row, cs, col(t, k * V), C, vec, neg_inf<acc_t>());
  }
  // The adjustment in pieces of 2 values (one 8-byte fp32 access, two fp64 loads): piece i holds
  // elements j = 2 i, 2 i + 1, consecutive columns inside one chunk. Narrower pieces keep the EM
  // loops' live registers down: with whole chunks (V = 4 fp32, 8 for 16-bit logits) or 16-byte
  // pieces the EM branch pushed the 16-bit block/512 tier of flexda_fwd into spills and 16-bit
  // warp/8 past its occupancy target; with single values ptxas spilled block/512 more (ptxas -v,
  // sm_90, nvcc 13.0; csrc/cuda/README.md).
  static constexpr int kAdjW = 2;
  static_assert(V % kAdjW == 0, "a piece lies inside one chunk");
  static constexpr int kAdjN = EPT / kAdjW;
  using AdjIO = VecIO<acc_t, kAdjW>;
  // d = adj[columns of piece i] (a [C] acc_t vector), padding columns 0.
  static __device__ __forceinline__ void adj_piece(acc_t (&d)[kAdjW], const acc_t* adj,
                                                   int64_t s, int C, int t, int i) {
    AdjIO::load(d, adj, s, col(t, i * kAdjW), C, s == 1 && AdjIO::aligned(adj), acc_t(0));
  }
  // x += adj; padding stays -inf (adds 0).
  static __device__ __forceinline__ void add(acc_t (&x)[EPT], const acc_t* adj, int64_t s, int C,
                                             int t) {
    const bool vec = s == 1 && AccIO::aligned(adj);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      acc_t d[V];
      AccIO::load(d, adj, s, col(t, k * V), C, vec, acc_t(0));
#pragma unroll
      for (int v = 0; v < V; ++v) x[k * V + v] += d[v];
    }
  }
  static __device__ __forceinline__ void store(scalar_t* row, const acc_t (&x)[EPT], int C, int t) {
    const bool vec = IO::aligned(row);
#pragma unroll
    for (int k = 0; k < K; ++k) IO::store(row, col(t, k * V), C, vec, &x[k * V]);
  }
};

template <typename scalar_t, typename acc_t, int TPR, int GPB, int EPT, int MIN_BLOCKS, bool STEP,
          bool DALL>
__global__ void __launch_bounds__(TPR * GPB, MIN_BLOCKS)
flexda_rows_kernel(const FlexdaParams<scalar_t, acc_t> p) {
  static_assert(GPB == 1 || TPR == 32, "a group wider than a warp owns the whole block");
  using Tile = RowTile<scalar_t, acc_t, TPR, EPT>;
  using G = Group<TPR>;
  __shared__ uint4 red_words[G::kSmemBytes / 16];  // 16-byte aligned scratch of G::allreduce
  unsigned char* red = reinterpret_cast<unsigned char*>(red_words);
  __shared__ acc_t loss_smem[3][GPB];  // per group: L_u, L_d, prior-weight sums
  // Batch-prior accumulators of the unlabeled rows: slot [grp][j][t] belongs to thread t of
  // group grp alone (no synchronisation until the block combine; lane-contiguous, so no bank
  // conflicts). Kept in shared memory rather than registers: EPT more live registers per thread
  // would cost occupancy in the EPT = 32 tier.
  __shared__ acc_t prior_smem[GPB][EPT][TPR];

  const int t = threadIdx.x % TPR;
  const int grp = threadIdx.x / TPR;
  const int C = p.C;
  const bool labeled = blockIdx.x >= p.G_u;
  // The block's adjustment vector (ds for labeled blocks, du for unlabeled ones): flexda_fwd's
  // input, or for flexda_step the prologue's copy in dynamic shared memory (C acc_t, always
  // fits in the register regimes: <= 32 KB). Both are named per branch below, at addresses the
  // compiler knows (kernel parameter / shared array), so neither takes registers in the row loop.
  ADELLO_DYNAMIC_SMEM(dyn);
  const acc_t* const adj_smem = reinterpret_cast<const acc_t*>(dyn);
  Hyper<acc_t> h;
  if constexpr (STEP) {
    __shared__ double red_d[32];
    double alpha, sum;
    h = step_hyper<acc_t>(p.st);
    step_prologue<acc_t>(p.st, labeled, C, dyn, red_d, alpha, sum);
  } else {
    h = read_hyper(p.hp, p.hp_s);
  }

  if (!labeled) {
    // ---------------------------------------------------------------- unlabeled row pairs
#pragma unroll
    for (int j = 0; j < EPT; ++j) prior_smem[grp][j][t] = acc_t(0);
    acc_t lu_sum = 0, ld_sum = 0, w_sum = 0;
    const bool weighted = p.weight != nullptr;
    const acc_t scale_u = h.lambda_u / acc_t(p.N);
    const acc_t scale_d = h.lambda_d * h.inv_t / acc_t(p.N);
    const int64_t row_step = int64_t(p.G_u) * GPB;
    const acc_t* const adj = STEP ? adj_smem : p.du;
    const int64_t adj_s = STEP ? 1 : p.du_s;

    for (int64_t r = int64_t(blockIdx.x) * GPB + grp; r < p.N; r += row_step) {
      acc_t w[EPT], a[EPT];
      Tile::load(w, p.z_w + r * p.z_w_rs, p.z_w_cs, C, t);
      Tile::load(a, p.z_s + r * p.z_s_rs, p.z_s_cs, C, t);  // issued now: overlaps the weak pass
      // The row's prior weight (one load per row, the group's threads at one address): a row
      // with !(w_i > 0) adds nothing to the prior or to w_sum (its NaN, if any, included).
      acc_t w_i = acc_t(1);
      bool in_prior = true;
      if (weighted) {
        w_i = p.weight[r * p.weight_s];
        in_prior = w_i > acc_t(0);
        if (in_prior) w_sum += w_i;
      }

      // Weak view: m_w = max, yhat = first index of the max.
      ArgMax<acc_t> am{neg_inf<acc_t>(), INT_MAX};
#pragma unroll
      for (int j = 0; j < EPT; ++j) {
        const int c = Tile::col(t, j);
        if (beats(w[j], c, am.v, am.i)) am = {w[j], c};
      }
      am = G::allreduce(am, ArgMaxOp{}, red);
      const acc_t m_w = am.v;
      const int yhat = am.i;
      // w <- exp(z_w - m_w) (padding: exp(-inf) = 0), s_w = sum; pw = w / s_w.
      acc_t s_w = 0;
      if (h.prior_em) {
        // EM batch prior: also s_e = sum_c w_c r_c, r_c = exp(du_c), in the same loop and
        // reduce (padding: du = 0, r = 1, w = 0). s_w is the same sum as below, in the same order.
        Pair<acc_t> se{0, 0};
#pragma unroll
        for (int i = 0; i < Tile::kAdjN; ++i) {
          acc_t d[Tile::kAdjW];
          Tile::adj_piece(d, adj, adj_s, C, t, i);
#pragma unroll
          for (int v = 0; v < Tile::kAdjW; ++v) {
            const int j = i * Tile::kAdjW + v;
            w[j] = exp_acc(w[j] - m_w);
            se.a += w[j];
            se.b += w[j] * exp_acc(d[v]);
          }
        }
        se = G::allreduce(se, PairSumOp{}, red);
        s_w = se.a;
        // pe = (w r) / s_e, r recomputed per element (not kept: EPT more live registers);
        // with prior weights w_i (pe w_i) = (w r) (w_i / s_e).
        if (in_prior) {
          const acc_t inv_se = acc_t(1) / se.b;
          const acc_t kp = weighted ? inv_se * w_i : inv_se;
#pragma unroll
          for (int i = 0; i < Tile::kAdjN; ++i) {
            acc_t d[Tile::kAdjW];
            Tile::adj_piece(d, adj, adj_s, C, t, i);
#pragma unroll
            for (int v = 0; v < Tile::kAdjW; ++v) {
              const int j = i * Tile::kAdjW + v;
              prior_smem[grp][j][t] += w[j] * exp_acc(d[v]) * kp;  // all rows, no mask
            }
          }
        }
      } else {
#pragma unroll
        for (int j = 0; j < EPT; ++j) {
          w[j] = exp_acc(w[j] - m_w);
          s_w += w[j];
        }
        s_w = G::allreduce(s_w, SumOp{}, red);
      }
      const acc_t inv_sw = acc_t(1) / s_w;
      // max_c pw = exp(0) / s_w; inclusive threshold, compared in acc_t (NaN -> mask 0, as torch).
      const bool M = inv_sw >= p.tau;
      if (!h.prior_em && in_prior) {
        const acc_t kp = weighted ? inv_sw * w_i : inv_sw;  // (pw w_i) = w (w_i / s_w)
#pragma unroll
        for (int j = 0; j < EPT; ++j) prior_smem[grp][j][t] += w[j] * kp;  // all rows, no mask
      }
      if (t == 0) {
        p.mask[r] = M ? acc_t(1) : acc_t(0);
        p.pseudo[r] = yhat;
      }

      scalar_t* grow = p.g_s + r * int64_t(C);
      // distill_all (DALL, a compile-time flag): with the gate on an M = 1 row has both terms
      // (handled in the distillation branch below); DALL = false compiles to today's code.
      const bool both = DALL && M && h.gate;
      if (M && !both) {
        // Consistency on a = z_s + du:  CE(yhat, softmax(a)) = (m_a - a[yhat]) + log s_a, both
        // terms >= 0 (no cancellation); dL/da = lambda_u (softmax(a) - onehot(yhat)) / N.
        Tile::add(a, adj, adj_s, C, t);
        acc_t m_a = neg_inf<acc_t>();
#pragma unroll
        for (int j = 0; j < EPT; ++j) m_a = max_acc(m_a, a[j]);
        m_a = G::allreduce(m_a, MaxOp{}, red);
        Pair<acc_t> sa{0, 0};  // (sum exp(a - m_a), a[yhat]); the gather rides on the same reduce
#pragma unroll
        for (int j = 0; j < EPT; ++j) {
          if (Tile::col(t, j) == yhat) sa.b = a[j];
          a[j] = exp_acc(a[j] - m_a);
          sa.a += a[j];
        }
        sa = G::allreduce(sa, PairSumOp{}, red);
        lu_sum += (m_a - sa.b) + log_acc(sa.a);
        const acc_t inv_sa = acc_t(1) / sa.a;
#pragma unroll
        for (int j = 0; j < EPT; ++j)
          a[j] = (a[j] * inv_sa - (Tile::col(t, j) == yhat ? acc_t(1) : acc_t(0))) * scale_u;
      } else if (h.gate) {
        // Distillation, q = softmax(z_w / T) (no gradient), p = softmax(a / T):
        //   H(q, p) = -sum_c q_c log p_c = log s' + sum_c q_c (m_a - a_c) / T,
        //   s' = sum_c exp((a_c - m_a) / T), using sum_c q_c = 1. Every term of the dot is >= 0,
        //   so nothing cancels even for logits ~1e4 (unlike lse(a/T) - sum q a/T).
        //   dL/da = lambda_d (p - q) / (T N).
        if (h.t_is_one) {
#pragma unroll
          for (int j = 0; j < EPT; ++j) w[j] *= inv_sw;  // q = pw
        } else {
          // exp((z_w - m_w) / T) needs z_w again: reload it (L1/L2 hit) rather than keep a
          // second EPT-register copy alive for every row.
          Tile::load(w, p.z_w + r * p.z_w_rs, p.z_w_cs, C, t);
          acc_t s_q = 0;
#pragma unroll
          for (int j = 0; j < EPT; ++j) {
            w[j] = exp_acc((w[j] - m_w) * h.inv_t);
            s_q += w[j];
          }
          s_q = G::allreduce(s_q, SumOp{}, red);
          const acc_t inv_sq = acc_t(1) / s_q;
#pragma unroll
          for (int j = 0; j < EPT; ++j) w[j] *= inv_sq;
        }
        Tile::add(a, adj, adj_s, C, t);
        acc_t m_a = neg_inf<acc_t>();
#pragma unroll
        for (int j = 0; j < EPT; ++j) m_a = max_acc(m_a, a[j]);
        m_a = G::allreduce(m_a, MaxOp{}, red);
        if (DALL && both) {
          // Both terms on one row: L_u = (m_a - a[yhat]) + log s_a, L_d = log s' + dot / T,
          // grad = (softmax(a) - onehot) scale_u + (softmax(a / T) - q) scale_d. T = 1: s' = s_a
          // and one exp pass serves both; T != 1: the sums first (a kept), then both exps
          // recomputed at the gradient (no second EPT-register copy of the row).
          Quad<acc_t> sb{0, 0, 0, 0};  // (s_a, s', dot, a[yhat])
#pragma unroll
          for (int j = 0; j < EPT; ++j) {
            const int c = Tile::col(t, j);
            if (c == yhat) sb.d = a[j];
            if (c < C) sb.c += w[j] * (m_a - a[j]);
            if (h.t_is_one) {
              a[j] = exp_acc(a[j] - m_a);
              sb.a += a[j];
            } else {
              sb.a += exp_acc(a[j] - m_a);
              sb.b += exp_acc((a[j] - m_a) * h.inv_t);
            }
          }
          sb = G::allreduce(sb, QuadSumOp{}, red);
          const acc_t log_sa = log_acc(sb.a);
          lu_sum += (m_a - sb.d) + log_sa;
          const acc_t inv_sa = acc_t(1) / sb.a;
          if (h.t_is_one) {
            ld_sum += log_sa + sb.c;
#pragma unroll
            for (int j = 0; j < EPT; ++j) {
              const acc_t e = a[j] * inv_sa;
              a[j] = (e - (Tile::col(t, j) == yhat ? acc_t(1) : acc_t(0))) * scale_u +
                     (e - w[j]) * scale_d;
            }
          } else {
            ld_sum += log_acc(sb.b) + sb.c * h.inv_t;
            const acc_t inv_sb = acc_t(1) / sb.b;
#pragma unroll
            for (int j = 0; j < EPT; ++j) {
              const acc_t e1 = exp_acc(a[j] - m_a) * inv_sa;
              const acc_t e2 = exp_acc((a[j] - m_a) * h.inv_t) * inv_sb;
              a[j] = (e1 - (Tile::col(t, j) == yhat ? acc_t(1) : acc_t(0))) * scale_u +
                     (e2 - w[j]) * scale_d;
            }
          }
        } else {
          Pair<acc_t> sd{0, 0};  // (s', sum_c q_c (m_a - a_c))
#pragma unroll
          for (int j = 0; j < EPT; ++j) {
            if (Tile::col(t, j) < C) sd.b += w[j] * (m_a - a[j]);  // padding: 0 * inf avoided
            a[j] = exp_acc((a[j] - m_a) * h.inv_t);
            sd.a += a[j];
          }
          sd = G::allreduce(sd, PairSumOp{}, red);
          ld_sum += log_acc(sd.a) + sd.b * h.inv_t;
          const acc_t inv_sd = acc_t(1) / sd.a;
#pragma unroll
          for (int j = 0; j < EPT; ++j) a[j] = (a[j] * inv_sd - w[j]) * scale_d;
        }
      } else {
        // Not confident and distillation off: the row contributes nothing (skipped, not * 0).
#pragma unroll
        for (int j = 0; j < EPT; ++j) a[j] = acc_t(0);
      }
      Tile::store(grow, a, C, t);
    }

    // Block partials, fixed order: groups 0..GPB-1 (column c is element j of thread tt).
    if (t == 0) {
      loss_smem[0][grp] = lu_sum;
      loss_smem[1][grp] = ld_sum;
      loss_smem[2][grp] = w_sum;
    }
    __syncthreads();
    acc_t* part = p.partial + int64_t(blockIdx.x) * C;
    int fin = 1;
    for (int c = threadIdx.x; c < C; c += TPR * GPB) {
      constexpr int V = Tile::V;
      const int q = c / V, tt = q % TPR, j = (q / TPR) * V + c % V;  // inverse of Tile::col
      acc_t v = prior_smem[0][j][tt];
#pragma unroll
      for (int g = 1; g < GPB; ++g) v += prior_smem[g][j][tt];
      part[c] = v;
      fin &= is_finite(v) ? 1 : 0;
    }
    fin = __syncthreads_and(fin);
    if (threadIdx.x == 0) {
      p.finite[blockIdx.x] = fin ? acc_t(1) : acc_t(0);
      acc_t u = loss_smem[0][0], d = loss_smem[1][0], ws = loss_smem[2][0];
#pragma unroll
      for (int g = 1; g < GPB; ++g) {
        u += loss_smem[0][g];
        d += loss_smem[1][g];
        ws += loss_smem[2][g];
      }
      p.loss_u[blockIdx.x] = u;
      p.loss_d[blockIdx.x] = d;
      p.wsum[blockIdx.x] = ws;
    }
  } else {
    // ---------------------------------------------------------------- labeled rows
    // x = z_l + ds:  CE(y, softmax(x)) = (m - x[y]) + log s;  dL/dx = (softmax(x) - onehot(y)) / B.
    const int gl = blockIdx.x - p.G_u;
    const acc_t scale_l = acc_t(1) / acc_t(p.B);
    const acc_t* const adj = STEP ? adj_smem : p.ds;
    const int64_t adj_s = STEP ? 1 : p.ds_s;
    acc_t ls_sum = 0;
    for (int64_t r = int64_t(gl) * GPB + grp; r < p.B; r += int64_t(p.G_l) * GPB) {
      acc_t x[EPT];
      Tile::load(x, p.z_l + r * p.z_l_rs, p.z_l_cs, C, t);
      Tile::add(x, adj, adj_s, C, t);
      const int64_t y = p.y[r * p.y_s];
      acc_t m = neg_inf<acc_t>();
#pragma unroll
      for (int j = 0; j < EPT; ++j) m = max_acc(m, x[j]);
      m = G::allreduce(m, MaxOp{}, red);
      Pair<acc_t> sx{0, 0};  // (sum exp(x - m), x[y])
#pragma unroll
      for (int j = 0; j < EPT; ++j) {
        if (Tile::col(t, j) == y) sx.b = x[j];
        x[j] = exp_acc(x[j] - m);
        sx.a += x[j];
      }
      sx = G::allreduce(sx, PairSumOp{}, red);
      // A label outside [0, C) (only reachable with validate=False): CE = NaN and a NaN gradient
      // row, never a bad read (the gather above only matches columns inside the row).
      const bool bad = !(y >= 0 && y < C);
      ls_sum += bad ? quiet_nan<acc_t>() : (m - sx.b) + log_acc(sx.a);
      const acc_t inv_s = bad ? quiet_nan<acc_t>() : acc_t(1) / sx.a;
#pragma unroll
      for (int j = 0; j < EPT; ++j)
        x[j] = (x[j] * inv_s - (Tile::col(t, j) == y ? acc_t(1) : acc_t(0))) * scale_l;
      Tile::store(p.g_lb + r * int64_t(C), x, C, t);
    }
    if constexpr (GPB > 1) {
      if (t == 0) loss_smem[0][grp] = ls_sum;
      __syncthreads();
      if (threadIdx.x == 0) {
        acc_t s = loss_smem[0][0];
#pragma unroll
        for (int g = 1; g < GPB; ++g) s += loss_smem[0][g];
        p.loss_l[gl] = s;
      }
    } else {
      if (threadIdx.x == 0) p.loss_l[gl] = ls_sum;
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Looped regime (rows too long for registers): one block per row, chunks of V columns at
// (k * TPR + t) * V, several passes over the row (re-reads hit L1/L2; HBM sees each row once).
// Sums of exponentials are kept online, (m, s) = (running max, sum exp((x - m) / T)), so a pass
// needs one exp per element; the rescale exp is paid only when a thread's running max grows.
// ------------------------------------------------------------------------------------------------

template <typename A>
struct Online { A m, s; };

// Add x to (m, s). -inf adds exactly 0 (skipped, so -inf - -inf = NaN never forms); NaN poisons s.
template <typename A>
__device__ __forceinline__ void online_add(Online<A>& o, A x, A inv_t) {
  if (x > o.m) {
    o.s = (o.s == A(0) ? A(0) : o.s * exp_acc((o.m - x) * inv_t)) + A(1);
    o.m = x;
  } else if (x != neg_inf<A>()) {
    o.s += exp_acc((x - o.m) * inv_t);
  }
}

template <typename A>
__device__ __forceinline__ Online<A> online_merge(Online<A> x, Online<A> y, A inv_t) {
  const A m = max_acc(x.m, y.m);
  const A sx = x.s == A(0) ? A(0) : x.s * exp_acc((x.m - m) * inv_t);
  const A sy = y.s == A(0) ? A(0) : y.s * exp_acc((y.m - m) * inv_t);
  return {m, sx + sy};
}

// EM batch prior, weak pass: e = sum_c exp(x_c - m) r_c kept online next to (m, s), rescaled
// by the same factor whenever the running max grows (so the pair needs no second pass over the
// row). s is updated exactly as online_add does it.
template <typename A>
__device__ __forceinline__ void online_add_em(Online<A>& o, A& e, A x, A r) {
  if (x > o.m) {
    const bool empty = o.s == A(0);  // then e == 0 too, and o.m - x may be -inf - -inf
    const A f = empty ? A(0) : exp_acc(o.m - x);
    o.s = (empty ? A(0) : o.s * f) + A(1);
    e = (empty ? A(0) : e * f) + r;
    o.m = x;
  } else if (x != neg_inf<A>()) {
    const A ex = exp_acc(x - o.m);
    o.s += ex;
    e += ex * r;
  }
}

// The weak pass's reduction in EM mode: (m, s), the arg-max, and e (see online_add_em). The
// products and sums are rounded separately so that merge(x, y) and merge(y, x) give the same bits
// (the butterfly relies on it).
template <typename A>
struct EmStats {
  Online<A> o;
  ArgMax<A> am;
  A e;
};
template <typename A>
struct EmStatsOp {
  __device__ __forceinline__ EmStats<A> operator()(EmStats<A> x, EmStats<A> y) const {
    const A m = max_acc(x.o.m, y.o.m);
    // An empty side (s == 0, so e == 0; m may be -inf, and -inf - -inf is NaN) adds 0.
    const A fx = x.o.s == A(0) ? A(0) : exp_acc(x.o.m - m);
    const A fy = y.o.s == A(0) ? A(0) : exp_acc(y.o.m - m);
    return {{m, add_rn(mul_rn(x.o.s, fx), mul_rn(y.o.s, fy))}, ArgMaxOp{}(x.am, y.am),
            add_rn(mul_rn(x.e, fx), mul_rn(y.e, fy))};
  }
};

// Everything one pass of the looped kernel reduces at once.
template <typename A>
struct LoopStats {
  Online<A> o;     // max / sum-exp of the pass's view
  ArgMax<A> am;    // weak pass: pseudo-label
  A x1, x2;        // plain sums (gathered logit, sum of exp for q)
};
template <typename A>
struct LoopStatsOp {
  A inv_t;
  __device__ __forceinline__ LoopStats<A> operator()(LoopStats<A> x, LoopStats<A> y) const {
    return {online_merge(x.o, y.o, inv_t), ArgMaxOp{}(x.am, y.am), x.x1 + y.x1, x.x2 + y.x2};
  }
};

template <typename scalar_t, typename acc_t, int TPR, bool STEP, bool DALL>
__global__ void __launch_bounds__(TPR)
flexda_looped_kernel(const FlexdaParams<scalar_t, acc_t> p) {
  constexpr int V = 16 / int(sizeof(scalar_t));
  constexpr int kStep = TPR * V;
  using IO = VecIO<scalar_t, V>;
  using AccIO = VecIO<acc_t, V>;
  using G = Group<TPR>;
  __shared__ uint4 red_words[G::kSmemBytes / 16];  // 16-byte aligned scratch of G::allreduce
  unsigned char* red = reinterpret_cast<unsigned char*>(red_words);

  const int t = threadIdx.x;
  const int C = p.C;
  const acc_t one = acc_t(1);
  const acc_t ninf = neg_inf<acc_t>();
  const bool labeled = blockIdx.x >= p.G_u;

  // The block's adjustment vector (ds for labeled blocks, du for unlabeled ones): flexda_fwd's
  // input; for flexda_step the prologue's shared-memory copy when C * sizeof(acc_t) fits
  // ADELLO_ADJ_SMEM_BYTES, else nullptr and each element is recomputed from the state where it
  // is added (same function, same bits; ~3 double transcendentals per element and pass, the price
  // of an unbounded C without a global scratch vector per block).
  Hyper<acc_t> h;
  const acc_t* adj;
  int64_t adj_s;
  double alpha = 0.0, sum = 1.0;
  if constexpr (STEP) {
    ADELLO_DYNAMIC_SMEM(dyn);
    __shared__ double red_d[32];
    h = step_hyper<acc_t>(p.st);
    adj = step_prologue<acc_t>(p.st, labeled, C, dyn, red_d, alpha, sum);
    adj_s = 1;
  } else {
    h = read_hyper(p.hp, p.hp_s);
    adj = labeled ? p.ds : p.du;
    adj_s = labeled ? p.ds_s : p.du_s;
  }
  const bool adj_vec = adj != nullptr && adj_s == 1 && AccIO::aligned(adj);

  // The block's adjustment for chunk c0 into d[V] (padding columns 0).
  auto load_adj = [&](acc_t* d, int c0) {
    if (!STEP || adj != nullptr) {
      AccIO::load(d, adj, adj_s, c0, C, adj_vec, acc_t(0));
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        d[v] = c0 + v < C ? step_adjustment<acc_t>(p.st, labeled, c0 + v, alpha, sum) : acc_t(0);
    }
  };
  // Load chunk c0 of a row (+ the block's adjustment when with_adj) into x[V].
  auto load = [&](acc_t* x, const scalar_t* row, int64_t cs, bool vec, int c0, bool with_adj) {
    IO::load(x, row, cs, c0, C, vec, ninf);
    if (with_adj) {
      acc_t d[V];
      load_adj(d, c0);
#pragma unroll
      for (int v = 0; v < V; ++v) x[v] += d[v];
    }
  };

  if (!labeled) {
    // ---------------------------------------------------------------- unlabeled row pairs
    acc_t* part = p.partial + int64_t(blockIdx.x) * C;  // owned by this block: plain RMW
    acc_t lu_sum = 0, ld_sum = 0, w_sum = 0;
    const acc_t scale_u = h.lambda_u / acc_t(p.N);
    const acc_t scale_d = h.lambda_d * h.inv_t / acc_t(p.N);
    const bool weighted = p.weight != nullptr;
    bool first = true;  // no row of this block has written `part` yet
    for (int64_t r = blockIdx.x; r < p.N; r += p.G_u) {
      const scalar_t* wrow = p.z_w + r * p.z_w_rs;
      const scalar_t* srow = p.z_s + r * p.z_s_rs;
      scalar_t* grow = p.g_s + r * int64_t(C);
      const bool wvec = p.z_w_cs == 1 && IO::aligned(wrow);
      const bool svec = p.z_s_cs == 1 && IO::aligned(srow);
      const bool gvec = IO::aligned(grow);
      // The row's prior weight (one load per row): a row with !(w_i > 0) writes nothing to
      // `part` in pass 3 and adds nothing to w_sum.
      acc_t w_i = one;
      bool in_prior = true;
      if (weighted) {
        w_i = p.weight[r * p.weight_s];
        in_prior = w_i > acc_t(0);
        if (in_prior) w_sum += w_i;
      }

      // Pass 1, weak view: online (m_w, s_w) and the arg-max; EM batch prior: also
      // s_e = sum_c exp(z_w - m_w) r_c online (online_add_em), r_c = exp(du_c) per element.
      acc_t m_w, inv_sw, inv_se = 0;
      int yhat;
      if (h.prior_em) {
        EmStats<acc_t> st{{ninf, acc_t(0)}, {ninf, INT_MAX}, acc_t(0)};
        for (int c0 = t * V; c0 < C; c0 += kStep) {
          acc_t x[V], d[V];
          load(x, wrow, p.z_w_cs, wvec, c0, false);
          load_adj(d, c0);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            if (beats(x[v], c0 + v, st.am.v, st.am.i)) st.am = {x[v], c0 + v};
            online_add_em(st.o, st.e, x[v], exp_acc(d[v]));
          }
        }
        st = G::allreduce(st, EmStatsOp<acc_t>{}, red);
        m_w = st.o.m;
        inv_sw = one / st.o.s;
        inv_se = one / st.e;
        yhat = st.am.i;
      } else {
        LoopStats<acc_t> st{{ninf, acc_t(0)}, {ninf, INT_MAX}, acc_t(0), acc_t(0)};
        for (int c0 = t * V; c0 < C; c0 += kStep) {
          acc_t x[V];
          load(x, wrow, p.z_w_cs, wvec, c0, false);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            if (beats(x[v], c0 + v, st.am.v, st.am.i)) st.am = {x[v], c0 + v};
            online_add(st.o, x[v], one);
          }
        }
        st = G::allreduce(st, LoopStatsOp<acc_t>{one}, red);
        m_w = st.o.m;
        inv_sw = one / st.o.s;
        yhat = st.am.i;
      }
      const bool M = inv_sw >= p.tau;
      if (t == 0) {
        p.mask[r] = M ? one : acc_t(0);
        p.pseudo[r] = yhat;
      }
      // distill_all (DALL, compile-time): with the gate on every row distils; an M = 1 row
      // (`both`) has both terms. Pass 2 then keeps a second online sum at scale 1/T next to the
      // scale-1 one when T != 1 (the running max is the same); T = 1 shares one exp pass.
      const bool both = DALL && M && h.gate;
      const bool distill = (DALL || !M) && h.gate;
      const bool fresh_q = distill && !h.t_is_one;  // q needs its own exp((z_w - m_w) / T)
      const bool two = DALL && both && !h.t_is_one;  // both terms, two exp scales

      // Pass 2, strong view a = z_s + du: online (m_a, s_a) with scale 1 (consistency) or 1/T
      // (distillation), a[yhat], and s_q = sum exp((z_w - m_w) / T) when T != 1.
      const acc_t it = M ? one : h.inv_t;
      acc_t m_a = 0, inv_sa = 0, log_sa = 0, a_y = 0, inv_sq = 0, inv_st = 0, log_st = 0;
      if (M || distill) {
        LoopStats<acc_t> sb{{ninf, acc_t(0)}, {ninf, INT_MAX}, acc_t(0), acc_t(0)};
        Online<acc_t> ot{ninf, acc_t(0)};  // two: sum exp((a - m) / T)
        for (int c0 = t * V; c0 < C; c0 += kStep) {
          acc_t x[V];
          load(x, srow, p.z_s_cs, svec, c0, true);
#pragma unroll
          for (int v = 0; v < V; ++v) {
            if (c0 + v == yhat) sb.x1 = x[v];
            online_add(sb.o, x[v], it);
            if (DALL && two) online_add(ot, x[v], h.inv_t);
          }
          if (fresh_q) {
            load(x, wrow, p.z_w_cs, wvec, c0, false);
#pragma unroll
            for (int v = 0; v < V; ++v) sb.x2 += exp_acc((x[v] - m_w) * h.inv_t);
          }
        }
        sb = G::allreduce(sb, LoopStatsOp<acc_t>{it}, red);
        m_a = sb.o.m;
        inv_sa = one / sb.o.s;
        log_sa = log_acc(sb.o.s);
        a_y = sb.x1;
        inv_sq = one / sb.x2;
        if constexpr (DALL) {
          // L_u now (a_y and log s_a are dead in pass 3: fewer live registers there); the same
          // expression and row order as after pass 3 without DALL.
          if (M) lu_sum += (m_a - a_y) + log_sa;
          if (two) {
            // The same running max as sb.o (online_add moves m on the same elements).
            const acc_t inv_t = h.inv_t;
            ot = G::allreduce(ot, [inv_t](Online<acc_t> x, Online<acc_t> y) {
              return online_merge(x, y, inv_t);
            }, red);
            inv_st = one / ot.s;
            log_st = log_acc(ot.s);
          } else {
            inv_st = inv_sa;  // T = 1 (or M = 0: sb itself is at scale 1/T)
            log_st = log_sa;
          }
        }
      }

      // Pass 3: batch prior, gradient row, distillation dot product. EM: the prior row is
      // (exp(z_w - m_w) r) / s_e, and the chunk's du (loaded once) also adjusts the strong row.
      // With prior weights the row's scale kp carries w_i (raw: exp(z_w - m_w) kp next to pw,
      // which the distillation needs unweighted).
      const acc_t kp = weighted ? (h.prior_em ? inv_se : inv_sw) * w_i : acc_t(0);
      acc_t dot = 0;
      for (int c0 = t * V; c0 < C; c0 += kStep) {
        acc_t x[V], g[V];
        load(x, wrow, p.z_w_cs, wvec, c0, false);
        acc_t pw[V];
        acc_t d[V];
        if (h.prior_em) {
          load_adj(d, c0);
          const acc_t ke = weighted ? kp : inv_se;
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const acc_t ew = exp_acc(x[v] - m_w);
            pw[v] = ew * inv_sw;
            if (in_prior && c0 + v < C) {
              const acc_t pe = ew * exp_acc(d[v]) * ke;
              part[c0 + v] = first ? pe : part[c0 + v] + pe;
            }
          }
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const acc_t ew = exp_acc(x[v] - m_w);
            pw[v] = ew * inv_sw;
            if (in_prior && c0 + v < C) {
              const acc_t pr = weighted ? ew * kp : pw[v];
              part[c0 + v] = first ? pr : part[c0 + v] + pr;
            }
          }
        }
        if (M || distill) {  // the strong chunk a = z_s + du (EM: the du loaded above)
          if (h.prior_em) {
            load(g, srow, p.z_s_cs, svec, c0, false);
#pragma unroll
            for (int v = 0; v < V; ++v) g[v] += d[v];
          } else {
            load(g, srow, p.z_s_cs, svec, c0, true);
          }
        }
        if (DALL && both) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const acc_t q = fresh_q ? exp_acc((x[v] - m_w) * h.inv_t) * inv_sq : pw[v];
            if (c0 + v < C) dot += q * (m_a - g[v]);
            const acc_t e1 = exp_acc(g[v] - m_a) * inv_sa;
            const acc_t e2 = two ? exp_acc((g[v] - m_a) * h.inv_t) * inv_st : e1;
            g[v] = (e1 - (c0 + v == yhat ? one : acc_t(0))) * scale_u + (e2 - q) * scale_d;
          }
        } else if (M) {
#pragma unroll
          for (int v = 0; v < V; ++v)
            g[v] = (exp_acc(g[v] - m_a) * inv_sa - (c0 + v == yhat ? one : acc_t(0))) * scale_u;
        } else if (distill) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const acc_t q = fresh_q ? exp_acc((x[v] - m_w) * h.inv_t) * inv_sq : pw[v];
            if (c0 + v < C) dot += q * (m_a - g[v]);
            g[v] = (exp_acc((g[v] - m_a) * h.inv_t) * inv_sa - q) * scale_d;
          }
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) g[v] = acc_t(0);
        }
        IO::store(grow, c0, C, gvec, g);
      }
      // CE(yhat, softmax(a)) as in the register regime (DALL: added after pass 2)
      if (!DALL && M) lu_sum += (m_a - a_y) + log_sa;
      if (distill) {
        dot = G::allreduce(dot, SumOp{}, red);
        // H = log s' + sum_c q_c (m_a - a_c) / T (distill_all: s' from the 1/T sum)
        ld_sum += (DALL ? log_st : log_sa) + dot * h.inv_t;
      }
      if (in_prior) first = false;
    }
    if (first) {  // every row of the block weighs 0: its partial is 0 (the thread's own columns)
      for (int c0 = t * V; c0 < C; c0 += kStep) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (c0 + v < C) part[c0 + v] = acc_t(0);
        }
      }
    }
    // Finite flag of this block's partial (each column is owned by one thread, so these are
    // the thread's own writes).
    int fin = 1;
    for (int c0 = t * V; c0 < C; c0 += kStep) {
#pragma unroll
      for (int v = 0; v < V; ++v) {
        if (c0 + v < C) fin &= is_finite(part[c0 + v]) ? 1 : 0;
      }
    }
    fin = __syncthreads_and(fin);
    if (t == 0) {
      p.loss_u[blockIdx.x] = lu_sum;
      p.loss_d[blockIdx.x] = ld_sum;
      p.finite[blockIdx.x] = fin ? one : acc_t(0);
      p.wsum[blockIdx.x] = w_sum;
    }
  } else {
    // ---------------------------------------------------------------- labeled rows
    const int gl = blockIdx.x - p.G_u;
    const acc_t scale_l = one / acc_t(p.B);
    acc_t ls_sum = 0;
    for (int64_t r = gl; r < p.B; r += p.G_l) {
      const scalar_t* row = p.z_l + r * p.z_l_rs;
      scalar_t* grow = p.g_lb + r * int64_t(C);
      const bool vec = p.z_l_cs == 1 && IO::aligned(row);
      const bool gvec = IO::aligned(grow);
      const int64_t y = p.y[r * p.y_s];
      LoopStats<acc_t> st{{ninf, acc_t(0)}, {ninf, INT_MAX}, acc_t(0), acc_t(0)};
      for (int c0 = t * V; c0 < C; c0 += kStep) {
        acc_t x[V];
        load(x, row, p.z_l_cs, vec, c0, true);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          if (c0 + v == y) st.x1 = x[v];
          online_add(st.o, x[v], one);
        }
      }
      st = G::allreduce(st, LoopStatsOp<acc_t>{one}, red);
      // A label outside [0, C): CE = NaN and a NaN gradient row (as the register regime).
      const bool bad = !(y >= 0 && y < C);
      const acc_t m = st.o.m, inv_s = bad ? quiet_nan<acc_t>() : one / st.o.s;
      ls_sum += bad ? quiet_nan<acc_t>() : (m - st.x1) + log_acc(st.o.s);
      for (int c0 = t * V; c0 < C; c0 += kStep) {
        acc_t x[V];
        load(x, row, p.z_l_cs, vec, c0, true);
#pragma unroll
        for (int v = 0; v < V; ++v)
          x[v] = (exp_acc(x[v] - m) * inv_s - (c0 + v == y ? one : acc_t(0))) * scale_l;
        IO::store(grow, c0, C, gvec, x);
      }
    }
    if (t == 0) p.loss_l[gl] = ls_sum;
  }
}

// ------------------------------------------------------------------------------------------------
// Finalize: blocks [0, ceil(C/32)) sum the [G_u, C] prior partials for 32 columns each (warp w
// takes partial rows w, w+32, ...; then the 32 warps in order); the last block sums the loss
// partials. Deterministic: the order depends on G_u, G_l, C only.
//
// flexda_step with `update` also runs the epilogue here, without a cross-block handoff:
//   ok = all(isfinite(prior_batch)), taken as the AND of the row kernel's per-block flags "this
//        block's partial is finite", which every finalize block reads. The two agree: a partial
//        entry is a sum of probabilities (each in [0, 1], or NaN when its row is not finite), so
//        a finite partial sums to at most N and prior_batch is finite exactly when every partial
//        is.
//   column blocks: Q_c <- m Q_c + (1 - m) prior_batch_c when ok, in Q's dtype with m and 1 - m
//        rounded to it, each product and the sum rounded separately (no FMA contraction), as
//        csrc/cpu/adello_update_cpu.cpp computes it. Each Q_c is read and written by one thread.
//   last block: skipped_updates += !ok; step += 1, after its own read of step (the gate); no
//        other finalize block reads step. The row kernel's reads of Q and step all precede this
//        kernel in stream order.
//
// Prior weights (`weighted`): every block first sums the [G_u] per-block weight sums in one
// fixed order (thread g takes g, g + 1024, ...; block_sum), so all blocks hold the same W;
// prior_batch = (sum of partials) / W, NaN when W == 0. A weighted partial entry is a sum of
// w_i p_i <= W, so with W finite "every partial finite" still means "prior_batch finite"; ok also
// requires W finite (a sum that overflowed: Q kept, counted as skipped). W == 0 (no row to
// estimate from): Q and skipped_updates left alone, step += 1.
// ------------------------------------------------------------------------------------------------

template <typename q_t, typename acc_t>
__device__ __forceinline__ void momentum_update(const StepArgs& s, int c, acc_t pb) {
  q_t* q = static_cast<q_t*>(s.prior_ulb) + c * s.prior_ulb_s;
  const q_t m = static_cast<q_t>(s.momentum);
  const q_t one_minus_m = static_cast<q_t>(1.0 - s.momentum);
  *q = add_rn(mul_rn(m, *q), mul_rn(one_minus_m, static_cast<q_t>(pb)));
}

template <typename acc_t, bool STEP>
__global__ void __launch_bounds__(1024) flexda_finalize_kernel(const FinalizeParams<acc_t> p) {
  __shared__ acc_t sh[32][33];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  acc_t w_total = 0;  // W, the prior weights' sum (weighted only)
  if (p.weighted) {
    __shared__ acc_t wbuf[32];
    acc_t v = 0;
    for (int g = threadIdx.x; g < p.G_u; g += blockDim.x) v += p.wsum[g];
    w_total = block_sum(v, wbuf);
  }
  const bool no_rows = p.weighted && !(w_total > acc_t(0));
  bool ok = true;
  if constexpr (STEP) {
    if (p.st.update) {
      int f = 1;
      for (int g = threadIdx.x; g < p.G_u; g += blockDim.x) f &= p.finite[g] != acc_t(0) ? 1 : 0;
      ok = __syncthreads_and(f) != 0 && (!p.weighted || is_finite(w_total));
    }
  }
  if (blockIdx.x + 1 < gridDim.x) {
    const int c = blockIdx.x * 32 + lane;
    acc_t v = 0;
    if (c < p.C) {
#pragma unroll 4
      for (int g = warp; g < p.G_u; g += 32) v += p.partial[int64_t(g) * p.C + c];
    }
    sh[warp][lane] = v;
    __syncthreads();
    if (warp == 0 && c < p.C) {
      acc_t s = sh[0][lane];
      for (int w = 1; w < 32; ++w) s += sh[w][lane];
      // mean over all N weak rows, or the weighted mean (no row of positive weight: NaN)
      const acc_t pb = !p.weighted ? s / acc_t(p.N) : no_rows ? quiet_nan<acc_t>() : s / w_total;
      p.prior[c] = pb;
      if constexpr (STEP) {
        if (p.st.update && ok && !no_rows) {
          if (p.st.prior_ulb_kind == kF64) {
            momentum_update<double>(p.st, c, pb);
          } else {
            momentum_update<float>(p.st, c, pb);
          }
        }
      }
    }
    return;
  }
  acc_t v[3] = {0, 0, 0};
  for (int i = threadIdx.x; i < p.G_l; i += blockDim.x) v[0] += p.loss_l[i];
  for (int i = threadIdx.x; i < p.G_u; i += blockDim.x) {
    v[1] += p.loss_u[i];
    v[2] += p.loss_d[i];
  }
#pragma unroll
  for (int q = 0; q < 3; ++q) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[q] += __shfl_xor_sync(0xffffffffu, v[q], o);
    if (lane == 0) sh[q][warp] = v[q];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int warps = blockDim.x / 32;
    acc_t s[3];
    for (int q = 0; q < 3; ++q) {
      s[q] = sh[q][0];
      for (int w = 1; w < warps; ++w) s[q] += sh[q][w];
    }
    Hyper<acc_t> h;
    if constexpr (STEP) {
      h = step_hyper<acc_t>(p.st);
    } else {
      h = read_hyper(p.hp, p.hp_s);
    }
    const acc_t l_s = s[0] / acc_t(p.B);
    const acc_t l_u = s[1] / acc_t(p.N);
    const acc_t l_d = s[2] / acc_t(p.N);
    // loss = L_s + lambda_u L_u + [gate] lambda_d L_d (the distillation term skipped when off)
    const acc_t base = l_s + h.lambda_u * l_u;
    p.loss[0] = h.gate ? base + h.lambda_d * l_d : base;
    *p.term[0] = l_s;
    *p.term[1] = l_u;
    *p.term[2] = h.gate ? l_d : acc_t(0);
    if constexpr (STEP) {
      if (p.st.update) {
        if (!ok && !no_rows) *p.st.skipped += 1;
        *p.st.step += 1;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

#ifdef ADELLO_CUDA_EMULATION
using AdelloStream = int;
#endif

enum class Tier { kWarp4, kWarp8, kWarp16, kPair16, kBlock128, kBlock256, kBlock512, kLooped };

struct Config {
  Tier tier;
  int rows_per_block;  // rows in flight per block (warps per block in the warp regime)
};

#ifndef ADELLO_GRID_CAP  // the CPU emulation shrinks it so that small tests exercise the row loops
#define ADELLO_GRID_CAP 1024
#endif
constexpr int kWarpsPerBlock = 4;
constexpr int kLoopedThreads = 512;
constexpr int64_t kMaxBlocks = ADELLO_GRID_CAP;         // per role; more rows loop in the blocks
constexpr int64_t kMinUlbBlocks = ADELLO_GRID_CAP / 4;  // keep the GPU busy even for huge C
constexpr int64_t kPartialBudget = 1 << 22;   // target G_u * C (16 MB of fp32 partials, L2-sized)

// Register budget and occupancy (sm_90, ptxas -v; the table is in csrc/cuda/README.md):
// a row pair in registers costs 2 * EPT values per thread plus ~40 for addresses, reductions and
// the hyperparameters. 16 warps per SM (<= 128 registers per thread) keep enough independent
// row pairs in flight to cover the load latency between the dependent phases of a row (max ->
// sum -> gradient); 8 warps per SM do not. The warp tiers up to EPT = 16 sit at <= 128 registers
// (4 blocks of 4 warps per SM). For 512 < C <= 1024 a warp per row would need EPT = 32 (211
// registers for fp32, 168 for bf16: 8 and 12 warps per SM); instead two warps share a row
// (kPair16: 64-thread groups, EPT = 16, __launch_bounds__(64, 8) = 128 registers), which halves
// the per-thread row at the price of a shared-memory step in each of the 6 reductions of a row
// pair. The block tiers (EPT = 16) are at 128 registers (16 warps per SM).
Config choose_config(bool fp64, int64_t C, bool distill_all = false) {
  const int w = kWarpsPerBlock;
  if (fp64) {  // fp64 rows take twice the registers: smaller register tiers
    if (C <= 128) return {Tier::kWarp4, w};
    // distill_all: fp64 warp/16's both-terms rows spill at 255 registers: the looped kernel
    if (C <= 512 && !distill_all) return {Tier::kWarp16, w};
    return {Tier::kLooped, 1};
  }
  if (C <= 128) return {Tier::kWarp4, w};
  if (C <= 256) return {Tier::kWarp8, w};
  if (C <= 512) return {Tier::kWarp16, w};
  if (C <= 1024) return {Tier::kPair16, 1};
  if (C <= 2048) return {Tier::kBlock128, 1};
  if (C <= 4096) return {Tier::kBlock256, 1};
  // distill_all: block/512's both-terms rows spill (ptxas, sm_90; csrc/cuda/README.md), so
  // 4096 < C <= 8192 takes the looped kernel then
  if (C <= 8192 && !distill_all) return {Tier::kBlock512, 1};
  return {Tier::kLooped, 1};
}

template <typename scalar_t, typename acc_t, bool STEP, bool DALL, int TPR, int GPB, int EPT,
          int MINB>
void launch_rows(const FlexdaParams<scalar_t, acc_t>& p, size_t smem, AdelloStream stream) {
  auto* kernel = &flexda_rows_kernel<scalar_t, acc_t, TPR, GPB, EPT, MINB, STEP, DALL>;
  if (smem > 0) ADELLO_ALLOW_SMEM(kernel, smem);
  ADELLO_LAUNCH(kernel, p.G_u + p.G_l, TPR * GPB, smem, stream, p);
}

template <typename scalar_t, typename acc_t, bool STEP, bool DALL>
void launch_main(Tier tier, const FlexdaParams<scalar_t, acc_t>& p, size_t smem,
                 AdelloStream stream) {
  constexpr int W = kWarpsPerBlock;
  // Minimum resident blocks per SM (the register cap is 64K / (blocks * threads)), see
  // choose_config: warp/4 64 registers, warp/8 80, warp/16 and kPair16 128 (fp64 warp/16: 255,
  // 8 warps per SM; fp64 is not a bandwidth target), the block tiers 128.
  constexpr bool kF64Acc = std::is_same_v<acc_t, double>;
  switch (tier) {
    case Tier::kWarp4:
      launch_rows<scalar_t, acc_t, STEP, DALL, 32, W, 4, kF64Acc ? 4 : 8>(p, smem, stream);
      return;
    case Tier::kWarp16:
      if constexpr (!(DALL && kF64Acc)) {  // fp64 with distill_all: looped (choose_config)
        launch_rows<scalar_t, acc_t, STEP, DALL, 32, W, 16, kF64Acc ? 2 : 4>(p, smem, stream);
        return;
      }
      break;
    case Tier::kLooped: {
      auto* kernel = &flexda_looped_kernel<scalar_t, acc_t, kLoopedThreads, STEP, DALL>;
      if (smem > 0) ADELLO_ALLOW_SMEM(kernel, smem);
      ADELLO_LAUNCH(kernel, p.G_u + p.G_l, kLoopedThreads, smem, stream, p);
      return;
    }
    default: break;
  }
  if constexpr (!std::is_same_v<scalar_t, double>) {
    switch (tier) {
      case Tier::kWarp8: launch_rows<scalar_t, acc_t, STEP, DALL, 32, W, 8, 6>(p, smem, stream); return;
      case Tier::kPair16: launch_rows<scalar_t, acc_t, STEP, DALL, 64, 1, 16, 8>(p, smem, stream); return;
      case Tier::kBlock128:
        launch_rows<scalar_t, acc_t, STEP, DALL, 128, 1, 16, 4>(p, smem, stream);
        return;
      case Tier::kBlock256:
        launch_rows<scalar_t, acc_t, STEP, DALL, 256, 1, 16, 2>(p, smem, stream);
        return;
      case Tier::kBlock512:
        // distill_all: the looped kernel instead (choose_config; the both-terms rows spill at
        // 128 registers in this tier)
        if constexpr (!DALL) {
          launch_rows<scalar_t, acc_t, STEP, DALL, 512, 1, 16, 1>(p, smem, stream);
          return;
        }
        break;
      default: break;
    }
  }
  TORCH_CHECK(false, "adello (CUDA): no kernel for this configuration");
}

inline int float_kind(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return kF32;
  }
}

// The logits and labels of either op; returns the accumulate dtype.
inline at::ScalarType check_logits(const char* op, const at::Tensor& logits_lb,
                                   const at::Tensor& labels_lb, const at::Tensor& logits_ulb_w,
                                   const at::Tensor& logits_ulb_s) {
  TORCH_CHECK_VALUE(logits_lb.dim() == 2, op, ": logits_lb must be 2-d, got ", logits_lb.sizes());
  TORCH_CHECK_VALUE(logits_ulb_w.dim() == 2, op, ": logits_ulb_w must be 2-d, got ",
                    logits_ulb_w.sizes());
  TORCH_CHECK_VALUE(logits_ulb_s.dim() == 2, op, ": logits_ulb_s must be 2-d, got ",
                    logits_ulb_s.sizes());
  const int64_t B = logits_lb.size(0), C = logits_lb.size(1), N = logits_ulb_w.size(0);
  TORCH_CHECK_VALUE(B >= 1 && N >= 1 && C >= 1, op, ": needs B >= 1, N >= 1 and C >= 1, got B=",
                    B, " N=", N, " C=", C);
  TORCH_CHECK_VALUE(C <= (int64_t(1) << 30), op, ": C=", C, " is too large");
  TORCH_CHECK_VALUE(logits_ulb_w.sizes() == logits_ulb_s.sizes() && logits_ulb_w.size(1) == C,
                    op, ": logits_ulb_w ", logits_ulb_w.sizes(), " and logits_ulb_s ",
                    logits_ulb_s.sizes(), " must both be [N, ", C, "]");
  const at::ScalarType dtype = logits_lb.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                        dtype == at::kDouble,
                    op, ": logits_lb must be float32, bfloat16, float16 or float64, got ", dtype);
  for (const at::Tensor* z : {&logits_ulb_w, &logits_ulb_s}) {
    TORCH_CHECK_VALUE(z->scalar_type() == dtype, op, ": logits_ulb_w and logits_ulb_s must be ",
                      dtype, " like logits_lb, got ", z->scalar_type());
    TORCH_CHECK_VALUE(z->device() == logits_lb.device(), op,
                      ": logits_ulb_w and logits_ulb_s must be on ", logits_lb.device());
  }
  TORCH_CHECK_VALUE(labels_lb.dim() == 1 && labels_lb.size(0) == B &&
                        labels_lb.scalar_type() == at::kLong &&
                        labels_lb.device() == logits_lb.device(),
                    op, ": labels_lb must be int64 [", B, "] on ", logits_lb.device());
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// The optional [N] prior weights of either op: the accumulate dtype, on the logits' device, any
// stride (read once per row). Returns nullptr when absent (the unweighted kernels' path).
inline const at::Tensor* prior_weight_arg(const char* op, const std::optional<at::Tensor>& w,
                                          const at::Tensor& logits_ulb_w, at::ScalarType acc) {
  if (!w.has_value() || !w->defined()) return nullptr;
  const int64_t N = logits_ulb_w.size(0);
  TORCH_CHECK_VALUE(w->dim() == 1 && w->size(0) == N, op, ": prior_weight must have shape [", N,
                    "], got ", w->sizes());
  TORCH_CHECK_VALUE(w->scalar_type() == acc, op, ": prior_weight must be ", acc,
                    " (the accumulate dtype of ", logits_ulb_w.scalar_type(), " logits), got ",
                    w->scalar_type());
  TORCH_CHECK_VALUE(w->device() == logits_ulb_w.device(), op, ": prior_weight is on ",
                    w->device(), " but the logits are on ", logits_ulb_w.device());
  return &*w;
}

struct FlexdaOutputs {
  at::Tensor loss, terms[3], mask, pseudo, prior, grad_lb, grad_s;
};

// Allocates the outputs and launches both kernels. flexda_fwd: adj_lb, adj_ulb, hparams given,
// STEP = false, the three terms are views of one [3] tensor; flexda_step: `st` filled in (its
// adj_smem decided here), the terms are three 0-d tensors. prior_weight: the checked [N] weights
// (prior_weight_arg), or nullptr.
template <bool STEP>
FlexdaOutputs flexda_launch(const at::Tensor& logits_lb, const at::Tensor& labels_lb,
                            const at::Tensor& logits_ulb_w, const at::Tensor& logits_ulb_s,
                            const at::Tensor* adj_lb, const at::Tensor* adj_ulb,
                            const at::Tensor* hparams, StepArgs st, double threshold,
                            const at::Tensor* prior_weight, bool distill_all,
                            AdelloStream stream) {
  const int64_t B = logits_lb.size(0), C = logits_lb.size(1), N = logits_ulb_w.size(0);
  const at::ScalarType dtype = logits_lb.scalar_type();
  const at::ScalarType acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = logits_lb.options().dtype(acc);
  FlexdaOutputs out;
  out.loss = at::empty({}, acc_opts);
  at::Tensor terms;
  if (STEP) {
    for (auto& t : out.terms) t = at::empty({}, acc_opts);
  } else {
    terms = at::empty({3}, acc_opts);
    for (int i = 0; i < 3; ++i) out.terms[i] = terms;  // the caller returns `terms` itself
  }
  out.mask = at::empty({N}, acc_opts);
  out.pseudo = at::empty({N}, logits_lb.options().dtype(at::kLong));
  out.prior = at::empty({C}, acc_opts);
  out.grad_lb = at::empty({B, C}, logits_lb.options());
  out.grad_s = at::empty({N, C}, logits_lb.options());

  const Config cfg = choose_config(dtype == at::kDouble, C, distill_all);
  const int64_t rpb = cfg.rows_per_block;
  const int64_t cap_u = std::max(kMinUlbBlocks, std::min(kMaxBlocks, kPartialBudget / C));
  const int G_u = static_cast<int>(std::min((N + rpb - 1) / rpb, cap_u));
  const int G_l = static_cast<int>(std::min((B + rpb - 1) / rpb, kMaxBlocks));
  // Workspace (caching allocator, no zeroing needed: every slot is written):
  //   partial [G_u, C] | loss_l [G_l] | loss_u [G_u] | loss_d [G_u] | finite [G_u] | wsum [G_u]
  // (wsum, the per-block prior-weight sums, is written always and read only with weights)
  at::Tensor ws = at::empty({int64_t(G_u) * C + G_l + 4 * int64_t(G_u)}, acc_opts);
  const size_t elem = acc == at::kDouble ? sizeof(double) : sizeof(float);
  size_t smem = 0;
  if (STEP) {
    // The register regimes always hold the adjustment vector in shared memory (C <= 8192 fp32,
    // <= 512 fp64: <= 32 KB); the looped kernel when it fits the budget.
    st.adj_smem = cfg.tier != Tier::kLooped || C * elem <= size_t(ADELLO_ADJ_SMEM_BYTES);
    smem = st.adj_smem ? C * elem : 0;
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "adello_flexda_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    acc_t* wsp = ws.data_ptr<acc_t>();
    FlexdaParams<scalar_t, acc_t> p{};
    p.z_l = logits_lb.const_data_ptr<scalar_t>();
    p.z_l_rs = logits_lb.stride(0);
    p.z_l_cs = logits_lb.stride(1);
    p.y = labels_lb.const_data_ptr<int64_t>();
    p.y_s = labels_lb.stride(0);
    p.z_w = logits_ulb_w.const_data_ptr<scalar_t>();
    p.z_w_rs = logits_ulb_w.stride(0);
    p.z_w_cs = logits_ulb_w.stride(1);
    p.z_s = logits_ulb_s.const_data_ptr<scalar_t>();
    p.z_s_rs = logits_ulb_s.stride(0);
    p.z_s_cs = logits_ulb_s.stride(1);
    if (!STEP) {
      p.ds = adj_lb->const_data_ptr<acc_t>();
      p.ds_s = adj_lb->stride(0);
      p.du = adj_ulb->const_data_ptr<acc_t>();
      p.du_s = adj_ulb->stride(0);
      p.hp = hparams->const_data_ptr<acc_t>();
      p.hp_s = hparams->stride(0);
    }
    p.st = st;
    p.tau = static_cast<acc_t>(threshold);
    p.B = B;
    p.N = N;
    p.C = static_cast<int>(C);
    p.G_u = G_u;
    p.G_l = G_l;
    p.mask = out.mask.data_ptr<acc_t>();
    p.pseudo = out.pseudo.data_ptr<int64_t>();
    p.g_lb = out.grad_lb.data_ptr<scalar_t>();
    p.g_s = out.grad_s.data_ptr<scalar_t>();
    p.partial = wsp;
    p.loss_l = wsp + int64_t(G_u) * C;
    p.loss_u = p.loss_l + G_l;
    p.loss_d = p.loss_u + G_u;
    p.finite = p.loss_d + G_u;
    p.wsum = p.finite + G_u;
    p.weight = prior_weight != nullptr ? prior_weight->const_data_ptr<acc_t>() : nullptr;
    p.weight_s = prior_weight != nullptr ? prior_weight->stride(0) : 0;
    if (distill_all) {
      launch_main<scalar_t, acc_t, STEP, true>(cfg.tier, p, smem, stream);
    } else {
      launch_main<scalar_t, acc_t, STEP, false>(cfg.tier, p, smem, stream);
    }

    FinalizeParams<acc_t> f{};
    f.partial = p.partial;
    f.loss_l = p.loss_l;
    f.loss_u = p.loss_u;
    f.loss_d = p.loss_d;
    f.finite = p.finite;
    f.wsum = p.wsum;
    f.weighted = p.weight != nullptr;
    f.hp = p.hp;
    f.hp_s = p.hp_s;
    f.st = st;
    f.G_u = G_u;
    f.G_l = G_l;
    f.C = p.C;
    f.B = B;
    f.N = N;
    f.loss = out.loss.data_ptr<acc_t>();
    for (int i = 0; i < 3; ++i) f.term[i] = out.terms[i].data_ptr<acc_t>() + (STEP ? 0 : i);
    f.prior = out.prior.data_ptr<acc_t>();
    const int col_blocks = static_cast<int>((C + 31) / 32);
    auto* finalize = &flexda_finalize_kernel<acc_t, STEP>;
    ADELLO_LAUNCH(finalize, col_blocks + 1, 1024, 0, stream, f);
  });
  return out;
}

}  // namespace
}  // namespace adello
