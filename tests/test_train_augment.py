"""Batched augmentation (adello_kernels/train/augment.py): shapes and dtypes, determinism per
seed, the weak crop against explicit padding, and every RandAugment operation against its PIL
counterpart (Pillow comes with matplotlib), pixel for pixel."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adello_kernels.train import augment as A

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402


def _images(n=6, c=3, h=16, w=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    x[1] = x[1] // 4 + 60  # a low-contrast image (autocontrast / equalize have work to do)
    return torch.from_numpy(x)


def _pil(x: torch.Tensor, i: int) -> Image.Image:
    a = x[i].to(torch.uint8).numpy()
    return Image.fromarray(a[0]) if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0))


def _from_pil(im: Image.Image) -> np.ndarray:
    a = np.asarray(im).astype(np.float32)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


# ------------------------------------------------------------------------------------------
# weak view
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (7, 3, 32, 32), (3, 3, 64, 64)])
def test_weak_matches_explicit_reflect_pad_crop_flip(shape):
    n, c, h, w = shape
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    p = A.sample_weak(n, h, w, torch.Generator().manual_seed(3))
    out = A.apply_weak(x, p)
    assert out.shape == x.shape and out.dtype == torch.uint8
    pad = A.crop_padding(h)
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    for i in range(n):
        oy, ox = int(p["oy"][i]), int(p["ox"][i])
        crop = padded[i, :, oy:oy + h, ox:ox + w]
        if p["flip"][i]:
            crop = crop.flip(-1)
        assert torch.equal(out[i].float(), crop), i


def test_weak_identity_parameters_return_the_input():
    x = _images(4, 3, 32, 32)
    pad = A.crop_padding(32)
    p = {"flip": torch.zeros(4, dtype=torch.bool), "oy": torch.full((4,), pad),
         "ox": torch.full((4,), pad)}
    assert torch.equal(A.apply_weak(x, p), x)
    p["flip"][:] = True
    assert torch.equal(A.apply_weak(x, p), x.flip(-1))


def test_parameters_are_deterministic_per_seed_and_differ_across_seeds():
    x = _images(16, 3, 32, 32)
    outs = []
    for seed in (0, 0, 1):
        g = torch.Generator().manual_seed(seed)
        outs.append((A.apply_weak(x, A.sample_weak(16, 32, 32, g)),
                     A.apply_strong(x, A.sample_strong(16, 32, 32, g))))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])
    assert not torch.equal(outs[0][1], outs[2][1])


def test_slices_of_global_parameters_equal_the_global_batch():
    """What makes K DDP ranks augment like one process."""
    x = _images(8, 3, 32, 32)
    p = A.sample_strong(8, 32, 32, torch.Generator().manual_seed(5))
    full = A.apply_strong(x, p)
    halves = [A.apply_strong(x[lo:lo + 4], A.slice_params(p, lo, lo + 4)) for lo in (0, 4)]
    assert torch.equal(torch.cat(halves), full)


# ------------------------------------------------------------------------------------------
# strong view
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(9, 1, 28, 28), (9, 3, 32, 32)])
def test_strong_shape_dtype_and_8bit_values(shape):
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    out = A.apply_strong(x, A.sample_strong(shape[0], *shape[2:], torch.Generator().manual_seed(0)))
    assert out.shape == shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255 and torch.equal(out, out.round())


def test_subset_and_where_dispatch_give_identical_images():
    """CPU runs each op on the images that drew it, accelerators on all + where: same result."""
    x = _images(64, 3, 32, 32)
    p = A.sample_strong(64, 32, 32, torch.Generator().manual_seed(7))
    assert torch.equal(A.apply_strong(x, p, subset=True), A.apply_strong(x, p, subset=False))


def test_randaugment_draws_three_ops_from_all_fourteen():
    p = A.sample_strong(4000, 32, 32, torch.Generator().manual_seed(0))
    assert p["ops"].shape == (4000, 3)
    counts = torch.bincount(p["ops"].flatten(), minlength=len(A.OPS))
    assert len(A.OPS) == 14 and (counts > 700).all()  # ~857 each


def test_cutout_fills_a_grey_square_of_at_most_half_the_width():
    x = torch.zeros(200, 1, 32, 32)
    cut = torch.rand(200, 3, generator=torch.Generator().manual_seed(0))
    out = A.cutout(x, cut)
    filled = (out == A.CUTOUT_FILL).flatten(1).sum(1)
    assert filled.max() <= 16 * 16 and (filled > 0).float().mean() > 0.9
    rows = (out == A.CUTOUT_FILL).any(3).sum(2).flatten()
    cols = (out == A.CUTOUT_FILL).any(2).sum(2).flatten()
    assert torch.equal(filled, rows * cols)          # one axis-aligned rectangle
    assert torch.equal(A.cutout(x, torch.zeros(200, 3)), x)  # side 0: nothing


# ------------------------------------------------------------------------------------------
# each operation against PIL (the library the released code augments with)
# ------------------------------------------------------------------------------------------

PIL_POINT = {
    "autocontrast": lambda im, v: ImageOps.autocontrast(im),
    "equalize": lambda im, v: ImageOps.equalize(im),
    "posterize": lambda im, v: ImageOps.posterize(im, int(v)),
    "solarize": lambda im, v: ImageOps.solarize(im, v),
    "brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
}


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(PIL_POINT))
@pytest.mark.parametrize("u", [0.0, 0.37, 0.93])
def test_point_op_matches_pil(name, u, channels):
    x = _images(4, channels, 16, 16, seed=1)
    lo, hi = A.RANGES.get(name, (0.0, 1.0))
    v = lo + (hi - lo) * u
    ours = A._POINT_OPS[name](x.float(), torch.full((4,), v)).numpy()
    ref = np.stack([_from_pil(PIL_POINT[name](_pil(x, i), v)) for i in range(4)])
    np.testing.assert_array_equal(ours, ref)


def _pil_geometric(im, name, v):
    w, h = im.size
    matrix = {"shear_x": (1, v, 0, 0, 1, 0), "shear_y": (1, 0, 0, v, 1, 0),
              "translate_x": (1, 0, v * w, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, v * h)}
    if name == "rotate":
        return im.rotate(v)
    return im.transform(im.size, Image.AFFINE, matrix[name])


@pytest.mark.parametrize("name,v,max_frac", [
    ("rotate", 90.0, 0.0), ("rotate", -90.0, 0.0), ("rotate", 23.0, 0.02),
    ("shear_x", 0.27, 0.0), ("shear_y", -0.21, 0.0), ("translate_x", 0.25, 0.0),
    ("translate_y", -0.3, 0.0), ("translate_x", -0.13, 0.0)])
def test_geometric_op_matches_pil(name, v, max_frac):
    """Nearest sampling, black outside; arbitrary rotations may differ on a few boundary
    pixels (PIL rounds its fixed-point coordinates differently)."""
    x = _images(4, 3, 16, 16, seed=2)
    op = torch.full((4,), A.OPS.index(name))
    ours = A._geometric(x.float(), A._affine_matrices(op, torch.full((4,), v), 16, 16)).numpy()
    ref = np.stack([_from_pil(_pil_geometric(_pil(x, i), name, v)) for i in range(4)])
    assert np.mean(ours != ref) <= max_frac


def test_rotate_90_is_counter_clockwise():
    x = _images(2, 1, 8, 8).float()
    op = torch.full((2,), A.OPS.index("rotate"))
    out = A._geometric(x, A._affine_matrices(op, torch.full((2,), 90.0), 8, 8))
    assert torch.equal(out, torch.rot90(x, 1, dims=(2, 3)))


def test_randaugment_round_equals_the_drawn_pil_op():
    """A whole RandAugment pass (one op per image) against PIL, for every op at once."""
    n = len(A.OPS) * 2
    x = _images(n, 3, 16, 16, seed=4)
    ops = torch.arange(n)[:, None] % len(A.OPS)
    mag = torch.rand(n, 1, generator=torch.Generator().manual_seed(1))
    ours = A.randaugment(x.float(), ops, mag).numpy()
    for i in range(n):
        name = A.OPS[int(ops[i, 0])]
        lo, hi = A.RANGES.get(name, (0.0, 1.0))
        v = lo + (hi - lo) * float(mag[i, 0])
        if name == "identity":
            ref = x[i].float().numpy()
        elif name in A.GEOMETRIC:
            ref = _from_pil(_pil_geometric(_pil(x, i), name, v))
        else:
            ref = _from_pil(PIL_POINT[name](_pil(x, i), v))
        assert np.mean(ours[i] != ref) <= (0.02 if name == "rotate" else 0.0), name
