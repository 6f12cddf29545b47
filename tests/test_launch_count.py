"""How much device work one `ADELLOLoss(backend="triton")` training step does, counted on CPU.

A training step (forward, loss.backward(), the prior/step update) on the triton backend must be at
most three units of device work, each of which is one kernel launch on a GPU:
  * Triton launches (counted by wrapping Triton's launcher),
  * ATen compute ops dispatched outside those launches (a TorchDispatchMode sees every op the
    step dispatches; allocations, views and metadata ops are free and not counted),
  * calls of any other adello:: op (one that is not the Triton step itself).
The autograd engine's own seed of loss.backward() (ones_like(loss), a fill kernel on a GPU) is
counted separately: it is the same for every backend (the reference's step has it too) and
disappears when the caller passes a preallocated `gradient`, as a CUDA-graph step does; the
test also runs that variant, which must be three units in all.

The count runs under Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before
triton is imported, so, as in tests/test_triton_kernel.py, the test runs itself in a child
process), where the Python code path is the one a GPU takes: the same launches, the same ops.

Also checked here, in the normal process: no adello:: op has a Python function as its CUDA-key
kernel, except the Triton ops, whose kernels are Triton launchers by nature. A Python kernel in a
GPU step's path costs tens of microseconds of host time per call, and its tensor ops are
separate launches.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None

if INTERPRETED:
    pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

MAX_UNITS = 3
# Free: allocations, views and metadata (no kernel on a GPU).
FREE_OPS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
            "aten::new_empty_strided", "aten::detach", "aten::alias", "aten::lift_fresh",
            "aten::_reshape_alias", "aten::view", "aten::as_strided", "aten::unbind",
            "aten::split", "aten::chunk", "aten::slice", "aten::select", "aten::t",
            "aten::transpose", "aten::expand", "aten::unsqueeze", "aten::squeeze",
            "aten::resize_", "aten::set_", "aten::sym_size", "aten::sym_stride",
            "aten::sym_numel", "aten::sym_storage_offset", "aten::is_same_size"}
SEED_OPS = {"aten::ones_like"}
TRITON_OPS = {"adello::flexda_fwd_triton", "adello::flexda_step_triton"}


# ---------------------------------------------------------------------------------------------
# The normal process
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(INTERPRETED, reason="this is the child process already")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_launch_count_suite():
    """Runs this file under TRITON_INTERPRET=1 in a fresh process (see the module docstring)."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           os.path.abspath(__file__)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = (proc.stdout[-8000:] + "\n" + proc.stderr[-3000:]).strip()
    assert proc.returncode == 0, f"launch-count tests failed (exit {proc.returncode}):\n{report}"


def _adello_ops() -> list[str]:
    import adello_kernels  # noqa: F401  defines the ops, loads every kernel that can load
    from adello_kernels import backends
    backends.available_backends()
    if HAS_TRITON:
        from adello_kernels.ops import flexda_triton  # noqa: F401
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("adello::"))


def python_kernel_file(op_name: str, key: str) -> str | None:
    """The source file of `op_name`'s kernel for dispatch key `key` when that kernel is a Python
    function (None: no kernel there, or a C++ one). The dispatcher's dump names where each kernel
    was registered: a TORCH_LIBRARY_IMPL in a .cpp/.cu file, or torch.library's Python code,
    which registers a boxed Python callable ('registered at .../torch/library.py:N')."""
    for line in torch._C._dispatch_dump(op_name).splitlines():
        m = re.match(rf"{key}: registered at (\S+?):\d+", line)
        if m:
            return m.group(1) if m.group(1).endswith(".py") else None
    return None


def test_python_kernel_detection_tells_python_from_cpp():
    """The detector itself: a Python kernel registered here is found; the C++ kernels of
    adello::flexda_fwd (CPU key, from the extension) are not."""
    lib = torch.library.Library("adello_launch_probe", "FRAGMENT")
    lib.define("probe(Tensor x) -> Tensor")
    lib.impl("probe", lambda x: x.clone(), "CUDA")
    assert python_kernel_file("adello_launch_probe::probe", "CUDA") is not None
    assert python_kernel_file("adello_launch_probe::probe", "CPU") is None
    if "cpu" in __import__("adello_kernels").available_backends():
        assert python_kernel_file("adello::flexda_fwd", "CPU") is None


@pytest.mark.skipif(INTERPRETED, reason="checked in the normal process")
@pytest.mark.parametrize("op_name", _adello_ops())
def test_no_python_cuda_kernel(op_name):
    if op_name in TRITON_OPS:
        pytest.skip("a Triton op's CUDA kernel is its Python launcher")
    where = python_kernel_file(op_name, "CUDA")
    assert where is None, f"{op_name} has a Python CUDA kernel, registered from {where}"


# ---------------------------------------------------------------------------------------------
# The child process: count the device work of one step
# ---------------------------------------------------------------------------------------------

interp = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 before triton is "
                            "imported: runs in the child process of test_launch_count_suite")


class _WorkCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Every op dispatched while active, by qualified name; see `units`."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.in_launch = 0     # ops inside a launch are the interpreter's own copies

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.in_launch:
            self.ops[func._schema.name] += 1
        return func(*args, **(kwargs or {}))


class StepWork:
    """Triton launches and dispatched ops during a `with` block."""

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        self.launches = Counter()
        self._cls = InterpretedFunction
        self._run = InterpretedFunction.run
        launches = self.launches
        original = self._run
        mode = self.mode = _WorkCounter()

        def run(fn_self, *args, grid, warmup, **kwargs):
            # The interpreter copies each tensor argument to a host buffer and back around the
            # launch (a GPU launch does nothing of the kind): not counted as separate work.
            if not warmup:
                launches[fn_self.fn.__name__] += 1
            mode.in_launch += 1
            try:
                return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                mode.in_launch -= 1

        InterpretedFunction.run = run
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self._cls.run = self._run
        return False

    def compute_ops(self) -> Counter:
        """Dispatched ops that are device work: not free, not a Triton op, not the seed."""
        out = Counter()
        for name, k in self.mode.ops.items():
            if name in FREE_OPS or name in TRITON_OPS or name in SEED_OPS:
                continue
            out[name] = k
        return out

    def units(self) -> int:
        return sum(self.launches.values()) + sum(self.compute_ops().values())

    def seed(self) -> int:
        return sum(k for name, k in self.mode.ops.items() if name in SEED_OPS)

    def report(self) -> str:
        return (f"triton launches {dict(self.launches)}, compute ops {dict(self.compute_ops())}, "
                f"seed {self.seed()}, all dispatched {dict(self.mode.ops)}")


def _criterion(c, **kw):
    import adello_kernels as ak
    g = torch.Generator().manual_seed(0)
    p_l = torch.rand(c, generator=g) + 0.1
    return ak.ADELLOLoss(p_l / p_l.sum(), 100, backend="triton", validate=False,
                         distill_start=1, **kw)


def _inputs(b, n, c, seed):
    g = torch.Generator().manual_seed(seed)
    z_l = (torch.randn(b, c, generator=g) * 3).requires_grad_()
    z_s = (torch.randn(n, c, generator=g) * 3).requires_grad_()
    z_w = torch.randn(n, c, generator=g) * 3
    y = torch.randint(0, c, (b,), generator=g)
    return z_l, y, z_w, z_s


def _one_step(crit, inputs, gradient=None):
    z_l, y, z_w, z_s = inputs
    out = crit(z_l, y, z_w, z_s)
    out.loss.backward(gradient)
    return out


@interp
@pytest.mark.parametrize("c", [100, 1000])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_adello_loss_step_is_at_most_three_units(c, temperature):
    """One ADELLOLoss(backend='triton', validate=False) step: forward + loss.backward() + update.
    The first step is a warm-up (it may compile and cache); the next steps are counted, one of
    them with the gate flipping on (distill_start=1)."""
    crit = _criterion(c, temperature=temperature)
    _one_step(crit, _inputs(16, 24, c, 0))
    for k in range(2):
        inputs = _inputs(16, 24, c, k + 1)
        step_before = int(crit.step)
        with StepWork() as work:
            _one_step(crit, inputs)
        assert work.units() <= MAX_UNITS, work.report()
        assert work.seed() <= 1, work.report()
        assert sum(work.launches.values()) >= 1, "no Triton launch counted: the counter is broken"
        assert int(crit.step) == step_before + 1
        assert inputs[0].grad is not None and inputs[3].grad is not None


@interp
def test_step_with_a_given_gradient_is_three_units_in_all():
    """With a preallocated seed (as a CUDA-graph-captured step passes), every unit counts, the
    seed included: at most three."""
    crit = _criterion(100)
    _one_step(crit, _inputs(16, 24, 100, 0))
    seed = torch.ones(())
    inputs = _inputs(16, 24, 100, 5)
    with StepWork() as work:
        _one_step(crit, inputs, seed)
    assert work.units() + work.seed() <= MAX_UNITS, work.report()


@interp
def test_the_counter_sees_compute_ops_and_launches():
    """The counter itself: an eager reference step (dozens of ATen ops) counts far above the
    budget, and a flexda_fwd_triton call counts its two launches."""
    import adello_kernels as ak
    from adello_kernels.ops import flexda_triton as ft
    g = torch.Generator().manual_seed(0)
    p_l = torch.rand(50, generator=g) + 0.1
    crit = ak.ADELLOLoss(p_l / p_l.sum(), 100, backend="reference", validate=False)
    inputs = _inputs(8, 8, 50, 3)
    with StepWork() as work:
        _one_step(crit, inputs)
    assert sum(work.launches.values()) == 0 and work.units() > 10 * MAX_UNITS, work.report()
    z_l, y, z_w, z_s = (x.detach() for x in _inputs(8, 8, 50, 4))
    hp = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])  # hparams slots: ops/flexda.py
    with StepWork() as work:
        ft.flexda_fwd_triton(z_l, y, z_w, z_s, torch.zeros(50), torch.zeros(50), hp, 0.9)
    assert dict(work.launches) == {"_rows_kernel": 1, "_finalize_kernel": 1}, work.report()


@interp
def test_the_previous_fused_path_is_over_budget():
    """What a GPU step was before the one-op step: the prologue in PyTorch (alpha_schedule,
    logit_adjustments, the hparams vector), the row op through its autograd.Function, and the
    update in PyTorch. It must count far above the budget, or the budget test proves nothing."""
    from adello_kernels.functional import fused_step
    from adello_kernels.ops.state import update_prior_
    from adello_kernels.reference import alpha_schedule, logit_adjustments
    crit = _criterion(100)
    z_l, y, z_w, z_s = _inputs(16, 24, 100, 6)
    q, step, skipped, temp = crit.prior_ulb, crit.step, crit.skipped_updates, crit.temperature
    with StepWork() as work:
        alpha = alpha_schedule(step, crit.total_steps, crit.alpha_min, crit.power)
        ds, du = logit_adjustments(crit.prior_lb, q, alpha, 1e-9, dtype=torch.float64)
        hp = torch.stack([torch.full((), crit.lambda_u), torch.full((), crit.lambda_d),
                          (step >= crit.distill_start).float(), temp.float(),
                          torch.zeros(())])   # the hparams slots of ops/flexda.py
        out = fused_step("triton", z_l, y, z_w, z_s, ds.float(), du.float(), hp, crit.threshold)
        out.loss.backward()
        update_prior_(q, step, skipped, out.prior_batch, crit.prior_momentum)
    print(work.report())
    assert work.units() > 10 * MAX_UNITS, work.report()
