"""Shared by the experiment scripts (batch_scaling.py, label_shift.py): run one training-driver
run in its own directory, resuming it if an earlier attempt was interrupted."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def driver_env() -> dict:
    """The environment of a run: one thread unless OMP_NUM_THREADS is set, this checkout first."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_driver(cmd: list[str], out: str, env: dict, what: str) -> int:
    """Run `cmd` (a driver command writing to `out`) at nice 10, its output in `out`.log; an
    existing `out` is an interrupted run and is resumed instead. Returns the exit status."""
    if os.path.isdir(out):
        cmd = [sys.executable, "-m", "adello_kernels.train", "--resume", out, "--no-progress"]
    print("$ " + " ".join(cmd[1:]), flush=True)
    with open(out + ".log", "a") as log:
        r = subprocess.run(["nice", "-n", "10"] + cmd, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    if r.returncode:
        print(f"{what}: exit {r.returncode} (log: {out}.log)", file=sys.stderr)
    return r.returncode
