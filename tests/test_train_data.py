"""Dataset readers, long-tailed splits, device data and sampler, downloads, ImageNet127
preparation (adello_kernels/train/data.py, prepare.py). Every reader is fed a tiny fake dataset
written in the real on-disk format (CIFAR python pickles, STL-10 binary, Imagenet32 pickles,
Fashion-MNIST idx with and without gzip)."""
import gzip
import json
import math
import os
import pickle
import struct
import urllib.error

import numpy as np
import pytest
import torch

from adello_kernels.train import data as D
from adello_kernels.train import prepare as P

# ------------------------------------------------------------------------------------------
# Fake datasets in the real formats (also used by test_train_e2e.py)
# ------------------------------------------------------------------------------------------


def _idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(">" + "i" * a.ndim, *a.shape) + \
        a.astype(np.uint8).tobytes()


def fake_images(n, c, h, w, labels, seed=0):
    """Noisy images whose mean brightness encodes the label (so a model can learn it)."""
    rng = np.random.default_rng(seed)
    base = (np.asarray(labels)[:, None, None, None] * 23 + 20).astype(np.int64)
    return np.clip(base + rng.integers(-15, 16, (n, c, h, w)), 0, 255).astype(np.uint8)


def write_fmnist(root, per_class_train=60, per_class_test=10, gz=True, seed=0):
    """Fashion-MNIST idx files; returns (train_x, train_y, test_x, test_y) as written."""
    os.makedirs(root, exist_ok=True)
    out = []
    for prefix, per in (("train", per_class_train), ("t10k", per_class_test)):
        y = np.tile(np.arange(10), per).astype(np.uint8)
        x = fake_images(len(y), 1, 28, 28, y, seed=seed + len(prefix))[:, 0]
        for tag, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = os.path.join(root, f"{prefix}-{tag}-ubyte")
            if gz:
                with gzip.open(name + ".gz", "wb") as f:
                    f.write(_idx_bytes(arr))
            else:
                with open(name, "wb") as f:
                    f.write(_idx_bytes(arr))
        out += [x, y]
    return out


def write_cifar(root, num_classes, per_class=8, seed=0):
    """CIFAR-10 (5 train batches + test_batch) or CIFAR-100 (train, test, meta) pickles with
    bytes keys, as the official python-version files."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    y = np.tile(np.arange(num_classes), per_class)
    data = rng.integers(0, 256, (len(y), 3072), dtype=np.uint8)
    y_test = np.arange(num_classes).repeat(2)
    data_test = rng.integers(0, 256, (len(y_test), 3072), dtype=np.uint8)
    if num_classes == 10:
        parts = np.array_split(np.arange(len(y)), 5)
        for i, idx in enumerate(parts, 1):
            with open(os.path.join(folder, f"data_batch_{i}"), "wb") as f:
                pickle.dump({b"data": data[idx], key: y[idx].tolist()}, f, protocol=2)
        test_name = "test_batch"
    else:
        with open(os.path.join(folder, "train"), "wb") as f:
            pickle.dump({b"data": data, key: y.tolist(), b"coarse_labels": (y // 5).tolist()}, f,
                        protocol=2)
        with open(os.path.join(folder, "meta"), "wb") as f:
            pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(num_classes)]}, f,
                        protocol=2)
        test_name = "test"
    with open(os.path.join(folder, test_name), "wb") as f:
        pickle.dump({b"data": data_test, key: y_test.tolist()}, f, protocol=2)
    return data, y, data_test, y_test


def _stl_pattern(n, seed):
    """[n, 3, 32, 32] target images; the 96 px versions repeat each pixel over a 3x3 block, so
    the area downsampling must give the target back exactly."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    return small, small.repeat(3, axis=2).repeat(3, axis=3)


def write_stl10(root, per_class=6, n_unlabeled=25, seed=0):
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n in (("train", per_class * 10), ("test", 20), ("unlabeled", n_unlabeled)):
        small, big = _stl_pattern(n, seed + len(split))
        # STL-10 stores each image column-major: [N, C, W, H].
        big.transpose(0, 1, 3, 2).astype(np.uint8).tofile(os.path.join(folder, f"{split}_X.bin"))
        out[split + "_x"] = small
        if split != "unlabeled":
            y = np.tile(np.arange(10), n // 10).astype(np.uint8)
            (y + 1).tofile(os.path.join(folder, f"{split}_y.bin"))   # 1-based on disk
            out[split + "_y"] = y
    return out


def write_imagenet32(root, size=32, n_per_batch=30, n_val=20, seed=0):
    """Imagenet32-format pickles (train_data_batch_1, _2, val_data): 'data' [N, 3*S*S] uint8,
    'labels' 1-based ImageNet indices, 'mean'."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    written = {}
    for name, n in (("train_data_batch_1", n_per_batch), ("train_data_batch_2", n_per_batch),
                    ("val_data", n_val)):
        data = rng.integers(0, 256, (n, 3 * size * size), dtype=np.uint8)
        labels = rng.integers(1, 1001, n).tolist()
        d = {"data": data, "labels": labels}
        if name != "val_data":
            d["mean"] = data.mean(0)
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump(d, f)
        written[name] = (data, labels)
    return written


# ------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_fmnist_idx_reader(tmp_path, gz):
    tx, ty, sx, sy = write_fmnist(str(tmp_path), 4, 2, gz=gz)
    a = D.read_dataset("fmnist", str(tmp_path))
    assert a.train_x.shape == (40, 1, 28, 28) and a.train_x.dtype == np.uint8
    assert a.test_x.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(a.train_x[:, 0], tx)
    np.testing.assert_array_equal(a.train_y, ty)
    np.testing.assert_array_equal(a.test_y, sy)
    assert a.num_classes == 10 and len(a.class_names) == 10


def test_fmnist_real_files_if_installed():
    root = "/usr/share/datasets/fashion-mnist"
    if not os.path.isdir(root):
        pytest.skip("dataset-fashion-mnist is not installed")
    a = D.read_fmnist(root)
    assert a.train_x.shape == (60000, 1, 28, 28) and a.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(a.train_y).tolist() == [6000] * 10


def test_fmnist_missing_files_explain_how_to_get_them(tmp_path):
    with pytest.raises(D.DataError, match="dataset-fashion-mnist"):
        D.read_dataset("fmnist", str(tmp_path))


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_pickle_reader(tmp_path, num_classes):
    data, y, data_test, y_test = write_cifar(str(tmp_path), num_classes, per_class=2)
    a = D.read_dataset(f"cifar{num_classes}", str(tmp_path))
    assert a.train_x.shape == (len(y), 3, 32, 32) and a.train_x.dtype == np.uint8
    np.testing.assert_array_equal(a.train_y, y)
    np.testing.assert_array_equal(a.test_y, y_test)
    # row layout: 1024 red values, 1024 green, 1024 blue, each row-major
    i, c, r, col = 3, 2, 5, 17
    assert a.train_x[i, c, r, col] == data[i, c * 1024 + r * 32 + col]
    assert a.test_x[1, 0, 31, 0] == data_test[1, 31 * 32]
    if num_classes == 100:
        assert a.class_names[7] == "c7"


def test_stl10_binary_reader_transposes_and_downsamples(tmp_path):
    w = write_stl10(str(tmp_path))
    a = D.read_dataset("stl10", str(tmp_path))
    assert a.train_x.shape == (60 + 25, 3, 32, 32)
    np.testing.assert_array_equal(a.train_x[:60], w["train_x"])
    np.testing.assert_array_equal(a.train_x[60:], w["unlabeled_x"])
    np.testing.assert_array_equal(a.test_x, w["test_x"])
    np.testing.assert_array_equal(a.train_y[:60], w["train_y"])       # 1-based on disk
    assert (a.train_y[60:] == -1).all()                               # unlabeled part


def test_imagenet127_prepare_maps_labels_and_reader_loads(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    written = write_imagenet32(src)
    P.prepare_imagenet127(src, dst, log=lambda *a: None)
    # the class map read here independently of prepare.py
    with open(os.path.join(P.MAP_DIR, "classes.tsv")) as f:
        rows = [line.rstrip("\n").split("\t") for line in f][1:]
    to127 = {int(r[0]): int(r[2]) for r in rows}
    assert len(to127) == 1000 and set(to127.values()) == set(range(127))
    a = D.read_dataset("imagenet127", dst, image_size=32)
    train_data = np.concatenate([written["train_data_batch_1"][0],
                                 written["train_data_batch_2"][0]])
    train_labels = written["train_data_batch_1"][1] + written["train_data_batch_2"][1]
    assert a.train_x.shape == (60, 3, 32, 32) and a.test_x.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(a.train_x.reshape(60, -1), train_data)
    assert a.train_y.tolist() == [to127[y] for y in train_labels]
    assert a.test_y.tolist() == [to127[y] for y in written["val_data"][1]]
    assert a.num_classes == 127 and len(a.class_names) == 127
    meta = json.load(open(os.path.join(dst, "meta.json")))
    assert meta["size"] == 32 and meta["train_images"] == 60
    with pytest.raises(D.DataError, match="64 px"):
        D.read_dataset("imagenet127", dst, image_size=64)


def test_imagenet127_prepare_cli_errors_without_pickles(tmp_path, capsys):
    assert P.main(["imagenet127", "--src", str(tmp_path), "--dst", str(tmp_path / "o")]) == 1
    assert "train_data_batch" in capsys.readouterr().err


def test_imagenet127_reader_without_prepare_says_how(tmp_path):
    with pytest.raises(D.DataError, match="adello_kernels.train.prepare imagenet127"):
        D.read_dataset("imagenet127", str(tmp_path), image_size=32)


# ------------------------------------------------------------------------------------------
# Downloads (no network is used: urlopen is replaced)
# ------------------------------------------------------------------------------------------

def test_download_offline_gives_a_clear_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(D.urllib.request, "urlopen", offline)
    with pytest.raises(D.DataError, match="offline") as info:
        D.read_dataset("cifar10", str(tmp_path), download=True)
    assert "cifar-10-python.tar.gz" in str(info.value) and "c58f30108f718f92721af3b95e74349a" \
        in str(info.value)
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


def test_download_rejects_a_bad_checksum(tmp_path, monkeypatch):
    import io

    class Fake(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda *a, **k: Fake(b"not the data"))
    with pytest.raises(D.DataError, match="MD5"):
        D.fetch("fmnist", str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_download_verifies_and_uses_a_good_file(tmp_path, monkeypatch):
    """With the expected checksum patched to the fake file's, the files land and load."""
    src = tmp_path / "src"
    write_fmnist(str(src), 2, 1, gz=True)
    files = sorted(os.listdir(src))
    table = []
    for url, _ in D.DOWNLOADS["fmnist"]:
        name = url.rsplit("/", 1)[1]
        table.append((url, D._md5(str(src / name))))
    monkeypatch.setitem(D.DOWNLOADS, "fmnist", table)
    monkeypatch.setattr(D.urllib.request, "urlopen",
                        lambda url, timeout: open(src / url.rsplit("/", 1)[1], "rb"))
    dst = tmp_path / "dst"
    a = D.read_dataset("fmnist", str(dst), download=True)
    assert sorted(os.listdir(dst)) == files and a.train_x.shape == (20, 1, 28, 28)


# ------------------------------------------------------------------------------------------
# Long-tailed splits (docs/training.md, Long-tailed splits)
# ------------------------------------------------------------------------------------------

def test_long_tail_counts_hand_computed():
    # 1000 * 10**(-1/2) = 316.2; the last class floor(1000 / 10)
    assert D.long_tail_counts(1000, 10, 3) == [1000, 316, 100]
    assert D.long_tail_counts(1000, -10, 3) == [100, 316, 1000]
    assert D.long_tail_counts(7, 1, 4) == [7, 7, 7, 7]
    assert D.long_tail_counts(150, 1, 100) == [150] * 100


@pytest.mark.parametrize("n1,gamma,c", [(500, 100, 10), (1500, 150, 10), (150, 50, 100),
                                        (4000, -100, 10), (300, -50, 100), (450, 20, 10)])
def test_long_tail_counts_formula(n1, gamma, c):
    g = abs(gamma)
    want = [math.floor(n1 * g ** (-k / (c - 1))) for k in range(c - 1)] + [math.floor(n1 / g)]
    if gamma < 0:
        want = want[::-1]
    got = D.long_tail_counts(n1, gamma, c)
    assert got == want
    head, tail = (got[0], got[-1]) if gamma > 0 else (got[-1], got[0])
    assert head == n1 and tail == math.floor(n1 / g)
    assert all(a >= b for a, b in zip(got, got[1:])) == (gamma > 0)


@pytest.mark.parametrize("gamma_u", [100.0, 1.0, -100.0])
def test_long_tail_split_counts_and_membership(gamma_u):
    y = np.tile(np.arange(10), 5000)                 # 5000 images per class, like CIFAR-10
    s = D.make_split(y, 10, mode="long_tail", seed=3, n1=500, gamma_l=100, m1=4000,
                     gamma_u=gamma_u)
    n_c = D.long_tail_counts(500, 100, 10)
    m_c = D.long_tail_counts(4000, gamma_u, 10)
    assert np.bincount(y[s.lb_idx], minlength=10).tolist() == n_c
    assert np.bincount(y[s.ulb_idx], minlength=10).tolist() == [a + b for a, b in zip(n_c, m_c)]
    assert s.lb_counts.tolist() == n_c
    np.testing.assert_allclose(s.prior_ulb_true, np.add(n_c, m_c) / sum(n_c + m_c))
    assert set(s.lb_idx) <= set(s.ulb_idx)            # labeled images are in the pool
    assert len(set(s.ulb_idx)) == len(s.ulb_idx)      # no image twice
    if gamma_u == 1.0:
        assert len(set(m_c)) == 1


def test_split_is_deterministic_per_seed():
    y = np.tile(np.arange(10), 600)
    a = D.make_split(y, 10, mode="long_tail", seed=0, n1=50, gamma_l=10, m1=400, gamma_u=10)
    b = D.make_split(y, 10, mode="long_tail", seed=0, n1=50, gamma_l=10, m1=400, gamma_u=10)
    c = D.make_split(y, 10, mode="long_tail", seed=1, n1=50, gamma_l=10, m1=400, gamma_u=10)
    np.testing.assert_array_equal(a.lb_idx, b.lb_idx)
    np.testing.assert_array_equal(a.ulb_idx, b.ulb_idx)
    assert a.digest() == b.digest() != c.digest()
    assert not np.array_equal(np.sort(a.lb_idx), np.sort(c.lb_idx))


def test_split_too_large_for_the_data_is_an_error():
    y = np.tile(np.arange(10), 100)
    with pytest.raises(D.DataError, match="lower --n1/--m1"):
        D.make_split(y, 10, mode="long_tail", seed=0, n1=50, gamma_l=10, m1=60, gamma_u=10)


def test_stl10_and_fraction_splits():
    y = np.concatenate([np.tile(np.arange(10), 50), np.full(300, -1)])
    s = D.make_split(y, 10, mode="stl10", seed=0, n1=40, gamma_l=10)
    assert np.bincount(y[s.lb_idx], minlength=10).tolist() == D.long_tail_counts(40, 10, 10)
    assert len(s.ulb_idx) == len(y) and s.ulb_counts is None and s.prior_ulb_true is None
    natural = np.repeat(np.arange(5), [400, 100, 40, 15, 3])
    f = D.make_split(natural, 5, mode="fraction", seed=0, lb_fraction=0.1)
    assert f.lb_counts.tolist() == [40, 10, 4, 1, 1]
    assert f.ulb_counts.tolist() == [400, 100, 40, 15, 3] and len(f.ulb_idx) == len(natural)


# ------------------------------------------------------------------------------------------
# Device data and sampler
# ------------------------------------------------------------------------------------------

def test_device_data_holds_the_split_images(tmp_path):
    tx, ty, sx, sy = write_fmnist(str(tmp_path), 30, 3)
    a = D.read_dataset("fmnist", str(tmp_path))
    s = D.make_split(a.train_y, 10, mode="long_tail", seed=0, n1=10, gamma_l=10, m1=15,
                     gamma_u=10)
    d = D.DeviceData(a, s, torch.device("cpu"), "fmnist")
    assert d.images.dtype == torch.uint8 and d.image_shape == (1, 28, 28)
    assert d.images.shape[0] == len(s.ulb_idx)              # each pool image stored once
    np.testing.assert_array_equal(d.images[d.lb_pos].numpy()[:, 0], tx[s.lb_idx])
    np.testing.assert_array_equal(d.images[d.ulb_pos].numpy()[:, 0], tx[s.ulb_idx])
    np.testing.assert_array_equal(d.lb_labels.numpy(), ty[s.lb_idx])
    x = d.normalize(d.images[:4])
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


def test_sampler_epochs_are_permutations_and_state_round_trips():
    g = torch.Generator().manual_seed(0)
    s = D.DeviceSampler(10, g)
    first = torch.cat([s.next(4) for _ in range(5)])          # 20 draws = 2 epochs
    assert sorted(first[:10].tolist()) == list(range(10))
    assert sorted(first[10:].tolist()) == list(range(10))
    state, gstate = s.state_dict(), g.get_state()
    after = [s.next(3) for _ in range(4)]
    g2 = torch.Generator()
    g2.set_state(gstate)
    s2 = D.DeviceSampler(10, g2)
    s2.load_state_dict(state)
    assert all(torch.equal(a, s2.next(3)) for a in after)
    big = D.DeviceSampler(3, torch.Generator().manual_seed(1)).next(7)   # batch > size
    assert big.shape == (7,) and set(big.tolist()) == {0, 1, 2}
