// CPU emulation of the CUDA kernels in csrc/cuda/ (flexda_fwd, flexda_step, scale_grads_), for
// testing their logic without a GPU.
//
// The kernel sources are compiled unchanged by the host compiler: the CUDA built-ins they use are
// defined here (threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __syncthreads_and,
// __shfl_xor_sync, the round-to-nearest intrinsics, the qualifiers, dynamic shared memory) and
// ADELLO_LAUNCH runs a grid on blockDim OS threads, one CUDA thread each, the blocks one after
// another. __syncthreads is a barrier of the block's threads; a shuffle is an exchange through a
// per-warp slot array between two barriers of the warp's 32 threads; __shared__ variables become
// function-local statics (one copy, which is exactly right for blocks that run one at a time);
// dynamic shared memory is a buffer of the launch's size. Everything else (tier choice, grid
// sizes, workspace layout, vector/scalar load paths, reductions, the step prologue, the finalize
// kernel and its epilogue, the scale kernel) is the production code.
//
// What this cannot check: real-GPU concerns (memory coalescing, register pressure, the exact
// expf/logf of the device math library, warp-synchronous assumptions; the kernels make none:
// every cross-thread exchange is a shuffle or goes through __syncthreads).
//
// Built by tests/cuda_emu.py with torch.utils.cpp_extension.load, -DADELLO_GRID_CAP=4 (at most 4
// blocks per role, so that a few dozen rows already loop inside warps and blocks) and a small
// -DADELLO_ADJ_SMEM_BYTES (so that the looped kernel's recompute path runs at small C); registers
// torch.ops.adello_cuda_emu.{flexda_fwd, flexda_step, scale_grads_} for CPU tensors with the
// schemas of the adello:: ops (written out, argument names and defaults included, so that a
// call may leave out the trailing optional arguments as with the real ops).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

namespace adello_emu {
struct Dim3 { unsigned x = 0, y = 0, z = 0; };

struct Grid {
  explicit Grid(int threads) : block_barrier(threads), slots(threads) {
    for (int w = 0; w < threads / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> block_barrier;
  std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
  std::vector<uint64_t> slots;  // one shuffle word per thread
  std::vector<uint4> dynamic_smem;
};
inline Grid* current = nullptr;
}  // namespace adello_emu

inline thread_local adello_emu::Dim3 threadIdx, blockIdx, blockDim, gridDim;

inline void __syncthreads() { adello_emu::current->block_barrier.arrive_and_wait(); }

inline int __syncthreads_and(int pred) {
  adello_emu::Grid& g = *adello_emu::current;
  g.slots[threadIdx.x] = pred != 0;
  g.block_barrier.arrive_and_wait();
  int all = 1;
  for (unsigned i = 0; i < blockDim.x; ++i) all &= g.slots[i] != 0;
  g.block_barrier.arrive_and_wait();  // nobody overwrites a slot before it was read
  return all;
}

// The kernels use these to keep a product and a sum rounded separately; the host compiler does
// not contract a * b + c without an FMA target flag, which this build does not pass.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask: all kernels shuffle with the full warp*/, T v, int offset) {
  static_assert(sizeof(T) <= 8, "one slot per thread");
  adello_emu::Grid& g = *adello_emu::current;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  g.slots[tid] = bits;
  g.warp_barriers[warp]->arrive_and_wait();
  const uint64_t other = g.slots[warp * 32 + (lane ^ offset)];
  g.warp_barriers[warp]->arrive_and_wait();  // nobody overwrites a slot before it was read
  T r;
  std::memcpy(&r, &other, sizeof(T));
  return r;
}

namespace adello_emu {
template <typename P>
void launch(void (*kernel)(P), int grid, int block, size_t smem, const P& params) {
  TORCH_CHECK(block % 32 == 0 && block <= 1024 && grid >= 1, "bad launch ", grid, "x", block);
  Grid g(block);
  g.dynamic_smem.assign(smem / sizeof(uint4) + 1, uint4{});
  current = &g;
  std::vector<std::thread> threads;
  threads.reserve(block);
  for (int tid = 0; tid < block; ++tid) {
    threads.emplace_back([&, tid] {
      threadIdx.x = tid;
      blockDim.x = block;
      gridDim.x = grid;
      for (int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        kernel(params);
        g.block_barrier.arrive_and_wait();  // the next block starts when this one is done
      }
    });
  }
  for (auto& t : threads) t.join();
  current = nullptr;
}
}  // namespace adello_emu

#define ADELLO_CUDA_EMULATION 1
#define ADELLO_LAUNCH(kernel, grid, block, smem, stream, params) \
  ::adello_emu::launch(kernel, (grid), (block), (smem), (params))
#define ADELLO_ALLOW_SMEM(kernel, bytes) ((void)(kernel), (void)(bytes))
#define ADELLO_DYNAMIC_SMEM(name) \
  unsigned char* name = reinterpret_cast<unsigned char*>(::adello_emu::current->dynamic_smem.data())

#include "../csrc/cuda/flexda_cuda.cu"
#include "../csrc/cuda/flexda_step_cuda.cu"

TORCH_LIBRARY(adello_cuda_emu, m) {
  // The schemas of adello_kernels/ops/flexda.py and ops/step.py (the mutable arguments as there).
  m.def("flexda_fwd(Tensor logits_lb, Tensor labels_lb, Tensor logits_ulb_w, "
        "Tensor logits_ulb_s, Tensor adj_lb, Tensor adj_ulb, Tensor hparams, float threshold, "
        "Tensor? prior_weight=None, bool distill_all=False) -> (Tensor loss, Tensor terms, "
        "Tensor mask, "
        "Tensor pseudo_labels, Tensor prior_batch, Tensor grad_lb, Tensor grad_ulb_s)",
        &adello::flexda_fwd_cuda);
  m.def("flexda_step(Tensor logits_lb, Tensor labels_lb, Tensor logits_ulb_w, "
        "Tensor logits_ulb_s, Tensor prior_lb, Tensor(a!) prior_ulb, Tensor(b!) step, "
        "Tensor(c!) skipped_updates, Tensor temperature, int total_steps, float alpha_min, "
        "float power, int distill_start, float lambda_u, float lambda_d, float eps, bool flexda, "
        "float threshold, float prior_momentum, bool update, bool prior_em=False, "
        "Tensor? prior_target=None, int alpha_epoch_steps=1, Tensor? prior_weight=None, "
        "bool distill_all=False) -> "
        "(Tensor loss, Tensor loss_sup, Tensor loss_unsup, Tensor loss_distill, Tensor mask, "
        "Tensor pseudo_labels, Tensor prior_batch, Tensor grad_lb, Tensor grad_ulb_s)",
        &adello::flexda_step_cuda);
  m.def("scale_grads_(Tensor(a!) grad_lb, Tensor(b!) grad_ulb_s, Tensor grad_loss) -> ()",
        &adello::scale_grads_cuda);
}
