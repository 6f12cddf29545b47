"""Claiming a run directory before any work (rank 0 only).

A fresh run creates its directory exclusively (`os.mkdir`: of two launches racing for the
same default name, the second gets the next free suffix) and holds an advisory lock on
`<run>/.lock` (`fcntl.flock`) for its whole lifetime; `--out DIR` and `--resume DIR` take the
same lock, so two processes can never write one run directory. The kernel drops the lock when
the process dies, however it dies (kill -9 included), so a crashed run never leaves a stale
lock behind. Temp files of interrupted checkpoint writes are removed once the lock is held.
"""
from __future__ import annotations

import errno
import fcntl
import glob
import os
import socket

import yaml

from .config import ConfigError

LOCK = ".lock"


class Claim:
    def __init__(self, path: str, fd: int):
        self.path = path
        self._fd = fd

    def write_config(self, cfg: dict) -> None:
        path = os.path.join(self.path, "config.yaml")
        tmp = path + f".tmp.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                yaml.safe_dump(cfg, f, sort_keys=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)       # closing the descriptor drops the flock
            self._fd = -1


def remove_stale_temp_files(run_dir: str) -> list[str]:
    """Temp files of checkpoint / log writes that never finished (the writer was killed).
    Only called with the run's lock held, so no live writer owns them."""
    pats = [os.path.join(run_dir, "checkpoints", ".*.tmp.*"), os.path.join(run_dir, "*.tmp"),
            os.path.join(run_dir, "*.tmp.*")]
    removed = []
    for pat in pats:
        for path in glob.glob(pat):
            if os.path.isfile(path):
                try:
                    os.remove(path)
                    removed.append(path)
                except OSError:
                    pass
    return removed


def _lock(path: str) -> int:
    lock_path = os.path.join(path, LOCK)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"run directory {path}: cannot create {lock_path}: "
                          f"{exc.strerror} (nothing in it was changed)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        owner = ""
        try:
            with open(lock_path) as f:
                owner = f.read().strip()
        except OSError:
            pass
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"run directory {path} is in use by another process"
                              + (f" ({owner})" if owner else "") +
                              "; wait for it to finish or choose another --out") from None
        raise ConfigError(f"run directory {path}: cannot lock {lock_path}: "
                          f"{exc.strerror}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def claim(run_dir: str, *, resume: bool, explicit: bool) -> Claim:
    """Create (fresh run) or open (resume) `run_dir` and lock it. `explicit`: the user named
    the directory (--out / --resume); otherwise `run_dir` is a proposed default name and a
    taken one moves on to `<name>-1`, `<name>-2`, ..."""
    if resume:
        if not os.path.isdir(run_dir):
            raise ConfigError(f"--resume: {run_dir} is not a directory")
        fd = _lock(run_dir)
        remove_stale_temp_files(run_dir)
        return Claim(run_dir, fd)
    parent = os.path.dirname(os.path.abspath(run_dir))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out: cannot create {parent}: {exc.strerror}") from None
    if explicit:
        try:
            os.mkdir(run_dir)
        except FileExistsError:
            if not os.path.isdir(run_dir):
                raise ConfigError(f"--out: {run_dir} exists and is not a directory; choose "
                                  "another --out") from None
        except OSError as exc:
            raise ConfigError(f"--out: cannot create {run_dir}: {exc.strerror}") from None
        path = run_dir
    else:
        path, i = run_dir, 0
        while True:
            try:
                os.mkdir(path)
                break
            except FileExistsError:
                i += 1
                path = f"{run_dir}-{i}"
            except OSError as exc:
                raise ConfigError(f"cannot create the run directory {path}: "
                                  f"{exc.strerror}") from None
    fd = _lock(path)
    # With the lock held: a run that finished or crashed earlier has left config.yaml.
    if os.path.exists(os.path.join(path, "config.yaml")):
        os.close(fd)
        raise ConfigError(f"--out: {path} already holds a run; use --resume {path} to "
                          "continue it or choose another --out")
    remove_stale_temp_files(path)
    try:
        os.makedirs(os.path.join(path, "checkpoints"), exist_ok=True)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"cannot create {os.path.join(path, 'checkpoints')}: "
                          f"{exc.strerror}") from None
    return Claim(path, fd)
