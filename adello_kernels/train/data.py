"""Datasets of the training driver: readers for the standard on-disk formats (no torchvision),
long-tailed labeled/unlabeled splits (docs/training.md), the device-resident dataset and its
sampler, and the optional downloads.

Readers return `Arrays`: uint8 images [N, C, H, W] and int64 labels (-1: no label, STL-10's
unlabeled part), for the train and test sets.

    fmnist       Fashion-MNIST idx files (train/t10k-{images-idx3,labels-idx1}-ubyte, .gz or not)
    cifar10      CIFAR-10 python pickles (cifar-10-batches-py/data_batch_1..5, test_batch)
    cifar100     CIFAR-100 python pickles (cifar-100-python/train, test; fine labels)
    stl10        STL-10 binary (stl10_binary/{train,test,unlabeled}_X.bin, *_y.bin), 96 -> 32 px
    imagenet127  Small-ImageNet-127 as written by `python -m adello_kernels.train.prepare`
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("fmnist", "cifar10", "cifar100", "stl10", "imagenet127")

# Per-channel mean / std of the training images, in 8-bit units.
MEAN_STD = {
    "fmnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4409, 0.4279, 0.3868), (0.2683, 0.2610, 0.2687)),
    "imagenet127": ((0.4810, 0.4575, 0.4078), (0.2605, 0.2533, 0.2683)),
}

FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                  "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship",
                 "truck")

# Official addresses and MD5 checksums of the archives (the ones torchvision verifies too).
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
DOWNLOADS = {
    "fmnist": [(FMNIST_URL + "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
               (FMNIST_URL + "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
               (FMNIST_URL + "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
               (FMNIST_URL + "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")],
    "cifar10": [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                 "c58f30108f718f92721af3b95e74349a")],
    "cifar100": [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                  "eb9058c3a382ffc7106e4002c42a8d85")],
    "stl10": [("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
               "91f7769df0f17e558f3565bffb0c7dfb")],
}


class DataError(RuntimeError):
    """A dataset is missing, malformed or too small for the requested split."""


@dataclass
class Arrays:
    train_x: np.ndarray   # [N, C, H, W] uint8 (may be a read-only memmap)
    train_y: np.ndarray   # [N] int64, -1 where unlabeled
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    class_names: list


# ------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------

def _find(root: str, names, subdirs=("",)) -> str | None:
    """The first existing root/subdir/name."""
    for sub in subdirs:
        for name in names:
            path = os.path.join(root, sub, name)
            if os.path.isfile(path):
                return path
    return None


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzipped): magic 0x0000 0x08 (uint8) ndim, big-endian int32 dims."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: the gzip stream is truncated or damaged ({exc}); download the "
                        "file again (or restore it)") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not a uint8 idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {tuple(dims)} but holds {data.size} bytes")
    return data.reshape(tuple(dims))


def read_fmnist(root: str) -> Arrays:
    subdirs = ("", "FashionMNIST/raw", "fashion-mnist", "fashion")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, tag in (("x", "images-idx3"), ("y", "labels-idx1")):
            base = f"{prefix}-{tag}-ubyte"
            path = _find(root, (base, base + ".gz"), subdirs)
            if path is None:
                raise DataError(
                    f"Fashion-MNIST: {base}[.gz] not found under {root!r}. Install it with "
                    "`apt-get install dataset-fashion-mnist` (files in "
                    "/usr/share/datasets/fashion-mnist), point --data-root at a directory "
                    "holding the four idx files, or add --download.")
            parts[split + kind] = read_idx(path)
    xs = {s: parts[s + "x"][:, None, :, :] for s in ("train", "test")}
    for s in ("train", "test"):
        if parts[s + "x"].ndim != 3 or parts[s + "y"].shape != (xs[s].shape[0],):
            raise DataError(f"Fashion-MNIST: {s} images {parts[s + 'x'].shape} and labels "
                            f"{parts[s + 'y'].shape} do not match")
    return Arrays(xs["train"], parts["trainy"].astype(np.int64), xs["test"],
                  parts["testy"].astype(np.int64), 10, list(FMNIST_CLASSES))


def _unpickle(path: str) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_images(d: dict, path: str) -> np.ndarray:
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected 'data' of shape [N, 3072], got {data.shape}")
    return data.reshape(-1, 3, 32, 32)


def read_cifar(root: str, num_classes: int) -> Arrays:
    if num_classes == 10:
        folder, train_files, test_files, key = ("cifar-10-batches-py",
                                                [f"data_batch_{i}" for i in range(1, 6)],
                                                ["test_batch"], "labels")
    else:
        folder, train_files, test_files, key = ("cifar-100-python", ["train"], ["test"],
                                                "fine_labels")
    out = {}
    for split, files in (("train", train_files), ("test", test_files)):
        xs, ys = [], []
        for name in files:
            path = _find(root, (name,), ("", folder))
            if path is None:
                raise DataError(f"CIFAR-{num_classes}: {folder}/{name} not found under {root!r}; "
                                "point --data-root at the directory holding the extracted "
                                f"{folder}/ folder, or add --download.")
            d = _unpickle(path)
            xs.append(_cifar_images(d, path))
            ys.append(np.asarray(d[key], dtype=np.int64))
        out[split] = (np.concatenate(xs), np.concatenate(ys))
    names = list(CIFAR10_CLASSES) if num_classes == 10 else [f"class {i}" for i in range(100)]
    meta = _find(root, ("meta",), ("", folder)) if num_classes == 100 else None
    if meta is not None:
        names = [n.decode() if isinstance(n, bytes) else n
                 for n in _unpickle(meta).get("fine_label_names", names)]
    return Arrays(*out["train"], *out["test"], num_classes, names)


def _resize_96_to_32(x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Area downsampling by 3 (3x3 means), rounded back to uint8, in chunks."""
    out = np.empty((x.shape[0], x.shape[1], 32, 32), dtype=np.uint8)
    for i in range(0, x.shape[0], chunk):
        t = torch.from_numpy(np.ascontiguousarray(x[i:i + chunk])).float()
        out[i:i + chunk] = F.avg_pool2d(t, 3).round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def _stl_images(path: str) -> np.ndarray:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise DataError(f"{path}: size {raw.size} is not a multiple of 3*96*96")
    # Stored column-major per image: [N, C, W, H]; transpose to rows first.
    return _resize_96_to_32(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2))


def read_stl10(root: str, with_unlabeled: bool = True) -> Arrays:
    paths = {}
    names = ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]
    if with_unlabeled:
        names.append("unlabeled_X.bin")
    for name in names:
        paths[name] = _find(root, (name,), ("", "stl10_binary"))
        if paths[name] is None:
            raise DataError(f"STL-10: stl10_binary/{name} not found under {root!r}; point "
                            "--data-root at the directory holding stl10_binary/, or add "
                            "--download.")
    tr_x, te_x = _stl_images(paths["train_X.bin"]), _stl_images(paths["test_X.bin"])
    tr_y = np.fromfile(paths["train_y.bin"], dtype=np.uint8).astype(np.int64) - 1  # 1-based
    te_y = np.fromfile(paths["test_y.bin"], dtype=np.uint8).astype(np.int64) - 1
    if tr_y.shape[0] != tr_x.shape[0] or te_y.shape[0] != te_x.shape[0]:
        raise DataError("STL-10: image and label counts differ")
    if with_unlabeled:
        un_x = _stl_images(paths["unlabeled_X.bin"])
        tr_x = np.concatenate([tr_x, un_x])
        tr_y = np.concatenate([tr_y, np.full(un_x.shape[0], -1, dtype=np.int64)])
    cls = _find(root, ("class_names.txt",), ("", "stl10_binary"))
    names = list(STL10_CLASSES)
    if cls is not None:
        with open(cls) as f:
            names = [line.strip() for line in f if line.strip()] or names
    return Arrays(tr_x, tr_y, te_x, te_y, 10, names)


def read_imagenet127(root: str, size: int | None = None) -> Arrays:
    meta_path = os.path.join(root, "meta.json")
    if not os.path.isfile(meta_path):
        raise DataError(f"ImageNet127: {meta_path} not found. Build the dataset first: "
                        "python -m adello_kernels.train.prepare imagenet127 --src "
                        "DIR_WITH_IMAGENET32_OR_64_PICKLES --dst " + root)
    with open(meta_path) as f:
        meta = json.load(f)
    if size is not None and meta.get("size") != size:
        raise DataError(f"ImageNet127: {root} holds {meta.get('size')} px images but the preset "
                        f"expects {size} px")
    arrays = {}
    for name in ("train_x", "train_y", "test_x", "test_y"):
        path = os.path.join(root, name + ".npy")
        if not os.path.isfile(path):
            raise DataError(f"ImageNet127: {path} missing (re-run the prepare step)")
        arrays[name] = np.load(path, mmap_mode="r")
    from .prepare import class127_names
    return Arrays(arrays["train_x"], np.asarray(arrays["train_y"], dtype=np.int64),
                  arrays["test_x"], np.asarray(arrays["test_y"], dtype=np.int64),
                  int(meta["num_classes"]), class127_names())


def read_dataset(name: str, root: str, *, image_size: int | None = None,
                 download: bool = False) -> Arrays:
    """The train/test arrays of dataset `name` under `root` (downloading it first if asked and
    missing)."""
    if name not in DATASETS:
        raise DataError(f"dataset: unknown dataset {name!r}; expected one of {DATASETS}")
    readers = {"fmnist": read_fmnist, "cifar10": lambda r: read_cifar(r, 10),
               "cifar100": lambda r: read_cifar(r, 100), "stl10": read_stl10,
               "imagenet127": lambda r: read_imagenet127(r, image_size)}
    try:
        arrays = readers[name](root)
    except DataError:
        if not download or name not in DOWNLOADS:
            raise
        fetch(name, root)
        arrays = readers[name](root)
    _check_labels(name, arrays)
    return arrays


def _check_labels(name: str, a: Arrays) -> None:
    for split, y in (("train", a.train_y), ("test", a.test_y)):
        if y.size and (y.max() >= a.num_classes or y.min() < -1 or
                       (split == "test" and y.min() < 0)):
            raise DataError(f"{name}: {split} labels outside [0, {a.num_classes})")


# ------------------------------------------------------------------------------------------
# Downloads
# ------------------------------------------------------------------------------------------

def _md5(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, root: str, timeout: float = 30.0) -> None:
    """Download dataset `name` from its official address into `root`, verify the MD5 and
    extract archives. Raises DataError with a clear message when offline or on a bad file."""
    os.makedirs(root, exist_ok=True)
    for url, md5 in DOWNLOADS[name]:
        dst = os.path.join(root, url.rsplit("/", 1)[1])
        if not (os.path.isfile(dst) and _md5(dst) == md5):
            tmp = dst + ".part"
            print(f"downloading {url} -> {dst}", flush=True)
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise DataError(
                    f"{name}: could not download {url} ({exc}). This machine seems to be "
                    f"offline or the address is blocked: fetch the file on a machine with "
                    f"network access (MD5 {md5}), put it into {root!r} and run again without "
                    "--download.") from None
            got = _md5(tmp)
            if got != md5:
                os.remove(tmp)
                raise DataError(f"{name}: {url} has MD5 {got}, expected {md5}; the download "
                                "is corrupt or the file changed upstream (removed it)")
            os.replace(tmp, dst)
        if dst.endswith(".tar.gz"):
            # The "data" filter (Python >= 3.12, backported to 3.10.12+) refuses unsafe paths.
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            with tarfile.open(dst, "r:gz") as tar:
                tar.extractall(root, **kw)


# ------------------------------------------------------------------------------------------
# Long-tailed splits (docs/training.md, Long-tailed splits)
# ------------------------------------------------------------------------------------------

def long_tail_counts(n1: int, gamma: float, num_classes: int) -> list[int]:
    """n_c = floor(N1 * g^(-c / (C-1))) for c < C-1 and n_{C-1} = floor(N1 / |g|); a negative
    g reverses the order (the tail first); g = 1 gives N1 for every class."""
    if gamma == 0 or not math.isfinite(gamma):
        raise ValueError(f"gamma: must be a finite non-zero number, got {gamma}")
    g = abs(gamma)
    if num_classes == 1:
        return [int(n1)]
    counts = [int(math.floor(n1 * g ** (-c / (num_classes - 1)))) for c in range(num_classes - 1)]
    counts.append(int(math.floor(n1 / g)))
    return counts[::-1] if gamma < 0 else counts


@dataclass
class Split:
    lb_idx: np.ndarray        # [L] indices into the train arrays: the labeled set
    ulb_idx: np.ndarray       # [U] the unlabeled pool (contains every labeled image)
    lb_counts: np.ndarray     # [C] labeled images per class
    ulb_counts: np.ndarray | None  # [C] pool images per class (None: labels unknown)
    seed: int

    @property
    def prior_lb(self) -> np.ndarray:
        return self.lb_counts / self.lb_counts.sum()

    @property
    def prior_ulb_true(self) -> np.ndarray | None:
        return None if self.ulb_counts is None else self.ulb_counts / self.ulb_counts.sum()

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.lb_idx, self.ulb_idx):
            h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def make_split(train_y: np.ndarray, num_classes: int, *, mode: str, seed: int, n1: int = 0,
               gamma_l: float = 1.0, m1: int = 0, gamma_u: float = 1.0,
               lb_fraction: float = 0.1) -> Split:
    """The labeled set and the unlabeled pool, deterministic in `seed`.

    mode 'long_tail' (CIFAR, Fashion-MNIST): per class c, after a seeded shuffle of its images,
        the first n_c (N1, gamma_l) are labeled and the next m_c (M1, gamma_u) are unlabeled;
        the pool is labeled + unlabeled (the released code adds the labeled images to it).
    mode 'stl10': labeled n_c (N1, gamma_l) from the labeled train images; the pool is every
        train image (all labeled ones and the unlabeled part, labels unknown).
    mode 'fraction' (ImageNet127): labeled floor(lb_fraction * count_c) (at least 1) per class;
        the pool is every train image, so it keeps the natural imbalance.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(train_y)
    labeled_classes = [np.flatnonzero(y == c) for c in range(num_classes)]
    lb, extra = [], []
    if mode == "long_tail":
        n_c = long_tail_counts(n1, gamma_l, num_classes)
        m_c = long_tail_counts(m1, gamma_u, num_classes)
    elif mode == "stl10":
        n_c = long_tail_counts(n1, gamma_l, num_classes)
        m_c = [0] * num_classes
    elif mode == "fraction":
        n_c = [max(1, int(math.floor(lb_fraction * len(i)))) for i in labeled_classes]
        m_c = [len(i) - n for i, n in zip(labeled_classes, n_c)]
    else:
        raise ValueError(f"split: unknown mode {mode!r}")
    for c, idx in enumerate(labeled_classes):
        need = n_c[c] + m_c[c]
        if need > len(idx):
            raise DataError(f"split: class {c} needs {n_c[c]} labeled + {m_c[c]} unlabeled "
                            f"images but the train set has only {len(idx)}; lower --n1/--m1")
        if n_c[c] == 0:
            raise DataError(f"split: class {c} gets no labeled image (N1={n1}, "
                            f"gamma_l={gamma_l}); raise --n1")
        idx = idx[rng.permutation(len(idx))]
        lb.append(idx[:n_c[c]])
        extra.append(idx[n_c[c]:need])
    lb_idx = np.concatenate(lb).astype(np.int64)
    lb_counts = np.asarray(n_c, dtype=np.float64)
    if mode == "stl10":
        ulb_idx = np.arange(len(y), dtype=np.int64)
        ulb_counts = None if (y < 0).any() else np.bincount(y, minlength=num_classes) * 1.0
    else:
        ulb_idx = np.concatenate([lb_idx, np.concatenate(extra).astype(np.int64)])
        ulb_counts = np.asarray([n + m for n, m in zip(n_c, m_c)], dtype=np.float64)
    return Split(lb_idx, ulb_idx, lb_counts, ulb_counts, seed)


# ------------------------------------------------------------------------------------------
# Device-resident data and sampling
# ------------------------------------------------------------------------------------------

class DeviceData:
    """The images of the pool and the test set as uint8 tensors on the training device.

    images [P, C, H, W] uint8 holds each image of the pool once (labeled images are part of
    it); lb_pos / ulb_pos index into it. labels [P] int64 (-1 unknown). mean / std
    [1, C, 1, 1] float32 in 8-bit units for `normalize`.
    """

    def __init__(self, arrays: Arrays, split: Split, device: torch.device, dataset: str,
                 chunk: int = 65536):
        pool = np.unique(split.ulb_idx)           # sorted; the labeled images are inside
        self.device = device
        h_train, h_test = hashlib.sha256(), hashlib.sha256()
        self.images = _to_device(arrays.train_x, pool, device, chunk, h_train)
        pool_labels = np.ascontiguousarray(np.asarray(arrays.train_y)[pool], dtype=np.int64)
        self.labels = torch.from_numpy(pool_labels).to(device)
        self.lb_pos = torch.from_numpy(np.searchsorted(pool, split.lb_idx)).to(device)
        self.ulb_pos = torch.from_numpy(np.searchsorted(pool, split.ulb_idx)).to(device)
        self.lb_labels = self.labels[self.lb_pos]
        self.ulb_labels = self.labels[self.ulb_pos]
        self.test_x = _to_device(arrays.test_x, None, device, chunk, h_test)
        test_y = np.ascontiguousarray(arrays.test_y, dtype=np.int64)
        self.test_y = torch.from_numpy(test_y).to(device)
        # What the run actually trains and evaluates on, hashed while it is copied anyway:
        # a resumed run refuses data that differs in any image, label or index.
        self.fingerprint = {
            "train_images": h_train.hexdigest()[:32],
            "train_labels": hashlib.sha256(pool_labels.tobytes()).hexdigest()[:32],
            "split": split.digest(),
            "test_images": h_test.hexdigest()[:32],
            "test_labels": hashlib.sha256(test_y.tobytes()).hexdigest()[:32],
            "shapes": {"train_images": list(self.images.shape),
                       "test_images": list(self.test_x.shape)},
        }
        mean, std = MEAN_STD[dataset]
        c = self.images.shape[1]
        if len(mean) != c:
            raise DataError(f"{dataset}: images have {c} channels, expected {len(mean)}")
        self.mean = torch.tensor(mean, device=device).view(1, c, 1, 1) * 255.0
        self.std = torch.tensor(std, device=device).view(1, c, 1, 1) * 255.0

    @property
    def image_shape(self) -> tuple:
        return tuple(self.images.shape[1:])

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 or 8-bit-valued float images -> normalised float32, channels_last."""
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def _to_device(x: np.ndarray, rows: np.ndarray | None, device: torch.device,
               chunk: int, hasher=None) -> torch.Tensor:
    """x[rows] as a uint8 tensor on `device`, copied in chunks (x may be a large memmap);
    `hasher` (hashlib) is fed every chunk's bytes on the way."""
    n = x.shape[0] if rows is None else len(rows)
    out = torch.empty((n,) + tuple(x.shape[1:]), dtype=torch.uint8, device=device)
    for i in range(0, n, chunk):
        part = x[i:i + chunk] if rows is None else x[rows[i:i + chunk]]
        part = np.require(part, np.uint8, ["C", "W"])
        if hasher is not None:
            hasher.update(part.tobytes())
        out[i:i + len(part)] = torch.from_numpy(part).to(device)
    return out


FINGERPRINT = "data_fingerprint.json"


def check_fingerprint(path: str, expected: dict, current: dict) -> None:
    """Raise DataError naming `path` and the parts of the data that changed."""
    diff = [k for k in sorted(set(expected) | set(current)) if expected.get(k) != current.get(k)]
    if diff:
        raise DataError(f"the data differs from the data this run started with ({path}): "
                        f"{', '.join(diff)} changed. Point --data-root at the original files, "
                        "or start a new run on the new data")


class DeviceSampler:
    """Endless epochs of random permutations of range(size), drawn on the device: each call
    returns the next `batch` positions (no host sync: the cursor is a host int). Every DDP rank
    holds an identical sampler (same seed) and takes its slice of the global batch."""

    def __init__(self, size: int, generator: torch.Generator):
        if size <= 0:
            raise DataError("sampler: empty index set")
        self.size = size
        self.gen = generator
        self.perm = torch.empty(0, dtype=torch.int64, device=generator.device)
        self.cursor = 0

    def next(self, batch: int) -> torch.Tensor:
        while self.perm.numel() - self.cursor < batch:
            fresh = torch.randperm(self.size, generator=self.gen, device=self.gen.device)
            self.perm = torch.cat([self.perm[self.cursor:], fresh])
            self.cursor = 0
        out = self.perm[self.cursor:self.cursor + batch]
        self.cursor += batch
        return out

    def state_dict(self) -> dict:
        return {"perm": self.perm.cpu(), "cursor": self.cursor, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"sampler: checkpoint has {state['size']} items, the data has "
                             f"{self.size}")
        self.perm = state["perm"].to(self.gen.device)
        self.cursor = int(state["cursor"])
