"""How long do K DDP processes reproduce one process? Runs the training driver once in one
process and once as two torchrun/gloo processes (--sync-bn, the same global batch, the tiny
fake Fashion-MNIST of tests/test_train_e2e.py), records the model after every step and prints,
per step, the largest absolute weight difference between the two runs.

    python benchmarks/ddp_equivalence.py --steps 40

The two runs compute the same thing up to floating-point summation order (all-reduced sums of
two halves instead of one sum); the table shows how that rounding difference grows.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)


def worker(dump: str, argv: list[str]) -> int:
    import torch

    from adello_kernels.train import cli, trainer
    orig = trainer.Trainer.train_step

    def step(self):
        orig(self)
        if self.dist.main:
            torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()},
                       os.path.join(dump, f"step{self.step}.pt"))
    trainer.Trainer.train_step = step
    return cli.main(argv)


def train_args(data: str, out: str, steps: int) -> list[str]:
    from test_train_e2e import _args
    return _args(data, out, steps=steps, extra=("--sync-bn",)) + [
        "--log-every", "1", "--eval-every", str(steps), "--threshold", "0.2"]


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a
               if a[k].is_floating_point())


def measure(steps: int, tmp: str) -> list[tuple[int, float]]:
    import torch
    from test_train_data import write_fmnist
    data = os.path.join(tmp, "data")
    write_fmnist(data, per_class_train=60, per_class_test=10)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    dumps = {}
    for name, launcher in (("one", []), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                 "--nproc_per_node", "2"])):
        dump = os.path.join(tmp, f"dump-{name}")
        os.makedirs(dump)
        cmd = [sys.executable] + launcher + [os.path.abspath(__file__), "--worker", dump, "--"] \
            + train_args(data, os.path.join(tmp, name), steps)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
        if r.returncode:
            sys.exit(f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}")
        dumps[name] = dump
    rows = []
    for s in range(1, steps + 1):
        a = torch.load(os.path.join(dumps["one"], f"step{s}.pt"), weights_only=True)
        b = torch.load(os.path.join(dumps["two"], f"step{s}.pt"), weights_only=True)
        rows.append((s, max_diff(a, b)))
    return rows


def main() -> int:
    if "--worker" in sys.argv:
        i = sys.argv.index("--worker")
        return worker(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.steps, tmp)
    print("| step | max abs weight difference, 2 gloo processes vs 1 |")
    print("|---|---|")
    for s, d in rows:
        print(f"| {s} | {d:.2e} |")
    first_bad = next((s for s, d in rows if d > 1e-5), None)
    print(f"weights agree to 1e-5 for steps 1..{(first_bad or args.steps + 1) - 1}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
