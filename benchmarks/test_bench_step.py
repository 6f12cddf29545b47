"""pytest-benchmark suite: one ADELLO step per provider and shape on this machine's device.

    pytest benchmarks/ --benchmark-only                 # all providers x shapes
    pytest benchmarks/ --benchmark-only -k imagenet127  # one shape
    pytest benchmarks/ -k lean_matches                  # only the lean baseline's check
For the ratio table in one process, use `python benchmarks/compare.py`.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import providers as P  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_lean_matches_reference():
    """The hand-written `lean` baseline computes what ADELLOLoss(backend="reference") does (all
    outputs, both gradients, the prior over three steps, to 1e-5): a baseline that dropped a
    term would be faster for the wrong reason. (`make_step` runs the same check before any
    lean provider is timed, so it also guards `--benchmark-only` runs.)"""
    P.check_lean.cache_clear()
    P.check_lean(DEVICE)


@pytest.mark.parametrize("shape", P.shapes_for(DEVICE), ids=lambda s: s.name)
@pytest.mark.parametrize("provider", P.providers_for(DEVICE))
def test_step(benchmark, provider, shape):
    step = P.make_step(provider, shape, DEVICE)
    for _ in range(3):  # compile / warm up outside the measurement
        step()
    if DEVICE == "cuda":
        def run():
            step()
            torch.cuda.synchronize()
    else:
        run = step
    benchmark.group = shape.name
    benchmark.extra_info["provider"] = provider
    benchmark(run)
