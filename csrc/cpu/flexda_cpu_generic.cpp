// The flexda_fwd CPU kernel (flexda_cpu_kernel_impl.h) compiled with the build's default flags:
// at::vec's portable Vectorized, for CPUs (or compilers) without the AVX2/AVX-512 builds.
#include "flexda_cpu_kernel.h"

#define FLEXDA_CPU_ISA generic
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "flexda_cpu_kernel_impl.h"

namespace adello::flexda_cpu {
KernelTable kernels_generic() { return generic::table(); }
}  // namespace adello::flexda_cpu
