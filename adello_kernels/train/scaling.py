"""The batch-size-invariant schedule: per-step values of a run at batch B from a recipe tuned at
batch B0 (docs/training.md, Large batches). Pure functions of the configuration; no torch.

A preset's time constants are per step at its base batch B0 (`base_batch_size`, 64 for the
released recipes). A run at another global batch B is the same run expressed in samples, with
kappa = B / B0:

    steps, distill_start     / kappa (rounded; steps at least 1), so that the alpha schedule
    eval_every, log_every    alpha_t = 1 - (1 - alpha_min) (t / T_max)^p and the start of the
                             distillation term are the same functions of the samples seen
    lr                       x kappa (linear scaling rule, Goyal et al. 2017, "Accurate, Large
                             Minibatch SGD"), or x sqrt(kappa) (`lr_scaling: sqrt`)
    warm-up                  Goyal et al.'s gradual warm-up: the lr rises linearly from the
                             base lr to the scaled one over `warmup` samples (or unlabeled
                             epochs), then stays there or follows a half cosine to 0 (`cosine`)
    EMA momenta rho          rho^kappa (Busbridge et al. 2023, "How to Scale Your EMA"): the
                             weight EMA (`ema`), the ADELLO prior momentum (`prior_momentum`),
                             both applied once per optimizer step
    BatchNorm momentum m     1 - (1 - m)^(kappa / K): torch's BatchNorm momentum is 1 - rho of
                             its running statistics, which are updated once per forward, and a
                             step of K accumulated micro-batches runs K forwards

so one optimizer step at B decays every average by exactly as much as kappa steps at B0.
Momentum (0.9) and weight decay are kept: with lr x kappa and steps / kappa, the lr-weighted
decay lr * wd * steps of the run is unchanged, as in Goyal et al.

`batch_size` is the global batch of one optimizer step: grad accumulation K and the DDP world
size W only decide how it is cut (K micro-batches, each split over the W ranks), so kappa does
not depend on either. With `scale_rules: false` every per-step value is kept as given (warm-up
and cosine still apply to the given lr). With kappa = 1, no warm-up and no cosine, every value
resolves to exactly the given one (the exponent-1 cases return the input, not a rounded
1 - (1 - m)).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .config import ConfigError

LR_SCALINGS = ("linear", "sqrt")
# Keys whose per-step value the rules derive (in the order of the printed table).
SCALED_KEYS = ("steps", "lr", "ema", "prior_momentum", "bn_momentum", "distill_start",
               "eval_every", "log_every")


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even: 2.5 -> 2)."""
    return int(math.floor(x + 0.5))


def _cadence(n: int, kappa: float) -> int:
    return max(1, _round(n / kappa))


def ema_momentum(rho: float, e: float) -> float:
    """rho^e: the per-step momentum of an average that keeps its time constant in samples when
    a step holds e times as many samples. e = 1 returns rho itself."""
    return rho if e == 1 else rho ** e


def bn_momentum(m: float, e: float) -> float:
    """torch BatchNorm momentum m (= 1 - rho) scaled by ema_momentum: 1 - (1 - m)^e."""
    return m if e == 1 else 1.0 - (1.0 - m) ** e


def parse_warmup(value) -> tuple[float, str]:
    """(amount, unit) of a warm-up: an integer number of labeled samples ('samples'), or a
    string 'Xep' of unlabeled epochs ('epochs'). 0 is none."""
    if isinstance(value, bool):
        raise ConfigError(f"--warmup: expected samples (an integer) or epochs ('2ep'), got "
                          f"{value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        for suffix in ("epochs", "epoch", "ep"):
            if text.endswith(suffix):
                try:
                    amount = float(text[:-len(suffix)])
                except ValueError:
                    break
                if not math.isfinite(amount) or amount < 0:
                    break
                return amount, "epochs"
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"--warmup: expected samples (an integer) or epochs ('2ep'), got "
                              f"{value!r}") from None
    try:
        amount = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--warmup: expected samples (an integer) or epochs ('2ep'), got "
                          f"{value!r}") from None
    if not math.isfinite(amount) or amount < 0 or amount != int(amount):
        raise ConfigError(f"--warmup: a number of samples must be a non-negative integer, got "
                          f"{value!r}")
    return amount, "samples"


@dataclass(frozen=True)
class Schedule:
    """The resolved per-step values of a run (see the module docstring)."""

    scale_rules: bool
    batch_size: int             # global labeled batch of one optimizer step, B
    base_batch_size: int        # B0
    kappa: float                # B / B0 (1 when the rules are off)
    lr_scaling: str
    grad_accum: int             # K micro-batches per optimizer step
    world_size: int             # W ranks
    micro_batch: int            # labeled images of one micro-batch on one rank: B / (K W)
    micro_batch_ulb: int        # unlabeled images of one micro-batch on one rank: mu B / (K W)
    mu: int
    steps: int
    lr: float                   # after warm-up (the peak when cosine)
    lr_base: float              # the given lr: where the warm-up starts
    warmup_samples: int         # labeled samples
    warmup_steps: int
    cosine: bool
    ema: float
    prior_momentum: float
    bn_momentum: float          # per forward (micro-batch)
    distill_start: int
    eval_every: int
    log_every: int
    given: dict                 # the configuration's values of SCALED_KEYS

    def lr_at(self, step: int) -> float:
        """lr of the optimizer step with 0-based index `step` (samples seen: step * B)."""
        lr = self.lr
        if step < self.warmup_steps:
            return self.lr_base + (self.lr - self.lr_base) * step / self.warmup_steps
        if self.cosine:
            span = max(1, self.steps - self.warmup_steps)
            lr = 0.5 * self.lr * (1.0 + math.cos(math.pi * (step - self.warmup_steps) / span))
        return lr

    def lr_table(self) -> list[float]:
        """lr_at(s) for every step s of the run (uploaded once as a device tensor, so a compiled
        or graph-captured step indexes it with its step counter)."""
        return [self.lr_at(s) for s in range(self.steps)]

    @property
    def lr_constant(self) -> bool:
        return self.warmup_steps == 0 and not self.cosine

    @property
    def samples(self) -> int:
        """Labeled samples of the whole run (steps * B); unlabeled: mu times that."""
        return self.steps * self.batch_size

    def as_dict(self) -> dict:
        d = asdict(self)
        d["samples"] = self.samples
        d["unlabeled_samples"] = self.samples * self.mu
        return d

    def table(self) -> str:
        """The resolved values as a text table (printed at the start of a run)."""
        k = self.kappa
        head = (f"batch B = {self.batch_size} (B0 = {self.base_batch_size}, kappa = {k:g}"
                f"{'' if self.scale_rules else ', scaling rules off'}); "
                f"{self.grad_accum} micro-batch{'es' if self.grad_accum > 1 else ''} x "
                f"{self.world_size} rank{'s' if self.world_size > 1 else ''} of "
                f"{self.micro_batch} labeled + {self.micro_batch_ulb} unlabeled images; "
                f"{self.samples} labeled samples in all")
        on = self.scale_rules and k != 1
        e_bn = k / self.grad_accum
        lr_rule = (("x kappa" if self.lr_scaling == "linear" else "x sqrt(kappa)")
                   if on else "as given")
        rules = {
            "steps": ("/ kappa" if on else "as given", str(self.steps)),
            "lr": (lr_rule, f"{self.lr:.6g}"),
            "ema": ("^kappa" if on else "as given", f"{self.ema:.6g}"),
            "prior_momentum": ("^kappa" if on else "as given", f"{self.prior_momentum:.6g}"),
            "bn_momentum": ((f"1-(1-m)^{e_bn:g}" if e_bn != 1 else "as given")
                            if self.scale_rules else "as given", f"{self.bn_momentum:.6g}"),
            "distill_start": ("/ kappa" if on else "as given", str(self.distill_start)),
            "eval_every": ("/ kappa" if on else "as given", str(self.eval_every)),
            "log_every": ("/ kappa" if on else "as given", str(self.log_every)),
        }
        rows = [("value", f"given (per step at B0 = {self.base_batch_size})", "rule",
                 "per step here")]
        for key in SCALED_KEYS:
            rule, value = rules[key]
            rows.append((key, f"{self.given[key]:g}" if isinstance(self.given[key], float)
                         else str(self.given[key]), rule, value))
        if self.warmup_steps:
            rows.append(("warm-up", f"{self.warmup_samples} samples", "linear",
                         f"{self.warmup_steps} steps, lr {self.lr_base:.6g} -> {self.lr:.6g}"))
        if self.cosine:
            rows.append(("decay", "cosine", "half cosine", f"lr {self.lr:.6g} -> 0 at step "
                                                           f"{self.steps}"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [head]
        for i, r in enumerate(rows):
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def resolve(cfg: dict, world_size: int = 1, pool_size: int | None = None) -> Schedule:
    """The per-step values of the run `cfg` (a validated configuration) on `world_size` ranks.

    `pool_size` (unlabeled images) converts a warm-up given in epochs; without it such a
    warm-up is checked for its form only (the driver resolves again once the data is read).
    Raises ConfigError (a ValueError) naming the flag of an inconsistent setting."""
    b, b0, k_acc, mu = cfg["batch_size"], cfg.get("base_batch_size", 64), \
        cfg.get("grad_accum", 1), cfg["mu"]
    scale = bool(cfg.get("scale_rules", True))
    lr_scaling = cfg.get("lr_scaling", "linear")
    for v, flag in ((b, "--batch-size"), (b0, "--set base_batch_size"),
                    (k_acc, "--grad-accum"), (mu, "--mu")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"{flag}: expected an integer >= 1, got {v!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"world size: expected an integer >= 1, got {world_size!r}")
    if lr_scaling not in LR_SCALINGS:
        raise ConfigError(f"--lr-scaling: expected one of {LR_SCALINGS}, got {lr_scaling!r}")
    parts = k_acc * world_size
    if b % parts or (mu * b) % parts:
        raise ConfigError(
            f"--batch-size: the global batch {b} (and mu * B = {mu * b} unlabeled) must divide "
            f"into --grad-accum {k_acc} micro-batches x {world_size} ranks = {parts} equal "
            f"parts")
    kappa = b / b0 if scale else 1.0
    given = {key: cfg[key] for key in SCALED_KEYS}
    if scale:
        steps = max(1, _round(cfg["steps"] / kappa))
        distill = _round(cfg["distill_start"] / kappa)
        eval_every = _cadence(cfg["eval_every"], kappa)
        log_every = _cadence(cfg["log_every"], kappa)
        lr = cfg["lr"] * (kappa if lr_scaling == "linear" else math.sqrt(kappa))
        if kappa == 1:
            lr = cfg["lr"]
        ema = ema_momentum(cfg["ema"], kappa)
        prior = ema_momentum(cfg["prior_momentum"], kappa)
        bn = bn_momentum(cfg["bn_momentum"], kappa / k_acc)
    else:
        steps, distill, eval_every, log_every = (cfg["steps"], cfg["distill_start"],
                                                 cfg["eval_every"], cfg["log_every"])
        lr, ema, prior, bn = cfg["lr"], cfg["ema"], cfg["prior_momentum"], cfg["bn_momentum"]
    amount, unit = parse_warmup(cfg.get("warmup", 0))
    if unit == "epochs":
        if pool_size is None:
            warm_samples = 0        # checked once the pool size is known
        else:
            # Unlabeled epochs -> labeled samples: a step draws mu * B unlabeled images.
            warm_samples = int(math.ceil(amount * pool_size / mu))
    else:
        warm_samples = int(amount)
    warm_steps = int(math.ceil(warm_samples / b)) if warm_samples else 0
    if warm_steps >= steps and warm_samples:
        raise ConfigError(
            f"--warmup: {cfg.get('warmup')!r} is {warm_samples} labeled samples = {warm_steps} "
            f"steps of B = {b}, not shorter than the run ({steps} steps, {steps * b} samples)")
    cosine = bool(cfg.get("cosine", False))
    if not 0 < ema < 1 and cfg["ema"] > 0:
        # rho^kappa underflows to 0 only for absurd kappa; say so rather than train without EMA.
        raise ConfigError(f"--batch-size: ema {cfg['ema']:g}^{kappa:g} underflows to {ema:g}")
    return Schedule(
        scale_rules=scale, batch_size=b, base_batch_size=b0, kappa=kappa,
        lr_scaling=lr_scaling, grad_accum=k_acc, world_size=world_size,
        micro_batch=b // parts, micro_batch_ulb=mu * b // parts, mu=mu, steps=steps, lr=lr,
        lr_base=cfg["lr"], warmup_samples=warm_samples, warmup_steps=warm_steps,
        cosine=cosine, ema=ema, prior_momentum=prior, bn_momentum=bn, distill_start=distill,
        eval_every=eval_every, log_every=log_every, given=given)


def apply(cfg: dict, sched: Schedule) -> dict:
    """A copy of `cfg` whose SCALED_KEYS hold the per-step values of `sched` (the lr key holds
    the post-warm-up lr); what the trainer builds its model, EMA, criterion and loop from."""
    out = dict(cfg)
    for key in SCALED_KEYS:
        out[key] = getattr(sched, key)
    return out
