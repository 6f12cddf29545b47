"""The fused CPU kernel of `adello::flexda_fwd` (csrc/cpu/flexda_cpu*.{h,cpp}): what is
specific to it. The contract every backend meets (every output against the float64 reference on
random shapes, dtypes and hyperparameters, ties, thresholds, bad labels, the step op's state) is
tests/test_contract.py; this file adds

- the CPU kernel's own regimes beyond the contract's shapes: many row tasks, C = 8192 and
  gradients above 16 MB (streaming stores), logits of magnitude 1e4 with exact ties, small
  losses of confident rows (relative precision), non-finite logits;
- strided and unaligned inputs (bitwise), the thread count (bitwise), the AVX2 and portable
  builds (subprocesses with ATEN_CPU_CAPABILITY), bad arguments;
- float64 gradcheck through `flexda_loss(backend="cpu")`, `torch.library.opcheck`, and
  `torch.compile(fullgraph=True)` of an `ADELLOLoss(backend="cpu")` step and of `flexda_loss`.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from contract import check_outputs, fwd_args, make_inputs, reference_outputs

import adello_kernels as ak
from adello_kernels import backends
from adello_kernels.ops import flexda as flexda_ops

pytestmark = pytest.mark.skipif(
    not (backends._load_extension() and flexda_ops.has_kernel("flexda_fwd", "CPU")),
    reason="adello_kernels._C is not built with the CPU kernel")


def op_args(b, n, c, dtype=torch.float32, *, seed=0, scale=5.0, lambda_u=0.8, lambda_d=1.3,
            distill=True, temperature=1.0, threshold=0.95, alpha=0.6, confident_frac=0.5):
    """The op's eight arguments as flexda_loss builds them (tests/contract.py: fwd_args)."""
    return fwd_args(b, n, c, dtype, seed=seed, scale=scale, lambda_u=lambda_u,
                    lambda_d=lambda_d, gate=distill, temperature=temperature,
                    threshold=threshold, alpha=alpha, confident_frac=confident_frac)


def run(args):
    return torch.ops.adello.flexda_fwd(*args)


# ------------------------------------------------------------------------------------------------
# The CPU kernel's regimes beyond the contract's shapes
# ------------------------------------------------------------------------------------------------

# (B, N, C, why). Tasks hold ~16K element-visits; gradients above 16 MB are written with
# streaming stores; the vector width is 16 fp32 lanes (AVX-512) or 8 (AVX2/portable).
REGIME_SHAPES = [
    (1, 1000, 10, "one labeled row, many tasks of unlabeled rows"),
    (1000, 1, 10, "many labeled tasks, one unlabeled row"),
    (1000, 1000, 127, "64 unlabeled tasks of unaligned rows"),
    (5, 7, 8192, "long aligned rows"),
    (300, 400, 8192, "> 16 MB of gradients: streaming stores"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,n,c", [s[:3] for s in REGIME_SHAPES],
                         ids=[f"{b}x{n}x{c}" for b, n, c, _ in REGIME_SHAPES])
def test_kernel_regimes_match_reference(b, n, c, dtype):
    args = op_args(b, n, c, dtype, seed=c + b, temperature=0.5)
    check_outputs(run(args), args, what=f"{b}x{n}x{c} {dtype}")


@pytest.mark.parametrize("c", [10, 127, 4097])
def test_logits_of_magnitude_1e4(c):
    """Beyond the contract's scales 1 to 30: the exps are taken of differences to the row max,
    and the adjusted logits as (z - z_k) + (adj - adj_k), exact where it matters."""
    args = op_args(40, 60, c, seed=11 + c, scale=1e4, temperature=0.7)
    check_outputs(run(args), args, what="scale 1e4")


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_saturated_logits_with_exact_ties(temperature):
    """Labeled and strong logits of exactly +-1e4 (many rows tie at the max: the loss must not
    depend on which tied index anchors the softmax), weak rows at scale 1e4, N = B = 1 as well."""
    for b, n, c in [(1, 1, 1000), (20, 30, 64)]:
        args = op_args(b, n, c, seed=5, scale=1e4, temperature=temperature)
        gen = torch.Generator().manual_seed(1)
        for i in (0, 3):  # labeled and strong rows
            args[i] = torch.where(torch.rand(args[i].shape, generator=gen) < 0.5, -1e4, 1e4)
        args[1][: b // 2] = args[0][: b // 2].argmax(1)  # half the labels at a tied max
        check_outputs(run(args), args, what=f"saturated {b}x{n}x{c}")


def test_small_losses_keep_relative_precision():
    """A confident, correct row has lse - x_y = log(1 + t) with t << 1; log of the rounded
    1 + t in fp32 would be off by up to 6e-8 absolute, i.e. far more than 1e-5 relative."""
    c = 50
    for margin in (7.0, 12.0, 16.0):
        z_l = torch.zeros(1, c)
        z_l[0, 3] = margin
        z_w = torch.zeros(1, c)
        z_w[0, 8] = margin + 9.0  # confident (M = 1), pseudo-label 8
        z_s = torch.zeros(1, c)
        z_s[0, 8] = margin
        zero = torch.zeros(c)
        args = [z_l, torch.tensor([3]), z_w, z_s, zero, zero,
                torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]), 0.95]
        got, want = run(args), reference_outputs(args)
        for name, a, b in (("L_s", got[1][0], want[1][0]), ("L_u", got[1][1], want[1][1])):
            assert b > 0 and abs(float(a) - float(b)) <= 1e-5 * float(b), \
                f"margin {margin}: {name} {float(a)!r} vs {float(b)!r}"


# ------------------------------------------------------------------------------------------------
# Robustness
# ------------------------------------------------------------------------------------------------

def test_non_finite_logits_do_not_crash():
    """NaN / inf logits make the affected terms NaN like the reference (not silently finite),
    the batch prior NaN when a weak row is (ADELLOLoss then skips its update), pseudo-labels stay
    valid indices, and rows that are finite keep finite gradients."""
    args = op_args(8, 8, 300, seed=7)
    args[0][0, 3] = math.nan
    args[2][1, 5] = math.nan
    args[2][2] = -math.inf
    args[3][3, 7] = math.inf
    got, want = run(args), reference_outputs(args)
    loss, terms, mask, pl, prior, g_lb, g_s = got
    assert not math.isfinite(float(loss)) and not math.isfinite(float(want[0]))
    assert not bool(torch.isfinite(prior).all())
    assert mask[1] == 0 and mask[2] == 0  # NaN >= tau and a row of -inf (NaN softmax): M = 0
    assert bool(((pl >= 0) & (pl < 300)).all())
    assert bool(torch.isnan(g_lb[0]).all()) and bool(torch.isfinite(g_lb[1:]).all())
    assert bool(torch.isfinite(g_s[4:]).all())
    # -inf entries in an otherwise finite row are exp(-inf) = 0, as in the reference (labels and
    # pseudo-labels elsewhere, distillation off: every loss term stays finite).
    args = op_args(6, 6, 20, seed=8, distill=False)
    args[0][:, 5] = -math.inf
    args[1] = torch.where(args[1] == 5, 0, args[1])
    args[2][:, 6] = -50.0
    args[3][:, 6] = -math.inf
    got, want = run(args), reference_outputs(args)
    assert math.isfinite(float(got[0])) and math.isfinite(float(want[0]))
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[5], want[5].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(got[6], want[6].float(), rtol=0, atol=1e-6)


def transposed(x):
    return x.t().contiguous().t()


def row_padded(x):
    wide = torch.zeros(x.shape[0], x.shape[1] + 3, dtype=x.dtype)
    wide[:, : x.shape[1]] = x
    return wide[:, : x.shape[1]]


def unaligned(x):
    buf = torch.empty(x.numel() + 1, dtype=x.dtype)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    return out


@pytest.mark.parametrize("layout", [transposed, row_padded, unaligned], ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_and_unaligned_inputs_give_the_same_bits(dtype, layout):
    args = op_args(37, 70, 131, dtype, seed=11, temperature=1.3)
    want = run(args)
    strided = list(args)
    for i in (0, 2, 3):
        strided[i] = layout(args[i])
    strided[4] = torch.stack([args[4], torch.zeros_like(args[4])], 1)[:, 0]
    got = run(strided)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("b,n,c", [(1000, 1000, 127), (64, 300, 4097)])
def test_one_and_two_threads_give_the_same_bits(b, n, c):
    """Rows are split into tasks by shape only and partial sums are reduced in task order, so the
    thread count (and scheduling) cannot change a single bit."""
    args = op_args(b, n, c, seed=2, temperature=0.8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(args)
        torch.set_num_threads(2)
        two = run(args)
        again = run(args)
    finally:
        torch.set_num_threads(threads)
    for x, y, z in zip(one, two, again):
        assert torch.equal(x, y) and torch.equal(y, z)


ISA_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import adello_kernels
    from adello_kernels.ops import flexda as flexda_ops
    import contract as K
    here = torch.backends.cpu.get_cpu_capability()
    assert here == {cap!r}, here
    for b, n, c in [(3, 5, 2), (64, 128, 100), (33, 70, 1000), (5, 7, 4097)]:
        for dtype, gate, temp in ((torch.float32, True, 1.0), (torch.float32, True, 0.5),
                                  (torch.bfloat16, False, 2.0), (torch.float64, True, 0.5)):
            args = K.fwd_args(b, n, c, dtype, seed=c, gate=gate, temperature=temp, ties=True)
            got = torch.ops.adello.flexda_fwd(*args)
            K.check_outputs(got, args, what=f"{{b}}x{{n}}x{{c}}")
    # the step op's prologue (pow and logs of the adjustments) is vectorised per ISA as well
    if flexda_ops.has_kernel("flexda_step", "CPU"):
        cfg = K.StepConfig(total_steps=1000, distill_start=100)
        for c in (1, 7, 127, 4097):
            for dtype in (torch.float32, torch.float64):
                z_l, y, z_w, z_s, p_l, q = K.make_inputs(3, 5, c, dtype=dtype, seed=c,
                                                         prior_zeros=True)
                args = K.step_fwd_args(z_l, y, z_w, z_s, p_l, q, 300, 1.5, cfg)
                out = torch.ops.adello.flexda_step(
                    z_l, y, z_w, z_s, p_l, q, torch.tensor(300), torch.tensor(0),
                    torch.tensor(1.5), *cfg.op_tail(False))
                K.check_outputs(K.step_outputs_as_fwd(out), args, what=f"step C={{c}} {{dtype}}")
    print("ok")
""")


@pytest.mark.parametrize("cap", ["AVX2", "DEFAULT"])
def test_narrower_instruction_sets_match_reference(cap):
    """The kernel (and the step op's prologue) follow torch's CPU capability: run the AVX2 and
    the portable builds in a subprocess (ATEN_CPU_CAPABILITY can only lower it)."""
    order = ["DEFAULT", "AVX2", "AVX512"]
    here = torch.backends.cpu.get_cpu_capability()
    if here not in order or order.index(cap) > order.index(here):
        pytest.skip(f"CPU capability {here} is below {cap}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    script = ISA_SCRIPT.format(tests=os.path.dirname(__file__), cap=cap)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# Labels outside [0, C) are not an error of the op: that row's CE and gradient row are NaN
# (tests/test_contract.py: test_labels_outside_the_classes_give_a_nan_row).
BAD_ARGS = [  # (what, position, replacement)
    ("int32 labels", 1, lambda y: y.int()),
    ("mixed logits dtypes", 3, lambda z: z.double()),
    ("weak/strong rows differ", 3, lambda z: z[:-1]),
    ("class count differs", 2, lambda z: z[:, :-1]),
    ("adj_lb wrong size", 4, lambda v: v[:-1]),
    ("adj_ulb wrong dtype", 5, lambda v: v.double()),
    ("hparams wrong size", 6, lambda v: v[:3]),
    ("empty labeled batch", 0, lambda z: z[:0]),
    ("integer logits", 0, lambda z: z.int()),
    ("threshold 0", 7, 0.0),
    ("temperature 0", 6, lambda v: torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])),
]


@pytest.mark.parametrize("what,index,value", BAD_ARGS, ids=[a[0] for a in BAD_ARGS])
def test_bad_arguments_raise(what, index, value):
    """Second line of defence (flexda_loss validates first): TORCH_CHECK, never a crash."""
    args = op_args(4, 6, 33)
    args[index] = value(args[index]) if callable(value) else value
    with pytest.raises(RuntimeError):
        run(args)


# ------------------------------------------------------------------------------------------------
# Integration: registration, autograd, opcheck, torch.compile
# ------------------------------------------------------------------------------------------------

def test_auto_picks_the_cpu_kernel():
    """With both CPU ops built, `cpu` is available and `auto` resolves to it for CPU tensors."""
    assert "cpu" in ak.available_backends()
    assert backends.resolve_backend("auto", torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("distill,temperature", [(True, 1.0), (True, 0.6), (False, 1.0)])
def test_gradcheck_float64_through_flexda_loss(distill, temperature):
    z_l, y, z_w, z_s, p_l, q = make_inputs(4, 6, 9, dtype=torch.float64, seed=4)
    z_l.requires_grad_()
    z_s.requires_grad_()

    def f(a, s):
        return ak.flexda_loss(a, y, z_w, s, p_l, q, 0.4, distill=distill, lambda_d=0.7,
                              temperature=temperature, backend="cpu").loss

    assert torch.autograd.gradcheck(f, (z_l, z_s))
    # and the gradients equal autograd through the reference
    g_cpu = torch.autograd.grad(f(z_l, z_s), (z_l, z_s))
    ref = ak.flexda_loss(z_l, y, z_w, z_s, p_l, q, 0.4, distill=distill, lambda_d=0.7,
                         temperature=temperature, backend="reference").loss
    g_ref = torch.autograd.grad(ref, (z_l, z_s))
    for a, b in zip(g_cpu, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck(dtype):
    args = op_args(5, 7, 19, dtype, temperature=0.7)
    args[0].requires_grad_()
    args[3].requires_grad_()
    torch.library.opcheck(torch.ops.adello.flexda_fwd.default, args)


def test_compile_fullgraph_module_step():
    """Two ADELLOLoss(backend="cpu") steps compiled with fullgraph=True equal eager ones:
    losses, gradients and the module state."""
    b, n, c = 16, 24, 37
    prior_lb = torch.softmax(torch.randn(c, generator=torch.Generator().manual_seed(0)), 0)
    eager = ak.ADELLOLoss(prior_lb, 100, backend="cpu")
    compiled_mod = ak.ADELLOLoss(prior_lb, 100, backend="cpu")
    compiled = torch.compile(compiled_mod, fullgraph=True)
    for step in range(2):
        z_l, y, z_w, z_s, _, _ = make_inputs(b, n, c, seed=step)
        outs = []
        for crit in (eager, compiled):
            a, s = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
            out = crit(a, y, z_w, s)
            out.loss.backward()
            outs.append((out, a.grad, s.grad))
        (o1, ga1, gs1), (o2, ga2, gs2) = outs
        for x1, x2 in zip(o1, o2):
            torch.testing.assert_close(x1, x2, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ga1, ga2, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(gs1, gs2, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(eager.prior_ulb, compiled_mod.prior_ulb, rtol=1e-6, atol=1e-9)
    assert int(eager.step) == int(compiled_mod.step) == 2


def test_compile_fullgraph_flexda_loss():
    z_l, y, z_w, z_s, p_l, q = make_inputs(12, 20, 50, seed=3)

    def step(a, s):
        return ak.flexda_loss(a, y, z_w, s, p_l, q, 0.3, temperature=0.8, backend="cpu",
                              validate=False)

    compiled = torch.compile(step, fullgraph=True)
    grads = []
    for fn in (step, compiled):
        a, s = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        out = fn(a, s)
        out.loss.backward()
        grads.append((out, a.grad, s.grad))
    (o1, ga1, gs1), (o2, ga2, gs2) = grads
    for x1, x2 in zip(o1, o2):
        torch.testing.assert_close(x1, x2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ga1, ga2)
    torch.testing.assert_close(gs1, gs2)
