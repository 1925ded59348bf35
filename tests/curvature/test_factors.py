"""batch_factors vs brute-force oracles (Eqn 32), and its lack of side effects."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kfcrun.curvature import UnsupportedLayerError, batch_factors, batch_factors_for_loss, make_block, nll_sum
from tests.helpers.nets import conv_net, two_conv_net
from tests.helpers.oracles import assert_close, conv_patches_loops, nll_of, oracle_factors

# PyTorch warns (once) that an even kernel with padding="same" pads a copy of the input.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")

CONV_CASES = {
    "k3_s1_p0_bias": dict(kernel_size=3),
    "k3_s2_p0_bias": dict(kernel_size=3, stride=2),
    "k3_same_nobias": dict(kernel_size=3, padding="same", bias=False),
    "k2_same_asymmetric": dict(kernel_size=2, padding="same"),
    "k3_dil2_p2": dict(kernel_size=3, padding=2, dilation=2),
    "k3_s2_p1_dil2_nobias": dict(kernel_size=3, stride=2, padding=1, dilation=2, bias=False),
    "k2x3_s1x2_p1x0": dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
    "k4_dil2_same": dict(kernel_size=4, padding="same", dilation=2),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_oracle_patches_reproduce_the_convolution(
    case: str, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Validates the loop oracle itself (not kfcrun): ``[[A]] W^T + b`` equals ``conv(x)``."""
    x, _ = batch
    conv = conv_net(nn.Conv2d(2, 3, **CONV_CASES[case]))[0]
    patches = conv_patches_loops(x, conv)
    out = patches @ conv.weight.flatten(1).T
    if conv.bias is not None:
        out = out + conv.bias
    ref = conv(x).flatten(2).transpose(1, 2)
    assert_close(out, ref, atol=1e-12, what=f"{case}: [[A]] W^T + b vs conv")


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_then_linear_factors_match_oracle(case: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    net = conv_net(nn.Conv2d(2, 3, **CONV_CASES[case]))
    factors = batch_factors(net, x, y)
    assert list(factors) == ["0", "3"]
    for name in factors:
        omega, gamma = factors[name]
        ref_omega, ref_gamma = oracle_factors(net, net.get_submodule(name), x, nll_of(y))
        assert_close(omega, ref_omega, atol=1e-11, what=f"{case} layer {name} Omega")
        assert_close(gamma, ref_gamma, atol=1e-12, what=f"{case} layer {name} Gamma")
        assert omega.dtype == torch.float64 and gamma.dtype == torch.float64


def test_two_conv_net_factors_match_oracle(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    net = two_conv_net()
    factors = batch_factors(net, x, y)
    assert list(factors) == ["0", "2", "6"]
    for name, (omega, gamma) in factors.items():
        ref_omega, ref_gamma = oracle_factors(net, net.get_submodule(name), x, nll_of(y))
        assert_close(omega, ref_omega, atol=1e-11, what=f"layer {name} Omega")
        assert_close(gamma, ref_gamma, atol=1e-12, what=f"layer {name} Gamma")


def test_homogeneous_coordinate_entries(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """``Omega[0,0] = |T|`` (output positions), ``Omega[0,1:]`` = mean over examples of column sums."""
    x, y = batch
    net = conv_net(nn.Conv2d(2, 3, 3, stride=2))  # 7x7 -> 3x3 output positions
    omega, _ = batch_factors(net, x, y)["0"]
    assert omega[0, 0].item() == 9.0
    patches = conv_patches_loops(x, net[0])
    assert_close(omega[0, 1:], patches.sum(dim=1).mean(dim=0), atol=1e-12, what="Omega row 0")
    # Linear after flatten: |T| = 1.
    psi, _ = batch_factors(net, x, y)["3"]
    assert psi[0, 0].item() == 1.0


def test_linear_with_extra_leading_dims_treats_them_as_positions() -> None:
    """Input (M, T, in): Omega summed over the M*T rows / M, Gamma averaged over M*T rows."""
    torch.manual_seed(3)
    lin = nn.Linear(4, 3).double()
    model = nn.Sequential(lin, nn.Flatten())  # logits (M, T*3), class dim 1
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 15, (2,))
    omega, gamma = batch_factors(model, x, y)["0"]
    a = torch.cat([torch.ones(2, 5, 1, dtype=torch.float64), x], dim=2).reshape(10, 5)
    assert_close(omega, a.T @ a / 2, atol=1e-12, what="Omega")
    ref_gamma = torch.zeros(3, 3, dtype=torch.float64)
    for m in range(2):
        out = lin(x[m : m + 1])
        loss = -torch.log_softmax(out.flatten(1), dim=1)[0, y[m]]
        (ds,) = torch.autograd.grad(loss, out)
        ref_gamma += ds[0].T @ ds[0]
    assert_close(gamma, ref_gamma / 10, atol=1e-12, what="Gamma")


def test_inplace_relu_after_layer_gives_pre_activation_derivatives(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, y = batch
    plain = two_conv_net()
    inplace = copy.deepcopy(plain)
    inplace[1] = nn.ReLU(inplace=True)
    ref, got = batch_factors(plain, x, y), batch_factors(inplace, x, y)
    for name in ref:
        assert_close(got[name][0], ref[name][0], atol=0, rtol=0, what=f"{name} Omega")
        assert_close(got[name][1], ref[name][1], atol=0, rtol=0, what=f"{name} Gamma")


def test_model_grads_buffers_hooks_and_mode_are_unchanged(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(75, 4, bias=False)
    ).double()
    net(x).sum().backward()  # populate .grad (the Linear gets one, we then clear the conv bias grad)
    net[0].bias.grad = None
    with torch.no_grad():  # non-trivial running stats
        net[1].running_mean.uniform_()
        net[1].num_batches_tracked.fill_(5)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    grads = {k: (None if v.grad is None else v.grad.clone()) for k, v in net.named_parameters()}
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    for mode in (True, False):
        net.train(mode)
        factors = batch_factors(net, x, y)
        assert set(factors) == {"0", "1", "4"}  # the BatchNorm has a block too
        assert all(m.training is mode for m in net.modules())
        for k, v in net.named_parameters():
            assert torch.equal(v, params[k]), f"parameter {k} changed"
            if grads[k] is None:
                assert v.grad is None, f"{k}.grad was created"
            else:
                assert torch.equal(v.grad, grads[k]), f"{k}.grad changed"
        for k, v in net.named_buffers():
            assert torch.equal(v, buffers[k]), f"buffer {k} changed (mode train={mode})"
        for name, mod in net.named_modules():
            assert not mod._forward_hooks and not mod._forward_pre_hooks, f"hook left on {name!r}"
            assert not mod._backward_hooks, f"backward hook left on {name!r}"


def test_works_under_no_grad_and_with_frozen_first_layer(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    net = two_conv_net()
    ref = batch_factors(net, x, y)
    net[0].requires_grad_(False)
    with torch.no_grad():
        got = batch_factors(net, x, y)
    assert "0" not in got, "a frozen layer has no block"
    assert set(got) == set(ref) - {"0"}
    for name in got:
        assert_close(got[name][1], ref[name][1], atol=1e-14, what=f"{name} Gamma (frozen/no_grad)")


def test_unused_layer_is_absent_and_detached_output_gives_zero_gamma(
    batch: tuple[torch.Tensor, torch.Tensor],
) -> None:
    x, y = batch

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3)
            self.side = nn.Conv2d(2, 1, 1)  # output does not reach the loss
            self.unused = nn.Linear(3, 3)  # never called
            self.fc = nn.Linear(75, 4)

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            self.side(inp)
            return self.fc(torch.relu(self.conv(inp)).flatten(1))

    net = Net().double()
    factors = batch_factors(net, x, y)
    assert list(factors) == ["conv", "side", "fc"]
    assert torch.count_nonzero(factors["side"][1]) == 0
    assert torch.count_nonzero(factors["side"][0]) > 0


def test_sua_refuses_grouped_and_non_zero_padding() -> None:
    for conv, match in [
        (nn.Conv2d(2, 4, 3, groups=2), "groups=2"),
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
    ]:
        with pytest.raises(UnsupportedLayerError, match=match):
            make_block("c", conv, omega_model="sua")


def test_batch_factors_is_batch_factors_for_loss_with_nll(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    net = two_conv_net()
    a = batch_factors(net, x, y)
    b = batch_factors_for_loss(net, x, lambda logits: nll_sum(logits, y))
    for name in a:
        assert torch.equal(a[name][0], b[name][0]) and torch.equal(a[name][1], b[name][1])


def test_float32_inputs_give_float32_factors(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    net = two_conv_net()
    ref = batch_factors(net, x, y)
    got = batch_factors(net.float(), x.float(), y)
    for name in ref:
        assert got[name][0].dtype == torch.float32
        assert_close(got[name][0], ref[name][0], atol=1e-4, rtol=1e-4, what=f"{name} Omega float32")
        assert_close(got[name][1], ref[name][1], atol=1e-5, rtol=1e-3, what=f"{name} Gamma float32")
