// The flexda_fwd CPU kernel (flexda_cpu_kernel_impl.h) compiled for AVX2 + FMA (256-bit
// at::vec::Vectorized). Only the at::vec headers and the kernel are compiled for the ISA; see
// flexda_cpu_kernel.h for why that keeps the library safe to load on any x86-64 CPU.
#include "flexda_cpu_kernel.h"

#if ADELLO_CPU_X86_GCC
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FLEXDA_CPU_ISA avx2
// GCC's C++ front end does not define the ISA macros for `#pragma GCC target`, and sleef.h
// (first included here) declares its vector functions only under them: define them for
// that one header, then take back the ones the build did not define itself.
#define SLEEF_STATIC_LIBS
#ifndef __AVX__
#define __AVX__ 1
#define ADELLO_DEFINED_AVX
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#define ADELLO_DEFINED_AVX2
#endif
#include <sleef.h>
#ifdef ADELLO_DEFINED_AVX
#undef __AVX__
#undef ADELLO_DEFINED_AVX
#endif
#ifdef ADELLO_DEFINED_AVX2
#undef __AVX2__
#undef ADELLO_DEFINED_AVX2
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "flexda_cpu_kernel_impl.h"
#pragma GCC pop_options

namespace adello::flexda_cpu {
KernelTable kernels_avx2() { return avx2::table(); }
}  // namespace adello::flexda_cpu
#else
namespace adello::flexda_cpu {
KernelTable kernels_avx2() { return {}; }
}  // namespace adello::flexda_cpu
#endif
