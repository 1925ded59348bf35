"""Preprocessor: the formula against hand computation, state round trip, devices, bad options."""

from __future__ import annotations

import pytest
import torch

from kfcrun.data import PAPER_PREPROCESSING, Preprocessor
from kfcrun.errors import ConfigError


@pytest.fixture
def images() -> torch.Tensor:
    """Three 2-channel 2x2 images with simple values, uint8 (N=3, C=2, H=2, W=2)."""
    return torch.tensor(
        [
            [[[0, 10], [20, 30]], [[100, 100], [100, 100]]],
            [[[30, 40], [50, 60]], [[110, 120], [130, 140]]],
            [[[60, 70], [80, 90]], [[120, 140], [160, 180]]],
        ],
        dtype=torch.uint8,
    )


def test_mean_image(images: torch.Tensor) -> None:
    pre = Preprocessor.fit(images)  # defaults: cuda-convnet's mean image, 0..255 scale
    mean_image = torch.tensor([[[30, 40], [50, 60]], [[110, 120], [130, 140]]], dtype=torch.float32)
    assert torch.equal(pre.mean, mean_image) and pre.std is None and pre.pixel_scale == 1.0
    out = pre(images)
    assert out.dtype == torch.float32
    assert torch.equal(out, images.float() - mean_image)
    assert torch.equal(out[1], torch.zeros(2, 2, 2))  # the second image is the mean image


def test_channel_mean_and_std_with_scale(images: torch.Tensor) -> None:
    pre = Preprocessor.fit(images, mean="channel", std="channel", pixel_scale=0.5)
    x = images.double() * 0.5
    mean = x.mean(dim=(0, 2, 3), keepdim=True)[0]  # (C, 1, 1)
    std = x.std(dim=(0, 2, 3), unbiased=False, keepdim=True)[0]
    assert torch.allclose(pre.mean.double(), mean) and torch.allclose(pre.std.double(), std)
    assert pre.mean.shape == (2, 1, 1) and pre.std.shape == (2, 1, 1)
    assert torch.allclose(pre(images).double(), (x - mean) / std, atol=1e-5)
    out = pre(images).double()
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(
        out.var(dim=(0, 2, 3), unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-5
    )


def test_no_mean_only_scale(images: torch.Tensor) -> None:
    pre = Preprocessor.fit(images, mean="none", pixel_scale=1 / 255)
    assert pre.mean is None and torch.allclose(pre(images), images.float() / 255)


def test_image_mean_with_channel_std(images: torch.Tensor) -> None:
    pre = Preprocessor.fit(images, mean="image", std="channel", pixel_scale=2.0)
    x = images.double() * 2
    want = (x - x.mean(dim=0)) / x.std(dim=(0, 2, 3), unbiased=False, keepdim=True)[0]
    assert torch.allclose(pre(images).double(), want, atol=1e-5)


def test_fit_chunks_agree_with_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    import kfcrun.data.preprocess as module

    x = torch.randint(0, 256, (37, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    whole = Preprocessor.fit(x, mean="image", std="channel")
    monkeypatch.setattr(module, "_FIT_CHUNK", 5)
    chunked = Preprocessor.fit(x, mean="image", std="channel")
    assert torch.allclose(whole.mean, chunked.mean) and torch.allclose(whole.std, chunked.std)


def test_state_dict_round_trip(images: torch.Tensor) -> None:
    pre = Preprocessor.fit(images, mean="channel", std="channel", pixel_scale=0.25)
    other = Preprocessor(None, None, 1.0)
    other.load_state_dict(pre.state_dict())
    assert torch.equal(other(images), pre(images))
    assert set(pre.state_dict()) == {"mean", "std", "pixel_scale"}


def test_to_returns_self(images: torch.Tensor) -> None:
    pre = Preprocessor.fit(images, mean="channel", std="channel")
    assert pre.to("cpu") is pre and pre(images).device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_follows_the_batch_device(images: torch.Tensor) -> None:
    pre = Preprocessor.fit(images, mean="image", std="channel")
    want = pre(images)
    out = pre(images.cuda())  # statistics move to the batch's device on first use
    assert out.device.type == "cuda" and pre.mean.device.type == "cuda" and pre.std.device.type == "cuda"
    assert torch.allclose(out.cpu(), want)
    assert pre.state_dict()["mean"].device.type == "cpu"


def test_rejects_bad_input(images: torch.Tensor) -> None:
    with pytest.raises(ConfigError, match="mean='pixel'"):
        Preprocessor.fit(images, mean="pixel")
    with pytest.raises(ConfigError, match="std='image'"):
        Preprocessor.fit(images, std="image")
    with pytest.raises(TypeError, match="uint8"):
        Preprocessor.fit(images)(images.float())


def test_paper_presets_are_valid(images: torch.Tensor) -> None:
    assert PAPER_PREPROCESSING["cifar10"] == {"mean": "image", "std": "none", "pixel_scale": 1.0}
    for preset in PAPER_PREPROCESSING.values():
        Preprocessor.fit(images, **preset)
