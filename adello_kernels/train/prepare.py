"""Dataset preparation.

    python -m adello_kernels.train.prepare imagenet127 --src DIR --dst DIR
        Small-ImageNet-127 from the Imagenet32 or Imagenet64 pickles (Chrabaszcz et al. 2017:
        train_data_batch_1..10 and val_data, each a pickled dict with 'data' [N, 3*S*S] uint8
        and 'labels' 1..1000; .npz copies work too). Labels are mapped 1000 -> 127 with the
        class map shipped in adello_kernels/train/data/imagenet127/ (see its README.md). Writes
        DST/{train_x,train_y,test_x,test_y}.npy ([N, 3, S, S] uint8 / int16, the val set as
        the test set) and DST/meta.json; the train images are streamed into a memory-mapped
        file, so the 64 px set (16 GB) needs no more RAM than one batch.

    python -m adello_kernels.train.prepare {fmnist,cifar10,cifar100,stl10} --dst DIR
        Download the dataset from its official address into DIR (MD5-checked, extracted).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import numpy as np

MAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "imagenet127")
NUM_CLASSES_127 = 127


def _read_tsv(name: str) -> list[dict]:
    with open(os.path.join(MAP_DIR, name)) as f:
        header = f.readline().rstrip("\n").split("\t")
        return [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f if line.strip()]


def class127_names() -> list[str]:
    rows = _read_tsv("classes127.tsv")
    return [r["name"] for r in sorted(rows, key=lambda r: int(r["index"]))]


def label_map_1000_to_127() -> np.ndarray:
    """[1001] int16: entry y (1-based ImageNet index in map_clsloc order) -> 127-class index;
    entry 0 is -1 (unused)."""
    table = np.full(1001, -1, dtype=np.int16)
    for r in _read_tsv("classes.tsv"):
        table[int(r["imagenet_index"])] = int(r["class127_index"])
    if (table[1:] < 0).any() or table.max() >= NUM_CLASSES_127:
        raise RuntimeError(f"{MAP_DIR}/classes.tsv: incomplete or invalid 1000 -> 127 map")
    return table


def _load_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    if path.endswith(".npz"):
        d = dict(np.load(path))
    else:
        from .data import _unpickle
        d = _unpickle(path)
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: 'data' {data.shape} and 'labels' {labels.shape} do not match")
    size = int(round((data.shape[1] / 3) ** 0.5))
    if 3 * size * size != data.shape[1]:
        raise ValueError(f"{path}: rows of {data.shape[1]} values are not 3*S*S images")
    if labels.min() < 1 or labels.max() > 1000:
        raise ValueError(f"{path}: labels must be 1-based ImageNet indices in [1, 1000]")
    return data.reshape(-1, 3, size, size), labels


def _batches(src: str, stem: str) -> list[str]:
    found = []
    for pattern in (stem, stem + ".npz", stem + "_*", "**/" + stem, "**/" + stem + ".npz",
                    "**/" + stem + "_*"):
        found += glob.glob(os.path.join(src, pattern), recursive=True)
    found = sorted({p for p in found if os.path.isfile(p)},
                   key=lambda p: (len(os.path.basename(p)), os.path.basename(p)))
    # train_data_batch_1.npz and train_data_batch_1 are the same batch: keep one of each.
    unique = {}
    for p in found:
        unique.setdefault(os.path.basename(p).removesuffix(".npz"), p)
    return list(unique.values())


def prepare_imagenet127(src: str, dst: str, log=print) -> dict:
    """Write Small-ImageNet-127 from the pickles under `src` into `dst`; returns meta.json."""
    train_files = _batches(src, "train_data_batch")
    val_files = _batches(src, "val_data")
    if not train_files or not val_files:
        raise FileNotFoundError(f"{src}: expected Imagenet32/64 pickles train_data_batch_1..10 "
                                f"and val_data (found {len(train_files)} train, "
                                f"{len(val_files)} val files)")
    table = label_map_1000_to_127()
    os.makedirs(dst, exist_ok=True)
    meta = {"num_classes": NUM_CLASSES_127, "source": os.path.abspath(src)}
    for split, files in (("train", train_files), ("test", val_files)):
        rows, size = 0, None
        for path in files:  # pass 1: sizes (the pickles hold no header to read them from)
            data, _ = _load_batch(path)
            if size is not None and data.shape[2] != size:
                raise ValueError(f"{path}: {data.shape[2]} px images mixed with {size} px ones")
            size = data.shape[2]
            rows += data.shape[0]
        if meta.setdefault("size", size) != size:
            raise ValueError(f"train images are {meta['size']} px but val images {size} px")
        tmp_x = os.path.join(dst, f".{split}_x.npy.tmp")
        x = np.lib.format.open_memmap(tmp_x, mode="w+", dtype=np.uint8,
                                      shape=(rows, 3, size, size))
        y = np.empty(rows, dtype=np.int16)
        at = 0
        for path in files:  # pass 2: copy
            data, labels = _load_batch(path)
            x[at:at + len(data)] = data
            y[at:at + len(data)] = table[labels]
            at += len(data)
            log(f"{split}: {at}/{rows} images ({os.path.basename(path)})")
        x.flush()
        del x
        os.replace(tmp_x, os.path.join(dst, f"{split}_x.npy"))
        np.save(os.path.join(dst, f"{split}_y.npy"), y)
        meta[f"{split}_images"] = rows
        meta[f"{split}_counts"] = np.bincount(y, minlength=NUM_CLASSES_127).tolist()
    counts = np.asarray(meta["train_counts"])
    meta["imbalance"] = float(counts.max() / max(1, counts[counts > 0].min()))
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    log(f"wrote {dst}: {meta['train_images']} train / {meta['test_images']} test images, "
        f"{meta['size']} px, train imbalance {meta['imbalance']:.0f}")
    return meta


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adello_kernels.train.prepare",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=("imagenet127", "fmnist", "cifar10", "cifar100", "stl10"))
    ap.add_argument("--src", help="imagenet127: directory with the Imagenet32/64 pickles")
    ap.add_argument("--dst", required=True, help="output directory")
    args = ap.parse_args(argv)
    from .data import DataError, fetch
    try:
        if args.dataset == "imagenet127":
            if not args.src:
                ap.error("imagenet127 needs --src")
            prepare_imagenet127(args.src, args.dst)
        else:
            fetch(args.dataset, args.dst)
            print(f"{args.dataset}: ready in {args.dst} (pass --data-root {args.dst})")
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
