"""Training throughput: this driver's step against a USB-style pipeline, side by side in one
process, on the same model, device and batch.

    python benchmarks/train_throughput.py                   # CPU: fmnist CNN, WRN-28-2 at 32 px
    python benchmarks/train_throughput.py --device cuda     # GPU: ResNet-50 at 32 and 64 px
    python benchmarks/train_throughput.py --cases cnn --steps 20 --json out.json

Providers (one training step each = sample + augment + forward of cat(labeled, weak, strong) +
loss + backward + SGD + weight EMA, on B labeled and mu B unlabeled images):

    driver          `Trainer.train_step` of `python -m adello_kernels.train` on
                    `--dataset synthetic` (the uint8 pool on the device, batched on-device
                    augmentation, the fused ADELLOLoss step, logged values kept on the device)
    driver-compile  the same with `--compile step` (`--compile` of this script)
    driver-graph    the same with `--cuda-graph` (`--cuda-graph` of this script, GPU only)
    usb             the pipeline as the released code runs it: two `torch.utils.data.DataLoader`s
                    (labeled, unlabeled) with worker processes that decode every image into PIL
                    and apply the weak (flip + reflect-pad crop) and strong (weak + RandAugment
                    with 3 ops of random magnitude + Cutout) views one image at a time, then
                    ToTensor + Normalize; host-to-device copies; the loss in plain eager PyTorch
                    with a hand-kept prior (`providers.LeanADELLO`, checked against the
                    reference); a Python loop for the EMA; and the per-step `.item()` logging of
                    four scalars

Images are synthetic uint8 in the real shapes (no dataset needed). Timing: for each of
`--rounds` rounds every provider runs `--warmup` untimed steps, then `--steps` timed ones; the
reported step time is the median over rounds. The usb provider's warm-up also drains the batches
its workers prefetched while the other providers ran (workers x prefetch factor per loader), so
its timed steps are steady state: the workers compete for the cores with the main process, as
they do in a real run. images/s counts B + 2 mu B images per step (the labeled, weak and
strong views the model sees); the ratio is the driver's images/s over the usb pipeline's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adello_kernels.train import config as config_mod  # noqa: E402
from adello_kernels.train import data as data_mod  # noqa: E402
from adello_kernels.train import synthetic  # noqa: E402
from adello_kernels.train.models import build_model  # noqa: E402
from adello_kernels.train.trainer import Trainer, param_groups  # noqa: E402

import providers as P  # noqa: E402

# name -> (preset, labeled batch B, timed steps, warm-up steps) per device type. CPU batches of
# the WRN are cut to 16 so that the whole comparison takes minutes on two cores.
CASES = {
    "cpu": {"cnn": ("fmnist-lt", 64, 10, 3), "wrn28_2": ("cifar10-lt", 16, 3, 2)},
    "cuda": {"resnet50-32": ("imagenet127-32", 256, 20, 5),
             "resnet50-64": ("imagenet127-64", 128, 20, 5)},
}


# ------------------------------------------------------------------------------------------
# The USB-style input pipeline: per-image PIL augmentation in DataLoader workers
# ------------------------------------------------------------------------------------------

def _weak_pil(img: Image.Image) -> Image.Image:
    """RandomHorizontalFlip + RandomCrop(size, padding=size / 8, padding_mode='reflect')."""
    a = np.asarray(img)
    h, w = a.shape[:2]
    pad = max(1, min(h, w) // 8)
    a = np.pad(a, ((pad, pad), (pad, pad)) + ((0, 0),) * (a.ndim - 2), mode="reflect")
    y, x = random.randint(0, 2 * pad), random.randint(0, 2 * pad)
    a = a[y:y + h, x:x + w]
    if random.random() < 0.5:
        a = a[:, ::-1]
    return Image.fromarray(np.ascontiguousarray(a))


def _affine(img, coeffs):
    return img.transform(img.size, Image.AFFINE, coeffs)


# (operation, magnitude range) of the FixMatch-style RandAugment: 3 ops drawn with replacement,
# each with a magnitude uniform in its range.
_RA_OPS = [
    (lambda img, v: ImageOps.autocontrast(img), None),
    (lambda img, v: ImageEnhance.Brightness(img).enhance(v), (0.05, 0.95)),
    (lambda img, v: ImageEnhance.Color(img).enhance(v), (0.05, 0.95)),
    (lambda img, v: ImageEnhance.Contrast(img).enhance(v), (0.05, 0.95)),
    (lambda img, v: ImageOps.equalize(img), None),
    (lambda img, v: img, None),
    (lambda img, v: ImageOps.posterize(img, int(v)), (4, 8)),
    (lambda img, v: img.rotate(v), (-30, 30)),
    (lambda img, v: ImageEnhance.Sharpness(img).enhance(v), (0.05, 0.95)),
    (lambda img, v: _affine(img, (1, v, 0, 0, 1, 0)), (-0.3, 0.3)),
    (lambda img, v: _affine(img, (1, 0, 0, v, 1, 0)), (-0.3, 0.3)),
    (lambda img, v: ImageOps.solarize(img, int(v)), (0, 256)),
    (lambda img, v: _affine(img, (1, 0, v * img.size[0], 0, 1, 0)), (-0.3, 0.3)),
    (lambda img, v: _affine(img, (1, 0, 0, 0, 1, v * img.size[1])), (-0.3, 0.3)),
]


def _strong_pil(img: Image.Image) -> Image.Image:
    img = _weak_pil(img)
    for fn, rng in random.choices(_RA_OPS, k=3):
        img = fn(img, random.uniform(*rng) if rng else None)
    # Cutout: a grey square of side U(0, 0.5) x width at a uniform centre.
    a = np.array(img)
    h, w = a.shape[:2]
    side = random.uniform(0, 0.5) * w
    cx, cy = random.uniform(0, w), random.uniform(0, h)
    x0, y0 = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    a[y0:int(min(h, y0 + side)), x0:int(min(w, x0 + side))] = 127
    return Image.fromarray(a)


class _USBDataset(torch.utils.data.Dataset):
    """uint8 HWC images; item = (weak, label) for labeled, (weak, strong) for unlabeled, each
    a normalised float32 CHW tensor (ToTensor + Normalize in the worker, as torchvision does)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean, std, unlabeled: bool):
        self.images, self.labels, self.unlabeled = images, labels, unlabeled
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)

    def __len__(self):
        return len(self.images)

    def _tensor(self, img: Image.Image) -> torch.Tensor:
        a = np.asarray(img, dtype=np.float32) / 255.0
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(((a - self.mean) / self.std).transpose(2, 0, 1).copy())

    def __getitem__(self, i):
        a = self.images[i]
        img = Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)
        if self.unlabeled:
            return self._tensor(_weak_pil(img)), self._tensor(_strong_pil(img))
        return self._tensor(_weak_pil(img)), int(self.labels[i])


class USBPipeline:
    """The released code's training step around the same model class and batch."""

    def __init__(self, cfg: dict, arrays, b: int, device: torch.device, workers: int,
                 amp: bool):
        mu = cfg["mu"]
        self.device, self.amp, self.b, self.n = device, amp, b, mu * b
        hwc = np.ascontiguousarray(arrays.train_x.transpose(0, 2, 3, 1))
        y = arrays.train_y
        lb = np.flatnonzero(y >= 0)[: max(b * 4, 1000)]
        mean, std = data_mod.MEAN_STD[cfg["dataset"]]
        self.loaders = []
        for ds, bs in ((_USBDataset(hwc[lb], y[lb], mean, std, False), b),
                       (_USBDataset(hwc, y, mean, std, True), self.n)):
            sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10 ** 8)
            self.loaders.append(torch.utils.data.DataLoader(
                ds, batch_size=bs, sampler=sampler, num_workers=workers, drop_last=True,
                pin_memory=device.type == "cuda", persistent_workers=workers > 0))
        self.prefetched = workers * 2 if workers else 0      # DataLoader's prefetch_factor 2
        self.iters = [iter(dl) for dl in self.loaders]
        torch.manual_seed(cfg["seed"])
        self.model = build_model(cfg["model"], arrays.num_classes, arrays.train_x.shape[1],
                                 bn_momentum=cfg["bn_momentum"]).to(device)
        self.opt = torch.optim.SGD(param_groups(self.model, cfg["weight_decay"]), lr=cfg["lr"],
                                   momentum=cfg["momentum"], nesterov=cfg["nesterov"])
        self.ema_decay = cfg["ema"]
        self.shadow = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        prior = torch.full((arrays.num_classes,), 1.0 / arrays.num_classes, device=device)
        self.crit = P.LeanADELLO(prior, 10 ** 6, threshold=cfg["threshold"],
                                 prior_momentum=cfg["prior_momentum"])
        self.log = {}

    def step(self) -> None:
        x_lb, y_lb = next(self.iters[0])
        x_w, x_s = next(self.iters[1])
        dev = self.device
        x_lb, y_lb = x_lb.to(dev, non_blocking=True), y_lb.to(dev, non_blocking=True)
        x_w, x_s = x_w.to(dev, non_blocking=True), x_s.to(dev, non_blocking=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(torch.cat((x_lb, x_w, x_s)))
        z_l, z_w, z_s = logits.split([self.b, self.n, self.n])
        out = self.crit(z_l, y_lb, z_w.detach(), z_s)
        self.opt.zero_grad()
        out.loss.backward()
        self.opt.step()
        with torch.no_grad():   # the released EMA: a Python loop, a new tensor per parameter
            for name, p in self.model.named_parameters():
                self.shadow[name] = ((1.0 - self.ema_decay) * p.data
                                     + self.ema_decay * self.shadow[name]).clone()
            for name, buf in self.model.named_buffers():
                self.shadow[name].copy_(buf)
        self.log = {"train/sup_loss": out.loss_sup.item(), "train/unsup_loss":
                    out.loss_unsup.item(), "train/total_loss": out.loss.item(),
                    "train/util_ratio": out.mask.float().mean().item()}


# ------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------

def driver_config(preset: str, b: int, device: str, compile_step: bool, amp: bool,
                  cuda_graph: bool = False) -> dict:
    cfg = config_mod.load_preset(preset)
    cfg.update(batch_size=b, scale_rules=False, steps=10 ** 6, device=device, synthetic=True,
               compile="step" if compile_step else False, amp="bf16" if amp else "none",
               progress=False, time_limit=0.0, cuda_graph=cuda_graph)
    return config_mod.validate(cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _block(step, n: int, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - t) / n


def run_case(name: str, device: torch.device, args) -> dict:
    preset, b, steps, warm = CASES[device.type][name]
    b = args.batch_size or b
    steps, warm = args.steps or steps, max(args.warmup if args.warmup is not None else warm, 1)
    amp = device.type == "cuda"
    cfgs = {"driver": driver_config(preset, b, str(device), False, amp)}
    if args.compile:
        cfgs["driver-compile"] = driver_config(preset, b, str(device), True, amp)
    if args.cuda_graph:
        cfgs["driver-graph"] = driver_config(preset, b, str(device), False, amp, True)
    base = cfgs["driver"]
    arrays = synthetic.synthetic_arrays(base["dataset"], base["image_size"], seed=0)
    providers, tmp = {}, tempfile.mkdtemp(prefix="throughput-")
    for pname, cfg in cfgs.items():
        os.makedirs(os.path.join(tmp, pname))
        tr = Trainer(cfg, os.path.join(tmp, pname))
        tr.model.train()
        providers[pname] = (tr.train_step, warm)
        t0 = time.perf_counter()
        tr.train_step()              # first call: compiles (--compile) or captures (graph)
        _sync(device)
        if pname == "driver-compile":
            print(f"  [{name}] compile of the step: {time.perf_counter() - t0:.1f} s", flush=True)
    usb = USBPipeline(base, arrays, b, device, args.workers, amp)
    providers["usb"] = (usb.step, warm + usb.prefetched)
    times = {p: [] for p in providers}
    for _ in range(args.rounds):
        for pname, (fn, w) in providers.items():
            for _ in range(w):
                fn()
            times[pname].append(_block(fn, steps, device))
    imgs = b * (1 + 2 * base["mu"])
    res = {"case": name, "preset": preset, "model": base["model"], "batch": b, "mu": base["mu"],
           "images_per_step": imgs, "steps": steps, "rounds": args.rounds, "providers": {}}
    for pname, ts in times.items():
        med = statistics.median(ts)
        res["providers"][pname] = {"step_s": med, "steps_per_s": 1 / med,
                                   "images_per_s": imgs / med, "rounds_s": ts}
    u = res["providers"]["usb"]["images_per_s"]
    for pname in cfgs:
        res["providers"][pname]["vs_usb"] = res["providers"][pname]["images_per_s"] / u
    return res


def check_graph(device: torch.device, steps: int = 6) -> float:
    """Largest parameter difference between `steps` eager and `steps` --cuda-graph steps of
    the fmnist CNN on synthetic data (same seed: same batches and views); raises if > 1e-4."""
    tmp = tempfile.mkdtemp(prefix="graph-check-")
    trs = []
    for name, graph in (("eager", False), ("graph", True)):
        cfg = driver_config("fmnist-lt", 64, str(device), False, False, graph)
        cfg.update(steps=100, warmup=640, cosine=True)       # a moving lr, refilled per replay
        os.makedirs(os.path.join(tmp, name))
        tr = Trainer(config_mod.validate(cfg), os.path.join(tmp, name))
        for _ in range(steps):
            tr.train_step()
        trs.append(tr)
    diff = max(float((a - b).abs().max()) for a, b in
               zip(trs[0].model.parameters(), trs[1].model.parameters()))
    prior = float((trs[0].crit.prior_ulb - trs[1].crit.prior_ulb).abs().max())
    print(f"cuda graph vs eager after {steps} steps: max |param diff| {diff:.2e}, "
          f"prior {prior:.2e}", flush=True)
    if not diff <= 1e-4 or not prior <= 1e-5:
        raise RuntimeError("the captured step differs from the eager step")
    return diff


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--cases", nargs="*", help="subset of the device's cases")
    ap.add_argument("--batch-size", type=int, help="labeled batch B (default per case)")
    ap.add_argument("--steps", type=int, help="timed steps per round (default per case)")
    ap.add_argument("--warmup", type=int, help="untimed steps per round (default per case)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="DataLoader workers of the usb pipeline (default min(4, cores))")
    ap.add_argument("--compile", action="store_true", help="also time the driver's --compile step")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time the driver's --cuda-graph step (GPU only)")
    ap.add_argument("--check-graph", action="store_true",
                    help="first check --cuda-graph steps against eager ones (GPU only)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        print("error: --cuda-graph: needs --device cuda", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no CUDA device", file=sys.stderr)
        return 2
    names = args.cases or list(CASES[device.type])
    for n in names:
        if n not in CASES[device.type]:
            print(f"error: --cases: {n!r} is not a {device.type} case ({list(CASES[device.type])})",
                  file=sys.stderr)
            return 2
    dev_text = (torch.cuda.get_device_name(device) if device.type == "cuda" else
                f"CPU ({platform.processor() or platform.machine()}), "
                f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print(f"device: {dev_text}; torch {torch.__version__}; usb workers: {args.workers}",
          flush=True)
    if args.check_graph:
        if device.type != "cuda":
            print("error: --check-graph: needs --device cuda", file=sys.stderr)
            return 2
        check_graph(device)
    results = []
    for n in names:
        res = run_case(n, device, args)
        results.append(res)
        print(f"\n{n}: {res['model']}, B = {res['batch']}, mu = {res['mu']} "
              f"({res['images_per_step']} images per step), median of {res['rounds']} rounds "
              f"of {res['steps']} steps")
        print(f"  {'provider':<16}{'step ms':>10}{'steps/s':>10}{'images/s':>11}{'vs usb':>9}")
        for pname, p in res["providers"].items():
            ratio = f"{p['vs_usb']:.2f}x" if "vs_usb" in p else "1.00x"
            print(f"  {pname:<16}{1e3 * p['step_s']:>10.1f}{p['steps_per_s']:>10.2f}"
                  f"{p['images_per_s']:>11.0f}{ratio:>9}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev_text, "torch": torch.__version__, "results": results}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
