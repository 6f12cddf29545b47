"""The USB check: adello_kernels.integrations.usb inside Microsoft USB itself (semilearn 0.3.2),
on the CPU, through USB's own train() loop and hooks (parameter update, EMA, evaluation,
checkpoint, logging). Not a pytest file (semilearn is not a dependency of this package); run
it with the interpreter of a venv that has semilearn, from tests/usb_check.sh:

    PYTHONPATH=<repo> <venv>/bin/python tests/usb_check.py

Three runs on a tiny in-memory long-tailed dataset (5 classes, 32x32 RGB, USB's BasicDataset
with USB's weak/strong transforms) and a tiny BatchNorm CNN:

1. USB's FixMatch as it is (the trajectory to reproduce).
2. USB's FixMatch whose train_step also runs the same step through the adapter
   (`ADELLOLoss(flexda=False, lambda_d=0)` from the run's args): sup/unsup/total loss and
   util_ratio must agree to 1e-6 on every step, and the run (USB's out_dict/log_dict returned)
   must be run 1 bit for bit.
3. An imbalanced algorithm registered in USB's IMB_ALGORITHMS ('adello_kernels', the default
   ADELLO configuration) built by USB's get_imb_algorithm over fixmatch: finite losses, the
   criterion's step, its prior away from uniform, and its state in USB's checkpoint, restored
   by load_model into a fresh instance.

What differs from USB on a GPU (there is no GPU here; CPUOnly below): process_batch and
evaluate keep the batches on the CPU instead of calling .cuda(self.gpu), and USB's TimerHook,
which records torch.cuda.Event's (and makes ParamUpdateHook call torch.cuda.synchronize), is
replaced by a wall-clock timer under the same name that logs the same keys. Nothing of
semilearn is patched or mocked.
"""
import logging
import math
import os
import random
import sys
import tempfile
import time
import warnings
from inspect import signature

T0 = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

T_TORCH = time.perf_counter()
import semilearn  # noqa: E402
from semilearn.algorithms.utils import SSL_Argument, str2bool  # noqa: E402
from semilearn.core import ImbAlgorithmBase  # noqa: E402
from semilearn.core.hooks import Hook, TimerHook  # noqa: E402
from semilearn.core.utils import ALGORITHMS, IMB_ALGORITHMS  # noqa: E402
from semilearn.datasets.augmentation import RandAugment  # noqa: E402
from semilearn.imb_algorithms import get_imb_algorithm  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
)
from torchvision import transforms  # noqa: E402

T_USB = time.perf_counter()
with warnings.catch_warnings(record=True) as _caught:
    warnings.simplefilter("always")
    import adello_kernels  # noqa: E402
    from adello_kernels.integrations import usb as ak_usb  # noqa: E402
T_AK = time.perf_counter()

NUM_CLASSES = 5
NUM_TRAIN_ITER = 6
TOL = 1e-6
LOG_KEYS = ("train/sup_loss", "train/unsup_loss", "train/total_loss", "train/util_ratio")
CKPT_KEY = "adello_crit"  # where the criterion's state goes in USB's checkpoint dict


# ---------------------------------------------------------------------------------------------
# data and model
# ---------------------------------------------------------------------------------------------
def make_images(rng, counts, means):
    """uint8 [sum(counts), 32, 32, 3] images of class-dependent colour plus noise; labels."""
    xs, ys = [], []
    for c, n in enumerate(counts):
        x = means[c][None, None, None, :] + rng.normal(0.0, 40.0, size=(n, 32, 32, 3))
        xs.append(np.clip(x, 0, 255).astype(np.uint8))
        ys.append(np.full(n, c, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def build_dataset_dict():
    """USB's dataset dict of BasicDataset's: long-tailed labeled (imbalance 10) and unlabeled
    sets (the labeled images included, USB's include_lb_to_ulb default), a balanced eval set;
    the transforms of USB's CIFAR loader (weak: crop + flip; strong: + RandAugment(3, 5))."""
    rng = np.random.RandomState(0)
    means = rng.uniform(50.0, 205.0, size=(NUM_CLASSES, 3))
    x_lb, y_lb = make_images(rng, [40, 20, 10, 6, 4], means)
    x_u, y_u = make_images(rng, [160, 80, 40, 24, 16], means)
    x_ev, y_ev = make_images(rng, [20] * NUM_CLASSES, means)
    x_ulb, y_ulb = np.concatenate([x_lb, x_u]), np.concatenate([y_lb, y_u])
    norm = transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    crop = transforms.RandomCrop(32, padding=4, padding_mode="reflect")
    weak = transforms.Compose([crop, transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                               norm])
    strong = transforms.Compose([crop, transforms.RandomHorizontalFlip(), RandAugment(3, 5),
                                 transforms.ToTensor(), norm])
    plain = transforms.Compose([transforms.ToTensor(), norm])
    def ds(x, y, transform, is_ulb=False, strong_transform=None):
        return semilearn.BasicDataset(alg="fixmatch", data=x, targets=y, num_classes=NUM_CLASSES,
                                      transform=transform, is_ulb=is_ulb,
                                      strong_transform=strong_transform, onehot=False)
    return {"train_lb": ds(x_lb, y_lb, weak), "train_ulb": ds(x_ulb, y_ulb, weak, True, strong),
            "eval": ds(x_ev, y_ev, plain), "test": None}


DATASET_DICT = None


class TinyNet(nn.Module):
    """Two conv + BatchNorm2d layers, no dropout; USB's net interface (a dict with 'logits'
    and 'feat'; only_fc / only_feat)."""

    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(32, num_classes)
        # wide initial logits, so that some weak rows pass a threshold from the first step
        nn.init.normal_(self.classifier.weight, std=1.0)

    def forward(self, x, only_fc=False, only_feat=False, **kwargs):
        if only_fc:
            return self.classifier(x)
        feat = self.features(x)
        if only_feat:
            return feat
        return {"logits": self.classifier(feat), "feat": feat}


def net_builder(num_classes, pretrained=False, pretrained_path=None, **kwargs):
    """What AlgorithmBase.set_model / set_ema_model call (num_classes=, pretrained=,
    pretrained_path=)."""
    return TinyNet(num_classes)


# ---------------------------------------------------------------------------------------------
# the CPU-only parts (the only changes to USB's behaviour) and the dataset
# ---------------------------------------------------------------------------------------------
class CPUTimerHook(Hook):
    """Stands in for USB's TimerHook (torch.cuda.Event's, which need a GPU): the same log keys
    ('lr', 'train/prefetch_time') from the wall clock; it sets no algorithm.start_run, so
    ParamUpdateHook skips its torch.cuda.synchronize()."""

    def before_run(self, algorithm):
        self.t_end = time.perf_counter()

    def before_train_step(self, algorithm):
        self.prefetch = time.perf_counter() - self.t_end

    def after_train_step(self, algorithm):
        algorithm.log_dict["lr"] = algorithm.optimizer.param_groups[-1]["lr"]
        algorithm.log_dict["train/prefetch_time"] = self.prefetch
        self.t_end = time.perf_counter()


class CPUOnly:
    """Mixin, first in the MRO. THE ONLY CHANGES TO USB'S BEHAVIOUR: USB's AlgorithmBase moves
    every batch with .cuda(self.gpu) in process_batch and evaluate, and its TimerHook uses CUDA
    events; here the batches stay on the CPU and the timer reads the wall clock. set_dataset
    returns the in-memory dataset (what USB's custom-dataset recipe does)."""

    def set_dataset(self):
        d = DATASET_DICT
        self.args.ulb_dest_len = len(d["train_ulb"])
        self.args.lb_dest_len = len(d["train_lb"])
        return d

    def set_hooks(self):
        super().set_hooks()
        self._hooks = [h for h in self._hooks if not isinstance(h, TimerHook)]
        self.register_hook(CPUTimerHook(), "TimerHook", "LOW")  # rebuilds hooks_dict

    def process_batch(self, input_args=None, **kwargs):
        # USB's selection (the train_step's parameters, None dropped), without .cuda()
        names = list(signature(self.train_step).parameters) if input_args is None \
            else input_args
        return {k: v for k, v in kwargs.items() if k in names and v is not None}

    def evaluate(self, eval_dest="eval", out_key="logits", return_logits=False):
        # USB's evaluation (EMA weights, eval mode, its keys and sklearn metrics), on the CPU
        self.model.eval()
        self.ema.apply_shadow()
        ys, zs = [], []
        try:
            with torch.no_grad():
                for batch in self.loader_dict[eval_dest]:
                    zs.append(self.model(batch["x_lb"])[out_key])
                    ys.append(batch["y_lb"])
        finally:
            self.ema.restore()
            self.model.train()
        z, y = torch.cat(zs), torch.cat(ys)
        t, p = y.numpy(), z.argmax(dim=-1).numpy()
        out = {f"{eval_dest}/loss": F.cross_entropy(z, y).item(),
               f"{eval_dest}/top-1-acc": accuracy_score(t, p),
               f"{eval_dest}/balanced_acc": balanced_accuracy_score(t, p),
               f"{eval_dest}/precision": precision_score(t, p, average="macro",
                                                         zero_division=0),
               f"{eval_dest}/recall": recall_score(t, p, average="macro", zero_division=0),
               f"{eval_dest}/F1": f1_score(t, p, average="macro", zero_division=0)}
        if return_logits:
            out[f"{eval_dest}/logits"] = z.numpy()
        return out


def lb_class_counts(alg):
    counts = np.bincount(np.asarray(alg.dataset_dict["train_lb"].targets),
                         minlength=alg.num_classes)
    return torch.tensor(counts, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# 1-2. FixMatch: USB's loss vs the adapter's
# ---------------------------------------------------------------------------------------------
FixMatch = ALGORITHMS["fixmatch"]


class PlainFixMatch(CPUOnly, FixMatch):
    """USB's FixMatch; records its log_dict per step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.usb_logs = []

    def train_step(self, x_lb, y_lb, x_ulb_w, x_ulb_s):
        out_dict, log_dict = super().train_step(x_lb=x_lb, y_lb=y_lb, x_ulb_w=x_ulb_w,
                                                x_ulb_s=x_ulb_s)
        self.usb_logs.append(dict(log_dict))
        return out_dict, log_dict


class FixMatchVsAdapter(PlainFixMatch):
    """USB's FixMatch step, then the same step through adello_kernels' adapter; returns USB's
    (out_dict, log_dict)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.crit = ak_usb.adello_loss_from_args(self.args, lb_class_counts(self), flexda=False,
                                                 lambda_d=0.0, backend="reference")
        self.diffs = []        # per step: {key: |USB - adapter|}
        self.ak_logs = []
        self.same_logits = []  # the second forward's logits == USB's forward's, bit for bit

    def train_step(self, x_lb, y_lb, x_ulb_w, x_ulb_s):
        seen = []
        handle = self.model.register_forward_hook(lambda m, i, o: seen.append(o["logits"]))
        try:
            out_dict, log_dict = super().train_step(x_lb, y_lb, x_ulb_w, x_ulb_s)
        finally:
            handle.remove()
        assert len(seen) == 1 and self.use_cat
        # The second forward (train mode: BatchNorm uses the batch's statistics, the same as in
        # USB's forward) would update the BN running statistics a second time: USB's own
        # Bn_Controller saves and restores them, so the run stays USB's.
        self.bn_controller.freeze_bn(self.model)
        try:
            with self.amp_cm():
                outputs = self.model(torch.cat((x_lb, x_ulb_w, x_ulb_s)))
        finally:
            self.bn_controller.unfreeze_bn(self.model)
        self.same_logits.append(torch.equal(outputs["logits"], seen[0]))
        _, ak_log = ak_usb.train_step_outputs(self.crit, outputs, y_lb)
        self.ak_logs.append(ak_log)
        self.diffs.append({k: abs(float(log_dict[k]) - float(ak_log[k])) for k in LOG_KEYS})
        return out_dict, log_dict


# ---------------------------------------------------------------------------------------------
# 3. ADELLO as a USB imbalanced algorithm
# ---------------------------------------------------------------------------------------------
class ADELLOKernels(ImbAlgorithmBase):
    """ADELLO (FlexDA + complementary consistency distillation) through adello_kernels'
    ADELLOLoss, as an imbalanced algorithm over USB's FixMatch (its model, loader, hooks): the
    loss of one forward of cat(x_lb, x_ulb_w, x_ulb_s), the released ADELLO arguments."""

    def __init__(self, args, net_builder, tb_log=None, logger=None, **kwargs):
        super().__init__(args, net_builder, tb_log, logger, **kwargs)
        if not self.use_cat:
            raise ValueError("adello_kernels: needs use_cat=True (one forward of all rows)")
        self.crit = ak_usb.adello_loss_from_args(self.args, lb_class_counts(self),
                                                 backend=getattr(self.args, "adello_backend",
                                                                 "auto"))
        self.step_logs = []

    def train_step(self, x_lb, y_lb, x_ulb_w, x_ulb_s):
        with self.amp_cm():
            outputs = self.model(torch.cat((x_lb, x_ulb_w, x_ulb_s)))
            out_dict, log_dict = ak_usb.train_step_outputs(self.crit, outputs, y_lb)
        self.step_logs.append(dict(log_dict))
        return out_dict, log_dict

    def get_p_hat(self):
        return self.crit.prior_ulb

    def get_save_dict(self):
        save_dict = super().get_save_dict()
        save_dict[CKPT_KEY] = self.crit.state_dict()
        return save_dict

    def load_model(self, load_path):
        checkpoint = super().load_model(load_path)
        self.crit.load_state_dict(checkpoint[CKPT_KEY])
        return checkpoint

    @staticmethod
    def get_argument():
        d = ak_usb.RELEASED_DEFAULTS
        return [
            SSL_Argument("--lambda_distill", float, d["lambda_distill"]),
            SSL_Argument("--distill_complement", str2bool, d["distill_complement"]),
            SSL_Argument("--distill_all", str2bool, d["distill_all"]),
            SSL_Argument("--distill_start_iter", int, d["distill_start_iter"]),
            SSL_Argument("--distill_T", float, d["distill_T"]),
            SSL_Argument("--imbalance_distill_with_warmup", str2bool,
                         d["imbalance_distill_with_warmup"]),
            SSL_Argument("--adello_mode", str, d["adello_mode"]),
            SSL_Argument("--adello_alpha_from_epoch", str2bool, d["adello_alpha_from_epoch"]),
            SSL_Argument("--adello_alpha_min", float, d["adello_alpha_min"]),
            SSL_Argument("--adello_k", float, d["adello_k"]),
            SSL_Argument("--adello_ema_p", float, d["adello_ema_p"]),
            SSL_Argument("--adello_backend", str, "auto"),
        ]


@IMB_ALGORITHMS.register("adello_kernels")
class ADELLOKernelsOnCPU(CPUOnly, ADELLOKernels):
    """ADELLOKernels with the CPU-only parts (this machine has no GPU)."""


# ---------------------------------------------------------------------------------------------
# the runs
# ---------------------------------------------------------------------------------------------
class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def make_logger(name):
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    handler = ListHandler()
    logger.handlers = [handler]
    return logger, handler


def usb_args(save_dir, save_name, **extra):
    cfg = dict(algorithm="fixmatch", net="tiny_cnn", dataset="tiny_lt", num_classes=NUM_CLASSES,
               num_labels=80, lb_imb_ratio=10, ulb_imb_ratio=10, img_size=32,
               num_train_iter=NUM_TRAIN_ITER, epoch=1, num_warmup_iter=0,
               num_eval_iter=1000, num_log_iter=2, batch_size=8, uratio=2,
               eval_batch_size=50, num_workers=0, lr=0.005, ema_m=0.999, use_cat=True,
               amp=False, gpu=None, distributed=False, multiprocessing_distributed=False,
               world_size=1, rank=0, save_dir=save_dir, save_name=save_name, seed=0,
               use_tensorboard=False, use_wandb=False, use_aim=False)
    cfg.update(extra)
    return semilearn.get_config(cfg)


def seed_all(seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_and_train(cls_or_factory, args, name):
    logger, handler = make_logger(name)
    seed_all()
    t = time.perf_counter()
    if isinstance(cls_or_factory, type):
        alg = cls_or_factory(args=args, net_builder=net_builder, tb_log=None, logger=logger)
    else:
        alg = cls_or_factory(args, net_builder, None, logger)
    alg.train()  # USB's loop: its hooks, evaluation at the last step, checkpoints
    return alg, handler.lines, time.perf_counter() - t


def check_fixmatch(tmp):
    # p_cutoff 0.8 (with lr 0.005, the wide classifier init): util_ratio strictly between 0
    # and 1 on most steps, so the mask and the masked unlabeled loss are compared, and losses
    # below 4 (fp32 ulp <= 4.8e-7: the 1e-6 absolute tolerance is a few ulps, not a loose bound)
    plain, _, t_plain = build_and_train(PlainFixMatch, usb_args(tmp, "fm_plain", p_cutoff=0.8),
                                        "usb_check.fm_plain")
    alg, lines, t_vs = build_and_train(FixMatchVsAdapter,
                                       usb_args(tmp, "fm_vs", p_cutoff=0.8),
                                       "usb_check.fm_vs")
    n = NUM_TRAIN_ITER
    assert len(alg.diffs) == n and len(alg.usb_logs) == n, (len(alg.diffs), n)
    assert all(alg.same_logits), f"second forward differs: {alg.same_logits}"
    worst = {k: max(d[k] for d in alg.diffs) for k in LOG_KEYS}
    for step, d in enumerate(alg.diffs):
        for k, v in d.items():
            assert v <= TOL, f"step {step}: |USB - adapter| {k} = {v:.3e} > {TOL}"
    ratios = [lg["train/util_ratio"] for lg in alg.usb_logs]
    assert any(0.0 < r < 1.0 for r in ratios), f"util_ratio never strictly in (0, 1): {ratios}"
    assert all(lg["train/unsup_loss"] > 0 for lg in alg.usb_logs if lg["train/util_ratio"] > 0)
    # the adapter beside USB's step changed nothing: the same trajectory as USB's FixMatch alone
    assert alg.usb_logs == plain.usb_logs, "the run with the adapter is not USB's run"
    for (k, a), (_, b) in zip(alg.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(a, b), f"model {k} differs from USB's run"
    for k, v in alg.ema_model.state_dict().items():
        assert torch.equal(v, plain.ema_model.state_dict()[k]), f"ema_model {k} differs"
    bn = [m for m in alg.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == n for m in bn), "BN stats updated twice a step"
    assert int(alg.crit.step) == n
    assert any("train/sup_loss" in ln for ln in lines), "USB's LoggingHook logged nothing"
    assert os.path.isfile(os.path.join(tmp, "fm_vs", "latest_model.pth"))
    print(f"[fixmatch] {n} steps, USB's FixMatch vs the adapter (reference backend), max |diff|: "
          + ", ".join(f"{k.split('/')[1]} {v:.2e}" for k, v in worst.items()))
    print("[fixmatch] per step (sup, unsup, total, util_ratio) USB | adapter:")
    for s, (u, a) in enumerate(zip(alg.usb_logs, alg.ak_logs)):
        print(f"  {s}: " + " ".join(f"{u[k]:.6f}" for k in LOG_KEYS) + " | "
              + " ".join(f"{a[k]:.6f}" for k in LOG_KEYS))
    print(f"[fixmatch] the run with the adapter == USB's FixMatch alone (logs, model, EMA model, "
          f"BN stats): yes; train() {t_plain:.1f} s plain, {t_vs:.1f} s with the adapter")
    return t_plain + t_vs


def check_adello(tmp):
    args = usb_args(tmp, "adello", imb_algorithm="adello_kernels", adello_backend="reference")
    alg, lines, t_run = build_and_train(get_imb_algorithm, args, "usb_check.adello")
    n = NUM_TRAIN_ITER
    c = alg.crit
    assert type(alg).__mro__[1] is ADELLOKernelsOnCPU and isinstance(alg, FixMatch)
    assert c.flexda and c.lambda_d == 1.0 and c.threshold == 0.95 and c.total_steps == n
    assert len(alg.step_logs) == n
    for s, lg in enumerate(alg.step_logs):
        for k in LOG_KEYS + ("train/distill_loss", "train/cte_alpha"):
            assert math.isfinite(lg[k]), f"step {s}: {k} = {lg[k]}"
    assert int(c.step) == n, (int(c.step), n)
    prior = c.prior_ulb.detach().clone()
    away = float((prior - 1.0 / NUM_CLASSES).abs().max())
    assert torch.isfinite(prior).all() and abs(float(prior.sum()) - 1.0) < 1e-5
    assert away > 1e-6, f"prior still uniform: {prior.tolist()}"
    assert alg.get_p_hat() is c.prior_ulb
    assert any("train/distill_loss" in ln for ln in lines), "USB's LoggingHook logged nothing"
    path = os.path.join(tmp, "adello", "latest_model.pth")
    ckpt = torch.load(path, map_location="cpu")
    assert CKPT_KEY in ckpt, sorted(ckpt)
    assert int(ckpt[CKPT_KEY]["step"]) == n
    assert torch.equal(ckpt[CKPT_KEY]["prior_ulb"], prior)
    # a fresh instance, built the same way, restored by USB's load_model (+ the criterion)
    fresh = get_imb_algorithm(args, net_builder, None, make_logger("usb_check.fresh")[0])
    assert int(fresh.crit.step) == 0 and not torch.equal(fresh.crit.prior_ulb, prior)
    fresh.load_model(path)
    assert int(fresh.crit.step) == n and torch.equal(fresh.crit.prior_ulb, prior)
    assert torch.equal(fresh.crit.temperature, c.temperature)
    for k, v in alg.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[k], v), k
    print(f"[adello] {n} steps through USB's train() (get_imb_algorithm: adello_kernels over "
          f"fixmatch): losses finite; crit.step {int(c.step)}; prior "
          f"{[round(v, 5) for v in prior.tolist()]} "
          f"(max |Q - 1/C| {away:.2e}); checkpoint key '{CKPT_KEY}' restored into a fresh "
          f"instance (step, prior, temperature, model); train() {t_run:.1f} s")
    last = alg.step_logs[-1]
    print("[adello] last step: " + ", ".join(f"{k.split('/')[1]} {last[k]:.4f}"
                                             for k in sorted(last) if k.startswith("train/")))
    return t_run


def main():
    global DATASET_DICT
    ext = [str(w.message) for w in _caught if "_C" in str(w.message)]
    from importlib.metadata import version
    print(f"usb_check: torch {torch.__version__}, semilearn {version('semilearn')}, "
          f"adello_kernels from {os.path.dirname(adello_kernels.__file__)} "
          f"(backends {adello_kernels.available_backends()}"
          f"{'; compiled extension not loaded, reference only' if ext else ''})")
    print(f"usb_check: import torch {T_TORCH - T0:.1f} s, semilearn {T_USB - T_TORCH:.1f} s, "
          f"adello_kernels {T_AK - T_USB:.1f} s")
    t = time.perf_counter()
    DATASET_DICT = build_dataset_dict()
    t_data = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="usb_check_") as tmp, warnings.catch_warnings():
        # torch.cuda.amp.GradScaler/autocast deprecation and "CUDA is not available" notes
        warnings.filterwarnings("ignore", message=".*torch.cuda.amp.*")
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        t_fm = check_fixmatch(tmp)
        t_ad = check_adello(tmp)
    total = time.perf_counter() - T0
    print(f"usb_check: OK (data {t_data:.1f} s, fixmatch runs {t_fm:.1f} s, adello run "
          f"{t_ad:.1f} s, whole script {total:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
