"""Command line of `python -m adello_kernels.train` (see `--help`)."""
from __future__ import annotations

import argparse
import os
import sys
import time

import yaml

from . import config as config_mod

# flag -> config key; flags left unset (None) keep the preset's value.
FLAGS = {key: key for key in config_mod.FLAG_KEYS}

EPILOG = """examples:
  python -m adello_kernels.train                                  # ADELLO, Fashion-MNIST-LT, CPU
  python -m adello_kernels.train --algorithm fixmatch --seed 1
  python -m adello_kernels.train --preset cifar10-lt --gamma-u 1 --data-root data
  torchrun --nproc_per_node 4 -m adello_kernels.train --preset cifar100-lt
  python -m adello_kernels.train --resume runs/fmnist-lt-adello-20250101-120000
"""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m adello_kernels.train",
        description="Train ADELLO (or an ablation) on a long-tailed semi-supervised split. "
                    "Flags override the preset.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default=None,
                    help=f"one of {config_mod.preset_names()} (default fmnist-lt)")
    ap.add_argument("--algorithm", choices=config_mod.ALGORITHMS,
                    help="adello = FlexDA + CCR; fixmatch; flexda (FixMatch + FlexDA); ccr "
                         "(FixMatch + distillation); supervised (labeled data only)")
    g = ap.add_argument_group("split")
    g.add_argument("--n1", type=int, help="labeled images of the most frequent class")
    g.add_argument("--gamma-l", type=float, help="labeled imbalance ratio (negative: reversed)")
    g.add_argument("--m1", type=int, help="extra unlabeled images of the most frequent class")
    g.add_argument("--gamma-u", type=float, help="unlabeled imbalance ratio: = gamma-l "
                   "(consistent), 1 (balanced), -gamma-l (reversed)")
    g.add_argument("--split-seed", type=int, help="seed of the split (default: --seed)")
    g.add_argument("--data-root", help="dataset directory")
    g.add_argument("--dataset", choices=config_mod.DATASETS_AND_SYNTHETIC,
                   help="the dataset (default: the preset's); synthetic: random uint8 images "
                        "in the preset's shapes, no files (throughput runs)")
    g.add_argument("--download", action="store_true", default=None,
                   help="download CIFAR / STL-10 / Fashion-MNIST if missing (MD5-checked)")
    g = ap.add_argument_group("training")
    g.add_argument("--steps", type=int, help="training steps (T_max of the alpha schedule)")
    g.add_argument("--batch-size", type=int,
                   help="global labeled batch B of one optimizer step; the per-step values "
                        "follow from kappa = B / B0 (see --no-scale-rules)")
    g.add_argument("--mu", type=int, help="unlabeled batch = mu * B")
    g.add_argument("--lr", type=float)
    g.add_argument("--ema", type=float, help="EMA decay of the evaluated model")
    g.add_argument("--threshold", type=float, help="confidence threshold tau")
    g.add_argument("--prior-momentum", type=float, help="momentum of the prior estimate")
    g.add_argument("--distill-start", type=int, help="step t0 from which L_d counts")
    g.add_argument("--temperature", help="distillation temperature, or imbalance_aware")
    g.add_argument("--prior-estimator", help="what the prior estimate Q averages: raw (the weak "
                   "softmax, the released method) or em (the weak posteriors adjusted to Q)")
    g.add_argument("--model", help="cnn, wrn28_2 or resnet50")
    g.add_argument("--model-width", type=int, help="CNN width (0: default)")
    g.add_argument("--seed", type=int)
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any configuration key (repeatable)")
    g = ap.add_argument_group("large batches (docs/training.md, Large batches)")
    g.add_argument("--no-scale-rules", dest="scale_rules", action="store_false", default=None,
                   help="keep steps, lr, EMA / prior / BatchNorm momenta, distill-start and the "
                        "eval / log cadence as given instead of deriving them from "
                        "kappa = B / B0 (B0: --set base_batch_size, 64)")
    g.add_argument("--warmup", help="linear lr warm-up from the base lr: N labeled samples, or "
                                    "Xep unlabeled epochs (e.g. 1ep)")
    g.add_argument("--lr-scaling", choices=("linear", "sqrt"),
                   help="lr x kappa (linear, default) or x sqrt(kappa)")
    g.add_argument("--cosine", action="store_true", default=None,
                   help="half-cosine lr decay to 0 after the warm-up")
    g.add_argument("--grad-accum", type=int, metavar="K",
                   help="cut each optimizer step's batch into K micro-batches (same kappa)")
    g.add_argument("--cuda-graph", action="store_true", default=None,
                   help="capture the whole training step in a CUDA graph (GPU only)")
    g.add_argument("--phase-timing", action="store_true", default=None,
                   help="report sample+augment / forward+backward / optimizer+EMA times "
                        "(adds a device sync per phase)")
    g = ap.add_argument_group("runtime")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--amp", choices=("none", "bf16"), help="bf16 autocast of the model")
    g.add_argument("--compile", nargs="?", const="model", choices=("model", "step"),
                   help="torch.compile the model (--compile, --compile model) or the whole "
                        "step: views + forward + loss + backward (--compile step)")
    g.add_argument("--backend", help="ADELLOLoss backend: auto, reference, cpu, cuda, triton")
    g.add_argument("--sync-bn", action="store_true", default=None,
                   help="BatchNorm statistics over the global batch under DDP")
    g.add_argument("--deterministic", action="store_true", default=None,
                   help="torch.use_deterministic_algorithms (exact resume)")
    g.add_argument("--eval-every", type=int, help="steps between evaluations + checkpoints")
    g.add_argument("--log-every", type=int, help="steps between log records")
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--time-limit", type=float,
                   help="seconds of training after which the run evaluates and stops (0: none)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    g.add_argument("--on-nonfinite", choices=("stop", "skip"),
                   help="a non-finite loss or state: stop (default: exit 3, the last good "
                        "checkpoint kept) or skip (updates with a non-finite gradient are not "
                        "applied; the run goes on)")
    g.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="DDP: how long a collective waits for the other ranks before the run "
                        "fails and names the ranks that stalled (default 600)")
    g.add_argument("--out", help="run directory (default runs/<preset>-<algorithm>-<time>)")
    g.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last checkpoint")
    return ap


def _overrides(args) -> dict:
    out = {key: getattr(args, flag) for flag, key in FLAGS.items()
           if getattr(args, flag) is not None}
    for item in args.set:
        if "=" not in item:
            raise config_mod.ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in config_mod.DEFAULTS:
            raise config_mod.ConfigError(f"--set: unknown key {key!r}")
        out[key] = config_mod.parse_value(value)
    if out.get("dataset") == "synthetic":     # the preset's shapes, random images
        del out["dataset"]
        out["synthetic"] = True
    if isinstance(out.get("warmup"), str):
        out["warmup"] = config_mod.parse_value(out["warmup"])
    return out


def _check_schedule(cfg: dict) -> dict:
    """The batch-size rules on the flags alone (a warm-up in epochs is checked again once the
    pool size is known): an inconsistent setting fails before any data is read."""
    from . import scaling
    scaling.resolve(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    return cfg


def _read_run_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.yaml")
    if os.path.isfile(run_dir):
        raise config_mod.ConfigError(f"--resume: {run_dir} is a file, not a run directory")
    if not os.path.isfile(path):
        raise config_mod.ConfigError(f"--resume: {path} not found (not a run directory)")
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise config_mod.ConfigError(f"--resume: {path} is not valid YAML ({exc}); restore it "
                                     "or start a new run") from None
    except OSError as exc:
        raise config_mod.ConfigError(f"--resume: cannot read {path}: {exc.strerror}") from None
    if not isinstance(cfg, dict) or "preset" not in cfg:
        raise config_mod.ConfigError(f"--resume: {path} is not a run configuration")
    unknown = sorted(set(cfg) - set(config_mod.DEFAULTS) - {"preset"})
    if unknown:
        raise config_mod.ConfigError(f"--resume: {path} has unknown keys {unknown}")
    return cfg


def resolve(args) -> tuple[dict, str, bool]:
    """(config, run directory, resume?) from the parsed flags. Every value is validated here,
    before any data is read."""
    over = _overrides(args)
    if args.resume:
        run_dir = args.resume
        if args.out and os.path.realpath(args.out) != os.path.realpath(run_dir):
            raise config_mod.ConfigError(
                f"--out {args.out} with --resume {run_dir}: a resumed run writes into its own "
                "directory; drop --out (or copy the run directory first and resume the copy)")
        cfg = _read_run_config(run_dir)
        if args.preset and args.preset != cfg["preset"]:
            raise config_mod.ConfigError(f"--resume: the run used preset {cfg['preset']!r}, "
                                         f"not {args.preset!r}")
        try:
            cfg = config_mod.validate({**config_mod.DEFAULTS, **cfg})
        except config_mod.ConfigError as exc:
            raise config_mod.ConfigError(f"--resume: {run_dir}/config.yaml: {exc}") from None
        for key, value in over.items():
            if key in config_mod.RUNTIME_KEYS:
                cfg[key] = value
                continue
            new = config_mod.validate({**cfg, key: value})[key]
            if new != cfg[key]:
                raise config_mod.ConfigError(
                    f"--resume: {config_mod.flag(key)} = {value!r} differs from the run's "
                    f"{cfg[key]!r}; a resumed run continues with its saved configuration")
        return _check_schedule(config_mod.validate(cfg)), run_dir, True
    cfg = config_mod.load_preset(args.preset or "fmnist-lt")
    cfg.update(over)
    cfg = _check_schedule(config_mod.validate(cfg))
    if args.out:
        run_dir = args.out
        if os.path.exists(run_dir) and not os.path.isdir(run_dir):
            raise config_mod.ConfigError(f"--out: {run_dir} exists and is not a directory; "
                                         "choose another --out")
        # Under torchrun only rank 0 writes the run directory; the others must not find it.
        if int(os.environ.get("RANK", "0")) == 0 and \
                os.path.exists(os.path.join(run_dir, "config.yaml")):
            raise config_mod.ConfigError(f"--out: {run_dir} already holds a run; use --resume "
                                         f"{run_dir} to continue it or choose another --out")
    else:
        # The name is only proposed here; `rundir.claim` creates it exclusively (a second
        # launch within the same second gets the next free suffix).
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = os.path.join("runs", f"{cfg['preset']}-{cfg['algorithm']}-{stamp}")
    return cfg, run_dir, False


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from . import checkpoint, rundir
    from . import data as data_mod
    from .trainer import DistFailure, Diverged
    try:
        cfg, run_dir, resume = resolve(args)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .trainer import Trainer, final_table
    trainer = None
    claim = None
    try:
        main_rank = int(os.environ.get("RANK", "0")) == 0
        if main_rank:
            # Claimed (created exclusively / locked) before any work, so two launches can
            # never share a run directory; config.yaml is written at once, so a crash while
            # the data loads still leaves a directory that `--resume` continues from step 0.
            claim = rundir.claim(run_dir, resume=resume, explicit=bool(args.out or resume))
            run_dir = claim.path
            if not resume:
                claim.write_config(cfg)
        trainer = Trainer(cfg, run_dir, resume=resume)  # data, model, backend: errors come here
        if claim is not None and not resume:
            claim.write_config({**cfg, "resolved": trainer.schedule.as_dict()})
        if trainer.dist.main:
            s = trainer.split
            print(f"{cfg['algorithm']} on {cfg['preset']}: {len(s.lb_idx)} labeled / "
                  f"{len(s.ulb_idx)} unlabeled images, {trainer.num_classes} classes, model "
                  f"{cfg['model']}, {trainer.cfg['steps']} steps, device {trainer.device} x "
                  f"{trainer.dist.world}, loss backend {trainer.backend}"
                  + (f", resuming at step {trainer.step}" if resume else ""), flush=True)
            if resume and trainer.resumed_from is None:
                print(f"{run_dir} holds no checkpoint yet (the run stopped before its first "
                      "evaluation): starting it from step 0 with its saved configuration",
                      flush=True)
            print(trainer.schedule.table(), flush=True)
            print(f"run directory: {run_dir}", flush=True)
        summary = trainer.run()
        if summary is not None:
            print(final_table(summary, run_dir), flush=True)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Diverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except (ValueError, data_mod.DataError, checkpoint.CheckpointError, DistFailure) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        kept = trainer.kept_text() if trainer is not None else "nothing was written"
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: cannot write{where}: {exc.strerror or exc} ({kept})", file=sys.stderr)
        return 1
    finally:
        if trainer is not None:
            trainer.dist.close()
        if claim is not None:
            claim.release()
    return 0
