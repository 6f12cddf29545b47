"""The training loop: data on the device, one forward of cat(labeled, weak, strong), the
ADELLOLoss step, SGD, EMA, periodic evaluation and checkpoints, DDP.

Everything that decides the numbers (model init, split, sampling, augmentation) is drawn from
seeded generators whose states go into every checkpoint, so `--resume` continues bit for bit
(in --deterministic mode), and K DDP ranks reproduce one process with the same global batch:
every rank draws the global batch's indices and augmentation parameters and keeps its slice.

Divergence is watched without a per-step host sync: each step adds its loss's finiteness to
the on-device log accumulator, and at every log / evaluation step (where the log is read
anyway) one read also tells whether any parameter, buffer, optimizer or criterion tensor is
non-finite. `on_nonfinite = "stop"` ends the run there (exit 3) before anything is saved;
`"skip"` leaves out, on the device, every optimizer update whose gradient is not finite (and
the BatchNorm statistics of that step), and still stops if the state itself goes non-finite
or every step of an evaluation interval was skipped. No checkpoint is ever written from a
non-finite state.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import signal
import statistics
import time

import torch
import torch.distributed as dist

from .. import backends
from ..module import ADELLOLoss
from . import checkpoint, fast_step, metrics, report, scaling, synthetic
from . import config as config_mod
from . import data as data_mod
from .models import build_model

KILL_ENV = "ADELLO_TRAIN_SIGKILL_AT_STEP"   # test hook: SIGKILL itself after this step
NAN_ENV = "ADELLO_TRAIN_NAN_AT_STEP"         # test hook: NaN input images at this step (1-based)
STALL_ENV = "ADELLO_TRAIN_STALL"             # test hook "RANK:STEP:SECONDS": that rank sleeps
NO_DISTILL = 2 ** 62                          # distill_start that is never reached

LOG_KEYS = ("loss", "loss_sup", "loss_unsup", "loss_distill", "mask_ratio", "pl_correct_masked",
            "pl_known_masked", "pl_correct", "pl_known")
# After the LOG_KEYS sums (of steps with a finite loss only): steps with a finite loss, steps
# with a non-finite loss, optimizer updates skipped (on_nonfinite = skip).
N_LOG = len(LOG_KEYS)
# Wall-clock fields of the log records (the only ones a resumed run does not reproduce).
TIMING_KEYS = ("images_per_s", "step_time_median", "phases")
ACC_LEN = N_LOG + 3


class Diverged(RuntimeError):
    """The loss or the state went non-finite (exit status 3)."""


class DistFailure(RuntimeError):
    """A DDP collective failed or timed out (the message names the ranks that stalled)."""


def _finite_or_none(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


# ------------------------------------------------------------------------------------------
# Set-up helpers
# ------------------------------------------------------------------------------------------

class Dist:
    """The process group of a torchrun launch (world size 1 otherwise)."""

    def __init__(self, device_cfg: str, timeout: float = 600.0):
        self.timeout = timeout
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
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=timeout))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.active:
            dist.barrier()

    def close(self):
        if self.active and dist.is_initialized():
            # Gloo's worker threads release the tensors of finished collectives, which takes
            # the GIL; a process group destroyed (with the GIL held) before they have done so
            # deadlocks at exit. A short sleep lets them finish.
            time.sleep(0.2)
            try:
                dist.destroy_process_group()
            except Exception:   # after a failed collective the group may be unusable
                pass

    def _store(self):
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:
            return None

    def heartbeat(self, step: int) -> None:
        """Record this rank's last logged step in the rendezvous store (host side, at log
        steps only), for the message of a later stall."""
        store = self._store() if self.active else None
        if store is not None:
            try:
                store.set(f"adello/step/{self.rank}", str(step))
            except Exception:
                pass

    def describe_failure(self, exc: Exception, step: int) -> str:
        """Which ranks stalled: every rank whose collective failed says so in the store; the
        ones that did not after a short wait never reached the collective."""
        head = (f"rank {self.rank}: a collective at step {step} failed or did not complete "
                f"within --dist-timeout {self.timeout:g} s ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})")
        store = self._store()
        if store is None:
            return head
        try:
            store.set(f"adello/failed/{self.rank}", str(step))
            time.sleep(min(3.0, self.timeout))
            failed = [r for r in range(self.world) if store.check([f"adello/failed/{r}"])]
            stalled = [r for r in range(self.world) if r not in failed]
            last = {}
            for r in stalled:
                if store.check([f"adello/step/{r}"]):
                    last[r] = store.get(f"adello/step/{r}").decode()
        except Exception:
            return head
        if not stalled:
            return head + "; every rank saw the failure (a lost connection or a crashed peer)"
        where = ", ".join(f"rank {r} (last logged step {last.get(r, 'none')})" for r in stalled)
        return head + f"; stalled: {where}, which never reached the collective"


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
        prior_estimator=cfg["prior_estimator"], sync_prior=True, backend=cfg["backend"],
        validate=False)


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
        self.ckpt_path = os.path.join(run_dir, "checkpoints", checkpoint.LAST)
        self.best_path = os.path.join(run_dir, "checkpoints", checkpoint.BEST)
        for path in (self.ckpt_path, self.best_path):
            if os.path.isdir(path):   # before any work: a save or a resume would fail later
                raise checkpoint.CheckpointError(f"{path} is a directory, not a checkpoint "
                                                 "file; remove or rename it")
        self.dist = Dist(cfg["device"], cfg["dist_timeout"])
        self.device = self.dist.device
        if cfg["deterministic"]:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif cfg["cudnn_benchmark"] and self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # static shapes: autotune each conv once
        world = self.dist.world
        self.b_global, self.n_global = cfg["batch_size"], cfg["batch_size"] * cfg["mu"]
        if self.b_global % world or self.n_global % world:
            raise config_mod.ConfigError(f"batch_size {self.b_global} and batch_size*mu "
                                         f"{self.n_global} must divide by the world size {world}")
        self.b, self.n = self.b_global // world, self.n_global // world

        # Data: split on the host (seeded), images on the device.
        seed = cfg["seed"]
        self.split_seed = seed if cfg["split_seed"] is None else cfg["split_seed"]
        if cfg["synthetic"]:
            arrays = synthetic.synthetic_arrays(cfg["dataset"], cfg["image_size"], seed=seed)
        else:
            arrays = data_mod.read_dataset(cfg["dataset"], cfg["data_root"],
                                           image_size=cfg["image_size"],
                                           download=cfg["download"])
        self.num_classes = arrays.num_classes
        self.class_names = arrays.class_names
        self.split = data_mod.make_split(
            arrays.train_y, arrays.num_classes, mode=cfg["split"], seed=self.split_seed,
            n1=cfg["n1"], gamma_l=cfg["gamma_l"], m1=cfg["m1"], gamma_u=cfg["gamma_u"],
            lb_fraction=cfg["lb_fraction"])
        self.data = data_mod.DeviceData(arrays, self.split, self.device, cfg["dataset"])
        del arrays
        # The per-step values at this batch (scaling.py): from here on self.cfg holds them;
        # the configuration as given (B0 values) is what the checkpoint digest is taken of.
        self.user_cfg = cfg
        self.schedule = scaling.resolve(cfg, world, pool_size=len(self.split.ulb_idx))
        cfg = self.cfg = scaling.apply(cfg, self.schedule)
        self.fingerprint_path = os.path.join(run_dir, data_mod.FINGERPRINT)
        if resume and self.dist.main and os.path.isfile(self.fingerprint_path):
            with open(self.fingerprint_path) as f:
                try:
                    saved = json.load(f)
                except ValueError:
                    raise data_mod.DataError(f"{self.fingerprint_path} is not valid JSON; "
                                             "restore it or start a new run") from None
            data_mod.check_fingerprint(self.fingerprint_path, saved, self.data.fingerprint)
        elif self.dist.main:
            tmp = self.fingerprint_path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data.fingerprint, f, indent=1)
            os.replace(tmp, self.fingerprint_path)

        # Model, EMA, optimizer, criterion: identical on every rank (same seed).
        torch.manual_seed(seed)
        c_in = self.data.image_shape[0]
        self.model = build_model(cfg["model"], self.num_classes, c_in,
                                 bn_momentum=cfg["bn_momentum"], width=cfg["model_width"],
                                 sync_bn=cfg["sync_bn"]).to(self.device)
        self.ema = EMA(self.model, cfg["ema"])
        self.skip_nonfinite = cfg["on_nonfinite"] == "skip"
        # skip: the fused SGD kernel takes a device flag (found_inf) and leaves parameters and
        # momentum untouched when it is set -- the update is skipped without a host sync.
        # Fused SGD also on CUDA for the compiled / captured step (one kernel, device lr).
        fused = self.skip_nonfinite or (self.device.type == "cuda" and
                                        (cfg["compile"] == "step" or cfg["cuda_graph"]))
        self.opt = torch.optim.SGD(param_groups(self.model, cfg["weight_decay"]), lr=cfg["lr"],
                                   momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                                   **({"fused": True} if fused else {}))
        if fused and cfg["momentum"] > 0:
            # The fused kernel's first step fills uninitialised momentum buffers; zeros make a
            # skipped first step harmless and a taken one identical (0 * m + g = g).
            for p in self.model.parameters():
                self.opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        prior_lb = torch.tensor(self.split.prior_lb, dtype=torch.float32, device=self.device)
        self.crit = make_criterion(cfg, prior_lb)
        # With prior_estimator "em", the released (raw) estimator is tracked beside Q for the
        # report: the same EMA of this rank's raw weak-view softmax, from each optimizer step's
        # last micro-batch. A diagnostic only: not checkpointed (a resumed run restarts it at Q).
        self.prior_raw = None
        if self.crit is not None and self.crit.prior_estimator == "em":
            self.prior_raw = self.crit.prior_ulb.detach().clone()
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
        self.config_digest = config_mod.digest(self.user_cfg)
        # Health counters over the whole run (host ints, updated at log steps).
        self.nonfinite_steps = 0      # steps whose loss was not finite
        self.skipped_steps = 0        # optimizer updates left out (on_nonfinite = skip)
        self.best = None              # {"step", "balanced_acc"} of best.pt
        self.saved_step = None        # step of the last checkpoint this run wrote or read
        self.resumed_from = None
        if resume and os.path.exists(self.ckpt_path):
            self._restore()
            self.resumed_from = self.saved_step = self.step

        self.net = self.model
        self._ddp = None
        if self.dist.active:
            self.net = self._ddp = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg["compile"] == "model":
            self.net = torch.compile(self.net)
        self.amp = cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and self.device.type == "cuda")
        self._log_acc = torch.zeros(ACC_LEN, dtype=torch.float64, device=self.device)
        self._log_steps = 0
        self._steps_since_eval = 0
        self._skipped_since_eval = 0
        self._bn_buffers = [b for b in self.model.buffers()]
        self._bn_saved = [b.clone() for b in self._bn_buffers] if self.skip_nonfinite else []
        self._nan_at = int(os.environ.get(NAN_ENV, "0") or 0)
        stall = os.environ.get(STALL_ENV, "")
        self._stall = tuple(float(x) for x in stall.split(":")) if stall else None
        self.runner = fast_step.StepRunner(self, nan_at=self._nan_at, stall=self._stall)
        # Throughput (host clocks only): images per step, per-step times, the current log
        # window, and training seconds/steps of this process (evaluation excluded).
        self.images_per_step = self.b_global + (2 * self.n_global if self.crit is not None
                                                else 0)
        self._step_times = []
        self._win_times = []
        self._win_t0 = time.perf_counter()
        self._train_s = 0.0
        self._train_steps = 0
        self._phase_mark = [0.0, 0.0, 0.0]

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
            "rng": rng, "data_fingerprint": self.data.fingerprint,
            "health": {"nonfinite_steps": self.nonfinite_steps,
                       "skipped_steps": self.skipped_steps},
            "best": self.best,
        }

    def kept_text(self) -> str:
        """What a failed run leaves to resume from."""
        if self.saved_step is None:
            return "no checkpoint had been written yet"
        text = f"kept {self.ckpt_path} from step {self.saved_step}, intact"
        if self.best is not None:
            text += (f", and {self.best_path} from step {self.best['step']} (balanced accuracy "
                     f"{100 * self.best['balanced_acc']:.2f} %)")
        return text

    def save(self, balanced_acc: float | None = None) -> None:
        """last.pt (and best.pt when `balanced_acc` is the best so far). Only called with a
        finite state. A failed write (full disk, read-only directory) keeps the old files and
        raises CheckpointError saying what was kept; every rank raises."""
        err = None
        if self.dist.main:
            best = balanced_acc is not None and math.isfinite(balanced_acc) and \
                (self.best is None or balanced_acc > self.best["balanced_acc"])
            old_best = self.best
            if best:
                self.best = {"step": self.step, "balanced_acc": float(balanced_acc)}
            try:
                checkpoint.save_atomic(checkpoint.with_checksum(self._state()), self.ckpt_path)
                self.saved_step = self.step
                if best:
                    checkpoint.link_or_copy(self.ckpt_path, self.best_path)
            except (OSError, checkpoint.CheckpointError) as exc:
                if self.saved_step != self.step:
                    self.best = old_best
                what = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                err = checkpoint.CheckpointError(
                    f"could not write the checkpoint of step {self.step} under "
                    f"{os.path.dirname(self.ckpt_path)}: {what}; {self.kept_text()}")
        if err is not None:
            # Under DDP the other ranks wait in the barrier below until the launcher, seeing
            # this rank fail, ends them (torchrun does at once).
            raise err
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
            if self.prior_raw is not None:
                self.prior_raw.copy_(self.crit.prior_ulb)
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
        fp = st.get("data_fingerprint")
        if self.dist.main and fp is not None:
            data_mod.check_fingerprint(f"{path} (its data_fingerprint)", fp,
                                       self.data.fingerprint)
        health = st.get("health") or {}
        self.nonfinite_steps = int(health.get("nonfinite_steps", 0))
        self.skipped_steps = int(health.get("skipped_steps", 0))
        self.best = st.get("best")

    # -- one step ---------------------------------------------------------------------------

    def train_step(self) -> None:
        """One optimizer step (fast_step.py: eager, --compile step or --cuda-graph; with
        --grad-accum K, K micro-batches)."""
        t = time.perf_counter()
        self.runner.step()
        self._win_times.append(time.perf_counter() - t)

    def _throughput(self) -> dict:
        """The log window's throughput (call right after the flush's sync), then a new window."""
        now = time.perf_counter()
        steps = len(self._win_times)
        secs = now - self._win_t0
        self._train_s += secs
        self._train_steps += steps
        self._step_times += self._win_times
        rec = {"images_per_s": steps * self.images_per_step / secs if steps and secs > 0
               else None,
               "step_time_median": statistics.median(self._win_times) if steps else None,
               "lr": self.schedule.lr_at(max(self.step - 1, 0)),
               "samples": self.step * self.b_global,
               "unlabeled_epochs": self.step * self.n_global / len(self.split.ulb_idx),
               "peak_memory_bytes": (torch.cuda.max_memory_allocated(self.device)
                                     if self.device.type == "cuda" else None)}
        if self.runner.phase_timing:
            ph = self.runner.phase_s
            rec["phases"] = {k: (ph[i] - self._phase_mark[i]) / max(steps, 1)
                             for i, k in enumerate(fast_step.PHASES)}
            self._phase_mark = list(ph)
        self._win_times = []
        self._win_t0 = time.perf_counter()
        return rec

    def _state_tensors(self) -> list[torch.Tensor]:
        ts = [t for t in self.model.parameters()] + \
            [t for t in self.model.buffers() if t.is_floating_point()] + \
            [t for t in self.ema.module.parameters()] + \
            [t for t in self.ema.module.buffers() if t.is_floating_point()]
        for st in self.opt.state.values():
            ts += [t for t in st.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if self.crit is not None:
            ts += [t for t in self.crit.buffers() if t.is_floating_point()]
        return [t.detach() for t in ts if t.numel()]

    def flush_log(self) -> dict:
        """Means of the logged values since the last flush and the health of the state (all
        ranks; one host sync)."""
        # max |x| is NaN or inf exactly when x holds a non-finite value (a 2-norm could
        # overflow on large finite weights).
        peaks = torch.stack(torch._foreach_norm(self._state_tensors(), math.inf))
        state_bad = (~torch.isfinite(peaks)).any().to(torch.float64).reshape(1)
        acc = torch.cat([self._log_acc, state_bad])
        if self.dist.active:
            dist.all_reduce(acc)
        extra = []
        if self.crit is not None:
            extra = [self.crit.prior_ulb.to(torch.float64),
                     (self.crit.alpha() if self.crit.flexda else torch.ones((), device=self.device))
                     .to(torch.float64).reshape(1),
                     self.crit.temperature.to(torch.float64).reshape(1),
                     self.crit.skipped_updates.to(torch.float64).reshape(1)]
            if self.prior_raw is not None:
                extra.append(self.prior_raw.to(torch.float64))
        allv = torch.cat([acc] + extra).tolist()
        vals = dict(zip(LOG_KEYS, allv[:N_LOG]))
        ok_steps, bad_steps, skipped, state_bad = allv[N_LOG:N_LOG + 4]
        w = self.dist.world
        rec = {"step": self.step}
        for key in ("loss", "loss_sup", "loss_unsup", "loss_distill", "mask_ratio"):
            rec[key] = _finite_or_none(vals[key] / ok_steps) if ok_steps else None
        if self.crit is None:
            for key in ("loss_sup", "loss_unsup", "loss_distill", "mask_ratio"):
                rec[key] = None
            rec["pl_acc_masked"] = rec["pl_acc"] = None
            rec["prior_ulb"] = rec["alpha"] = None
        else:
            rec["pl_acc_masked"] = (vals["pl_correct_masked"] / vals["pl_known_masked"]
                                    if vals["pl_known_masked"] > 0 else None)
            rec["pl_acc"] = vals["pl_correct"] / vals["pl_known"] if vals["pl_known"] else None
            c = self.num_classes
            rest = allv[ACC_LEN + 1:]
            rec["prior_ulb"] = [_finite_or_none(v) for v in rest[:c]]
            rec["alpha"] = _finite_or_none(rest[c])
            rec["temperature"] = _finite_or_none(rest[c + 1])
            rec["skipped_updates"] = int(rest[c + 2])
            if self.prior_raw is not None:
                rec["prior_ulb_raw"] = [_finite_or_none(v) for v in rest[c + 3:2 * c + 3]]
        # Under DDP a step counts as non-finite on any rank; skipped updates are the same on
        # every rank (the gradients are all-reduced).
        window_bad = int(round(bad_steps)) if w == 1 else min(self._log_steps,
                                                             int(round(bad_steps)))
        window_skipped = int(round(skipped / w))
        rec["nonfinite_steps"] = window_bad
        rec["skipped_steps"] = window_skipped
        self.nonfinite_steps += window_bad
        self.skipped_steps += window_skipped
        self._skipped_since_eval += window_skipped
        self._steps_since_eval += self._log_steps
        health = {"window": self._log_steps, "nonfinite": window_bad,
                  "skipped": window_skipped, "state_bad": state_bad > 0}
        self._log_acc.zero_()
        self._log_steps = 0
        return rec, health

    def _diverged(self, health: dict, at_eval: bool) -> str | None:
        """Why the run must stop now, or None."""
        start = self.step - health["window"]
        if health["state_bad"]:
            return (f"the model / optimizer state holds non-finite values at step {self.step} "
                    f"(steps {start + 1}..{self.step}: {health['nonfinite']} non-finite losses, "
                    f"{health['skipped']} updates skipped)")
        if health["nonfinite"] and not self.skip_nonfinite:
            return (f"{health['nonfinite']} of the steps {start + 1}..{self.step} had a "
                    "non-finite loss")
        if self.skip_nonfinite and at_eval and self._steps_since_eval and \
                self._skipped_since_eval == self._steps_since_eval:
            return (f"every update of the {self._steps_since_eval} steps up to step "
                    f"{self.step} had a non-finite gradient and was skipped (the run is stuck)")
        return None

    def _stop_diverged(self, reason: str) -> None:
        msg = (f"training diverged: {reason}. No checkpoint was written from this state; "
               f"{self.kept_text()}. Lower --lr (now {self.cfg['lr']:g})"
               + ("" if self.skip_nonfinite else ", or rerun with --on-nonfinite skip to "
                  "leave out updates with a non-finite gradient") + ".")
        if self.dist.main:
            summary = {
                "status": "diverged", "error": msg, "algorithm": self.cfg["algorithm"],
                "preset": self.cfg["preset"], "steps": self.step, "seconds": self.elapsed,
                "nonfinite_steps": self.nonfinite_steps, "skipped_steps": self.skipped_steps,
                "skipped_updates": self._criterion_skipped(),
                "last_checkpoint_step": self.saved_step, "best": self.best,
                "on_nonfinite": self.cfg["on_nonfinite"], "config_digest": self.config_digest,
            }
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        raise Diverged(msg)

    def _criterion_skipped(self) -> int | None:
        return None if self.crit is None else int(self.crit.skipped_updates)

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
        if self.prior_raw is not None:
            raw = self.prior_raw.tolist()
            m["prior_ulb_raw"] = raw
            m["prior_kl_raw"] = metrics.prior_kl(self.split.prior_ulb_true, raw)
        return m

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict | None:
        cfg, main = self.cfg, self.dist.main
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        log_path = os.path.join(self.run_dir, "train_log.jsonl")
        evals, log = [], []
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
        self._win_t0 = time.perf_counter()
        last_eval = evals[-1] if main and evals and evals[-1]["step"] == self.step else None
        self.model.train()
        try:
            self._loop(steps, bar, t_start, log_path, metrics_path, evals, log, kill_at,
                       last_eval)
        except (RuntimeError, ValueError) as exc:
            if not self.dist.active or isinstance(exc, (Diverged, checkpoint.CheckpointError,
                                                        DistFailure)):
                raise
            raise DistFailure(self.dist.describe_failure(exc, self.step)) from None
        finally:
            if bar is not None:
                bar.close()
        stopped_early = self._stopped_early
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

    def _loop(self, steps, bar, t_start, log_path, metrics_path, evals, log, kill_at,
              last_eval) -> None:
        cfg, main = self.cfg, self.dist.main
        self._stopped_early = stopped_early = False
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
                self._stopped_early = True
            # Every evaluation is also a log step: its checkpoint needs the health check.
            at_log = at_log or at_eval
            if at_log:
                rec, health = self.flush_log()
                self.dist.heartbeat(self.step)
                self.elapsed = time.time() - t_start
                rec["seconds"] = self.elapsed
                rec.update(self._throughput())
                if main:
                    _append(log_path, rec)
                    log.append(rec)
                    if bar is not None:
                        post = {"loss": "n/a" if rec["loss"] is None else f"{rec['loss']:.3f}"}
                        if rec.get("mask_ratio") is not None:
                            post["mask"] = f"{rec['mask_ratio']:.2f}"
                        if last_eval is not None:
                            post["bal_acc"] = f"{100 * last_eval['balanced_acc']:.1f}"
                        bar.set_postfix(post)
                reason = self._diverged(health, at_eval)
                if reason is not None:
                    self._stop_diverged(reason)
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
                self.save(last_eval["balanced_acc"] if main else None)
                self._steps_since_eval = self._skipped_since_eval = 0
                self.model.train()
                self._win_t0 = time.perf_counter()     # evaluation is not training time
            if kill_at and self.step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if stopped_early:
                break

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
            "prior_ulb": m["prior_ulb"], "prior_estimator": self.cfg["prior_estimator"],
            "prior_ulb_raw": m.get("prior_ulb_raw"), "prior_kl_raw": m.get("prior_kl_raw"),
            "prior_ulb_true": None if s.prior_ulb_true is None else s.prior_ulb_true.tolist(),
            "lb_counts": s.lb_counts.tolist(),
            "ulb_counts": None if s.ulb_counts is None else s.ulb_counts.tolist(),
            "ulb_pool_size": int(len(s.ulb_idx)), "class_names": self.class_names,
            "reliability": m["reliability"], "device": str(self.device),
            "world_size": self.dist.world, "backend": self.backend,
            "torch": torch.__version__, "config_digest": self.config_digest,
            "split_digest": s.digest(), "status": "completed",
            "on_nonfinite": self.cfg["on_nonfinite"], "nonfinite_steps": self.nonfinite_steps,
            "skipped_steps": self.skipped_steps, "skipped_updates": self._criterion_skipped(),
            "best": self.best,
            # throughput of this process's training (evaluation and checkpoints excluded)
            "synthetic": self.cfg["synthetic"], "grad_accum": self.cfg["grad_accum"],
            "images_per_s": (self._train_steps * self.images_per_step / self._train_s
                             if self._train_s > 0 else None),
            "step_time_median": (statistics.median(self._step_times) if self._step_times
                                 else None),
            "samples": self.step * self.b_global,
            "unlabeled_samples": self.step * self.n_global,
            "unlabeled_epochs": self.step * self.n_global / len(s.ulb_idx),
            "peak_memory_bytes": (torch.cuda.max_memory_allocated(self.device)
                                  if self.device.type == "cuda" else None),
            "phases": ({k: v / max(self._train_steps, 1) for k, v in
                        zip(fast_step.PHASES, self.runner.phase_s)}
                       if self.runner.phase_timing else None),
            "schedule": self.schedule.as_dict(),
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
