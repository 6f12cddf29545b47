"""Checkpoints: written atomically (temp file, fsync, rename), checksummed, checked on load.

A checkpoint is a dict of tensors and plain values (it loads with `weights_only=True`):
format/version, the configuration digest, the split digest and the data fingerprint it belongs
to, the step, the model / EMA / optimizer / ADELLOLoss state dicts, the samplers' permutations
and cursors, the states of every random generator used (data sampling, augmentation, torch's
default CPU and CUDA generators), the seconds spent so far, the world size, the best
evaluation so far, and `checksum`: a SHA-256 over every other entry (each tensor's dtype,
shape and bytes, each plain value's repr, in key order). `load` recomputes the checksum and
checks that every floating-point tensor of the model, EMA, optimizer and criterion is finite,
and raises CheckpointError with the reason for a missing, truncated, corrupt, damaged,
non-finite or foreign file; it never returns a fresh state.

`last.pt` is the latest evaluation's state, `best.pt` the one with the highest balanced
accuracy (a hard link to the same bytes when the file system allows it). Neither is ever
written from a non-finite state (the trainer checks before it saves).
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil

import torch

FORMAT = "adello-kernels-train-checkpoint"
VERSION = 2
LAST = "last.pt"
BEST = "best.pt"
# Parts of the state whose floating-point tensors must be finite to be worth resuming from.
FINITE_PARTS = ("model", "ema", "optimizer", "criterion")


class CheckpointError(RuntimeError):
    pass


def _walk(obj, prefix: str = ""):
    """(path, leaf) for every leaf of nested dicts / lists / tuples, in a fixed order."""
    if isinstance(obj, dict):
        for k in sorted(obj, key=lambda k: (type(k).__name__, str(k))):
            yield from _walk(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def payload_checksum(state: dict) -> str:
    """SHA-256 of everything in `state` except its own 'checksum' entry."""
    h = hashlib.sha256()
    for path, leaf in _walk({k: v for k, v in state.items() if k != "checksum"}):
        h.update(path.encode())
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()


def nonfinite_entries(state: dict, parts=FINITE_PARTS) -> list[str]:
    """Paths of floating-point tensors under `parts` that hold a NaN or an infinity."""
    bad = []
    for part in parts:
        for path, leaf in _walk(state.get(part), part):
            if isinstance(leaf, torch.Tensor) and leaf.is_floating_point() and \
                    not bool(torch.isfinite(leaf).all()):
                bad.append(path)
    return bad


def _fsync_dir(directory: str) -> None:
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, then rename over `path`: a crash
    at any point leaves either the old or the new file, never a partial one. On failure (a full
    disk, a read-only directory) the temp file is removed and the old file is untouched."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; remove or rename "
                              "it")
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    # Serialised in memory first: torch's own writer turns a failed write (ENOSPC, EFBIG) into
    # an opaque RuntimeError; a plain file write raises OSError with the reason.
    buf = io.BytesIO()
    torch.save(obj, buf)
    try:
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _remove_if_left(tmp)
    _fsync_dir(directory)


def _remove_if_left(tmp: str) -> None:
    """Remove a temp file a failed write left behind (best effort: the error that matters is the
    write's own)."""
    if os.path.exists(tmp):
        try:
            os.remove(tmp)
        except OSError:
            pass


def link_or_copy(src: str, dst: str) -> None:
    """`dst` becomes the same bytes as `src`, atomically: a hard link when possible (no second
    copy on disk; `src` is always replaced by rename, so the link keeps the old bytes), a copy
    otherwise."""
    directory = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(directory, f".{os.path.basename(dst)}.tmp.{os.getpid()}")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        _remove_if_left(tmp)
    _fsync_dir(directory)


def _short(exc: Exception) -> str:
    """The first line of a loader's error, without its advice to unpickle arbitrary code."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if "weights_only" in text or len(text) > 200:
        text = ""
    return type(exc).__name__ + (f": {text}" if text else "")


def load(path: str, *, config_digest: str, split_digest: str) -> dict:
    """The checkpoint at `path`, checked against the run it is meant to continue."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file; remove or rename "
                              "it (the run then resumes from best.pt's step if you copy best.pt "
                              f"to {LAST}, or from step 0 without one)")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, foreign file...
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({_short(exc)}); restore "
                              "a good copy (best.pt next to it is the best evaluation's state) "
                              "or delete it to resume from step 0") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an adello_kernels.train checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, this "
                              f"code reads version {VERSION}")
    want = state.get("checksum")
    got = payload_checksum(state)
    if want != got:
        raise CheckpointError(f"{path} is damaged: its contents do not match the checksum "
                              f"stored when it was written (stored {str(want)[:16]}, now "
                              f"{got[:16]}); restore a good copy (best.pt next to it is the "
                              "best evaluation's state) or delete it to resume from step 0")
    bad = nonfinite_entries(state)
    if bad:
        raise CheckpointError(f"{path} holds non-finite values ({', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}); it cannot be resumed")
    if state.get("config_digest") != config_digest:
        raise CheckpointError(f"{path} was written with another configuration (digest "
                              f"{state.get('config_digest')}, the run's config.yaml gives "
                              f"{config_digest}); was config.yaml edited?")
    if state.get("split_digest") != split_digest:
        raise CheckpointError(f"{path} was written for another labeled/unlabeled split (digest "
                              f"{state.get('split_digest')}, now {split_digest}): the dataset "
                              "files under --data-root differ from the ones the run started with")
    return state


def with_checksum(state: dict) -> dict:
    state = dict(state)
    state["checksum"] = payload_checksum(state)
    return state


def restore_module(module: torch.nn.Module, state: dict, what: str, path: str) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the {what} state does not fit this model: {exc}") from None
