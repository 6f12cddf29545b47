"""Run configuration: built-in defaults < preset YAML < command-line flags.

A configuration is a flat dict (the keys of DEFAULTS). Presets live in
adello_kernels/train/presets/<name>.yaml and may set any key; `load_preset` rejects unknown keys
so that a typo never goes unnoticed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os

import yaml

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets")
ALGORITHMS = ("adello", "fixmatch", "flexda", "ccr", "supervised")

DEFAULTS = {
    # data
    "dataset": "fmnist",
    "data_root": "data",
    "image_size": None,          # ImageNet127: 32 or 64 (checked against the prepared data)
    "split": "long_tail",        # long_tail | stl10 | fraction
    "n1": 500, "gamma_l": 100.0, "m1": 4000, "gamma_u": 100.0,
    "lb_fraction": 0.1,          # split 'fraction' only
    "split_seed": None,          # None: same as seed
    # model
    "model": "cnn", "model_width": 0, "bn_momentum": 0.001, "sync_bn": False,
    # method
    "algorithm": "adello",
    "threshold": 0.95, "prior_momentum": 0.999, "alpha_min": 0.1, "power": 2.0,
    "distill_start": 0, "temperature": 1.0, "lambda_u": 1.0, "lambda_d": 1.0,
    # optimisation
    "steps": 262144, "batch_size": 64, "mu": 2, "lr": 0.03, "momentum": 0.9, "nesterov": True,
    "weight_decay": 5e-4, "ema": 0.999,
    # evaluation and logging
    "eval_every": 1024, "log_every": 64, "eval_batch_size": 1024,
    # runtime
    "seed": 0, "device": "auto", "amp": "none", "compile": False, "backend": "auto",
    "deterministic": False, "time_limit": 0.0, "progress": True, "download": False,
}

# Keys that do not change the computation: excluded from the digest a checkpoint is matched on,
# so a resumed run may change them.
RUNTIME_KEYS = ("data_root", "eval_batch_size", "device", "compile", "time_limit", "progress",
                "download")


class ConfigError(ValueError):
    pass


def preset_names() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def load_preset(name: str) -> dict:
    path = os.path.join(PRESET_DIR, name + ".yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"preset: unknown preset {name!r}; available: {preset_names()}")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    unknown = sorted(set(values) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"preset {name}: unknown keys {unknown}")
    cfg = dict(DEFAULTS)
    cfg.update(values)
    cfg["preset"] = name
    return cfg


def validate(cfg: dict) -> dict:
    """Type-normalise and check a configuration in place; returns it."""
    ints = ("n1", "m1", "steps", "batch_size", "mu", "eval_every", "log_every",
            "eval_batch_size", "seed", "distill_start", "model_width")
    for k in ints:
        if isinstance(cfg[k], bool) or not isinstance(cfg[k], int):
            try:
                if float(cfg[k]) != int(float(cfg[k])):
                    raise ValueError
                cfg[k] = int(float(cfg[k]))
            except (TypeError, ValueError):
                raise ConfigError(f"{k}: expected an integer, got {cfg[k]!r}") from None
    for k in ("steps", "batch_size", "mu", "eval_every", "log_every", "eval_batch_size"):
        if cfg[k] <= 0:
            raise ConfigError(f"{k}: must be positive, got {cfg[k]}")
    for k in ("gamma_l", "gamma_u", "lr", "momentum", "weight_decay", "ema", "threshold",
              "prior_momentum", "alpha_min", "power", "lambda_u", "lambda_d", "lb_fraction",
              "bn_momentum", "time_limit"):
        try:
            cfg[k] = float(cfg[k])
        except (TypeError, ValueError):
            raise ConfigError(f"{k}: expected a number, got {cfg[k]!r}") from None
        if not math.isfinite(cfg[k]):
            raise ConfigError(f"{k}: must be finite")
    for k in ("gamma_l", "gamma_u"):
        if cfg[k] == 0 or (abs(cfg[k]) < 1):
            raise ConfigError(f"{k}: |gamma| must be >= 1 (a negative gamma reverses the "
                              f"order), got {cfg[k]}")
    if not 0 <= cfg["ema"] < 1:
        raise ConfigError(f"ema: must lie in [0, 1), got {cfg['ema']}")
    if cfg["algorithm"] not in ALGORITHMS:
        raise ConfigError(f"algorithm: expected one of {ALGORITHMS}, got {cfg['algorithm']!r}")
    if cfg["amp"] not in ("none", "bf16"):
        raise ConfigError(f"amp: expected 'none' or 'bf16', got {cfg['amp']!r}")
    dev = str(cfg["device"])
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {dev!r}")
    if cfg["split"] not in ("long_tail", "stl10", "fraction"):
        raise ConfigError(f"split: expected long_tail, stl10 or fraction, got {cfg['split']!r}")
    if cfg["split_seed"] is not None:
        cfg["split_seed"] = int(cfg["split_seed"])
    if isinstance(cfg["temperature"], str):
        if cfg["temperature"] != "imbalance_aware":
            try:
                cfg["temperature"] = float(cfg["temperature"])
            except ValueError:
                raise ConfigError("temperature: expected a number or 'imbalance_aware'") from None
    else:
        cfg["temperature"] = float(cfg["temperature"])
    for k in ("sync_bn", "compile", "deterministic", "progress", "download", "nesterov"):
        cfg[k] = bool(cfg[k])
    return cfg


def digest(cfg: dict) -> str:
    """A short hash of everything that determines the computation (not RUNTIME_KEYS)."""
    core = {k: v for k, v in sorted(cfg.items()) if k not in RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_value(text: str):
    """A --set KEY=VALUE value: YAML scalars (numbers, true/false, null) or a string."""
    return yaml.safe_load(text)
