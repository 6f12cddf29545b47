// adello::snapshot (schema and why it exists: adello_kernels/ops/snapshot.py): a copy of a state
// tensor that torch.compile keeps as a saved value instead of recomputing it from a buffer the
// step later updates in place. A plain clone; registered from C++ for CPU and CUDA tensors alike
// (clone dispatches to the tensor's device), so that no adello:: op runs a Python kernel.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace adello {
namespace {

at::Tensor snapshot(const at::Tensor& x) { return x.clone(); }

}  // namespace
}  // namespace adello

TORCH_LIBRARY_IMPL(adello, CPU, m) { m.impl("snapshot", &adello::snapshot); }

TORCH_LIBRARY_IMPL(adello, CUDA, m) { m.impl("snapshot", &adello::snapshot); }
