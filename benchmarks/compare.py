"""Side-by-side timing of one ADELLO step for every provider, in one process.

    python benchmarks/compare.py                       # CPU, the four CPU shapes
    python benchmarks/compare.py --device cuda --json results.json

Prints median time per step and, for every provider, the ratio to each baseline (providers.py):
`eager` and `compile` (the library's reference path, plain and under torch.compile) and `lean`
and `lean-compile` (the step hand-written the way users of the released code run it, plain and
under torch.compile), plus the achieved bandwidth on the compulsory bytes (read z_l, z_w, z_s
once, write both gradients once) and the device's measured copy bandwidth for scale. A ratio
above 1 means the provider is that many times faster than the baseline. Providers are timed
round-robin (one timing block of each in turn, many rounds) so that a noisy machine slows all of
them alike; the reported number is the median over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import adello_kernels as ak  # noqa: E402

import providers as P  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _block_time(fn, iters: int, device: str) -> float:
    """Seconds per call over `iters` back-to-back calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def _calibrate(fn, device: str, target_s: float) -> int:
    iters = 1
    while True:
        t = _block_time(fn, iters, device)
        if t * iters >= target_s / 4 or iters >= 1 << 16:
            return max(1, int(target_s / max(t, 1e-9)))
        iters *= 4


def time_round_robin(fns: dict, device: str, rounds: int, target_s: float) -> dict:
    """{name: median seconds per call}; each round times every function once, in turn."""
    for fn in fns.values():  # warm-up: compile, autotune, caches
        for _ in range(3):
            fn()
    iters = {name: _calibrate(fn, device, target_s) for name, fn in fns.items()}
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(_block_time(fn, iters[name], device))
    return {name: statistics.median(s) for name, s in samples.items()}


def copy_bandwidth(device: str) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written)."""
    n = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.empty(n, device=device).uniform_()
    dst = torch.empty_like(src)
    t = min(_block_time(lambda: dst.copy_(src), 5, device) for _ in range(5))
    return 2 * src.numel() * src.element_size() / t / 1e9


def forward_only_step(backend: str, shape: P.Shape, device: str, dtype):
    """Just the forward of one fused step (`flexda_loss` without autograd: reads the three logit
    tensors, writes both gradients)."""
    z_l, y, z_w, z_s = (x.detach() for x in P.make_inputs(shape, device, dtype))
    prior_lb, prior_ulb = P.bench_prior(shape.c, device), torch.full((shape.c,), 1.0 / shape.c,
                                                                      device=device)
    return lambda: ak.flexda_loss(z_l, y, z_w, z_s, prior_lb, prior_ulb, 0.5, backend=backend,
                                  validate=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", nargs="*", help=f"subset of {list(P.SHAPES)}")
    ap.add_argument("--providers", nargs="*", help=f"subset of {list(P.PROVIDERS)}")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--target-ms", type=float, default=40.0, help="time per timing block")
    ap.add_argument("--forward-only", action="store_true",
                    help="also time each fused backend's forward alone (flexda_loss without "
                         "autograd; the kernel's bandwidth at the large shapes)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    device = args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shapes = [P.SHAPES[s] for s in args.shapes] if args.shapes else P.shapes_for(device)
    provs = [p for p in (args.providers or P.providers_for(device))
             if p in P.providers_for(device)]
    dev_name = torch.cuda.get_device_name() if device == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    copy_gbs = copy_bandwidth(device)
    print(f"device: {device} ({dev_name}); torch {torch.__version__}; dtype {args.dtype}; "
          f"copy bandwidth {copy_gbs:.1f} GB/s")
    results = {"device": device, "device_name": dev_name, "torch": torch.__version__,
               "dtype": args.dtype, "copy_gbs": copy_gbs, "rows": []}

    if any(p.startswith("lean") for p in provs):
        P.check_lean(device)  # the hand-written baseline computes what the reference does
        print(f"lean step checked against ADELLOLoss(backend='reference') to 1e-5 "
              f"(shape {P.CHECK_SHAPE.b}/{P.CHECK_SHAPE.n}/{P.CHECK_SHAPE.c}, 3 steps)")
    bases = [b for b in P.BASELINES if b in provs]
    short = {"eager": "eager", "compile": "compile", "lean": "lean", "lean-compile": "lean-c"}
    header = (f"{'shape':<18} {'provider':<13} {'median ms':>10} "
              + "".join(f"{'vs ' + short[b]:>11}" for b in bases)
              + f" {'GB/s':>8} {'% copy':>7}")
    print(header)
    print("-" * len(header))
    for shape in shapes:
        fns = {p: P.make_step(p, shape, device, dtype) for p in provs}
        if args.forward_only:
            for p in provs:
                if p not in P.BASELINES:
                    fns[p + ":fwd"] = forward_only_step(P.PROVIDERS[p][0], shape, device,
                                                        dtype)
        times = time_round_robin(fns, device, args.rounds, args.target_ms / 1e3)
        nbytes = shape.step_bytes(torch.empty((), dtype=dtype).element_size())
        for p, t in times.items():
            gbs = nbytes / t / 1e9
            vs = {b: times[b] / t for b in bases}
            row = {"shape": shape.name, "provider": p, "ms": t * 1e3, "gbs": gbs,
                   "pct_copy": 100 * gbs / copy_gbs, "vs": vs,
                   "vs_eager": vs.get("eager"), "vs_compile": vs.get("compile"),
                   "vs_lean": vs.get("lean"), "vs_lean_compile": vs.get("lean-compile")}
            results["rows"].append(row)
            print(f"{shape.name:<18} {p:<13} {t * 1e3:>10.3f} "
                  + "".join(f"{vs[b]:>10.2f}x" for b in bases)
                  + f" {gbs:>8.1f} {row['pct_copy']:>6.1f}%", flush=True)
        if args.json:  # after every shape, so a run cut short by a time limit keeps its rows
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
