"""End-to-end fault injection on the default preset (Fashion-MNIST-LT, real data, short runs):
kill -9, a flipped byte, changed data, a full disk, divergence, stale temp files, two launches
on one directory. Prints a table (case, expected, observed) and exits non-zero if any case
does not behave as expected.

    .venv/bin/python tests/fault_injection.py            # about 2 minutes on 2 CPU cores

The full disk is a real one when the script may mount a small tmpfs (root): writes fail with
ENOSPC. Otherwise it falls back to RLIMIT_FSIZE (`ulimit -f`) in the child: writes past the
limit fail with EFBIG, which exercises the same path.
"""
from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
FMNIST = "/usr/share/datasets/fashion-mnist"
STEPS = 40
BASE = ["--steps", str(STEPS), "--eval-every", "20", "--log-every", "10", "--time-limit", "0",
        "--no-progress", "--deterministic"]
CKPT = os.path.join("checkpoints", "last.pt")

rows: list[tuple[str, str, str, bool]] = []
TMP = ""          # the scratch directory, left out of the observed messages


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
             PYTHONWARNINGS="ignore",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    e.update(extra)
    return e


def train(args, cwd, preexec=None, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adello_kernels.train", *args], cwd=cwd,
                          env=env(**extra), capture_output=True, text=True, timeout=600,
                          preexec_fn=preexec)


def record(case: str, expected: str, observed: str, ok: bool) -> None:
    observed = observed.replace(TMP + "/", "").replace("|", "/")
    rows.append((case, expected, observed, ok))
    print(f"[{'ok' if ok else 'FAIL'}] {case}: {observed}", flush=True)


def err_line(r) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    line = lines[-1][7:] if lines else (r.stderr.strip().splitlines() or [""])[-1]
    return line.replace(TMP + "/", "")


def summary(run) -> dict:
    with open(os.path.join(run, "summary.json")) as f:
        return json.load(f)


def copy(src, dst) -> str:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def flip_tensor_byte(path: str) -> None:
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(read_bytes(path))
    off = info.header_offset
    n, e = (int.from_bytes(raw[off + 26:off + 28], "little"),
            int.from_bytes(raw[off + 28:off + 30], "little"))
    raw[off + 30 + n + e + info.file_size // 2] ^= 0x40
    with open(path, "wb") as f:
        f.write(bytes(raw))


def write_idx(path: str, a: np.ndarray) -> None:
    import struct
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, a.ndim]) + struct.pack(">" + "i" * a.ndim, *a.shape))
        f.write(a.astype(np.uint8).tobytes())


def changed_data(tmp: str, what: str) -> str:
    from adello_kernels.train.data import read_idx
    root = os.path.join(tmp, f"data-{what}")
    os.makedirs(root)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        a = read_idx(os.path.join(FMNIST, name + ".gz"))
        if what == "inverted-train-pixels" and name.startswith("train-images"):
            a = 255 - a
        if what == "test-labels-zero" and name.startswith("t10k-labels"):
            a = np.zeros_like(a)
        write_idx(os.path.join(root, name), a)
    return root


def mount_tmpfs(path: str, size: int) -> bool:
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                       capture_output=True)
    return r.returncode == 0


def main() -> int:
    if not os.path.isdir(FMNIST):
        print(f"needs the real Fashion-MNIST in {FMNIST} (apt-get install dataset-fashion-mnist)")
        return 2
    t0 = time.time()
    global TMP
    tmp = TMP = tempfile.mkdtemp(prefix="adello-faults-")
    try:
        from adello_kernels.train import checkpoint, trainer

        # Uninterrupted reference run.
        full = os.path.join(tmp, "full")
        r = train(BASE + ["--out", full], tmp)
        record("uninterrupted run", "exit 0", f"exit {r.returncode}", r.returncode == 0)
        if r.returncode:
            print(r.stderr[-3000:])
            return 1

        # kill -9 after step 30 (checkpoint of step 20 on disk), then --resume.
        killed = os.path.join(tmp, "killed")
        r = train(BASE + ["--out", killed], tmp, **{trainer.KILL_ENV: "30"})
        step20 = read_bytes(os.path.join(killed, CKPT))
        # The directory as the kill left it (best.pt is a hard link of last.pt: not copied).
        at20 = os.path.join(tmp, "killed-at-20")
        shutil.copytree(killed, at20, ignore=shutil.ignore_patterns(".lock", "best.pt"))
        r2 = train(["--resume", killed, "--no-progress"], tmp)
        import torch
        same = r2.returncode == 0 and all(
            summary(full)[k] == summary(killed)[k]
            for k in ("top1", "balanced_acc", "ece", "mce", "prior_ulb", "steps"))
        a = torch.load(os.path.join(full, CKPT), weights_only=True)
        b = torch.load(os.path.join(killed, CKPT), weights_only=True)
        same = same and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        record("kill -9 at step 30, --resume", "resumes at 20; final state == uninterrupted",
               f"kill exit {r.returncode}, resume exit {r2.returncode}, "
               f"{'bit-identical' if same else 'DIFFERENT'}",
               r.returncode == -signal.SIGKILL and same)

        # kill -9 from outside at a random moment (maybe mid-checkpoint), then --resume.
        rnd = random.Random(1)
        ok_all, notes = True, []
        for trial in range(2):
            run = os.path.join(tmp, f"extkill{trial}")
            p = subprocess.Popen([sys.executable, "-m", "adello_kernels.train", *BASE, "--out",
                                  run], cwd=tmp, env=env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            # From the moment the run has claimed its directory: while the data loads, during
            # training, or in the middle of a checkpoint write.
            for _ in range(600):
                if os.path.exists(os.path.join(run, "config.yaml")) or p.poll() is not None:
                    break
                time.sleep(0.1)
            time.sleep(rnd.uniform(0.0, 8.0))
            p.send_signal(signal.SIGKILL)
            p.wait()
            has = os.path.exists(os.path.join(run, CKPT))
            r = train(["--resume", run, "--no-progress"], tmp)
            ok = r.returncode == 0 and summary(run)["steps"] == STEPS
            ok_all &= ok
            notes.append(f"{'ckpt' if has else 'no ckpt'} -> resume exit {r.returncode}")
        record("kill -9 at a random time (x2), --resume", "resume exit 0, run completes",
               "; ".join(notes), ok_all)

        # One flipped byte in the tensor data of last.pt.
        run = copy(full, os.path.join(tmp, "flipped"))
        flip_tensor_byte(os.path.join(run, CKPT))
        r = train(["--resume", run, "--no-progress"], tmp)
        record("flipped byte in last.pt", "exit 1, checksum mismatch named",
               f"exit {r.returncode}: {err_line(r)[:90]}",
               r.returncode == 1 and "checksum" in r.stderr and "weights_only" not in r.stderr)

        # Changed data under the same --data-root layout.
        for what, part in (("inverted-train-pixels", "train_images"),
                           ("test-labels-zero", "test_labels")):
            run = copy(full, os.path.join(tmp, what))
            r = train(["--resume", run, "--no-progress", "--data-root", changed_data(tmp, what)],
                      tmp)
            record(f"changed data: {what}", "exit 1, data_fingerprint.json named",
                   f"exit {r.returncode}: {err_line(r)[:90]}",
                   r.returncode == 1 and "data_fingerprint.json" in r.stderr and part in r.stderr)

        # A full disk while saving the step-40 checkpoint (the step-20 one is on disk).
        size = len(step20)
        disk = os.path.join(tmp, "disk")
        real = mount_tmpfs(disk, int(size * 1.6) + 256 * 1024)
        try:
            run = copy(at20, os.path.join(disk if real else tmp, "full-disk"))
            limit = size // 2

            def cap():
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            r = train(["--resume", run, "--no-progress"], tmp, preexec=None if real else cap)
            intact = read_bytes(os.path.join(run, CKPT)) == step20
            tmp_left = [n for n in os.listdir(os.path.join(run, "checkpoints")) if ".tmp." in n]
            record(f"disk full while saving ({'tmpfs, ENOSPC' if real else 'ulimit -f, EFBIG'})",
                   "exit 1, says step-20 checkpoint kept; it is intact",
                   f"exit {r.returncode}: {err_line(r)[:70]}...; "
                   f"{'intact' if intact else 'CHANGED'}, {len(tmp_left)} temp files",
                   r.returncode == 1 and "from step 20, intact" in r.stderr and intact
                   and not tmp_left and "Traceback" not in r.stderr)
        finally:
            if real:
                subprocess.run(["umount", disk], capture_output=True)

        # A read-only file system (root only: a tmpfs remounted read-only).
        ro = os.path.join(tmp, "ro")
        if mount_tmpfs(ro, 8 << 20):
            try:
                run = copy(at20, os.path.join(ro, "run"))
                subprocess.run(["mount", "-o", "remount,ro", ro], check=True)
                r = train(["--resume", run, "--no-progress"], tmp)
                record("read-only file system", "clear error, no traceback, nothing changed",
                       f"exit {r.returncode}: {err_line(r)[:80]}",
                       r.returncode != 0 and "Read-only file system" in r.stderr
                       and "Traceback" not in r.stderr)
            finally:
                subprocess.run(["umount", ro], capture_output=True)

        # Divergence: a huge learning rate from the start.
        run = os.path.join(tmp, "lr1000")
        r = train(["--lr", "1000", "--steps", "60", "--eval-every", "20", "--time-limit", "0",
                   "--no-progress", "--out", run], tmp)
        wrote = os.path.exists(os.path.join(run, CKPT))
        record("--lr 1000 (diverges at once)", "exit 3, no checkpoint, summary 'diverged'",
               f"exit {r.returncode}, checkpoint {'written' if wrote else 'none'}, "
               f"status {summary(run).get('status')}",
               r.returncode == 3 and not wrote and summary(run).get("status") == "diverged")

        # Divergence after a good checkpoint: NaN images at step 25.
        run = copy(at20, os.path.join(tmp, "nan"))
        r = train(["--resume", run, "--no-progress"], tmp, **{trainer.NAN_ENV: "25"})
        intact = read_bytes(os.path.join(run, CKPT)) == step20
        record("NaN at step 25 after the step-20 checkpoint", "exit 3, last.pt byte-identical",
               f"exit {r.returncode}, last.pt {'byte-identical' if intact else 'CHANGED'}",
               r.returncode == 3 and intact)

        # The same with --on-nonfinite skip (a policy of the run, part of its configuration):
        # the bad update is left out and the run completes.
        run = os.path.join(tmp, "nan-skip")
        r = train(BASE + ["--out", run, "--on-nonfinite", "skip"], tmp,
                  **{trainer.NAN_ENV: "25"})
        s = summary(run) if os.path.exists(os.path.join(run, "summary.json")) else {}
        state = checkpoint.nonfinite_entries(torch.load(os.path.join(run, CKPT),
                                                        weights_only=True))
        record("NaN at step 25, --on-nonfinite skip", "exit 0, 1 update skipped, finite state",
               f"exit {r.returncode}, skipped {s.get('skipped_steps')}, "
               f"{'finite' if not state else 'NON-FINITE'}",
               r.returncode == 0 and s.get("skipped_steps") == 1 and not state)

        # A stale temp file of an interrupted save.
        run = copy(full, os.path.join(tmp, "stale"))
        stale = os.path.join(run, "checkpoints", ".last.pt.tmp.424242")
        with open(stale, "wb") as f:
            f.write(b"\0" * (1 << 20))
        r = train(["--resume", run, "--no-progress"], tmp)
        record("stale .last.pt.tmp.<pid>", "removed at start", f"exit {r.returncode}, "
               f"{'removed' if not os.path.exists(stale) else 'STILL THERE'}",
               r.returncode == 0 and not os.path.exists(stale))

        # Two launches on one directory.
        run = os.path.join(tmp, "shared")
        p = subprocess.Popen([sys.executable, "-m", "adello_kernels.train", *BASE, "--out", run],
                             cwd=tmp, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        for _ in range(100):
            if os.path.exists(os.path.join(run, "config.yaml")):
                break
            time.sleep(0.1)
        r = train(BASE + ["--out", run], tmp)
        p.send_signal(signal.SIGKILL)
        p.wait()
        record("second launch on a busy --out", "exit 2, refused",
               f"exit {r.returncode}: {err_line(r)[:80]}", r.returncode == 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{len(rows)} cases in {time.time() - t0:.0f} s\n")
    print("| case | expected | observed | |")
    print("|---|---|---|---|")
    for case, expected, observed, ok in rows:
        print(f"| {case} | {expected} | {observed} | {'ok' if ok else 'FAIL'} |")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
