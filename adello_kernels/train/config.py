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
    "prior_estimator": "raw",    # raw (the released method) | em (docs/method.md)
    # optimisation
    "steps": 262144, "batch_size": 64, "mu": 2, "lr": 0.03, "momentum": 0.9, "nesterov": True,
    "weight_decay": 5e-4, "ema": 0.999,
    # evaluation and logging
    "eval_every": 1024, "log_every": 64, "eval_batch_size": 1024,
    # runtime
    "seed": 0, "device": "auto", "amp": "none", "compile": False, "backend": "auto",
    "deterministic": False, "time_limit": 0.0, "progress": True, "download": False,
    # large batches and speed (docs/training.md, Large batches; scaling.py)
    "base_batch_size": 64,       # B0: the batch the per-step constants are tuned at
    "scale_rules": True,         # derive per-step values from kappa = batch_size / B0
    "warmup": 0,                 # labeled samples, or 'Xep' unlabeled epochs (linear lr warm-up)
    "lr_scaling": "linear",      # linear | sqrt
    "cosine": False,             # half-cosine lr decay after the warm-up
    "grad_accum": 1,             # micro-batches per optimizer step
    "synthetic": False,          # random uint8 images in the dataset's shapes (--dataset synthetic)
    "cuda_graph": False,         # capture the whole step in a CUDA graph
    "cudnn_benchmark": False,    # cudnn.benchmark on a GPU (never under --deterministic)
    "phase_timing": False,       # time sample+augment / forward+backward / optimizer+EMA
    "resolved": None,            # the resolved per-step values (written by the driver)
    # reliability
    "on_nonfinite": "stop",      # stop | skip (see the training driver's README section)
    "dist_timeout": 600.0,       # seconds a DDP collective may wait for the other ranks
}

# Keys with a command-line flag of their own (--key-with-dashes; progress is --no-progress).
FLAG_KEYS = ("algorithm", "gamma_l", "gamma_u", "n1", "m1", "steps", "batch_size", "mu", "seed",
             "split_seed", "device", "amp", "compile", "backend", "data_root", "download",
             "eval_every", "log_every", "eval_batch_size", "deterministic", "sync_bn", "lr",
             "ema", "threshold", "distill_start", "temperature", "prior_momentum", "time_limit",
             "model", "model_width", "progress", "on_nonfinite", "dist_timeout", "dataset",
             "grad_accum", "warmup", "lr_scaling", "cosine", "scale_rules", "cuda_graph",
             "phase_timing", "prior_estimator")
MODELS = ("cnn", "wrn28_2", "resnet50")
BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
# The splits each dataset's reader supports (any other would be silently meaningless).
DATASET_SPLITS = {"fmnist": ("long_tail", "fraction"), "cifar10": ("long_tail", "fraction"),
                  "cifar100": ("long_tail", "fraction"), "stl10": ("stl10",),
                  "imagenet127": ("fraction",)}
DATASETS_AND_SYNTHETIC = tuple(DATASET_SPLITS) + ("synthetic",)

# Keys that do not change the computation: excluded from the digest a checkpoint is matched on,
# so a resumed run may change them.
RUNTIME_KEYS = ("data_root", "eval_batch_size", "device", "compile", "time_limit", "progress",
                "download", "dist_timeout", "cuda_graph", "phase_timing", "resolved")


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


def flag(key: str) -> str:
    """How the user sets `key`: its flag, or --set KEY=VALUE (used in every error message)."""
    if key == "progress":
        return "--no-progress"
    if key == "scale_rules":
        return "--no-scale-rules"
    if key == "synthetic":
        return "--dataset synthetic"
    return "--" + key.replace("_", "-") if key in FLAG_KEYS else f"--set {key}"


def _err(key: str, text: str) -> ConfigError:
    return ConfigError(f"{flag(key)}: {text}")


def _int(cfg: dict, key: str, lo: int | None = None) -> None:
    v = cfg[key]
    # bool is an int subclass: `--set steps=true` must not mean 1 step.
    if isinstance(v, bool):
        raise _err(key, f"expected an integer, got {v!r}")
    if not isinstance(v, int):
        try:
            f = float(v)
            if not math.isfinite(f) or f != int(f):
                raise ValueError
            v = int(f)
        except (TypeError, ValueError):
            raise _err(key, f"expected an integer, got {cfg[key]!r}") from None
    if lo is not None and v < lo:
        raise _err(key, f"must be >= {lo}, got {v}")
    cfg[key] = v


def _float(cfg: dict, key: str) -> float:
    v = cfg[key]
    if isinstance(v, bool):
        raise _err(key, f"expected a number, got {v!r}")
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise _err(key, f"expected a number, got {cfg[key]!r}") from None
    if not math.isfinite(v):
        raise _err(key, f"must be finite, got {v}")
    cfg[key] = v
    return v


def _range(cfg: dict, key: str, lo: float, hi: float, lo_open: bool, hi_open: bool) -> None:
    v = _float(cfg, key)
    if (v <= lo if lo_open else v < lo) or (v >= hi if hi_open else v > hi):
        raise _err(key, f"must lie in {'(' if lo_open else '['}{lo:g}, {hi:g}"
                        f"{')' if hi_open else ']'}, got {v:g}")


def _bool(cfg: dict, key: str) -> None:
    v = cfg[key]
    if isinstance(v, str) and v.lower() in ("true", "false"):
        v = v.lower() == "true"
    if not isinstance(v, bool):
        raise _err(key, f"expected true or false, got {cfg[key]!r}")
    cfg[key] = v


def _choice(cfg: dict, key: str, choices) -> None:
    if cfg[key] not in choices:
        raise _err(key, f"expected one of {tuple(choices)}, got {cfg[key]!r}")


def validate(cfg: dict) -> dict:
    """Type-normalise and check every value of a configuration in place; returns it.

    Runs before any data is read, so a bad value costs nothing; every message names the flag
    (or `--set KEY`) that sets the value."""
    unknown = sorted(set(cfg) - set(DEFAULTS) - {"preset"})
    if unknown:
        raise ConfigError(f"configuration: unknown keys {unknown}")
    for k in ("steps", "batch_size", "mu", "eval_every", "log_every", "eval_batch_size", "n1"):
        _int(cfg, k, 1)
    for k in ("m1", "seed", "distill_start", "model_width"):
        _int(cfg, k, 0)
    if cfg["split_seed"] is not None:
        _int(cfg, "split_seed", 0)
    for k in ("gamma_l", "gamma_u"):
        if abs(_float(cfg, k)) < 1:
            raise _err(k, f"|gamma| must be >= 1 (a negative gamma reverses the order), got "
                          f"{cfg[k]:g}")
    _range(cfg, "lr", 0.0, math.inf, True, True)
    _range(cfg, "momentum", 0.0, 1.0, False, True)
    _range(cfg, "weight_decay", 0.0, math.inf, False, True)
    _range(cfg, "ema", 0.0, 1.0, False, True)
    _range(cfg, "bn_momentum", 0.0, 1.0, True, False)
    _range(cfg, "threshold", 0.0, 1.0, True, False)
    _range(cfg, "prior_momentum", 0.0, 1.0, False, True)
    _range(cfg, "alpha_min", 0.0, 1.0, False, False)
    _range(cfg, "power", 0.0, math.inf, True, True)
    _range(cfg, "lambda_u", 0.0, math.inf, False, True)
    _range(cfg, "lambda_d", 0.0, math.inf, False, True)
    _range(cfg, "lb_fraction", 0.0, 1.0, True, False)
    _range(cfg, "time_limit", 0.0, math.inf, False, True)   # 0: no limit; negative is a typo
    _range(cfg, "dist_timeout", 0.0, math.inf, True, True)
    if isinstance(cfg["temperature"], str) and cfg["temperature"] == "imbalance_aware":
        pass
    else:
        try:
            _range(cfg, "temperature", 0.0, math.inf, True, True)
        except ConfigError:
            raise _err("temperature", "expected a positive number or 'imbalance_aware', got "
                                      f"{cfg['temperature']!r}") from None
    if cfg["prior_estimator"] not in ("raw", "em"):
        raise _err("prior_estimator", f"expected 'raw' or 'em', got {cfg['prior_estimator']!r}")
    for k in ("sync_bn", "deterministic", "progress", "download", "nesterov", "scale_rules",
              "cosine", "synthetic", "cuda_graph", "cudnn_benchmark", "phase_timing"):
        _bool(cfg, k)
    # compile: false | model (torch.compile of the model) | step (the whole step, fast_step.py)
    if cfg["compile"] is True or cfg["compile"] == "true":
        cfg["compile"] = "model"
    if cfg["compile"] in (None, "false", "none"):
        cfg["compile"] = False
    _choice(cfg, "compile", (False, "model", "step"))
    for k in ("base_batch_size", "grad_accum"):
        _int(cfg, k, 1)
    _choice(cfg, "lr_scaling", ("linear", "sqrt"))
    from .scaling import parse_warmup
    parse_warmup(cfg["warmup"])
    if cfg["resolved"] is not None and not isinstance(cfg["resolved"], dict):
        raise _err("resolved", "is written by the driver; expected a mapping or null")
    if cfg["grad_accum"] > 1 and cfg["temperature"] == "imbalance_aware":
        raise _err("grad_accum", "gradient accumulation cannot be combined with --temperature "
                                 "imbalance_aware (its temperature is frozen from the prior "
                                 "after a whole step); use a fixed temperature")
    if cfg["cuda_graph"] and cfg["device"] == "cpu":
        raise _err("cuda_graph", "captures the step in a CUDA graph and needs a GPU "
                                 "(--device cuda or auto)")
    _choice(cfg, "algorithm", ALGORITHMS)
    _choice(cfg, "amp", ("none", "bf16", "auto"))   # auto: bf16 on a GPU, none on a CPU
    _choice(cfg, "model", MODELS)
    _choice(cfg, "backend", BACKENDS)
    _choice(cfg, "on_nonfinite", ("stop", "skip"))
    _choice(cfg, "dataset", tuple(DATASET_SPLITS))
    dev = cfg["device"]
    if not isinstance(dev, str) or not (dev in ("auto", "cpu", "cuda") or
                                        (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise _err("device", f"expected auto, cpu, cuda or cuda:N, got {dev!r}")
    if not isinstance(cfg["data_root"], str) or not cfg["data_root"]:
        raise _err("data_root", f"expected a directory, got {cfg['data_root']!r}")
    ds = cfg["dataset"]
    if cfg["split"] not in DATASET_SPLITS[ds]:
        raise _err("split", f"dataset {ds} supports split {' or '.join(DATASET_SPLITS[ds])}, "
                            f"got {cfg['split']!r}")
    if ds == "imagenet127":
        if cfg["image_size"] not in (None, 32, 64) or isinstance(cfg["image_size"], bool):
            raise _err("image_size", f"expected 32 or 64, got {cfg['image_size']!r}")
    elif cfg["image_size"] is not None:
        raise _err("image_size", f"only Small-ImageNet-127 has a choice of image size; dataset "
                                 f"{ds} has fixed-size images (got {cfg['image_size']!r})")
    return cfg


def digest(cfg: dict) -> str:
    """A short hash of everything that determines the computation (not RUNTIME_KEYS)."""
    core = {k: v for k, v in sorted(cfg.items()) if k not in RUNTIME_KEYS}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_value(text: str):
    """A --set KEY=VALUE value: YAML scalars (numbers, true/false, null) or a string."""
    return yaml.safe_load(text)
