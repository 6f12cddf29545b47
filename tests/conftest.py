import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/utils.py


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_torch_globals():
    """In-process training runs set the deterministic flag and seed the global RNG: undo both,
    so no test depends on the order the suite runs in."""
    flag, rng = torch.are_deterministic_algorithms_enabled(), torch.get_rng_state()
    yield
    torch.use_deterministic_algorithms(flag)
    torch.set_rng_state(rng)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A small Fashion-MNIST in its real idx format (60 train / 10 test images per class), for
    the trainer tests."""
    from test_train_data import write_fmnist
    root = tmp_path_factory.mktemp("fmnist")
    write_fmnist(str(root), per_class_train=60, per_class_test=10)
    return root
