"""Brute-force oracles written from the definitions, sharing no code with kfcrun.curvature.

* Patches ``[[A]]`` (Eqn 14) by Python loops over output positions and kernel offsets,
  with zero padding applied by bounds checks (no ``unfold``, no ``F.pad``).
* ``DS`` per example: one forward and one ``autograd.grad`` per example's own loss.
* Factors by Eqn 32 with the ones column materialised.
* Exact Fisher blocks from Jacobians (``torch.func.jacrev``), ``vec`` = column stacking.
* The exact Fisher of a softmax classifier, ``(1/n) sum_m J_m^T (diag p_m - p_m p_m^T) J_m``,
  from full Jacobians of the logits (:func:`explicit_fisher`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def assert_close(
    actual: Tensor, expected: Tensor, *, atol: float = 1e-10, rtol: float = 1e-8, what: str = ""
) -> None:
    """``|actual - expected| <= atol + rtol |expected|`` elementwise; on failure say where and by how much."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    diff = (a - e).abs()
    bad = ~(diff <= atol + rtol * e.abs())  # NaN counts as bad
    if bool(bad.any()):
        idx = bad.nonzero()
        order = diff[bad].nan_to_num(float("inf")).argsort(descending=True)[:5]
        lines = [
            f"  at {tuple(idx[k].tolist())}: actual={a[tuple(idx[k])].item():.12g} "
            f"expected={e[tuple(idx[k])].item():.12g} |diff|={diff[tuple(idx[k])].item():.3g}"
            for k in order.tolist()
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} entries differ "
            f"(max |diff| {diff.nan_to_num(float('inf')).max().item():.3g}, "
            f"atol={atol}, rtol={rtol}); worst:\n" + "\n".join(lines)
        )


def same_padding(kernel: int, dilation: int) -> tuple[int, int]:
    """PyTorch's ``padding='same'``: total ``d(k-1)``, ``total // 2`` before, the rest after."""
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def conv_geometry(conv: nn.Conv2d, height: int, width: int) -> dict[str, tuple[int, int]]:
    """Padding before each dim and the output grid of ``conv`` on an ``height x width`` input."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == "same":
        (pt, pb), (pl, pr) = same_padding(kh, dh), same_padding(kw, dw)
    elif conv.padding == "valid":
        pt = pb = pl = pr = 0
    else:
        (pt, pl), (pb, pr) = conv.padding, conv.padding
    out_h = (height + pt + pb - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + pl + pr - dw * (kw - 1) - 1) // sw + 1
    return {"pad_before": (pt, pl), "out": (out_h, out_w)}


def conv_patches_loops(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """``[[A_m]]`` for every example by explicit loops: shape ``(M, |T|, J*kh*kw)``.

    Row ``t = oh * out_w + ow``; column ``j*kh*kw + p*kw + q`` (``weight.flatten(1)`` order);
    entry ``x[m, j, oh*sh - pt + p*dh, ow*sw - pl + q*dw]`` or 0 outside the image.
    """
    m_count, channels, height, width = x.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    geo = conv_geometry(conv, height, width)
    pt, pl = geo["pad_before"]
    out_h, out_w = geo["out"]
    out = torch.zeros(m_count, out_h * out_w, channels * kh * kw, dtype=x.dtype)
    for m in range(m_count):
        for oh in range(out_h):
            for ow in range(out_w):
                t = oh * out_w + ow
                for j in range(channels):
                    for p in range(kh):
                        for q in range(kw):
                            ih, iw = oh * sh - pt + p * dh, ow * sw - pl + q * dw
                            if 0 <= ih < height and 0 <= iw < width:
                                out[m, t, j * kh * kw + p * kw + q] = x[m, j, ih, iw]
    return out


def _record_io(model: nn.Module, layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(logits, layer input, layer output)`` of one forward pass (plain hook, oracle-only)."""
    seen: dict[str, Tensor] = {}

    def hook(_mod: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        seen["in"], seen["out"] = args[0].detach(), output

    handle = layer.register_forward_hook(hook)
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen["in"], seen["out"]


def per_example_rows(
    model: nn.Module, layer: nn.Module, x: Tensor, per_example_loss: Callable[[Tensor, int], Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """Per example ``m``: activation rows ``A_m`` (``|T| x in``, no ones column) and ``DS_m``.

    ``per_example_loss(logits_of_example_m, m)`` is example ``m``'s own loss; ``DS_m`` is
    its derivative w.r.t. the layer output, one row per output position (``|T| x I``).
    """
    acts, derivs = [], []
    for m in range(x.shape[0]):
        logits, inp, out = _record_io(model, layer, x[m : m + 1])
        (ds,) = torch.autograd.grad(per_example_loss(logits, m), out)
        if isinstance(layer, nn.Conv2d):
            acts.append(conv_patches_loops(inp, layer)[0])
            derivs.append(ds[0].reshape(ds.shape[1], -1).T)
        else:
            acts.append(inp.reshape(-1, inp.shape[-1]))
            derivs.append(ds.reshape(-1, ds.shape[-1]))
    return acts, derivs


def oracle_factors(
    model: nn.Module, layer: nn.Module, x: Tensor, per_example_loss: Callable[[Tensor, int], Tensor]
) -> tuple[Tensor, Tensor]:
    """Eqn 32 by definition.

    ``Omega = (1/M) sum_m [[A_m]]_H^T [[A_m]]_H`` and ``Gamma = 1/(M|T|) sum_m DS_m^T DS_m``.
    """
    acts, derivs = per_example_rows(model, layer, x, per_example_loss)
    m_count = len(acts)
    t_count = derivs[0].shape[0]
    omega = torch.zeros(0)
    for a in acts:
        if layer.bias is not None:
            a = torch.cat([torch.ones(a.shape[0], 1, dtype=a.dtype), a], dim=1)
        omega = a.T @ a if omega.numel() == 0 else omega + a.T @ a
    gamma = sum(ds.T @ ds for ds in derivs)
    return omega / m_count, gamma / (m_count * t_count)


def nll_of(targets: Tensor) -> Callable[[Tensor, int], Tensor]:
    """Per-example loss ``-log softmax(logits)[y_m]`` for the oracle."""
    return lambda logits, m: -torch.log_softmax(logits, dim=-1)[0, targets[m]]


def vec(mat: Tensor) -> Tensor:
    """Column-stacking vec."""
    return mat.T.reshape(-1)


def unvec(v: Tensor, rows: int, cols: int) -> Tensor:
    """Inverse of :func:`vec`."""
    return v.reshape(cols, rows).T


def jacobian_wrt_wbar(fn: Callable[[Tensor], Tensor], wbar: Tensor) -> Tensor:
    """``d fn(W_bar) / d vec(W_bar)`` as ``(outputs, I*(1+J|Δ|))`` with column-stacking vec."""
    jac = torch.func.jacrev(fn)(wbar)  # (*out, I, cols)
    jac = jac.reshape(-1, *wbar.shape)
    return jac.transpose(1, 2).reshape(jac.shape[0], -1)


def explicit_fisher(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``F = (1/n) sum_m J_m^T (diag p_m - p_m p_m^T) J_m`` from full Jacobians."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def logits_of(flat: torch.Tensor) -> torch.Tensor:
        chunks, offset = {}, 0
        for n in names:
            size = params[n].numel()
            chunks[n] = flat[offset : offset + size].reshape(params[n].shape)
            offset += size
        return torch.func.functional_call(model, chunks, (x,))

    flat = torch.cat([params[n].reshape(-1) for n in names])
    jac = torch.autograd.functional.jacobian(logits_of, flat)  # (n, classes, P)
    probs = torch.softmax(logits_of(flat), dim=1)
    fisher = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype)
    for m in range(x.shape[0]):
        h = torch.diag(probs[m]) - torch.outer(probs[m], probs[m])
        fisher += jac[m].T @ h @ jac[m]
    return fisher / x.shape[0]
