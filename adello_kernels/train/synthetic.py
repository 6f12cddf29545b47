"""`--dataset synthetic`: random uint8 images in the shapes of a preset's dataset, for throughput
runs without any data on disk (docs/training.md, Large batches).

The arrays have the real dataset's image shape, channel count, class count and label layout
(balanced labels, so every split of the preset can be drawn; STL-10's unlabeled part carries
-1), and its real number of train images up to `max_train` (Small-ImageNet-127's 1.28 M images
would cost 3.9 / 15.7 GB of host memory for no change in the step's speed: the step gathers its
batch from the device-resident pool wherever the rows lie). Accuracy numbers of such a run mean
nothing; images/s and step times are those of the real shapes.
"""
from __future__ import annotations

import numpy as np

from .data import CIFAR10_CLASSES, FMNIST_CLASSES, STL10_CLASSES, Arrays

# dataset -> (channels, train images, test images, classes, labeled train images)
SHAPES = {
    "fmnist": (1, 60_000, 10_000, 10, None),
    "cifar10": (3, 50_000, 10_000, 10, None),
    "cifar100": (3, 50_000, 10_000, 100, None),
    "stl10": (3, 105_000, 8_000, 10, 5_000),
    "imagenet127": (3, 1_281_167, 50_000, 127, None),
}
SIZES = {"fmnist": 28, "cifar10": 32, "cifar100": 32, "stl10": 32}


def image_size(dataset: str, size: int | None) -> int:
    if dataset == "imagenet127":
        return 32 if size is None else int(size)
    return SIZES[dataset]


def synthetic_arrays(dataset: str, size: int | None = None, *, seed: int = 0,
                     max_train: int = 131_072, max_test: int = 10_000) -> Arrays:
    """Random images [N, C, H, W] uint8 and balanced labels in the shapes of `dataset`."""
    if dataset not in SHAPES:
        raise ValueError(f"--dataset synthetic: no shapes for dataset {dataset!r}; expected one "
                         f"of {tuple(SHAPES)}")
    c, n_train, n_test, classes, n_labeled = SHAPES[dataset]
    hw = image_size(dataset, size)
    n_train, n_test = min(n_train, max_train), min(n_test, max_test)
    rng = np.random.default_rng(seed)
    train_x = rng.integers(0, 256, (n_train, c, hw, hw), dtype=np.uint8)
    test_x = rng.integers(0, 256, (n_test, c, hw, hw), dtype=np.uint8)
    train_y = rng.permutation(np.arange(n_train, dtype=np.int64) % classes)
    if n_labeled is not None:
        n_labeled = min(n_labeled, n_train // 2)
        train_y[:n_labeled] = np.arange(n_labeled, dtype=np.int64) % classes
        train_y[n_labeled:] = -1
    test_y = np.arange(n_test, dtype=np.int64) % classes
    names = {"fmnist": list(FMNIST_CLASSES), "cifar10": list(CIFAR10_CLASSES),
             "stl10": list(STL10_CLASSES)}.get(dataset, [f"class {i}" for i in range(classes)])
    return Arrays(train_x, train_y, test_x, test_y, classes, names)
