"""Label shift on Fashion-MNIST-LT: FixMatch, ADELLO and ADELLO with the EM prior estimator,
in the three unlabeled settings, paired seeds (the same seed gives every arm the same split,
initialisation, batches and augmentations).

    arms      fixmatch   --algorithm fixmatch
              adello     --algorithm adello (prior_estimator "raw", the released behaviour)
              adello-em  --algorithm adello --prior-estimator em
    gamma_u   100 (consistent with the labeled tail), 1 (uniform), -100 (reversed)

    python benchmarks/label_shift.py                    # 27 runs, default preset (800 steps)
    python benchmarks/label_shift.py --long             # 3000 steps, time constants scaled
    python benchmarks/label_shift.py --table-only       # the tables of the finished runs
    python benchmarks/label_shift.py --jobs 2           # two runs at a time (1 thread each)

The long schedule (`--long`: fixmatch and adello at gamma_u 100 and -100, seeds 0 1) is the
default preset with 3000 steps and its time constants stretched by the same factor (3.75) as
the preset's YAML explains for its 800 steps: weight EMA and prior momentum 0.99 -> 0.997
(time constant ~100 -> ~375 steps), evaluation every 375 steps; alpha still goes 1 -> 0.1 over
the run.

Runs go to runs/label-shift/<arm>-g<gamma_u>-s<seed>/ (a run whose summary.json exists is not
run again; an interrupted one is resumed), OMP_NUM_THREADS=1 unless set, nice. Prints Markdown
tables: balanced accuracy, ECE, MCE, accuracy of the three rarest labeled classes and KL(true
unlabeled prior || estimate), mean +- sd over the seeds, and the per-seed paired differences
of each ADELLO arm against FixMatch (and of EM against raw).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

from driver_runs import driver_env, run_driver

ARMS = {
    "fixmatch": ("FixMatch", ["--algorithm", "fixmatch"]),
    "adello": ("ADELLO", ["--algorithm", "adello"]),
    "adello-em": ("ADELLO, EM prior", ["--algorithm", "adello", "--prior-estimator", "em"]),
}
GAMMAS = (100, 1, -100)
LONG = ["--steps", "3000", "--set", "ema=0.997", "--set", "prior_momentum=0.997",
        "--eval-every", "375", "--log-every", "75"]
RAREST = (7, 8, 9)   # the three classes with the fewest labeled images at gamma_l = 100 (13, 8, 5)


def run_dir(root: str, arm: str, gamma: int, seed: int) -> str:
    return os.path.join(root, f"{arm}-g{gamma}-s{seed}")


def command(arm: str, gamma: int, seed: int, out: str, long: bool) -> list[str]:
    return [sys.executable, "-m", "adello_kernels.train", "--seed", str(seed), "--gamma-u",
            str(gamma), "--time-limit", "0", "--no-progress", "--out", out, *ARMS[arm][1],
            *(LONG if long else [])]


def _load(root, arm, gamma, seeds):
    out = {}
    for s in seeds:
        path = os.path.join(run_dir(root, arm, gamma, s), "summary.json")
        if os.path.isfile(path):
            with open(path) as f:
                out[s] = json.load(f)
    return out


def metrics(summary: dict) -> dict:
    pca = summary["per_class_acc"]
    return {"acc": 100 * summary["balanced_acc"], "ece": 100 * summary["ece"],
            "mce": 100 * summary["mce"],
            "rare": 100 * statistics.mean(pca[c] for c in RAREST),
            "kl": summary.get("prior_kl")}


def _ms(xs, digits=1):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.mean(xs):.{digits}f} +- {statistics.stdev(xs):.{digits}f}"


def table(root: str, arms, gammas, seeds) -> str:
    keys = (("acc", "bal. acc. %", 1), ("ece", "ECE %", 1), ("mce", "MCE %", 1),
            ("rare", "rarest-3 acc. %", 1), ("kl", "KL(P_u, Q)", 3))
    lines = ["| gamma_u | arm | runs | " + " | ".join(k[1] for k in keys)
             + " | bal. acc. per seed |", "|---" * (len(keys) + 4) + "|"]
    for g in gammas:
        for arm in arms:
            runs = _load(root, arm, g, seeds)
            if not runs:
                continue
            ms = {s: metrics(x) for s, x in runs.items()}
            cells = [_ms([m[k] for m in ms.values()], d) for k, _, d in keys]
            per = " / ".join(f"{ms[s]['acc']:.2f}" for s in seeds if s in ms)
            lines.append(f"| {g} | {ARMS[arm][0]} | {len(ms)} | " + " | ".join(cells)
                         + f" | {per} |")
    pairs = [(a, b) for a, b in (("adello", "fixmatch"), ("adello-em", "fixmatch"),
                                 ("adello-em", "adello")) if a in arms and b in arms]
    if pairs:
        lines += ["", "Paired differences (same seed), balanced accuracy / ECE, points:", "",
                  "| gamma_u | pair | per seed (acc) | mean acc | per seed (ECE) | mean ECE |",
                  "|---|---|---|---|---|---|"]
        for g in gammas:
            for a, b in pairs:
                ra, rb = _load(root, a, g, seeds), _load(root, b, g, seeds)
                both = [s for s in seeds if s in ra and s in rb]
                if not both:
                    continue
                da = [metrics(ra[s])["acc"] - metrics(rb[s])["acc"] for s in both]
                de = [metrics(ra[s])["ece"] - metrics(rb[s])["ece"] for s in both]
                lines.append(f"| {g} | {ARMS[a][0]} - {ARMS[b][0]} | "
                             + " / ".join(f"{d:+.2f}" for d in da) + f" | {_ms(da)} | "
                             + " / ".join(f"{d:+.2f}" for d in de) + f" | {_ms(de)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long", action="store_true", help="the 3000-step schedule")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS))
    ap.add_argument("--gammas", type=int, nargs="+", choices=GAMMAS)
    ap.add_argument("--out", help="default runs/label-shift[-long]")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)
    seeds = args.seeds or ([0, 1] if args.long else [0, 1, 2])
    arms = args.arms or (["fixmatch", "adello"] if args.long else list(ARMS))
    gammas = args.gammas or ([100, -100] if args.long else list(GAMMAS))
    root = args.out or os.path.join("runs", "label-shift-long" if args.long else "label-shift")
    if args.jobs < 1:
        ap.error(f"--jobs: expected a positive int, got {args.jobs}")
    env = driver_env()

    def one(job):
        arm, g, s = job
        out = run_dir(root, arm, g, s)
        return run_driver(command(arm, g, s, out, args.long), out, env,
                          f"{arm} gamma_u {g} seed {s}")

    if not args.table_only:
        os.makedirs(root, exist_ok=True)
        # seed-major: a partial experiment is still paired
        jobs = [(a, g, s) for s in seeds for g in gammas for a in arms
                if not os.path.isfile(os.path.join(run_dir(root, a, g, s), "summary.json"))]
        with ThreadPoolExecutor(args.jobs) as pool:
            rcs = list(pool.map(one, jobs))
        if any(rcs):
            return 1
    print(table(root, arms, gammas, seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
