"""``Omega_hat`` of a stride-1 convolution without the patch expansion ``[[A]]`` (row lags).

The patch GEMM (:func:`kron_math.conv_omega`) multiplies ``[[A]]^T [[A]]`` with ``[[A]]``
holding every input value ``|Δ| = kh kw`` times. For stride 1 most of that work is
repeated: entry ``[(j,p,q), (j',p',q')]`` of ``[[A]]^T [[A]]`` is a sum of lagged products

    S[(j,p,q),(j',p',q')] = sum_m sum_{r in I_p} sum_{c in I'_q} x[m,j,r,c] x[m,j',r+a,c+b]

with the lag ``(a, b) = (dh (p'-p), dw (q'-q))``, ``x = 0`` outside the image, and
``I_p = [dh p - pt, dh p - pt + oh) ∩ [0, H)`` the image rows tap row ``p`` sees (likewise
``I'_q`` for columns). Only the first factor's window matters: a partner in the padding
is zero.

**Row-lag form (exact, no correction terms).** Expand along the width only,
``U[(j,q), (r, m, t)] = x_padW[m, j, r, t + dw q]`` (``J kw`` rows, the exact column
windows), and take the lags along the height: for each row lag ``a = dh ia`` one batched
GEMM gives ``R_a[r] = U_r U_{r+a}^T`` for every image row ``r`` at once (``U_r`` is the
``(J kw) x (M ow)`` slice of row ``r``), and tap row ``p`` sums the rows it sees::

    S[(·,p,·), (·,p+ia,·)] = sum_{r in I_p, r+a < H} R_a[r]

as one 0/1-matrix product written into the block ``(p, p+ia)``. Blocks with ``p > p'`` are
transposes. This is about ``1/kh`` of the patch GEMM's flops with GEMMs as large as its,
and its float32 sums are shorter (one image row each). Kernels wider than tall are
handled by transposing the image (the saving is ``1/kh`` along the lagged axis).

Derivation, variants that lost, and measurements: ``/work/notes/omega_lag/NOTE.md``
(issue 13) and ``scripts/bench_omega.py``. Exactness: ``tests/curvature/test_omega_lagged.py``
against :func:`kron_math.conv_omega` in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .kron_math import DEFAULT_PATCH_BUDGET_BYTES, Pair, accumulation_dtype, homogeneous_moment

__all__ = ["MIN_LAG_ROWS", "OMEGA_METHODS", "conv_omega_lagged", "lagged_applies", "lagged_preferred"]

#: ``"auto"`` takes the row lags only when the width expansion has at least this many rows
#: (``J kw``, input channels times the kernel extent along the lagged axis). Measured on the
#: 2-core CPU with 2 threads (``scripts/bench_omega.py``, issue 13): the cuda-convnet conv1
#: (``J kw = 15``) at 128 examples took 0.63-0.74x the patch GEMM's speed, because its
#: ``15 x 15`` row products do not thread well (2.4x faster than the GEMM with 1 thread);
#: every layer with ``J kw >= 160`` was 1.6-2.8x faster.
MIN_LAG_ROWS = 16

#: ``omega_method`` values: ``"auto"`` (row lags where :func:`lagged_applies`, else the
#: patch GEMM), ``"patch"`` (always the patch GEMM), ``"lagged"`` (row lags; an error where
#: they do not apply).
OMEGA_METHODS = ("auto", "patch", "lagged")


def _pair(v: int | Sequence[int]) -> Pair:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def lagged_applies(
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    *,
    groups: int = 1,
    diagonal: bool = False,
) -> bool:
    """Whether the row-lag form computes this conv's ``Omega_hat`` and is expected to be faster.

    Stride 1 only (a strided conv's taps see rows of different residue classes), one group,
    the full factor (a diagonal is one pass anyway), and a kernel of at least 2 along one
    axis (a 1x1 kernel has nothing to share: its "patch GEMM" is already a plain Gram).
    """
    kh, kw = _pair(kernel_size)
    return _pair(stride) == (1, 1) and groups == 1 and not diagonal and max(kh, kw) >= 2


def lagged_preferred(in_channels_per_group: int, kernel_size: int | Sequence[int]) -> bool:
    """``"auto"``'s rule on top of :func:`lagged_applies`: enough rows (:data:`MIN_LAG_ROWS`)."""
    return in_channels_per_group * max(_pair(kernel_size)) >= MIN_LAG_ROWS


def window_mask(n: int, k: int, before: int, after: int, d: int, device: torch.device) -> tuple[Tensor, int]:
    """``(mask, out)``: ``mask[p, r] = 1`` iff tap ``p`` sees image index ``r``; ``out`` output positions."""
    out = n + before + after - d * (k - 1)
    if out < 1:
        raise ValueError(f"empty output grid: size {n}, kernel {k}, dilation {d}, padding {before},{after}")
    r = torch.arange(n, device=device)
    lo = torch.arange(k, device=device) * d - before
    return (r[None, :] >= lo[:, None]) & (r[None, :] < lo[:, None] + out), out


def _accumulate_row_lags(
    x: Tensor, kh: int, kw: int, pad_w: Pair, dh: int, dw: int, rows: Tensor, out: Tensor
) -> None:
    """Add one chunk's ``S[(·,p,·), (·,p+ia,·)]`` into ``out[p, p+ia]`` (shape ``(kh, kh, J kw, J kw)``).

    Two ops per row lag: one batched GEMM over the ``H - a`` image rows (all strided views
    of ``U``, no copy beyond ``U`` itself) and one ``addmm_`` with the 0/1 tap-row mask
    straight into the strided view of the blocks ``(p, p + ia)``.
    """
    m, j, h, _ = x.shape
    xw = F.pad(x, pad_w) if any(pad_w) else x
    ow = xw.shape[3] - dw * (kw - 1)
    s_m, s_j, s_h, s_w = xw.stride()
    # U[(j, q), (r, m, t)] = xw[m, j, r, t + dw q]: one copy (the width-only expansion).
    u = xw.as_strided((j, kw, h, m, ow), (s_j, s_w * dw, s_h, s_m, s_w)).reshape(j * kw, h * m * ow)
    row_len, jk = m * ow, j * kw
    su, offset = u.stride(0), u.storage_offset()
    flat = out.view(kh * kh, jk * jk)
    for ia in range(kh):
        a = ia * dh
        if a >= h:
            break
        first = u.as_strided((h - a, jk, row_len), (row_len, su, 1), offset)
        second = u.as_strided((h - a, jk, row_len), (row_len, su, 1), offset + a * row_len)
        products = torch.bmm(first, second.transpose(1, 2)).view(h - a, jk * jk)
        sel = rows[: kh - ia, : h - a].to(products.dtype)  # sel[p, r] = 1 iff tap row p sees row r
        flat[ia : ia + (kh - ia) * (kh + 1) : kh + 1].addmm_(sel, products)  # flat index p*kh + p + ia


def _assemble(out: Tensor, j: int, kh: int, kw: int) -> Tensor:
    """``[[A]]^T [[A]]`` in ``(j, p, q)`` order from the blocks ``out[p, p']`` with ``p <= p'``."""
    diag = out.diagonal(0, 0, 1).permute(2, 0, 1)  # (kh, Jkw, Jkw): the lag-0 blocks, symmetric
    diag.copy_(diag.tril() + diag.tril(-1).transpose(1, 2))  # exactly symmetric
    upper = torch.ones(kh, kh, dtype=torch.bool, device=out.device).triu()[:, :, None, None]
    full = torch.where(upper, out, out.permute(1, 0, 3, 2))  # block (p', p) = block (p, p')^T
    k = j * kh * kw
    return full.view(kh, kh, j, kw, j, kw).permute(2, 0, 3, 4, 1, 5).reshape(k, k)


def conv_omega_lagged(
    x: Tensor,
    kernel_size: int | Sequence[int],
    *,
    padding: tuple[Pair, Pair] = ((0, 0), (0, 0)),
    dilation: int | Sequence[int] = 1,
    homogeneous: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` of a **stride-1** conv input ``x`` ``(M, J, H, W)``.

    The same matrix as :func:`kron_math.conv_omega` (same shape, order and scaling; the
    homogeneous coordinate at index 0 when ``homogeneous``) by the row-lag form of the
    module docstring. ``padding`` is ``((top, bottom), (left, right))`` zero padding;
    ``chunk_size`` bounds the examples whose width expansion (``J kw H ow`` values each)
    exists at once (default: :data:`kron_math.DEFAULT_PATCH_BUDGET_BYTES`).
    """
    kh, kw = _pair(kernel_size)
    dh, dw = _pair(dilation)
    (pt, pb), (pl, pr) = padding
    if kw > kh:
        # Lag along the axis with the larger kernel: transpose the image, then swap the
        # tap indices (j, q, p) -> (j, p, q) back.
        flipped = conv_omega_lagged(
            x.transpose(2, 3),
            (kw, kh),
            padding=((pl, pr), (pt, pb)),
            dilation=(dw, dh),
            homogeneous=homogeneous,
            chunk_size=chunk_size,
        )
        j = x.shape[1]
        h0 = int(homogeneous)
        order = torch.arange(j * kh * kw, device=x.device).view(j, kw, kh).transpose(1, 2).reshape(-1)
        index = torch.cat([torch.zeros(h0, dtype=order.dtype, device=x.device), order + h0])
        return flipped[index][:, index]
    m, j, h, w = x.shape
    acc = accumulation_dtype(x.dtype)
    rows, oh = window_mask(h, kh, pt, pb, dh, x.device)
    cols, ow = window_mask(w, kw, pl, pr, dw, x.device)
    if chunk_size is None:
        per_example = max(1, j * kw * h * ow * torch.finfo(acc).bits // 8)
        chunk_size = max(1, DEFAULT_PATCH_BUDGET_BYTES // per_example)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    blocks = torch.zeros(kh, kh, j * kw, j * kw, dtype=acc, device=x.device)
    for start in range(0, m, chunk_size):
        _accumulate_row_lags(x[start : start + chunk_size].to(acc), kh, kw, (pl, pr), dh, dw, rows, blocks)
    sum_aa = _assemble(blocks, j, kh, kw)
    col_sum = None
    if homogeneous:
        # s[(j,p,q)] = sum over the examples and the positions tap (p, q) sees of x[., j, ., .].
        total = x.to(acc).sum(dim=0)
        col_sum = torch.einsum("pr,jrc,qc->jpq", rows.to(acc), total, cols.to(acc)).reshape(-1)
    return homogeneous_moment(sum_aa, col_sum, m * oh * ow, m)
