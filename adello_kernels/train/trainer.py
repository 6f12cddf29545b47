"""The training loop: data on the device, one forward of cat(labeled, weak, strong), the
ADELLOLoss step, SGD, EMA, periodic evaluation and checkpoints, DDP.

Everything that decides the numbers (model init, split, sampling, augmentation) is drawn from
seeded generators whose states go into every checkpoint, so `--resume` continues bit for bit
(in --deterministic mode), and K DDP ranks reproduce one process with the same global batch:
every rank draws the global batch's indices and augmentation parameters and keeps its slice.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import backends
from ..module import ADELLOLoss
from . import augment, checkpoint, config as config_mod, data as data_mod, metrics, report
from .models import build_model

KILL_ENV = "ADELLO_TRAIN_SIGKILL_AT_STEP"   # test hook: SIGKILL itself after this step
NO_DISTILL = 2 ** 62                          # distill_start that is never reached

LOG_KEYS = ("loss", "loss_sup", "loss_unsup", "loss_distill", "mask_ratio", "pl_correct_masked",
            "pl_known_masked", "pl_correct", "pl_known")


# ------------------------------------------------------------------------------------------
# Set-up helpers
# ------------------------------------------------------------------------------------------

class Dist:
    """The process group of a torchrun launch (world size 1 otherwise)."""

    def __init__(self, device_cfg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        want_cuda = device_cfg.startswith("cuda") or (device_cfg == "auto"
                                                      and torch.cuda.is_available())
        if want_cuda:
            if not torch.cuda.is_available():
                raise config_mod.ConfigError(f"device: {device_cfg!r} requested but CUDA is not "
                                             "available (use --device cpu)")
            if self.world > 1:
                self.device = torch.device("cuda", self.local_rank)
            else:
                dev = torch.device("cuda" if device_cfg == "auto" else device_cfg)
                self.device = torch.device("cuda", dev.index if dev.index is not None
                                           else torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.active = self.world > 1
        if self.active and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.active:
            dist.barrier()

    def close(self):
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def make_criterion(cfg: dict, prior_lb: torch.Tensor) -> ADELLOLoss | None:
    """ADELLOLoss configured for the ablation row `cfg['algorithm']` (None: supervised)."""
    algo = cfg["algorithm"]
    if algo == "supervised":
        return None
    distill = algo in ("adello", "ccr")
    return ADELLOLoss(
        prior_lb, cfg["steps"], alpha_min=cfg["alpha_min"], power=cfg["power"],
        threshold=cfg["threshold"], prior_momentum=cfg["prior_momentum"],
        distill_start=cfg["distill_start"] if distill else NO_DISTILL,
        temperature=cfg["temperature"], lambda_u=cfg["lambda_u"],
        lambda_d=cfg["lambda_d"] if distill else 0.0, flexda=algo in ("adello", "flexda"),
        sync_prior=True, backend=cfg["backend"], validate=False)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights with 2+ dims (conv / linear), none on biases and BN affine."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class EMA:
    """Exponential moving average of the parameters (foreach lerp); buffers (BatchNorm running
    statistics) are copied from the live model, as in the released code."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._src_p = list(model.parameters())
        self._dst_p = list(self.module.parameters())
        self._src_b = list(model.buffers())
        self._dst_b = list(self.module.buffers())

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._dst_p, self._src_p, 1.0 - self.decay)
        if self._dst_b:
            torch._foreach_copy_(self._dst_b, self._src_b)


def _jsonl_read(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _jsonl_truncate(path: str, step: int) -> list[dict]:
    """Keep the records up to `step` (a resumed run replays the ones after its checkpoint)."""
    kept = [r for r in _jsonl_read(path) if r["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)
    return kept


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


# ------------------------------------------------------------------------------------------
# The trainer
# ------------------------------------------------------------------------------------------

class Trainer:
    def __init__(self, cfg: dict, run_dir: str, resume: bool = False):
        self.cfg = cfg
        self.run_dir = run_dir
        self.dist = Dist(cfg["device"])
        self.device = self.dist.device
        if cfg["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        world = self.dist.world
        self.b_global, self.n_global = cfg["batch_size"], cfg["batch_size"] * cfg["mu"]
        if self.b_global % world or self.n_global % world:
            raise config_mod.ConfigError(f"batch_size {self.b_global} and batch_size*mu "
                                         f"{self.n_global} must divide by the world size {world}")
        self.b, self.n = self.b_global // world, self.n_global // world

        # Data: split on the host (seeded), images on the device.
        seed = cfg["seed"]
        self.split_seed = seed if cfg["split_seed"] is None else cfg["split_seed"]
        arrays = data_mod.read_dataset(cfg["dataset"], cfg["data_root"],
                                       image_size=cfg["image_size"], download=cfg["download"])
        self.num_classes = arrays.num_classes
        self.class_names = arrays.class_names
        self.split = data_mod.make_split(
            arrays.train_y, arrays.num_classes, mode=cfg["split"], seed=self.split_seed,
            n1=cfg["n1"], gamma_l=cfg["gamma_l"], m1=cfg["m1"], gamma_u=cfg["gamma_u"],
            lb_fraction=cfg["lb_fraction"])
        self.data = data_mod.DeviceData(arrays, self.split, self.device, cfg["dataset"])
        del arrays

        # Model, EMA, optimizer, criterion: identical on every rank (same seed).
        torch.manual_seed(seed)
        c_in = self.data.image_shape[0]
        self.model = build_model(cfg["model"], self.num_classes, c_in,
                                 bn_momentum=cfg["bn_momentum"], width=cfg["model_width"],
                                 sync_bn=cfg["sync_bn"]).to(self.device)
        self.ema = EMA(self.model, cfg["ema"])
        self.opt = torch.optim.SGD(param_groups(self.model, cfg["weight_decay"]), lr=cfg["lr"],
                                   momentum=cfg["momentum"], nesterov=cfg["nesterov"])
        prior_lb = torch.tensor(self.split.prior_lb, dtype=torch.float32, device=self.device)
        self.crit = make_criterion(cfg, prior_lb)
        if self.crit is not None:
            self.crit.to(self.device)
        self.backend = backends.resolve_backend(cfg["backend"], self.device) \
            if self.crit is not None else "n/a"
        self.gen_data = torch.Generator(self.device).manual_seed(seed + 1_000_003)
        self.gen_aug = torch.Generator(self.device).manual_seed(seed + 2_000_003)
        self.lb_sampler = data_mod.DeviceSampler(len(self.split.lb_idx), self.gen_data)
        self.ulb_sampler = data_mod.DeviceSampler(len(self.split.ulb_idx), self.gen_data)
        self.step = 0
        self.elapsed = 0.0
        self.config_digest = config_mod.digest(cfg)
        self.ckpt_path = os.path.join(run_dir, "checkpoints", checkpoint.LAST)
        if resume:
            self._restore()

        self.net = self.model
        if self.dist.active:
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg["compile"]:
            self.net = torch.compile(self.net)
        self.amp = cfg["amp"] == "bf16"
        self._log_acc = torch.zeros(len(LOG_KEYS), dtype=torch.float64, device=self.device)
        self._log_steps = 0

    # -- checkpoints ------------------------------------------------------------------------

    def _state(self) -> dict:
        rng = {"data": self.gen_data.get_state(), "augment": self.gen_aug.get_state(),
               "torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": checkpoint.FORMAT, "version": checkpoint.VERSION,
            "config_digest": self.config_digest, "split_digest": self.split.digest(),
            "split_seed": self.split_seed, "step": self.step, "elapsed": self.elapsed,
            "world_size": self.dist.world, "device_type": self.device.type,
            "model": self.model.state_dict(), "ema": self.ema.module.state_dict(),
            "optimizer": self.opt.state_dict(),
            "criterion": None if self.crit is None else self.crit.state_dict(),
            "samplers": {"lb": self.lb_sampler.state_dict(), "ulb": self.ulb_sampler.state_dict()},
            "rng": rng,
        }

    def save(self) -> None:
        if self.dist.main:
            checkpoint.save_atomic(self._state(), self.ckpt_path)
        self.dist.barrier()

    def _restore(self) -> None:
        path = self.ckpt_path
        st = checkpoint.load(path, config_digest=self.config_digest,
                             split_digest=self.split.digest())
        if st["device_type"] != self.device.type:
            raise checkpoint.CheckpointError(
                f"{path} was written on {st['device_type']}, this run is on {self.device.type}; "
                "its random generator states cannot continue on another device type")
        checkpoint.restore_module(self.model, st["model"], "model", path)
        checkpoint.restore_module(self.ema.module, st["ema"], "EMA model", path)
        if (st["criterion"] is None) != (self.crit is None):
            raise checkpoint.CheckpointError(f"{path}: criterion state does not match the "
                                             "algorithm")
        if self.crit is not None:
            checkpoint.restore_module(self.crit, st["criterion"], "ADELLOLoss", path)
        try:
            self.opt.load_state_dict(st["optimizer"])
            self.lb_sampler.load_state_dict(st["samplers"]["lb"])
            self.ulb_sampler.load_state_dict(st["samplers"]["ulb"])
            self.gen_data.set_state(st["rng"]["data"])
            self.gen_aug.set_state(st["rng"]["augment"])
            torch.set_rng_state(st["rng"]["torch_cpu"])
            if "torch_cuda" in st["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(st["rng"]["torch_cuda"], self.device)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise checkpoint.CheckpointError(f"{path}: cannot restore the optimizer, samplers "
                                             f"or generators: {exc}") from None
        self.step = int(st["step"])
        self.elapsed = float(st["elapsed"])

    # -- one step ---------------------------------------------------------------------------

    def train_step(self) -> None:
        d, h, w = self.data, *self.data.image_shape[1:]
        # Global batch indices and augmentation parameters (identical on every rank) ...
        lb_sel = self.lb_sampler.next(self.b_global)
        p_l = augment.sample_weak(self.b_global, h, w, self.gen_aug)
        supervised = self.crit is None
        if not supervised:
            ulb_sel = self.ulb_sampler.next(self.n_global)
            p_w = augment.sample_weak(self.n_global, h, w, self.gen_aug)
            p_s = augment.sample_strong(self.n_global, h, w, self.gen_aug)
        # ... of which this rank takes its slice.
        r0b, r0n = self.dist.rank * self.b, self.dist.rank * self.n
        lb_sel = lb_sel[r0b:r0b + self.b]
        x_lb = augment.apply_weak(d.images[d.lb_pos[lb_sel]],
                                  augment.slice_params(p_l, r0b, r0b + self.b))
        y_lb = d.lb_labels[lb_sel]
        parts = [x_lb.float()]
        if not supervised:
            ulb_sel = ulb_sel[r0n:r0n + self.n]
            raw = d.images[d.ulb_pos[ulb_sel]]
            parts.append(augment.apply_weak(raw, augment.slice_params(p_w, r0n, r0n + self.n))
                         .float())
            parts.append(augment.apply_strong(raw, augment.slice_params(p_s, r0n, r0n + self.n)))
        x = d.normalize(torch.cat(parts))

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.net(x)
        if supervised:
            loss = F.cross_entropy(logits.float(), y_lb)
            stats = [loss.detach()] + [torch.zeros((), device=self.device)] * 3 + \
                [torch.zeros((), device=self.device)] * 5
        else:
            z_l, z_w, z_s = logits.split([self.b, self.n, self.n])
            out = self.crit(z_l, y_lb, z_w.detach(), z_s)
            loss = out.loss
            y_true = d.ulb_labels[ulb_sel]
            known = (y_true >= 0).to(out.mask.dtype)
            hit = (out.pseudo_labels == y_true).to(out.mask.dtype)
            stats = [loss.detach(), out.loss_sup, out.loss_unsup, out.loss_distill,
                     out.mask.mean(), (hit * out.mask).sum(), (known * out.mask).sum(),
                     hit.sum(), known.sum()]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update()
        # Logged values stay on the device; read every log_every steps (no per-step sync).
        self._log_acc += torch.stack([s.to(torch.float64) for s in stats])
        self._log_steps += 1
        self.step += 1

    def flush_log(self) -> dict:
        """Means of the logged values since the last flush (all ranks; one host sync)."""
        acc = self._log_acc.clone()
        if self.dist.active:
            dist.all_reduce(acc)
            acc /= self.dist.world
        vals = dict(zip(LOG_KEYS, acc.tolist()))
        k = max(1, self._log_steps)
        rec = {"step": self.step}
        for key in ("loss", "loss_sup", "loss_unsup", "loss_distill", "mask_ratio"):
            rec[key] = vals[key] / k
        if self.crit is None:
            for key in ("loss_sup", "loss_unsup", "loss_distill", "mask_ratio"):
                rec[key] = None
            rec["pl_acc_masked"] = rec["pl_acc"] = None
            rec["prior_ulb"] = rec["alpha"] = None
        else:
            rec["pl_acc_masked"] = (vals["pl_correct_masked"] / vals["pl_known_masked"]
                                    if vals["pl_known_masked"] > 0 else None)
            rec["pl_acc"] = vals["pl_correct"] / vals["pl_known"] if vals["pl_known"] else None
            rec["prior_ulb"] = self.crit.prior_ulb.tolist()
            rec["alpha"] = float(self.crit.alpha()) if self.crit.flexda else 1.0
            rec["temperature"] = float(self.crit.temperature)
        self._log_acc.zero_()
        self._log_steps = 0
        return rec

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Metrics of the EMA model's raw logits on the test set (call on rank 0)."""
        d = self.data
        chunks = []
        bs = self.cfg["eval_batch_size"]
        for i in range(0, d.test_x.shape[0], bs):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                chunks.append(self.ema.module(d.normalize(d.test_x[i:i + bs])).float())
        # Metrics on the host: small, and free of device-specific (non)determinism.
        m = metrics.classification_metrics(torch.cat(chunks).cpu(), d.test_y.cpu(),
                                           self.num_classes)
        prior = None if self.crit is None else self.crit.prior_ulb.tolist()
        m["prior_ulb"] = prior
        m["prior_kl"] = metrics.prior_kl(self.split.prior_ulb_true, prior)
        return m

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict | None:
        cfg, main = self.cfg, self.dist.main
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        log_path = os.path.join(self.run_dir, "train_log.jsonl")
        if main:
            evals = _jsonl_truncate(metrics_path, self.step)
            log = _jsonl_truncate(log_path, self.step)
        kill_at = int(os.environ.get(KILL_ENV, "0") or 0)
        steps = cfg["steps"]
        bar = None
        if main and cfg["progress"]:
            from tqdm import tqdm
            bar = tqdm(total=steps, initial=self.step, desc=f"{cfg['algorithm']} {cfg['preset']}",
                       unit="step", dynamic_ncols=True, leave=True)
        t_start = time.time() - self.elapsed
        stopped_early = False
        last_eval = evals[-1] if main and evals and evals[-1]["step"] == self.step else None
        self.model.train()
        while self.step < steps:
            self.train_step()
            if bar is not None:
                bar.update(1)
            at_log = self.step % cfg["log_every"] == 0 or self.step == steps
            at_eval = self.step % cfg["eval_every"] == 0 or self.step == steps
            # The time limit: checked every step in one process (a host clock read, no sync);
            # under DDP at log steps, where rank 0's clock decides for everyone.
            if (at_log or not self.dist.active) and self._time_up(t_start) \
                    and self.step < steps:
                at_log = at_eval = stopped_early = True
            if at_log:
                rec = self.flush_log()
                self.elapsed = time.time() - t_start
                rec["seconds"] = self.elapsed
                if main:
                    _append(log_path, rec)
                    log.append(rec)
                    if bar is not None:
                        post = {"loss": f"{rec['loss']:.3f}"}
                        if rec.get("mask_ratio") is not None:
                            post["mask"] = f"{rec['mask_ratio']:.2f}"
                        if last_eval is not None:
                            post["bal_acc"] = f"{100 * last_eval['balanced_acc']:.1f}"
                        bar.set_postfix(post)
            if at_eval:
                self.elapsed = time.time() - t_start
                if main:
                    m = self.evaluate()
                    self._last_metrics = (self.step, m)
                    last_eval = {"step": self.step, "seconds": self.elapsed,
                                 **{k: m[k] for k in ("top1", "balanced_acc", "ece", "mce",
                                                      "prior_kl", "per_class_acc",
                                                      "prior_ulb")}}
                    _append(metrics_path, last_eval)
                    evals.append(last_eval)
                self.save()
                self.model.train()
            if kill_at and self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopped_early:
                break
        if bar is not None:
            bar.close()
        if not main:
            return None
        cached = getattr(self, "_last_metrics", None)
        final = cached[1] if cached and cached[0] == self.step else self.evaluate()
        self.elapsed = time.time() - t_start
        summary = self._summary(final, stopped_early)
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        pngs = report.write_report(self.run_dir, summary, evals, log, cfg)
        summary["plots"] = pngs
        return summary

    def _time_up(self, t_start: float) -> bool:
        """Past the time limit? Under DDP rank 0's clock decides, so all ranks stop together."""
        limit = self.cfg["time_limit"]
        if limit <= 0:
            return False
        up = time.time() - t_start > limit
        if self.dist.active:
            flag = torch.tensor([1.0 if up else 0.0], device=self.device)
            dist.broadcast(flag, 0)
            up = bool(flag.item())
        return up

    def _summary(self, m: dict, stopped_early: bool) -> dict:
        s = self.split
        return {
            "algorithm": self.cfg["algorithm"], "preset": self.cfg["preset"],
            "dataset": self.cfg["dataset"], "seed": self.cfg["seed"],
            "split_seed": self.split_seed,
            "top1": m["top1"], "balanced_acc": m["balanced_acc"], "ece": m["ece"],
            "mce": m["mce"], "per_class_acc": m["per_class_acc"], "prior_kl": m["prior_kl"],
            "steps": self.step, "seconds": self.elapsed, "stopped_early": stopped_early,
            "prior_ulb": m["prior_ulb"],
            "prior_ulb_true": None if s.prior_ulb_true is None else s.prior_ulb_true.tolist(),
            "lb_counts": s.lb_counts.tolist(),
            "ulb_counts": None if s.ulb_counts is None else s.ulb_counts.tolist(),
            "ulb_pool_size": int(len(s.ulb_idx)), "class_names": self.class_names,
            "reliability": m["reliability"], "device": str(self.device),
            "world_size": self.dist.world, "backend": self.backend,
            "torch": torch.__version__, "config_digest": self.config_digest,
            "split_digest": s.digest(),
        }


def _fmt(v, pct=True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:6.2f} %" if pct else f"{v:.4f}"


def final_table(summary: dict, run_dir: str) -> str:
    names = summary["class_names"]
    lines = [
        f"{summary['algorithm']} on {summary['preset']}: {summary['steps']} steps in "
        f"{summary['seconds']:.0f} s" + (" (stopped by the time limit)"
                                        if summary["stopped_early"] else ""),
        f"  {'top-1 accuracy':<22}{_fmt(summary['top1'])}",
        f"  {'balanced accuracy':<22}{_fmt(summary['balanced_acc'])}",
        f"  {'ECE (15 bins)':<22}{_fmt(summary['ece'])}",
        f"  {'MCE (15 bins)':<22}{_fmt(summary['mce'])}",
        f"  {'prior KL(true||Q)':<22}{_fmt(summary['prior_kl'], pct=False)}",
    ]
    if len(names) <= 20:
        lines.append(f"  {'class':<14}{'labeled':>8}{'test acc':>10}")
        for c, name in enumerate(names):
            lines.append(f"  {str(name)[:13]:<14}{int(summary['lb_counts'][c]):>8}"
                         f"{_fmt(summary['per_class_acc'][c]):>10}")
    lines.append(f"run directory: {run_dir}")
    return "\n".join(lines)
