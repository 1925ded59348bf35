"""The synthetic dataset: shapes, determinism, balance, speed, and that a small net can learn it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kfcrun.data import DeviceBatches, Preprocessor, load_dataset
from kfcrun.data.synthetic import DEFAULTS
from kfcrun.errors import ConfigError

SMALL = {"num_train": 2000, "num_test": 500}


def test_default_shapes_match_cifar10() -> None:
    d = load_dataset("synthetic", None)
    assert d.train_images.shape == (DEFAULTS["num_train"], 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.test_images.shape == (DEFAULTS["num_test"], 3, 32, 32)
    assert d.train_labels.dtype == torch.int64 and d.num_classes == 10 and d.name == "synthetic"


def test_custom_shapes_and_balance() -> None:
    d = load_dataset(
        "synthetic",
        None,
        synthetic={"num_train": 103, "num_test": 20, "num_classes": 4, "channels": 1, "image_size": 8},
    )
    assert d.train_images.shape == (103, 1, 8, 8) and d.test_images.shape == (20, 1, 8, 8)
    assert d.train_labels.bincount().tolist() == [26, 26, 26, 25]  # 103 = 4 * 25 + 3
    assert d.test_labels.bincount().tolist() == [5, 5, 5, 5]
    assert d.classes == ("class0", "class1", "class2", "class3")


def test_deterministic_and_seeded() -> None:
    a = load_dataset("synthetic", None, synthetic=SMALL)
    b = load_dataset("synthetic", None, synthetic=SMALL)
    c = load_dataset("synthetic", None, synthetic={**SMALL, "seed": 1})
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images, c.train_images)
    # the test set does not depend on the training-set size
    d = load_dataset("synthetic", None, synthetic={**SMALL, "num_train": 100})
    assert torch.equal(a.test_images, d.test_images)


def test_fast() -> None:
    # CPU time of this process, not wall-clock: a loaded shared machine must not fail it.
    start = time.process_time()
    load_dataset("synthetic", None, synthetic=SMALL)
    assert time.process_time() - start < 1.0


def test_uses_the_pixel_range() -> None:
    x = load_dataset("synthetic", None, synthetic=SMALL).train_images.float()
    assert 110 < x.mean() < 146 and 50 < x.std() < 100  # centred at 128, noisy but not saturated


@pytest.mark.parametrize("bad", [{"num_train": 0}, {"colour": 3}, {"num_classes": 1}, {"seed": 1.5}])
def test_bad_parameters(bad: dict) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.synthetic"):
        load_dataset("synthetic", None, synthetic=bad)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny convolutions gain nothing from threads, and on a busy 2-core machine OpenMP threads
    spinning against other processes made this test 30x slower (measured: 109 s vs 3.5 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_learnable_by_a_small_conv_net() -> None:
    """150 SGD steps take the test error from chance (90 %) to well below it (measured: about 31 %)."""
    torch.manual_seed(0)
    d = load_dataset("synthetic", None, synthetic=SMALL)
    pre = Preprocessor.fit(d.train_images, mean="channel", std="channel")
    net = nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    batches = DeviceBatches(d.train_images, d.train_labels, 64, seed=0)
    for _ in range(150):
        x, y = next(batches)
        loss = F.cross_entropy(net(pre(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        error = (net(pre(d.test_images)).argmax(1) != d.test_labels).float().mean().item()
    assert error < 0.5, f"test error {error:.3f} after 150 steps; chance is 0.9"
