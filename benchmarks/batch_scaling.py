"""Is the batch-size scaling real? Fashion-MNIST-LT (the default preset), arms with the same
sample budget (51,200 labeled + 102,400 unlabeled images), paired seeds:

    b64        the default run: B = 64, 800 steps
    b128       B = 128 with the scaling rules: kappa = 2, 400 steps, lr 0.06
    b256       B = 256 with the scaling rules: kappa = 4, 200 steps, lr 0.12
    b512       B = 512 with the scaling rules: kappa = 8, 100 steps, lr 0.24 after a linear
               warm-up from 0.03 over 6,400 samples, EMA / prior momentum 0.99^8, BatchNorm
               momentum 1 - 0.99^8, evaluation every 13 steps
    b512-raw   the unscaled control: B = 512, 100 steps, every other per-step constant of the
               B = 64 run (lr 0.03, EMA 0.99, prior momentum 0.99, BatchNorm momentum 0.01)

(every scaled arm warms up over the same 6,400 labeled samples). Not in the default set:

    b512-sqrt  b512 with lr x sqrt(kappa) (0.085)
    b512-lr2   b512 with twice the linear rule's lr (0.48)
    b512-cos   b512 with a half-cosine decay to 0 after the warm-up
    b1024-100  B = 1024 for the same 100 steps as b512 (twice the samples): if it is no better
               than b512, a step at B = 512 is already past the gradient noise scale and the
               run is limited by its number of steps (benchmarks/noise_scale.py measures it)

    python benchmarks/batch_scaling.py --jobs 2              # seeds 0 1 2, runs/batch-scaling/
    python benchmarks/batch_scaling.py --seeds 0 --arms b512 # one run
    python benchmarks/batch_scaling.py --table-only          # the table of the finished runs
    python benchmarks/batch_scaling.py --arms b512-sqrt b512-lr2 b512-cos b1024-100

Runs --jobs at a time (OMP_NUM_THREADS=1 each unless set, nice), each in its own run directory;
a run whose summary.json exists is not run again, so an interrupted experiment continues where
it stopped. Prints a Markdown table: balanced accuracy and ECE per seed, mean +- sd over the
seeds, and each arm's training images/s (median over seeds; labeled + 2 x unlabeled images per
second of training, evaluation excluded; lower with two jobs sharing the machine).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

from driver_runs import driver_env, run_driver

WARMUP = ["--warmup", "6400"]
ARMS = {
    "b64": ("B = 64, 800 steps (default)", []),
    "b128": ("B = 128, 400 steps, scaling rules", ["--batch-size", "128", *WARMUP]),
    "b256": ("B = 256, 200 steps, scaling rules", ["--batch-size", "256", *WARMUP]),
    "b512": ("B = 512, 100 steps, scaling rules", ["--batch-size", "512", *WARMUP]),
    "b512-raw": ("B = 512, 100 steps, per-step constants of B = 64",
                 ["--batch-size", "512", "--no-scale-rules", "--steps", "100",
                  "--eval-every", "13", "--log-every", "3"]),
    "b512-sqrt": ("B = 512, 100 steps, scaling rules, sqrt lr",
                  ["--batch-size", "512", *WARMUP, "--lr-scaling", "sqrt"]),
    "b512-lr2": ("B = 512, 100 steps, scaling rules, 2 x lr",
                 ["--batch-size", "512", *WARMUP, "--lr", "0.06"]),
    "b512-cos": ("B = 512, 100 steps, scaling rules, cosine",
                 ["--batch-size", "512", *WARMUP, "--cosine"]),
    # --steps is in B0 steps: 1600 / kappa 16 = 100 steps of B = 1024
    "b1024-100": ("B = 1024, 100 steps (2 x the samples), scaling rules",
                  ["--batch-size", "1024", "--steps", "1600", "--warmup", "12800"]),
}
DEFAULT_ARMS = ("b64", "b128", "b256", "b512", "b512-raw")


def command(arm: str, seed: int, out: str) -> list[str]:
    return [sys.executable, "-m", "adello_kernels.train", "--seed", str(seed), "--time-limit",
            "0", "--no-progress", "--out", out, *ARMS[arm][1]]


def _fmt(xs: list[float]) -> tuple[str, str]:
    per = " / ".join(f"{100 * x:.2f}" for x in xs)
    if len(xs) > 1:
        return per, f"{100 * statistics.mean(xs):.1f} +- {100 * statistics.stdev(xs):.1f}"
    return per, f"{100 * xs[0]:.1f}" if xs else "-"


def table(root: str, arms, seeds) -> str:
    lines = ["| run | balanced acc. % (seeds " + " / ".join(map(str, seeds)) + ") | mean +- sd "
             "| ECE % | mean +- sd | images/s | steps |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        sums = []
        for s in seeds:
            path = os.path.join(root, f"{arm}-s{s}", "summary.json")
            if os.path.isfile(path):
                with open(path) as f:
                    sums.append(json.load(f))
        if not sums:
            lines.append(f"| {ARMS[arm][0]} | not run | | | | | |")
            continue
        acc, acc_m = _fmt([x["balanced_acc"] for x in sums])
        ece, ece_m = _fmt([x["ece"] for x in sums])
        ips = [x["images_per_s"] for x in sums if x.get("images_per_s")]
        ips_t = f"{statistics.median(ips):.0f}" if ips else "-"
        done = "" if len(sums) == len(seeds) else f" ({len(sums)} of {len(seeds)} seeds)"
        lines.append(f"| {ARMS[arm][0]}{done} | {acc} | {acc_m} | {ece} | {ece_m} | {ips_t} | "
                     f"{sums[0]['steps']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    ap.add_argument("--out", default=os.path.join("runs", "batch-scaling"))
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs: expected a positive int, got {args.jobs}")
    env = driver_env()

    def one(job):
        arm, seed = job
        out = os.path.join(args.out, f"{arm}-s{seed}")
        return run_driver(command(arm, seed, out), out, env, f"{arm} seed {seed}")

    if not args.table_only:
        os.makedirs(args.out, exist_ok=True)
        # seed-major: a partial experiment is still paired
        jobs = [(arm, seed) for seed in args.seeds for arm in args.arms
                if not os.path.isfile(os.path.join(args.out, f"{arm}-s{seed}", "summary.json"))]
        with ThreadPoolExecutor(args.jobs) as pool:
            if any(list(pool.map(one, jobs))):
                return 1
    print(table(args.out, args.arms, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
