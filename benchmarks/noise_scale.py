"""The gradient noise scale along a training run: how large a batch can be before a step's
progress saturates (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch
Training").

    python benchmarks/noise_scale.py                  # fmnist-lt, B = 64, 800 steps, 9 points
    python benchmarks/noise_scale.py --preset cifar10-lt --steps 2000 --every 250

Trains the preset's run (its B, or --batch-size) and every --every steps prints the gradient
noise scale B_simple = tr(S) / |G|^2 of the whole training loss at the current weights, from
--draws x --k independent batches of B (estimators and model: adello_kernels/train/
noise_scale.py). Far below B_simple the linear scaling rule holds (docs/training.md, Large
batches); far above it a step's progress saturates and a fixed sample budget spent at a larger
batch does less work. The last column is the per-sample efficiency of a batch of --compare
(default 512) relative to B, (1 + B / B_simple) / (1 + compare / B_simple).

Every measurement saves and restores the model, BatchNorm, criterion, generators and samplers,
so the trained run is the run the driver would train (its final balanced accuracy is
printed). Uses one thread unless OMP_NUM_THREADS is set; about 1.3 x the run's time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from adello_kernels.train import config as config_mod  # noqa: E402
from adello_kernels.train.noise_scale import measure, sample_efficiency  # noqa: E402
from adello_kernels.train.trainer import Trainer  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="fmnist-lt")
    ap.add_argument("--steps", type=int, help="training steps (default: the preset's)")
    ap.add_argument("--batch-size", type=int, help="B of the run (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=100, help="steps between measurements")
    ap.add_argument("--k", type=int, default=8, help="batches of B per draw (B_big = k B)")
    ap.add_argument("--draws", type=int, default=4, help="draws averaged per measurement")
    ap.add_argument("--compare", type=int, default=512, help="batch whose per-sample "
                    "efficiency relative to B is printed")
    args = ap.parse_args(argv)
    for name in ("every", "k", "draws", "compare"):
        if getattr(args, name) < (2 if name == "k" else 1):
            ap.error(f"--{name}: must be at least {2 if name == 'k' else 1}")
    cfg = config_mod.load_preset(args.preset)
    cfg.update(seed=args.seed, progress=False, time_limit=0)
    if args.steps is not None:
        cfg["steps"] = args.steps
    if args.batch_size is not None:
        cfg["batch_size"] = args.batch_size
    try:
        cfg = config_mod.validate(cfg)
    except config_mod.ConfigError as exc:
        ap.error(str(exc))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    with tempfile.TemporaryDirectory() as run_dir:
        tr = Trainer(cfg, run_dir)
        b, steps = tr.b, tr.cfg["steps"]
        print(f"{args.preset}: B = {b} labeled + {tr.n} unlabeled, {steps} steps, seed "
              f"{args.seed}; B_big = {args.k} x {b}, {args.draws} draws per point", flush=True)
        print(f"| step | labeled samples | \\|G\\|^2 | tr(S) | B_simple | step at B = "
              f"{args.compare} vs {b}: per-sample efficiency |")
        print("|---|---|---|---|---|---|")
        tr.model.train()
        for step in range(steps + 1):
            if step % args.every == 0 or step == steps:
                m = measure(tr, args.k, args.draws)
                bn = m["b_simple"]
                eff = sample_efficiency(args.compare, b, bn)
                print(f"| {step} | {step * b} | {m['g2']:.4g} | {m['trace']:.4g} | "
                      f"{bn:.0f} | {eff:.2f} |", flush=True)
            if step < steps:
                tr.train_step()
        final = tr.evaluate()
        print(f"final balanced accuracy of the trained run: {100 * final['balanced_acc']:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
