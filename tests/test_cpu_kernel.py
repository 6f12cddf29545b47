"""The fused CPU kernel of `adello::flexda_fwd` (csrc/cpu/flexda_cpu*.{h,cpp}).

- every output against the float64 closed-form reference on exactly the kernel's inputs, at the
  SPEC.md section 6 tolerances, over a grid with one case per kernel regime (below);
- targeted regressions: logits of magnitude 1e4 with exact ties, small losses of confident rows
  (relative precision), non-finite logits, strided inputs, the thread count (bitwise), the
  AVX2 and portable builds (subprocesses with ATEN_CPU_CAPABILITY), bad arguments;
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

import adello_kernels as ak
from adello_kernels import backends
from adello_kernels.ops import flexda as flexda_ops
from adello_kernels.reference import flexda_fwd_reference, logit_adjustments
from utils import TOL, excused_rows, make_inputs

pytestmark = pytest.mark.skipif(
    not (backends._load_extension() and flexda_ops.has_kernel("flexda_fwd", "CPU")),
    reason="adello_kernels._C is not built with the CPU kernel")


def op_args(b, n, c, dtype=torch.float32, *, seed=0, scale=5.0, lambda_u=0.8, lambda_d=1.3,
            distill=True, temperature=1.0, threshold=0.95, alpha=0.6, confident_frac=0.5):
    """The op's eight arguments; ds, du, hparams in the accumulate dtype as flexda_loss builds
    them (non-unit lambdas so that a swapped weight shows)."""
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype, seed=seed, scale=scale,
                                           confident_frac=confident_frac)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ds, du = logit_adjustments(p_l, q, alpha, 1e-9, dtype=acc)
    hp = torch.tensor([lambda_u, lambda_d, float(distill), temperature], dtype=acc)
    return [z_l, y, z_w, z_s, ds, du, hp, threshold]


def run(args):
    return torch.ops.adello.flexda_fwd(*args)


def reference(args):
    """The float64 closed-form reference on exactly the kernel's inputs (adjustments included)."""
    z_l, y, z_w, z_s, ds, du, hp, threshold = args
    return flexda_fwd_reference(z_l.double(), y, z_w.double(), z_s.double(), ds.double(),
                                du.double(), hp.double(), threshold)


def assert_matches_reference(got, want, args, what=""):
    """SPEC.md section 6. Rows whose weak max probability is within 1e-5 of tau or whose top two
    weak logits tie within 1e-5 may flip their mask / pseudo-label: their gradient rows and the
    unlabeled loss terms are then left out; everything else is still compared."""
    z_l, _, z_w, _, _, _, _, threshold = args
    dtype = z_l.dtype
    loss_rtol, grad_tol = TOL[dtype]
    loss, terms, mask, pl, prior, g_lb, g_s = got
    w_loss, w_terms, w_mask, w_pl, w_prior, w_g_lb, w_g_s = want
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert loss.dtype == terms.dtype == mask.dtype == prior.dtype == acc, what
    assert pl.dtype == torch.int64 and g_lb.dtype == g_s.dtype == dtype, what
    assert g_lb.is_contiguous() and g_s.is_contiguous(), what
    ok = ~excused_rows(z_w, threshold)
    assert torch.equal(mask.double()[ok], w_mask[ok]), f"{what}: mask differs"
    assert torch.equal(pl[ok], w_pl[ok]), f"{what}: pseudo-labels differ"

    def close_loss(name, a, b):
        a, b = a.double(), b.double()
        bound = loss_rtol * b.abs().clamp_min(1e-3) + 1e-8
        assert bool(((a - b).abs() <= bound).all()), f"{what}: {name} {a.tolist()} vs {b.tolist()}"

    def close_grad(name, a, b):
        scale = float(b.abs().max()) if b.numel() else 0.0
        bound = grad_tol * (max(1.0, scale) if dtype in (torch.float32, torch.float64) else scale)
        err = float((a.double() - b).abs().max()) if b.numel() else 0.0
        assert err <= bound + 1e-12, f"{what}: {name} max err {err:.3g} > {bound:.3g}"

    close_loss("L_s", terms[0], w_terms[0])  # the labeled rows never depend on the weak ones
    close_grad("grad_lb", g_lb, w_g_lb)
    close_grad("grad_ulb_s", g_s[ok], w_g_s[ok])
    p_err = float((prior.double() - w_prior).abs().max())
    assert p_err <= (1e-6 if dtype in (torch.float32, torch.float64) else 1e-2), \
        f"{what}: prior_batch err {p_err:.3g}"
    if bool(ok.all()):
        close_loss("terms", terms, w_terms)
        close_loss("loss", loss, w_loss)


# ------------------------------------------------------------------------------------------------
# Correctness against the float64 reference
# ------------------------------------------------------------------------------------------------

# (B, N, C, why). Vector width is 16 fp32 lanes (AVX-512), 8 (AVX2/portable); tasks hold ~16K
# element-visits; gradients above 16 MB are written with streaming stores.
SHAPES = [
    (1, 1, 1, "a single class: every softmax is 1, all gradients 0"),
    (3, 5, 2, "C below one vector: a masked tail only"),
    (7, 9, 7, "odd C below one vector"),
    (1, 1000, 10, "one labeled row, many tasks of unlabeled rows"),
    (1000, 1, 10, "many labeled tasks, one unlabeled row"),
    (64, 128, 100, "cifar100 shape: 6 full vectors + tail"),
    (256, 512, 127, "imagenet127: 7 full vectors + a 15-lane tail, rows never aligned"),
    (1000, 1000, 127, "the largest rows of the grid at C = 127: 64 unlabeled tasks"),
    (33, 70, 1000, "C = 1000: unrolled main loop + tail"),
    (17, 9, 4097, "one column past a power of two"),
    (5, 7, 8192, "large C: long rows, aligned"),
    (300, 400, 8192, "large-C regime: > 16 MB of gradients, streaming stores"),
]
MODES = {  # name: (distill, temperature)
    "distill-T1": (True, 1.0),
    "distill-T0.5": (True, 0.5),
    "nodistill-T2.5": (False, 2.5),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("b,n,c", [s[:3] for s in SHAPES], ids=[f"{b}x{n}x{c}" for b, n, c, _ in SHAPES])
def test_fp32_matches_reference(b, n, c, mode):
    distill, temperature = MODES[mode]
    args = op_args(b, n, c, seed=c + b, distill=distill, temperature=temperature)
    assert_matches_reference(run(args), reference(args), args, f"{b}x{n}x{c} {mode}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("b,n,c", [(3, 5, 2), (64, 128, 100), (50, 60, 1000), (9, 11, 4097)])
@pytest.mark.parametrize("mode", ["distill-T0.5", "nodistill-T2.5"])
def test_other_dtypes_match_reference(b, n, c, dtype, mode):
    distill, temperature = MODES[mode]
    args = op_args(b, n, c, dtype, seed=3 * c, distill=distill, temperature=temperature)
    assert_matches_reference(run(args), reference(args), args, f"{dtype} {b}x{n}x{c} {mode}")


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("c", [10, 127, 4097])
def test_logit_scales(c, scale):
    """Scales 1 to 30 and magnitudes ~1e4: the exps are taken of differences to the row max,
    and the adjusted logits as (z - z_k) + (adj - adj_k), exact where it matters."""
    args = op_args(40, 60, c, seed=int(scale) % 97 + c, scale=scale, temperature=0.7)
    assert_matches_reference(run(args), reference(args), args, f"scale {scale}")


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
        assert_matches_reference(run(args), reference(args), args, f"saturated {b}x{n}x{c}")


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
                torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.95]
        got, want = run(args), reference(args)
        for name, a, b in (("L_s", got[1][0], want[1][0]), ("L_u", got[1][1], want[1][1])):
            assert b > 0 and abs(float(a) - float(b)) <= 1e-5 * float(b), \
                f"margin {margin}: {name} {float(a)!r} vs {float(b)!r}"


def test_threshold_is_inclusive_and_compared_in_fp32():
    """M = [1 / sum exp(w - max w) >= (float) tau]: a probability of exactly tau counts as
    confident, and tau is rounded to the accumulate dtype before the comparison."""
    z_w = torch.tensor([[0.0, 0.0]])  # max probability exactly 0.5
    args = [torch.zeros(1, 2), torch.tensor([0]), z_w, torch.zeros(1, 2), torch.zeros(2),
            torch.zeros(2), torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5]
    assert run(args)[2].tolist() == [1.0]
    args[7] = math.nextafter(0.5, 1.0)  # rounds to 0.5 in fp32
    assert run(args)[2].tolist() == [1.0]
    args[7] = float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))  # next fp32 above
    assert run(args)[2].tolist() == [0.0]


def test_all_rows_masked_and_none_masked():
    for frac, thr in ((1.0, 0.5), (0.0, 0.999)):
        args = op_args(20, 40, 33, seed=9, confident_frac=frac, threshold=thr)
        got = run(args)
        assert_matches_reference(got, reference(args), args, f"confident_frac {frac}")
        assert float(got[2].sum()) in (0.0, 40.0)


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
    got, want = run(args), reference(args)
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
    got, want = run(args), reference(args)
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
    import test_cpu_kernel as t
    assert torch.backends.cpu.get_cpu_capability() == {cap!r}, torch.backends.cpu.get_cpu_capability()
    for b, n, c in [(3, 5, 2), (64, 128, 100), (33, 70, 1000), (5, 7, 4097)]:
        for dtype, distill, temp in ((torch.float32, True, 1.0), (torch.float32, True, 0.5),
                                     (torch.bfloat16, False, 2.0), (torch.float64, True, 0.5)):
                args = t.op_args(b, n, c, dtype, seed=c, distill=distill, temperature=temp)
                t.assert_matches_reference(t.run(args), t.reference(args), args, f"{{b}}x{{n}}x{{c}}")
    # the prologue's logit adjustments come from the same per-ISA build
    from adello_kernels.ops.state import adello_prepare, _prepare_torch
    for c in (1, 7, 127, 4097):
        p_l, q = torch.rand(2, c, generator=torch.Generator().manual_seed(c)) ** 3 + 1e-4
        for dtype in (torch.float32, torch.float64):
            args = (p_l / p_l.sum(), q / q.sum(), torch.tensor(300), torch.tensor(1.5), 1000, 0.1,
                    2.0, 100, 1.0, 1.0, 1e-9, True, dtype)
            for g, w in zip(adello_prepare(*args), _prepare_torch(*args)):
                torch.testing.assert_close(g, w, rtol=2e-7, atol=1e-6)
    print("ok")
""")


@pytest.mark.parametrize("cap", ["AVX2", "DEFAULT"])
def test_narrower_instruction_sets_match_reference(cap):
    """The kernel (and the prologue's adjustments) follow torch's CPU capability: run the AVX2
    and the portable builds in a subprocess (ATEN_CPU_CAPABILITY can only lower it)."""
    order = ["DEFAULT", "AVX2", "AVX512"]
    here = torch.backends.cpu.get_cpu_capability()
    if here not in order or order.index(cap) > order.index(here):
        pytest.skip(f"CPU capability {here} is below {cap}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap.lower())
    script = ISA_SCRIPT.format(tests=os.path.dirname(__file__), cap=cap)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


BAD_ARGS = [  # (what, position, replacement)
    ("label >= C", 1, lambda y: y.clone().fill_(33)),
    ("negative label", 1, lambda y: y.clone().fill_(-1)),
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
    ("temperature 0", 6, lambda v: torch.tensor([1.0, 1.0, 1.0, 0.0])),
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

def test_cpp_kernel_is_registered_and_auto_picks_it():
    assert flexda_ops.has_kernel("flexda_fwd", "CPU")
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
