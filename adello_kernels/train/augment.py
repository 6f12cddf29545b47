"""Batched weak and strong augmentation on the training device, plain torch (no torchvision).

    weak   = random horizontal flip + reflect-pad random crop (pad = size / 8: 4 px at 32 px)
    strong = an independent weak view + RandAugment(3, 5) + Cutout

RandAugment follows the FixMatch / USB variant the ADELLO code uses: 3 operations drawn with
replacement from the 14 below, each with a magnitude drawn uniformly from its range (the `5` of
RandAugment(3, 5) is unused by that variant), then Cutout with a square of side
U(0, 0.5) * width filled with grey 127. The operations mirror their PIL counterparts on 8-bit
images (values are kept as integers 0..255 in float32 between operations):

    AutoContrast, Brightness [0.05, 0.95], Color [0.05, 0.95], Contrast [0.05, 0.95], Equalize,
    Identity, Posterize [4, 8] bits, Rotate [-30, 30] deg, Sharpness [0.05, 0.95],
    ShearX / ShearY [-0.3, 0.3], Solarize [0, 256], TranslateX / TranslateY [-0.3, 0.3] x size
    (geometric ops: nearest-neighbour sampling, black outside the image, as PIL's defaults)

Random parameters are drawn per sample from one `torch.Generator` by `sample_weak` /
`sample_strong` and applied by `apply_weak` / `apply_strong`; splitting the two lets every DDP
rank draw the parameters of the global batch (identical on all ranks, cheap) and apply only its
own slice (`slice_params`), so K processes augment exactly like one.

On a CPU each operation runs on the subset of images that drew it; on an accelerator every
operation runs on the whole batch and `torch.where` keeps the drawn one (no data-dependent
shapes, no host sync). Both give the same images: every operation is per-image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

OPS = ("autocontrast", "brightness", "color", "contrast", "equalize", "identity", "posterize",
       "rotate", "sharpness", "shear_x", "shear_y", "solarize", "translate_x", "translate_y")
RANGES = {"brightness": (0.05, 0.95), "color": (0.05, 0.95), "contrast": (0.05, 0.95),
          "posterize": (4.0, 8.0), "rotate": (-30.0, 30.0), "sharpness": (0.05, 0.95),
          "shear_x": (-0.3, 0.3), "shear_y": (-0.3, 0.3), "solarize": (0.0, 256.0),
          "translate_x": (-0.3, 0.3), "translate_y": (-0.3, 0.3)}
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
NUM_OPS = 3
CUTOUT_MAX = 0.5
CUTOUT_FILL = 127.0


def crop_padding(size: int) -> int:
    """Reflect padding of the random crop: 4 px at 32 px (size / 8), 3 px at 28 px."""
    return max(1, size // 8)


# ------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------

def sample_weak(n: int, height: int, width: int, gen: torch.Generator) -> dict:
    """Per-sample flip and crop offsets for `n` images, drawn from `gen` (on its device)."""
    dev = gen.device
    pad = crop_padding(min(height, width))
    return {
        "flip": torch.rand(n, generator=gen, device=dev) < 0.5,
        "oy": torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev),
        "ox": torch.randint(0, 2 * pad + 1, (n,), generator=gen, device=dev),
    }


def sample_strong(n: int, height: int, width: int, gen: torch.Generator) -> dict:
    """Weak parameters plus NUM_OPS (op, magnitude in [0, 1]) pairs and a Cutout square."""
    dev = gen.device
    p = sample_weak(n, height, width, gen)
    p["ops"] = torch.randint(0, len(OPS), (n, NUM_OPS), generator=gen, device=dev)
    p["mag"] = torch.rand(n, NUM_OPS, generator=gen, device=dev)
    p["cut"] = torch.rand(n, 3, generator=gen, device=dev)  # side fraction, centre x, centre y
    return p


def slice_params(p: dict, lo: int, hi: int) -> dict:
    """The parameters of samples [lo, hi) (this rank's share of a global batch)."""
    return {k: v[lo:hi] for k, v in p.items()}


# ------------------------------------------------------------------------------------------
# Weak view
# ------------------------------------------------------------------------------------------

def _reflect(i: torch.Tensor, size: int) -> torch.Tensor:
    """Index i in [-size+1, 2 size-2] reflected into [0, size) (reflect padding, edge once)."""
    i = i.abs()
    return torch.where(i > size - 1, 2 * (size - 1) - i, i)


def apply_weak(x: torch.Tensor, p: dict) -> torch.Tensor:
    """Flip + reflect-pad crop of x [n, C, H, W] (any dtype; uint8 stays uint8) as one gather:
    the padding is never materialised, the crop's indices are reflected instead."""
    n, c, h, w = x.shape
    pad = crop_padding(min(h, w))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = _reflect(p["oy"][:, None] - pad + ar_h, h)                                # [n, H]
    # A flipped crop reads its columns right to left.
    cols = _reflect(p["ox"][:, None] - pad + torch.where(p["flip"][:, None], w - 1 - ar_w, ar_w),
                    w)                                                               # [n, W]
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)


# ------------------------------------------------------------------------------------------
# RandAugment operations on float32 images holding 8-bit values, x [m, C, H, W]
# ------------------------------------------------------------------------------------------

def _q(x: torch.Tensor) -> torch.Tensor:
    """Back to 8-bit values (PIL stores every intermediate image as uint8)."""
    return x.clamp(0.0, 255.0).round()


def _blend(degenerate: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PIL ImageEnhance / Image.blend: degenerate + v * (x - degenerate), truncated to an int
    and clipped to 0..255 as PIL does."""
    return (degenerate + v[:, None, None, None] * (x - degenerate)).trunc().clamp(0.0, 255.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL 'L' conversion (ITU-R 601-2 luma) as [m, 1, H, W]; a 1-channel image is its own."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1].double(), x[:, 1:2].double(), x[:, 2:3].double()
    # PIL's fixed-point form of 0.299 R + 0.587 G + 0.114 B, rounded (exact in float64).
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor().to(x.dtype)


def _autocontrast(x, v):
    """PIL ImageOps.autocontrast (no cutoff): lut[i] = int(i * scale - lo * scale), in float64
    like PIL, per channel; identity for a flat channel."""
    lo = x.amin((2, 3), keepdim=True).double()
    hi = x.amax((2, 3), keepdim=True).double()
    scale = 255.0 / (hi - lo).clamp_min(1.0)
    out = (x.double() * scale - lo * scale).trunc().clamp(0, 255).to(x.dtype)
    return torch.where(hi > lo, out, x)


def _brightness(x, v):
    return _blend(torch.zeros_like(x), x, v)


def _color(x, v):
    return _blend(_gray(x).expand_as(x), x, v)


def _contrast(x, v):
    mean = (_gray(x).mean((1, 2, 3), keepdim=True) + 0.5).floor()
    return _blend(mean.expand_as(x), x, v)


def _equalize(x, v):
    """PIL ImageOps.equalize per channel: lut[i] = (step // 2 + #pixels below i) // step with
    step = (#pixels - #pixels of the highest level present) // 255; identity when step = 0."""
    m, c, h, w = x.shape
    xi = x.to(torch.int64).view(m * c, h * w)
    # One flat 1-d scatter: deterministic under torch.use_deterministic_algorithms.
    offsets = (torch.arange(m * c, device=x.device) * 256)[:, None]
    hist = torch.zeros(m * c * 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(0, (xi + offsets).flatten(), torch.ones_like(xi).flatten())
    hist = hist.view(m * c, 256)
    top = 255 - (hist.flip(1) > 0).to(torch.int64).argmax(1)           # highest level present
    step = (h * w - hist.gather(1, top[:, None])) // 255                # [m*c, 1]
    below = hist.cumsum(1) - hist                                       # exclusive prefix sum
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=x.device))
    return lut.gather(1, xi).view(m, c, h, w).to(x.dtype)


def _identity(x, v):
    return x


def _posterize(x, v):
    shift = 2.0 ** (8 - v.floor().clamp(1, 8))                          # keep the top v bits
    return (x / shift[:, None, None, None]).floor() * shift[:, None, None, None]


def _sharpness(x, v):
    """PIL's SMOOTH filter (centre 5, neighbours 1, / 13) on the interior; borders unchanged."""
    m, c, h, w = x.shape
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    k = (k / 13.0).expand(c, 1, 3, 3)
    smooth = _q(F.conv2d(x, k, padding=1, groups=c))
    inner = torch.zeros(1, 1, h, w, dtype=torch.bool, device=x.device)
    inner[..., 1:-1, 1:-1] = True
    return _blend(torch.where(inner, smooth, x), x, v)


def _solarize(x, v):
    return torch.where(x < v[:, None, None, None], x, 255.0 - x)


_POINT_OPS = {"autocontrast": _autocontrast, "brightness": _brightness, "color": _color,
              "contrast": _contrast, "equalize": _equalize, "identity": _identity,
              "posterize": _posterize, "sharpness": _sharpness, "solarize": _solarize}


def _affine_matrices(op: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[m, 3, 3] output -> input maps in pixel coordinates (PIL's convention, pixel centres at
    i + 0.5) for the geometric ops; the identity where `op` is not geometric."""
    m = op.shape[0]
    eye = torch.eye(3, device=op.device, dtype=torch.float32).expand(m, 3, 3).clone()
    idx = {name: OPS.index(name) for name in GEOMETRIC}
    # Rotate about the centre, counter-clockwise on screen (y down): in = R (out - c) + c.
    rad = torch.deg2rad(v)
    cos, sin = torch.cos(rad), torch.sin(rad)
    cx, cy = w / 2.0, h / 2.0
    rot = eye.clone()
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 0, 2] = cos, -sin, cx - cos * cx + sin * cy
    rot[:, 1, 0], rot[:, 1, 1], rot[:, 1, 2] = sin, cos, cy - sin * cx - cos * cy
    # Shears about the top-left corner and translations by a fraction of the size, as PIL.
    shx, shy, tx, ty = eye.clone(), eye.clone(), eye.clone(), eye.clone()
    shx[:, 0, 1] = v
    shy[:, 1, 0] = v
    tx[:, 0, 2] = v * w
    ty[:, 1, 2] = v * h
    out = eye
    for name, mat in (("rotate", rot), ("shear_x", shx), ("shear_y", shy), ("translate_x", tx),
                      ("translate_y", ty)):
        out = torch.where((op == idx[name])[:, None, None], mat, out)
    return out


def _geometric(x: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
    """Warp x by per-image pixel-space maps with nearest sampling and black outside."""
    m, _, h, w = x.shape
    # The pixel-space map M = [[a, b, c], [d, e, f]] in affine_grid's normalised coordinates
    # (u = 2 X / w - 1, align_corners=False), written out so no constant crosses to the device.
    a, b, c = mats[:, 0, 0], mats[:, 0, 1], mats[:, 0, 2]
    d, e, f = mats[:, 1, 0], mats[:, 1, 1], mats[:, 1, 2]
    theta = torch.stack([
        torch.stack([a, b * (h / w), a + b * (h / w) + 2 * c / w - 1], 1),
        torch.stack([d * (w / h), e, d * (w / h) + e + 2 * f / h - 1], 1)], 1)
    grid = F.affine_grid(theta, [m, x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def _run_on(x: torch.Tensor, sel: torch.Tensor, fn, *args, subset: bool) -> torch.Tensor:
    """x with fn applied to the images where `sel` is true; args are per-image tensors."""
    if subset:
        idx = sel.nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        out = x.clone()
        out[idx] = fn(x[idx], *(a[idx] for a in args))
        return out
    return torch.where(sel[:, None, None, None], fn(x, *args), x)


def _magnitude(name: str, u: torch.Tensor) -> torch.Tensor:
    lo, hi = RANGES.get(name, (0.0, 1.0))
    return lo + (hi - lo) * u


def randaugment(x: torch.Tensor, ops: torch.Tensor, mag: torch.Tensor,
                subset: bool | None = None) -> torch.Tensor:
    """Apply ops[:, r] with magnitudes mag[:, r] (in [0, 1]) for r = 0..NUM_OPS-1 to the float
    8-bit-valued images x [m, C, H, W]. `subset` None: per-op subsets on a CPU, where() else."""
    if subset is None:
        subset = x.device.type == "cpu"
    h, w = x.shape[2:]
    for r in range(ops.shape[1]):
        op, u = ops[:, r], mag[:, r]
        # All five geometric ops in one grid_sample (per-image matrices).
        is_geo = torch.zeros_like(op, dtype=torch.bool)
        v_geo = torch.zeros_like(u)
        for name in GEOMETRIC:
            is_geo |= op == OPS.index(name)
            v_geo = torch.where(op == OPS.index(name), _magnitude(name, u), v_geo)
        mats = _affine_matrices(op, v_geo, h, w)
        x = _run_on(x, is_geo, _geometric, mats, subset=subset)
        for name, fn in _POINT_OPS.items():
            if name == "identity":
                continue
            x = _run_on(x, op == OPS.index(name), fn, _magnitude(name, u), subset=subset)
    return x


def cutout(x: torch.Tensor, cut: torch.Tensor) -> torch.Tensor:
    """Grey square of side U(0, 0.5) * width at a uniform centre, clipped to the image
    (cut [m, 3] = side fraction, centre x, centre y in [0, 1))."""
    _, _, h, w = x.shape
    side = cut[:, 0] * CUTOUT_MAX * w
    x0 = (cut[:, 1] * w - side / 2).clamp_min(0).floor()
    y0 = (cut[:, 2] * h - side / 2).clamp_min(0).floor()
    x1 = torch.minimum(x0 + side, torch.full_like(side, float(w))).floor()
    y1 = torch.minimum(y0 + side, torch.full_like(side, float(h))).floor()
    ys = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None]
    xs = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :]
    box = ((ys >= y0[:, None, None]) & (ys < y1[:, None, None])
           & (xs >= x0[:, None, None]) & (xs < x1[:, None, None]))
    return torch.where(box[:, None], torch.full_like(x, CUTOUT_FILL), x)


def apply_strong(x: torch.Tensor, p: dict, subset: bool | None = None) -> torch.Tensor:
    """Strong view of uint8 images x [n, C, H, W]: float32 [n, C, H, W] holding 0..255."""
    out = apply_weak(x, p).float()
    out = randaugment(out, p["ops"], p["mag"], subset=subset)
    return cutout(out, p["cut"])

