"""Shared test helpers. The input builders and the comparison against the float64 reference
live in tests/contract.py (one harness for every backend); this module re-exports them under
the names the test files have always imported."""
from __future__ import annotations

from contract import (  # noqa: F401
    TOL,
    TOLERANCES,
    assert_outputs_close,
    check_outputs,
    excused_rows,
    exempt_rows,
    fwd_args,
    make_inputs,
    random_prior,
    reference_op_outputs,
    reference_outputs,
    step_without_host_sync,
)
