"""Checkpoints: written atomically (temp file, fsync, rename), checked on load.

A checkpoint is a dict of tensors and plain values (it loads with `weights_only=True`):
format/version, the configuration digest and the split digest it belongs to, the step, the
model / EMA / optimizer / ADELLOLoss state dicts, the samplers' permutations and cursors, the
states of every random generator used (data sampling, augmentation, torch's default CPU and
CUDA generators), the seconds spent so far and the world size. `load` raises CheckpointError
with the reason for a missing, truncated, corrupt or foreign file, never returns a fresh state.
"""
from __future__ import annotations

import os

import torch

FORMAT = "adello-kernels-train-checkpoint"
VERSION = 1
LAST = "last.pt"


class CheckpointError(RuntimeError):
    pass


def save_atomic(obj, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, then rename over `path`: a crash
    at any point leaves either the old or the new file, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    try:  # make the rename itself durable
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load(path: str, *, config_digest: str, split_digest: str) -> dict:
    """The checkpoint at `path`, checked against the run it is meant to continue."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: the run has not reached its first "
                              "evaluation (nothing to resume); start it again without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle, foreign file...
        raise CheckpointError(f"{path} is corrupt or not a checkpoint ({type(exc).__name__}: "
                              f"{exc}); delete it to start over, or restore a good copy") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an adello_kernels.train checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, this "
                              f"code reads version {VERSION}")
    if state.get("config_digest") != config_digest:
        raise CheckpointError(f"{path} was written with another configuration (digest "
                              f"{state.get('config_digest')}, the run's config.yaml gives "
                              f"{config_digest}); was config.yaml edited?")
    if state.get("split_digest") != split_digest:
        raise CheckpointError(f"{path} was written for another labeled/unlabeled split (digest "
                              f"{state.get('split_digest')}, now {split_digest}): the dataset "
                              "files under --data-root differ from the ones the run started with")
    return state


def restore_module(module: torch.nn.Module, state: dict, what: str, path: str) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: the {what} state does not fit this model: {exc}") from None
