"""`flexda_loss`: input validation (every bad input raises ValueError naming the argument),
backend selection, and every available backend against the float64 reference."""
import math

import pytest
import torch
from contract import check_outputs, hparams_tensor, make_inputs

import adello_kernels as ak
from adello_kernels import backends
from adello_kernels.reference import accumulate_dtype, adjustments


def good_args(c=5, b=3, n=4, dtype=torch.float32):
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, n, c, dtype=dtype)
    return [z_l, y, z_w, z_s, p_l, q, 0.5]


def mutate(index, value):
    args = good_args()
    args[index] = value(args[index]) if callable(value) else value
    return args


BAD_POSITIONAL = [  # (argument name, position, replacement)
    ("logits_lb", 0, lambda x: x[0]),                      # 1-d
    ("logits_lb", 0, lambda x: x.to(torch.int32)),         # not float
    ("logits_lb", 0, lambda x: x[:0]),                      # empty labeled batch
    ("logits_lb", 0, [[1.0]]),                              # not a tensor
    ("logits_ulb_w", 2, lambda x: x[:, :3]),                # class count mismatch
    ("logits_ulb_w", 2, lambda x: x.double()),              # dtype mismatch
    ("logits_ulb_w", 2, lambda x: x[:0]),                   # empty unlabeled batch
    ("logits_ulb_s", 3, lambda x: x[:2]),                   # rows do not pair up
    ("logits_ulb_s", 3, lambda x: x.half()),
    ("labels_lb", 1, lambda y: y[:2]),
    ("labels_lb", 1, lambda y: y.int()),
    ("labels_lb", 1, lambda y: y.float()),
    ("labels_lb", 1, lambda y: y.clone().fill_(5)),         # == C
    ("labels_lb", 1, lambda y: y.clone().fill_(-1)),
    ("prior_lb", 4, lambda p: p[:4]),
    ("prior_lb", 4, lambda p: p * 2),                       # sums to 2
    ("prior_lb", 4, lambda p: p.clone().index_fill_(0, torch.tensor([0]), math.nan)),
    ("prior_lb", 4, lambda p: torch.tensor([1.2, -0.2, 0.0, 0.0, 0.0])),
    ("prior_lb", 4, lambda p: torch.ones(5, dtype=torch.int64)),
    ("prior_ulb", 5, lambda p: p[None]),
    ("prior_ulb", 5, lambda p: p.clone().index_fill_(0, torch.tensor([1]), math.inf)),
    ("prior_ulb", 5, lambda p: p * 0.5),
    ("alpha", 6, -0.1),
    ("alpha", 6, 1.5),
    ("alpha", 6, math.nan),
    ("alpha", 6, torch.tensor([0.5])),
    ("alpha", 6, torch.tensor(2.0)),
    ("alpha", 6, "0.5"),
]


@pytest.mark.parametrize("name,index,value", BAD_POSITIONAL,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_POSITIONAL)])
def test_bad_positional_argument_raises_value_error_naming_it(name, index, value):
    args = mutate(index, value)
    with pytest.raises(ValueError, match=f"^{name}"):
        ak.flexda_loss(*args)


BAD_KEYWORD = [
    ("threshold", 0.0), ("threshold", 1.01), ("threshold", -1), ("threshold", math.nan),
    ("threshold", torch.tensor(0.9)),
    ("temperature", 0.0), ("temperature", -2.0), ("temperature", math.inf),
    ("temperature", torch.tensor(0.0)), ("temperature", torch.tensor([1.0, 2.0])),
    ("lambda_u", -1.0), ("lambda_d", math.nan), ("lambda_u", "1"),
    ("distill", "yes"), ("distill", torch.tensor([True, False])),
    ("eps", 0.0), ("eps", 0.5),
    ("backend", "gpu"), ("backend", None),
    ("prior_estimator", "EM"), ("prior_estimator", True),
    ("prior_target", torch.full((4,), 0.25)), ("prior_target", torch.full((5,), 0.5)),
    ("prior_target", [0.2] * 5),
    ("prior_weight", torch.ones(3)), ("prior_weight", torch.ones(4, dtype=torch.int64)),
    ("prior_weight", torch.tensor([1.0, -1.0, 1.0, 1.0])),
    ("distill_all", 1), ("distill_all", None),
]


@pytest.mark.parametrize("name,value", BAD_KEYWORD)
def test_bad_keyword_argument_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=f"^{name}"):
        ak.flexda_loss(*good_args(), **{name: value})


def test_unavailable_backend_is_a_value_error():
    """Every backend that cannot serve CPU tensors here is refused by name (never a silent
    fallback); `cuda` never runs on CPU tensors, so the list is never empty."""
    missing = [b for b in backends.BACKENDS if "cpu" not in backends._backend_devices(b)]
    assert "cuda" in missing
    for name in missing:
        with pytest.raises(ValueError, match="^backend"):
            ak.flexda_loss(*good_args(), backend=name)


def test_value_checks_are_skipped_without_validate():
    # validate=False is the captured hot path: out-of-range values are the caller's promise.
    args = mutate(5, lambda p: p * 0.5)
    out = ak.flexda_loss(*args, validate=False, backend="reference")
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="^logits_ulb_s"):  # metadata checks still run
        ak.flexda_loss(*mutate(3, lambda x: x[:2]), validate=False)


def test_zero_prior_entries_are_allowed():
    args = good_args()
    args[4] = torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0])
    assert torch.isfinite(ak.flexda_loss(*args).loss)


def test_available_backends_and_auto():
    avail = ak.available_backends()
    assert "reference" in avail
    cpu = torch.device("cpu")
    expected = "cpu" if "cpu" in avail else "reference"
    assert backends.resolve_backend("auto", cpu) == expected


@pytest.mark.parametrize("backend", [b for b in ak.available_backends()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("temperature,distill,estimator", [(1.0, True, "raw"), (0.6, True, "raw"),
                                                           (2.0, False, "raw"), (0.6, True, "em")])
def test_every_backend_matches_reference(backend, dtype, temperature, distill, estimator):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel computes in fp32 (tested in test_triton_kernel.py)")
    z_l, y, z_w, z_s, p_l, q = make_inputs(37, 45, 19, dtype=dtype, seed=11, scale=6.0)
    z_l.requires_grad_()
    z_s.requires_grad_()
    kw = dict(threshold=0.9, lambda_u=1.2, lambda_d=0.8, distill=distill, temperature=temperature,
              prior_estimator=estimator)
    out = ak.flexda_loss(z_l, y, z_w, z_s, p_l, q, 0.3, backend=backend, **kw)
    g_l, g_s = torch.autograd.grad(out.loss, (z_l, z_s))
    assert g_l.dtype == dtype and g_s.dtype == dtype
    got = (out.loss, torch.stack([out.loss_sup, out.loss_unsup, out.loss_distill]), out.mask,
           out.pseudo_labels, out.prior_batch, g_l, g_s)
    # the op's arguments as flexda_loss builds them: the comparison re-scores exempt rows
    ds, du = adjustments(p_l, q, 0.3, 1e-9, accumulate_dtype(dtype))
    hp = hparams_tensor(1.2, 0.8, distill, temperature, accumulate_dtype(dtype),
                        prior_em=estimator == "em")
    check_outputs(got, [z_l.detach(), y, z_w, z_s.detach(), ds, du, hp, 0.9], what=backend)
    for term in (out.loss_sup, out.loss_unsup, out.loss_distill, out.mask, out.prior_batch):
        assert not term.requires_grad


def test_tensor_hyperparameters_match_python_numbers():
    args = good_args(c=7, b=5, n=9)
    a = ak.flexda_loss(*args[:6], 0.25, distill=True, temperature=1.5)
    b = ak.flexda_loss(*args[:6], torch.tensor(0.25), distill=torch.tensor(True),
                       temperature=torch.tensor(1.5))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("backend", ak.available_backends())
def test_labels_outside_the_classes_without_validation_give_a_nan_row(backend):
    """validate=False skips the label range check (a host sync on a GPU): a label outside
    [0, C) gives that row a NaN cross-entropy and an all-NaN gradient row, so loss and loss_sup
    are NaN; the unlabeled terms and every other gradient row equal those of the same batch
    with a valid label there."""
    b, c = 6, 11
    z_l, y, z_w, z_s, p_l, q = make_inputs(b, 8, c, seed=13)
    bad_rows = {1: c, 4: -3}
    y_bad = y.clone()
    for row, label in bad_rows.items():
        y_bad[row] = label
    results = []
    for labels in (y_bad, y):
        a, s = z_l.clone().requires_grad_(), z_s.clone().requires_grad_()
        out = ak.flexda_loss(a, labels, z_w, s, p_l, q, 0.4, temperature=0.7, backend=backend,
                             validate=False)
        results.append((out, *torch.autograd.grad(out.loss, (a, s))))
    (out, g_l, g_s), (clean, c_l, c_s) = results
    assert math.isnan(float(out.loss.detach())) and math.isnan(float(out.loss_sup))
    nan_rows = torch.isnan(g_l).all(1)
    assert nan_rows.tolist() == [i in bad_rows for i in range(b)]
    ok = ~nan_rows
    torch.testing.assert_close(g_l[ok], c_l[ok], rtol=0, atol=0)
    torch.testing.assert_close(g_s, c_s, rtol=0, atol=0)
    for name in ("loss_unsup", "loss_distill", "mask", "pseudo_labels", "prior_batch"):
        assert torch.equal(getattr(out, name), getattr(clean, name)), name
    with pytest.raises(ValueError, match="^labels_lb"):  # and validation does catch it
        ak.flexda_loss(z_l, y_bad, z_w, z_s, p_l, q, 0.4, backend=backend)


def test_nonfinite_logits_give_nonfinite_loss():
    for backend in ak.available_backends():
        args = good_args()
        args[3] = args[3].clone()
        args[3][0, 0] = math.nan
        assert not torch.isfinite(ak.flexda_loss(*args, backend=backend).loss)
        args = good_args()
        args[0] = args[0].clone()
        args[0][1, 2] = math.inf
        assert not torch.isfinite(ak.flexda_loss(*args, backend=backend).loss)
        args = good_args()
        args[2] = args[2].clone()
        args[2][0, 0] = math.nan
        assert not bool(torch.isfinite(ak.flexda_loss(*args, backend=backend).prior_batch).all())


def test_compile_fullgraph_flexda_loss():
    z_l, y, z_w, z_s, p_l, q = make_inputs(6, 8, 10)
    z_l.requires_grad_()

    def step(z_l, y, z_w, z_s, p_l, q, alpha):
        return ak.flexda_loss(z_l, y, z_w, z_s, p_l, q, alpha, temperature=torch.tensor(2.0))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    alpha = torch.tensor(0.4)
    got = compiled(z_l, y, z_w, z_s, p_l, q, alpha)
    want = step(z_l, y, z_w, z_s, p_l, q, alpha)
    torch.testing.assert_close(got.loss, want.loss)
    g1 = torch.autograd.grad(got.loss, z_l)[0]
    g2 = torch.autograd.grad(want.loss, z_l)[0]
    torch.testing.assert_close(g1, g2)
