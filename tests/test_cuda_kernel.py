"""The fused CUDA kernel of `adello::flexda_fwd` (csrc/cuda/flexda_cuda.cu).

GPU tests (marked `gpu`, skipped without a GPU or without the compiled CUDA kernel): every output
against the float64 closed-form reference at the SPEC.md section 6 tolerances, one class count per
kernel regime, each dtype, temperature != 1, distillation on and off; strided / unaligned inputs;
bit-identical repeats; opcheck; CUDA-graph capture and sync-free steps.

CPU tests (run in CI):
- `test_emulated_*`: the same kernel source compiled for the CPU by tests/cuda_emulator.cpp (CUDA
  threads as OS threads, __syncthreads and shuffles as barriers), every kernel regime against the
  float64 reference and across input layouts. This checks the kernels' logic without a GPU.
- `test_every_adello_op_has_a_cuda_kernel_in_a_cuda_build`: where torch is a CUDA build and a
  CUDA toolkit exists, the built extension registers a CUDA kernel for every adello:: op but the
  CPU-only `flexda_step` (CPU_ONLY_OPS). CI runs it in the CUDA venv through
  tests/cuda_build_check.sh (it skips under a CPU build of torch).
"""
import copy
import functools
import hashlib
import os
import shutil

import pytest
import torch

import adello_kernels as ak
from adello_kernels import backends
from adello_kernels.ops import flexda as flexda_ops
from adello_kernels.reference import flexda_fwd_reference, logit_adjustments
from utils import assert_outputs_close, make_inputs, step_without_host_sync


def _cuda_kernel_built() -> bool:
    return backends._load_extension() and flexda_ops.has_kernel("flexda_fwd", "CUDA")


needs_cuda_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and _cuda_kernel_built()),
    reason="needs a CUDA GPU and adello_kernels._C built with the CUDA kernel")

# One class count per kernel regime of choose_config (fp32/bf16/fp16), plus the list:
#   1, 10, 100, 127 -> warp, 4 elements per lane (127: odd rows are never 16-byte aligned)
#   200 -> warp/8, 500 -> warp/16, 1000 -> warp/32 (bandwidth shape)
#   2000 -> block of 128, 3000 -> block of 256, 4097 -> block of 512 (one column past 4096)
#   9000, 32768 -> looped kernel (online softmax over chunks)
CLASS_COUNTS = [1, 10, 100, 127, 200, 500, 1000, 2000, 3000, 4097, 9000, 32768]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODES = {  # name: (distill, temperature)
    "distill-T1": (True, 1.0),
    "distill-T0.6": (True, 0.6),
    "nodistill-T2.5": (False, 2.5),
}


def rows_for(c: int) -> tuple[int, int]:
    """(B, N): enough rows for several blocks per role, bounded memory for the large C."""
    if c >= 9000:
        return 33, 70
    if c >= 2000:
        return 65, 130
    return 150, 301


def op_inputs(z_l, prior_lb, prior_ulb, alpha, *, lambda_u=1.0, lambda_d=0.7, distill=True,
              temperature=1.0):
    """The op's vector inputs (ds, du, hparams) in the accumulate dtype, as flexda_loss builds
    them."""
    acc = torch.float64 if z_l.dtype == torch.float64 else torch.float32
    ds, du = logit_adjustments(prior_lb, prior_ulb, alpha, 1e-9, dtype=acc)
    hp = torch.tensor([lambda_u, lambda_d, float(distill), temperature], dtype=acc,
                      device=z_l.device)
    return ds, du, hp


def reference(z_l, y, z_w, z_s, ds, du, hp, threshold):
    """The float64 closed-form reference on exactly the kernel's inputs (adjustments included)."""
    return flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds.double(),
                                du.double(), hp.double(), threshold)


def cuda_case(b, n, c, dtype, *, seed=0, scale=5.0, distill=True, temperature=1.0,
              threshold=0.95, alpha=0.6, confident_frac=0.5):
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype, seed=seed, scale=scale,
                                           device="cuda", confident_frac=confident_frac)
    ds, du, hp = op_inputs(z_l, p_l, q, alpha, distill=distill, temperature=temperature)
    return [z_l, y, z_w, z_s, ds, du, hp, threshold]


def run(args):
    return torch.ops.adello.flexda_fwd(*args)


# ------------------------------------------------------------------------------------------------
# Correctness against the float64 reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASS_COUNTS)
def test_matches_reference(c, dtype, mode):
    distill, temperature = MODES[mode]
    b, n = rows_for(c)
    args = cuda_case(b, n, c, dtype, seed=c, distill=distill, temperature=temperature)
    got = run(args)
    torch.cuda.synchronize()
    assert got[5].dtype == dtype and got[6].dtype == dtype  # gradients in the logits' dtype
    assert got[5].is_contiguous() and got[6].is_contiguous()
    if not distill:
        assert float(got[1][2]) == 0.0
    assert_outputs_close(got, reference(*args), args[2], dtype, what=f"C={c} {dtype} {mode}")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c", [10, 300, 1000, 5000])  # fp64: warp/4, warp/16, looped, looped
def test_float64_matches_reference(c):
    args = cuda_case(40, 90, c, torch.float64, seed=1, temperature=0.8)
    assert_outputs_close(run(args), reference(*args), args[2], torch.float64, what=f"fp64 C={c}")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c", [10, 127, 1000, 32768])
def test_many_rows_per_block(c):
    """More rows than the grid caps (1024 labeled / <= 1024 unlabeled blocks): each warp or
    block loops over several rows, and the batch prior accumulates across them."""
    b, n = (5000, 4500) if c <= 1000 else (300, 600)
    args = cuda_case(b, n, c, torch.float32, seed=3, temperature=0.7)
    assert_outputs_close(run(args), reference(*args), args[2], torch.float32, what=f"C={c}")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c", [127, 1000, 9000])
def test_large_strong_logits_no_cancellation(c):
    """Strong logits ~1e4 on unconfident rows, T != 1: the distillation term is written with
    per-element differences (m - a_c) / T, all >= 0, so fp32 keeps the reference's accuracy where
    lse(a/T) - sum_c q_c a_c / T would cancel to ~1e-3 absolute. du = 0 keeps a = z_s exact in
    fp32 (a rounded z_s + du at 1e4 would move near-tied probabilities by ~1e-3, an input
    rounding no fp32 kernel can avoid)."""
    args = cuda_case(20, 40, c, torch.float32, seed=5, scale=1.0, temperature=0.5)
    args[3] = args[3] * 3000.0 + 1.0e4
    args[5] = torch.zeros_like(args[5])
    assert_outputs_close(run(args), reference(*args), args[2], torch.float32, what="large logits")


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c", [100, 2000, 9000])
def test_all_rows_masked_or_none(c):
    """threshold 1e-6 masks every row (pure consistency); unconfident rows under threshold 0.99
    mask none (pure distillation)."""
    for threshold, frac in ((1e-6, 0.5), (0.99, 0.0)):
        args = cuda_case(30, 64, c, torch.float32, seed=6, scale=1.0, threshold=threshold,
                         temperature=2.0, confident_frac=frac)
        got = run(args)
        assert float(got[2].mean()) == (1.0 if threshold < 0.5 else 0.0)
        assert_outputs_close(got, reference(*args), args[2], torch.float32, threshold=threshold,
                             what=f"threshold={threshold}")


@pytest.mark.gpu
@needs_cuda_kernel
def test_non_finite_logits_do_not_crash():
    """NaN / inf logits give non-finite losses (as the reference), valid pseudo-labels, no fault."""
    args = cuda_case(8, 8, 300, torch.float32, seed=7)
    args[0][0, 3] = float("nan")
    args[2][1, 5] = float("nan")
    args[2][2] = float("-inf")
    args[3][3, 7] = float("inf")
    got = run(args)
    torch.cuda.synchronize()
    assert not bool(torch.isfinite(got[0]))
    assert bool(((got[3] >= 0) & (got[3] < 300)).all())


# ------------------------------------------------------------------------------------------------
# Layouts: strided and unaligned inputs take the scalar-load path and must give the same bits
# ------------------------------------------------------------------------------------------------

def unaligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of x whose data pointer is one element past a 16-byte boundary."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    return out


def transposed(x: torch.Tensor) -> torch.Tensor:
    """A copy of x with column stride != 1 (a transposed view)."""
    return x.t().contiguous().t()


def row_padded(x: torch.Tensor) -> torch.Tensor:
    """A copy of x living in a wider buffer (row stride > C, column stride 1)."""
    wide = torch.zeros(x.shape[0], x.shape[1] + 3, dtype=x.dtype, device=x.device)
    wide[:, : x.shape[1]] = x
    return wide[:, : x.shape[1]]


def strided_vector(v: torch.Tensor) -> torch.Tensor:
    return torch.stack([v, torch.zeros_like(v)], dim=1)[:, 0]


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("layout", [unaligned, transposed, row_padded], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [100, 128, 1000, 4097, 9000])
def test_strided_and_unaligned_inputs(c, dtype, layout):
    """Vector and scalar loads fetch the same elements and every sum has an order fixed by
    (B, N, C): any layout gives bit-identical outputs, and they match the reference."""
    args = cuda_case(37, 70, c, dtype, seed=11, temperature=1.3)
    want = run(args)
    odd = list(args)
    for i in (0, 2, 3):
        odd[i] = layout(args[i])
    odd[1] = strided_vector(args[1])
    odd[4] = strided_vector(args[4])
    odd[5] = unaligned(args[5])
    got = run(odd)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output {i} depends on the input layout"
    assert_outputs_close(got, reference(*args), args[2], dtype, what=layout.__name__)


# ------------------------------------------------------------------------------------------------
# Determinism, opcheck, graphs, sync-freedom
# ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c", [100, 1000, 4097, 32768])
def test_bit_identical_repeats(c):
    """No float atomics: repeated runs give the same bits (including the batch prior and loss,
    which are multi-block reductions)."""
    b, n = (4096, 8192) if c <= 1000 else (64, 512)
    args = cuda_case(b, n, c, torch.bfloat16, seed=12, temperature=0.9)
    first = run(args)
    for _ in range(3):
        again = run(args)
        for i, (g, w) in enumerate(zip(again, first)):
            assert torch.equal(g, w), f"output {i} differs between runs"


@pytest.mark.gpu
@needs_cuda_kernel
@pytest.mark.parametrize("c,dtype", [(7, torch.float32), (1000, torch.bfloat16),
                                     (9000, torch.float64)], ids=str)
def test_opcheck_cuda(c, dtype):
    args = cuda_case(5, 9, c, dtype, seed=13, temperature=1.5)
    args[0].requires_grad_()
    args[3].requires_grad_()
    torch.library.opcheck(torch.ops.adello.flexda_fwd.default, args)


def _step_inputs(seed, c=100, dtype=torch.float32):
    z_l, y, z_w, z_s, _, _ = make_inputs(48, 96, c, dtype=dtype, seed=seed, device="cuda")
    return z_l, y, z_w, z_s


@pytest.mark.gpu
@needs_cuda_kernel
def test_cuda_graph_capture_of_a_training_step():
    """An ADELLOLoss(backend='cuda', validate=False) step captured once and replayed equals the
    eager steps bit for bit (losses, mask, pseudo-labels, updated prior, step counter)."""
    c = 100
    prior_lb = make_inputs(1, 1, c, seed=20)[4].cuda()
    kw = dict(backend="cuda", validate=False, distill_start=1, temperature=0.8)
    eager = ak.ADELLOLoss(prior_lb, 1000, **kw).cuda()
    graphed = copy.deepcopy(eager)
    static = [t.clone() for t in _step_inputs(0, c)]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture (allocator, lazy init)
        for _ in range(2):
            graphed(*static)
    torch.cuda.current_stream().wait_stream(side)
    graphed.load_state_dict(eager.state_dict())  # in-place: the captured buffers stay the same

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = graphed(*static)

    for step in range(4):  # steps 0..3 cross distill_start = 1
        data = _step_inputs(100 + step, c)
        for s, d in zip(static, data):
            s.copy_(d)
        graph.replay()
        want = eager(*data)
        torch.cuda.synchronize()
        for name, g, w in zip(want._fields, out_static, want):
            assert torch.equal(g, w), f"step {step}: {name} differs from the eager step"
        assert torch.equal(graphed.prior_ulb, eager.prior_ulb)
        assert int(graphed.step) == int(eager.step) == step + 1


@pytest.mark.gpu
@needs_cuda_kernel
def test_op_does_not_synchronize():
    args = cuda_case(64, 128, 1000, torch.bfloat16, seed=21, temperature=0.7)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(args)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@needs_cuda_kernel
def test_training_step_does_not_synchronize():
    """A whole ADELLOLoss step (forward, prior update, backward) with validate=False."""
    c = 127
    prior_lb = make_inputs(1, 1, c, seed=22)[4].cuda()
    crit = ak.ADELLOLoss(prior_lb, 1000, backend="cuda", validate=False, distill_start=0,
                         temperature=0.5).cuda()
    z_l, y, z_w, z_s = _step_inputs(23, c)
    z_l.requires_grad_()
    z_s.requires_grad_()
    step_without_host_sync(crit, z_l, y, z_w, z_s)
    assert z_l.grad is not None and z_s.grad is not None


@pytest.mark.gpu
@needs_cuda_kernel
def test_flexda_loss_cuda_backend_gradients():
    """backend='cuda' through flexda_loss: autograd returns the kernel's gradients scaled by the
    incoming gradient, matching autograd of the reference."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(20, 40, 127, seed=24, device="cuda")
    grads = []
    for backend in ("cuda", "reference"):
        a, s = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        out = ak.flexda_loss(a, y, z_w, s, p_l, q, 0.4, temperature=0.7, backend=backend)
        (2.5 * out.loss).backward()
        grads.append((a.grad, s.grad))
    for g, w in zip(grads[0], grads[1]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6 * 2.5)


# ------------------------------------------------------------------------------------------------
# CPU emulation of the CUDA kernels (tests/cuda_emulator.cpp): runs in CI without a GPU
# ------------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
EMULATOR_SOURCES = [os.path.join(HERE, "cuda_emulator.cpp"),
                    os.path.join(HERE, "..", "csrc", "cuda", "flexda_cuda.cu")]


@functools.lru_cache(maxsize=None)
def emulated_op():
    """torch.ops.adello_cuda_emu.flexda_fwd, built once per source version (~30 s)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the CUDA-kernel emulator")
    from torch.utils.cpp_extension import load
    digest = hashlib.sha1(b"".join(open(f, "rb").read() for f in EMULATOR_SOURCES)).hexdigest()
    # The kernel file is #included, which the JIT's version check does not see: its hash goes
    # into the flags so that an edited kernel is rebuilt. Grid cap 4: small tests loop over rows.
    load(name="adello_cuda_emulator", sources=EMULATOR_SOURCES[:1], is_python_module=False,
         extra_cflags=["-O1", "-std=c++20", "-DADELLO_GRID_CAP=4", f"-DADELLO_SRC_{digest[:12]}"])
    return torch.ops.adello_cuda_emu.flexda_fwd


def cpu_case(b, n, c, dtype, mode, seed=0):
    distill, temperature = MODES[mode]
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype, seed=seed)
    ds, du, hp = op_inputs(z_l, p_l, q, 0.6, distill=distill, temperature=temperature)
    return [z_l, y, z_w, z_s, ds, du, hp, 0.95]


# (C, dtype, B, N, mode): every regime once, the modes and dtypes spread over them. With the grid
# capped at 4 blocks per role, N > 16 (warp regime) or N > 4 (block regimes) loops over rows.
EMULATED_CASES = [
    (1, torch.float32, 5, 9, "distill-T0.6"),         # warp/4, a single class
    (10, torch.bfloat16, 5, 21, "distill-T1"),        # warp/4, rows loop in the warps
    (127, torch.float16, 9, 40, "distill-T0.6"),      # warp/4, odd rows unaligned
    (200, torch.float32, 7, 30, "nodistill-T2.5"),    # warp/8
    (500, torch.bfloat16, 9, 33, "distill-T0.6"),     # warp/16
    (1000, torch.float32, 6, 18, "distill-T0.6"),     # warp/32
    (2000, torch.float16, 3, 9, "distill-T1"),        # block of 128
    (3000, torch.float32, 3, 9, "distill-T0.6"),      # block of 256
    (4097, torch.bfloat16, 3, 9, "nodistill-T2.5"),   # block of 512
    (9000, torch.float32, 3, 9, "distill-T0.6"),      # looped
    (9000, torch.bfloat16, 2, 5, "distill-T1"),       # looped, 16-bit loads
    (10, torch.float64, 5, 40, "distill-T0.6"),       # fp64 warp/4
    (300, torch.float64, 5, 30, "nodistill-T2.5"),    # fp64 warp/16
    (600, torch.float64, 3, 9, "distill-T0.6"),       # fp64 looped
]


@pytest.mark.parametrize("c,dtype,b,n,mode", EMULATED_CASES,
                         ids=[f"C{c}-{str(d)[6:]}-{m}" for c, d, _, _, m in EMULATED_CASES])
def test_emulated_kernel_matches_reference(c, dtype, b, n, mode):
    args = cpu_case(b, n, c, dtype, mode, seed=c)
    got = emulated_op()(*args)
    assert got[5].dtype == dtype and got[6].dtype == dtype
    if not MODES[mode][0]:
        assert float(got[1][2]) == 0.0
    assert_outputs_close(got, reference(*args), args[2], dtype, what=f"emulated C={c} {mode}")


@pytest.mark.parametrize("c,dtype", [(127, torch.float16), (1000, torch.float32),
                                     (4097, torch.bfloat16), (9000, torch.float32)])
def test_emulated_kernel_layouts_bit_identical(c, dtype):
    """Scalar strided / unaligned loads and 16-byte vector loads give the same bits."""
    args = cpu_case(3, 9, c, dtype, "distill-T0.6", seed=1)
    want = emulated_op()(*args)
    odd = list(args)
    odd[0], odd[2], odd[3] = transposed(args[0]), unaligned(args[2]), row_padded(args[3])
    odd[1], odd[4], odd[5] = strided_vector(args[1]), strided_vector(args[4]), unaligned(args[5])
    got = emulated_op()(*odd)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"output {i} depends on the input layout"


def test_emulated_kernel_large_strong_logits():
    """The distillation term at strong logits ~1e4 (see test_large_strong_logits_no_cancellation)."""
    args = cpu_case(4, 20, 127, torch.float32, "distill-T0.6", seed=5)
    args[2] = args[2] / 5.0                       # unconfident weak rows
    args[3] = args[3] * 600.0 + 1.0e4
    args[5] = torch.zeros_like(args[5])
    got = emulated_op()(*args)
    assert float(got[2].sum()) < 20               # some rows distil
    assert_outputs_close(got, reference(*args), args[2], torch.float32, what="large logits")


# ------------------------------------------------------------------------------------------------
# Build check (CPU; meaningful in the CUDA venv of tests/cuda_build_check.sh)
# ------------------------------------------------------------------------------------------------

# CPU-only by design: adello::flexda_step is the CPU fast path of an ADELLOLoss step (prologue +
# kernel + C++ autograd in one call, adello_kernels/ops/step.py); on a GPU the module runs
# adello_prepare + flexda_fwd, which the check below covers.
CPU_ONLY_OPS = {"adello::flexda_step"}


def _adello_ops() -> list[str]:
    backends._load_triton()  # adello::flexda_fwd_triton registers its kernels on import
    names = {"adello::" + n for n in flexda_ops.OP_NAMES}
    names |= {n for n in torch._C._dispatch_get_all_op_names() if n.startswith("adello::")}
    return sorted(names - CPU_ONLY_OPS)


@pytest.mark.parametrize("op", _adello_ops())
def test_every_adello_op_has_a_cuda_kernel_in_a_cuda_build(op):
    if torch.version.cuda is None:
        pytest.skip("CPU build of torch: the CUDA build check runs in the CUDA venv "
                    "(tests/cuda_build_check.sh)")
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None:
        pytest.skip("no CUDA toolkit found (set CUDA_HOME): the CUDA sources cannot be built")
    assert backends._load_extension(), "adello_kernels._C is not built or failed to load"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), \
        f"{op} has no kernel for the CUDA dispatch key in this CUDA build"
