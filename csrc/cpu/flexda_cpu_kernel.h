// Internal interface between the op glue (flexda_cpu.cpp) and the vectorised kernel
// (flexda_cpu_kernel_impl.h), which is compiled once per instruction set:
//
//   flexda_cpu_generic.cpp   plain C++ (at::vec's portable Vectorized), any CPU
//   flexda_cpu_avx2.cpp      AVX2 + FMA           (x86-64, GCC; empty table elsewhere)
//   flexda_cpu_avx512.cpp    AVX-512 F/BW/VL/DQ   (x86-64, GCC; empty table elsewhere)
//
// Why three translation units: at::vec::Vectorized picks its width from CPU_CAPABILITY_* macros
// at compile time, and setup.py builds every file with the same portable flags. Each ISA file
// enables its instruction set with `#pragma GCC target` around the at::vec headers and the kernel
// only, after this header has pulled in every c10/ATen header they depend on with the default
// target. So the only code compiled for AVX2/AVX-512 lives in namespaces named after the ISA
// (at::vec::AVX512, adello::flexda_cpu::avx512): no inline function shared with the rest of the
// library can be emitted with wide instructions and picked by the linker on an older CPU.
// flexda_cpu.cpp chooses the table at run time from torch's own CPU capability.
#pragma once

#include <cstdint>

// Everything the at::vec headers include, with the default target (see above), except
// <sleef.h>, which only declares the vector functions of the ISA enabled where it is included.
#include <ATen/AccumulateType.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>  // _mm_getcsr / _mm_setcsr (baseline SSE)
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ADELLO_CPU_X86_GCC 1
#include <immintrin.h>  // declares every ISA's intrinsics, each with its own target attribute
#else
#define ADELLO_CPU_X86_GCC 0
#endif

namespace adello::flexda_cpu {

// Raw views of the op's (contiguous) tensors. `acc` = double for double logits, float otherwise.
struct Args {
  const void* logits_lb;      // [B, C] scalar_t
  const int64_t* labels_lb;   // [B]
  const void* logits_ulb_w;   // [N, C] scalar_t
  const void* logits_ulb_s;   // [N, C] scalar_t
  const void* adj_lb;         // [C] acc
  const void* adj_ulb;        // [C] acc
  const void* prior_weight;   // [N] acc per-row weights of the batch prior, or nullptr (all 1)
  int64_t B, N, C;
  double lambda_u, lambda_d, temperature;
  bool gate;                  // distill_gate != 0
  bool prior_em;              // prior_batch from softmax(w + du) (EM estimator), not softmax(w)
  bool distill_all;           // distillation on every row, not only the rows with M = 0
  double threshold;
  void* loss;                 // 0-d acc
  void* terms;                // [3] acc
  void* mask;                 // [N] acc
  int64_t* pseudo_labels;     // [N]
  void* prior_batch;          // [C] acc
  void* grad_lb;              // [B, C] scalar_t
  void* grad_ulb_s;           // [N, C] scalar_t
};

using KernelFn = void (*)(const Args&);

// The logit adjustments of the step prologue, in double (see `adjustments` in the kernel):
// (prior_lb [C], prior_ulb [C], prior_target [C], C, alpha, eps, workspace [C], ds [C], du [C]).
using AdjustFn = void (*)(const double*, const double*, const double*, int64_t, double, double,
                          double*, double*, double*);

// One kernel per logits dtype, and the adjustments; null entries when the ISA was not compiled
// in this build.
struct KernelTable {
  KernelFn f32 = nullptr, f64 = nullptr, bf16 = nullptr, f16 = nullptr;
  AdjustFn adjust = nullptr;

  template <typename scalar_t>
  KernelFn get() const {
    if constexpr (std::is_same_v<scalar_t, float>) return f32;
    else if constexpr (std::is_same_v<scalar_t, double>) return f64;
    else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return bf16;
    else return f16;
  }
};

KernelTable kernels_generic();
KernelTable kernels_avx2();
KernelTable kernels_avx512();

// Flushes denormals to zero (FTZ and DAZ) on this thread while alive. Probabilities below 1e-38
// are 0 to every tolerance here, but producing or consuming one costs a ~100-cycle microcode
// assist per instruction on x86; the tails of short rows and the exps of far-from-max logits
// would hit them constantly. The thread's previous mode is restored on exit.
struct DenormalsAreZero {
#if defined(__x86_64__) || defined(_M_X64)
  unsigned int saved = _mm_getcsr();
  DenormalsAreZero() { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15) | DAZ (bit 6)
  ~DenormalsAreZero() { _mm_setcsr(saved); }
#endif
};

// Row partitioning, shared by every ISA so that all of them sum in the same order. Rows are
// grouped into tasks of fixed size that depends on the shape only (never on the thread count),
// and each task owns its partial sums, reduced afterwards in task order: results are bitwise the
// same for any number of threads and any scheduling.
struct Plan {
  int64_t rows_lb, rows_ulb;   // rows per labeled / unlabeled task
  int64_t tasks_lb, tasks_ulb; // labeled tasks come first, then unlabeled ones
};

// A task is about kTaskCost element-visits (a labeled row costs C, an unlabeled pair 2C or 3C);
// small enough to balance two threads at the small shapes, large enough that the per-task work
// (a [C] partial of the batch prior) stays a few percent. At most kMaxTasksUlb unlabeled tasks,
// which bounds the partial-prior buffer to kMaxTasksUlb x C.
inline Plan make_plan(int64_t B, int64_t N, int64_t C, bool distill_t) {
  constexpr int64_t kTaskCost = int64_t(1) << 14;
  constexpr int64_t kMaxTasksUlb = 64;
  const int64_t cost_lb = C;
  const int64_t cost_ulb = distill_t ? 3 * C : 2 * C;
  int64_t rows_ulb = std::max<int64_t>(1, kTaskCost / cost_ulb);
  rows_ulb = std::max(rows_ulb, (N + kMaxTasksUlb - 1) / kMaxTasksUlb);
  rows_ulb = std::min(rows_ulb, N);
  int64_t rows_lb = std::max<int64_t>(1, rows_ulb * cost_ulb / cost_lb);
  rows_lb = std::min(rows_lb, B);
  return Plan{rows_lb, rows_ulb, (B + rows_lb - 1) / rows_lb, (N + rows_ulb - 1) / rows_ulb};
}

}  // namespace adello::flexda_cpu
