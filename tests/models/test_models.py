"""The paper's networks: parameter counts, shapes, rnorm and pooling against their definitions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfcrun.models import CudaConvnetCifar10, SpatialResponseNorm, SrivastavaSVHNNet, build_model


def conv_params(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def test_cuda_convnet_parameter_count_and_shape():
    model = CudaConvnetCifar10()
    expected = conv_params(3, 32, 5) + conv_params(32, 32, 5) + conv_params(32, 64, 5) + (1024 * 10 + 10)
    assert sum(p.numel() for p in model.parameters()) == expected == 89_578
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert model.fc10.in_features == 64 * 4 * 4


def test_cuda_convnet_feature_map_sizes_round_up():
    model = CudaConvnetCifar10()
    sizes = {}
    for name in ("pool1", "pool2", "pool3"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, name=name: sizes.__setitem__(name, o.shape[-1])
        )
    model(torch.randn(1, 3, 32, 32))
    assert sizes == {"pool1": 16, "pool2": 8, "pool3": 4}


def test_cuda_convnet_layer_order_and_pooling_kinds():
    model = CudaConvnetCifar10()
    assert isinstance(model.pool1, nn.MaxPool2d)
    assert isinstance(model.pool2, nn.AvgPool2d) and isinstance(model.pool3, nn.AvgPool2d)
    # conv1 has no neuron of its own: ReLU comes after pool1 (layers-18pct.cfg)
    x = torch.randn(2, 3, 32, 32)
    manual = model.rnorm1(torch.relu(model.pool1(model.conv1(x))))
    manual = model.rnorm2(model.pool2(torch.relu(model.conv2(manual))))
    manual = model.pool3(torch.relu(model.conv3(manual)))
    torch.testing.assert_close(model(x), model.fc10(manual.flatten(1)))


def test_cuda_convnet_init_matches_layer_params():
    torch.manual_seed(0)
    model = CudaConvnetCifar10()
    assert model.conv1.weight.std().item() == pytest.approx(1e-4, rel=0.05)
    for name in ("conv2", "conv3", "fc10"):
        assert getattr(model, name).weight.std().item() == pytest.approx(1e-2, rel=0.05)
        assert getattr(model, name).bias.abs().max().item() == 0.0


def test_batch_norm_variant_drops_conv_biases():
    model = CudaConvnetCifar10(batch_norm=True)
    assert all(getattr(model, f"conv{i}").bias is None for i in (1, 2, 3))
    assert model.fc10.bias is not None
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters())
    assert bn == 2 * (32 + 32 + 64)
    assert sum(p.numel() for p in model.parameters()) == 89_578 - (32 + 32 + 64) + bn


@pytest.mark.parametrize("pooling, kinds", [("max", nn.MaxPool2d), ("avg", nn.AvgPool2d)])
def test_pooling_switch_applies_everywhere(pooling, kinds):
    for model in (CudaConvnetCifar10(pooling=pooling), SrivastavaSVHNNet(pooling=pooling)):
        pools = [m for n, m in model.named_modules() if n.startswith("pool")]
        assert len(pools) == 3 and all(isinstance(p, kinds) for p in pools)


def test_svhn_net_parameter_count_shape_and_dropout():
    model = SrivastavaSVHNNet()
    expected = (
        conv_params(3, 96, 5)
        + conv_params(96, 128, 5)
        + conv_params(128, 256, 5)
        + (4096 * 2048 + 2048)
        + (2048 * 2048 + 2048)
        + (2048 * 10 + 10)
    )
    assert sum(p.numel() for p in model.parameters()) == expected == 13_741_578
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    keep = [1 - m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    assert keep == pytest.approx([0.9, 0.75, 0.75, 0.5, 0.5, 0.5])
    assert not any(isinstance(m, nn.Dropout) for m in SrivastavaSVHNNet(dropout=False).modules())


def test_spatial_response_norm_matches_definition():
    torch.manual_seed(1)
    u = torch.randn(2, 3, 6, 5, dtype=torch.float64) * 40
    size, scale, power = 3, 5e-5, 0.75
    out = SpatialResponseNorm(size, scale, power)(u)
    expected = torch.empty_like(u)
    for n in range(2):
        for c in range(3):
            for y in range(6):
                for x in range(5):
                    window = u[n, c, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
                    denom = (1 + scale / size**2 * (window**2).sum()) ** power
                    expected[n, c, y, x] = u[n, c, y, x] / denom
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_average_pool_divides_by_in_image_pixels_at_the_border():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    pool = CudaConvnetCifar10(pooling="avg").pool1
    out = pool(x)
    assert out.shape[-1] == 2  # ceil((4 - 3) / 2) + 1
    # the last window covers rows/cols 2..3 only (clipped): mean of those 4 pixels
    assert out[0, 0, 1, 1].item() == pytest.approx(x[0, 0, 2:, 2:].mean().item())


def test_build_model_by_name():
    assert isinstance(build_model("cuda_convnet"), CudaConvnetCifar10)
    assert isinstance(build_model("srivastava_svhn", dropout=False), SrivastavaSVHNNet)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")
