"""Pure tensor math for KFC: patch expansion, factor estimates, damping, Kronecker solves.

No modules, hooks or state live here; every function maps tensors to tensors.
Notation and equation numbers follow Grosse & Martens (2016):

* ``[[A]]`` (Eqn 14): the expansion of a layer's input, one row per **output**
  position, ``J|Δ|`` columns in ``weight.flatten(1)`` order (input channel major,
  kernel offset minor). That is exactly :func:`torch.nn.functional.unfold`.
* ``[[A]]_H``: ``[[A]]`` with a column of ones prepended at index 0 (the
  homogeneous coordinate, present only when the layer has a bias).
* ``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` summed over all ``M|T|`` rows, divided by
  ``M`` only; ``Gamma_hat = 1/(M|T|) DS^T DS`` (Eqn 32).
* A combined parameter matrix ``W_bar = [b | W]`` has shape ``I x (1 + J|Δ|)``;
  ``vec`` stacks columns, so ``(Omega ⊗ Gamma) vec(G) = vec(Gamma G Omega)``.

Two generalisations run through the damping and solve functions:

* **leading batch dims**: a factor of shape ``(g, k, k)`` is ``g`` independent blocks
  (a grouped convolution has one Kronecker block per group), solved together;
* **diagonal factors**: a factor stored as its diagonal ``(..., k)`` (flag
  ``*_diagonal=True``) stands for ``diag(d)``; used above a size cap, where the full
  ``k x k`` factor would not fit, and for an embedding's exactly diagonal input factor.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEFAULT_PATCH_BUDGET_BYTES",
    "accumulation_dtype",
    "add_to_diagonal",
    "cholesky_inverse_fast",
    "conv_omega",
    "conv_omega_sua",
    "conv_padding",
    "damped_factors",
    "diagonal_inverse_fast",
    "eigh_psd",
    "expand_patches",
    "gamma_from_derivatives",
    "gamma_sum",
    "homogeneous_moment",
    "inverse_fallback",
    "kron_solve_eigen",
    "kron_solve_pi",
    "linear_omega",
    "mean_diagonal",
    "patch_rows",
    "pi_trace_norm",
    "symmetrize",
]

#: Memory the expanded patches ``[[A]]`` of one chunk may take (bytes) when no
#: explicit ``chunk_size`` is given. The GEMM also needs one transposed copy of the
#: chunk, so the peak is about twice this.
DEFAULT_PATCH_BUDGET_BYTES = 128 * 2**20

Pair = tuple[int, int]


def _pair(v: int | Sequence[int]) -> Pair:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the factor statistics are accumulated in: the input dtype, but at least float32.

    Half-precision inputs (autocast) would overflow or lose the sum over M|T| rows.
    """
    return torch.promote_types(dtype, torch.float32)


def conv_padding(
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    padding: str | int | Sequence[int],
    dilation: int | Sequence[int],
) -> tuple[Pair, Pair]:
    """Zero padding of a 2-D convolution as ``((top, bottom), (left, right))``.

    ``padding="same"`` follows PyTorch: total ``dilation*(kernel-1)`` per dimension,
    ``total // 2`` before and the remainder after (so even kernels pad one more at the
    bottom/right). ``"valid"`` is no padding.
    """
    kernel, dil = _pair(kernel_size), _pair(dilation)
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        if _pair(stride) != (1, 1):
            raise ValueError("padding='same' requires stride 1 (as in torch.nn.Conv2d)")
        out = []
        for k, d in zip(kernel, dil, strict=True):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return (out[0], out[1])
    if isinstance(padding, str):
        raise ValueError(f"unknown padding {padding!r}; expected an int, a pair, 'same' or 'valid'")
    ph, pw = _pair(padding)
    return ((ph, ph), (pw, pw))


def expand_patches(
    x: Tensor,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: tuple[Pair, Pair] = ((0, 0), (0, 0)),
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """The expansion ``[[A]]`` (Eqn 14) of a batch ``x`` of shape ``(M, J, H, W)``, by definition.

    This is the reference layout (``F.unfold``); :func:`conv_omega` builds the same
    numbers transposed with :func:`patch_rows`, which saves a copy.

    Returns shape ``(M, J|Δ|, |T|)``: column ``j|Δ| + δ`` of ``[[A_m]]`` is entry
    ``[m, j*|Δ| + δ, t]``, with ``|T|`` output positions in row-major order and zeros
    outside the image. ``padding`` is ``((top, bottom), (left, right))`` from
    :func:`conv_padding`; an asymmetric padding is applied with ``F.pad`` first
    because ``unfold`` pads symmetrically.
    """
    (pt, pb), (pl, pr) = padding
    if pt == pb and pl == pr:
        # torch's stub for unfold wants int | tuple, but it takes any int sequence (_pair): ignores.
        return F.unfold(x, kernel_size, dilation=dilation, padding=(pt, pl), stride=stride)  # type: ignore[arg-type]
    x = F.pad(x, (pl, pr, pt, pb))
    return F.unfold(x, kernel_size, dilation=dilation, padding=0, stride=stride)  # type: ignore[arg-type]


def homogeneous_moment(
    sum_aa: Tensor, col_sum: Tensor | None, num_rows: int, num_examples: int, *, diagonal: bool = False
) -> Tensor:
    """Assemble ``(1/M) [[A]]_H^T [[A]]_H`` without materialising the ones column.

    With ``n`` rows, ``[[A]]_H^T [[A]]_H = [[n, s^T], [s, [[A]]^T [[A]]]]`` where ``s``
    is the vector of column sums. ``col_sum=None`` means no bias: no homogeneous
    coordinate, the result is ``sum_aa / M``. Leading batch dims (groups) are kept;
    ``diagonal=True`` means ``sum_aa`` is the diagonal ``(..., k)`` and so is the result
    (``[n, diag(sum_aa)] / M``).
    """
    if col_sum is None:
        return sum_aa / num_examples
    k = sum_aa.shape[-1]
    if diagonal:
        out = sum_aa.new_empty(*sum_aa.shape[:-1], k + 1)
        out[..., 0] = num_rows
        out[..., 1:] = sum_aa
        return out.div_(num_examples)
    out = sum_aa.new_empty(*sum_aa.shape[:-2], k + 1, k + 1)
    out[..., 0, 0] = num_rows
    out[..., 0, 1:] = col_sum
    out[..., 1:, 0] = col_sum
    out[..., 1:, 1:] = sum_aa
    return out.div_(num_examples)


def patch_rows(
    x: Tensor,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: tuple[Pair, Pair] = ((0, 0), (0, 0)),
    dilation: int | Sequence[int] = 1,
) -> Tensor:
    """``[[A]]^T`` for a batch ``x`` ``(c, J, H, W)``: shape ``(J|Δ|, c|T|)``, built with ONE copy.

    The same numbers as :func:`expand_patches` (row ``j|Δ| + δ``, columns = the ``c|T|``
    output positions of all examples), but laid out for the GEMM ``[[A]]^T [[A]]``
    directly: a strided view of the zero-padded input, indexed
    ``[j, p, q, m, oh, ow] -> x_pad[m, j, oh*stride + p*dil, ow*stride + q*dil]``, is
    copied once by ``reshape``. ``unfold`` followed by the transpose would copy twice.
    """
    (pt, pb), (pl, pr) = padding
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    if pt or pb or pl or pr:
        x = F.pad(x, (pl, pr, pt, pb))
    c, j, hp, wp = x.shape
    out_h = (hp - dh * (kh - 1) - 1) // sh + 1
    out_w = (wp - dw * (kw - 1) - 1) // sw + 1
    s_m, s_j, s_h, s_w = x.stride()
    view = x.as_strided((j, kh, kw, c, out_h, out_w), (s_j, s_h * dh, s_w * dw, s_m, s_h * sh, s_w * sw))
    return view.reshape(j * kh * kw, c * out_h * out_w)


def _row_blocks(k: int) -> list[tuple[int, int]]:
    """Row blocks for the lower-triangular Gram: ~256+ rows each, at most 3 blocks.

    Block ``i`` multiplies its rows by the prefix ``rows[:hi]`` only, so the GEMMs cover
    ``(b+1)/(2b)`` of the full product (2/3 for b = 3), while staying large enough to
    run at full BLAS speed.
    """
    b = max(1, min(3, k // 256))
    edges = [round(i * k / b) for i in range(b + 1)]
    return list(itertools.pairwise(edges))


def conv_omega(
    x: Tensor,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: tuple[Pair, Pair] = ((0, 0), (0, 0)),
    dilation: int | Sequence[int] = 1,
    homogeneous: bool = True,
    chunk_size: int | None = None,
    groups: int = 1,
    diagonal: bool = False,
) -> Tensor:
    """``Omega_hat = (1/M) [[A]]_H^T [[A]]_H`` (Eqn 32) for a conv input ``x`` ``(M, J, H, W)``.

    Summed over all ``M|T|`` rows (``|T|`` = number of output positions) and divided
    by ``M`` only. Shape ``(1 + J|Δ|)^2`` with the homogeneous coordinate at index 0
    when ``homogeneous`` (layer has a bias), else ``(J|Δ|)^2``.

    ``groups = g > 1`` (grouped convolution): output group ``i`` sees only input channels
    ``i J/g .. (i+1) J/g - 1``, so its block is built from those channels' patches alone;
    the result is ``(g, k, k)`` with ``k = (J/g)|Δ| [+1]``, one Omega per group.
    ``diagonal=True`` returns only the diagonal (shape ``(..., k)``): the sum of squared
    patch entries per column (and ``|T|`` at the homogeneous index).

    The expansion is built ``chunk_size`` examples at a time (default: as many as fit
    :data:`DEFAULT_PATCH_BUDGET_BYTES`) by :func:`patch_rows` as one ``(J|Δ|, c|T|)``
    matrix, and multiplied by its own transpose with ``addmm_`` accumulating in place.
    For ``groups = 1`` only the lower triangle is accumulated (a few row-block GEMMs,
    see :func:`_row_blocks`) and mirrored once at the end; groups use one batched GEMM.
    """
    m = x.shape[0]
    acc = accumulation_dtype(x.dtype)
    kh, kw = _pair(kernel_size)
    k_all = x.shape[1] * kh * kw
    if x.shape[1] % groups:
        raise ValueError(f"{x.shape[1]} input channels do not split into {groups} groups")
    k = k_all // groups
    if chunk_size is None:
        # Bytes of one example's patches: J|Δ| x |T| (|T| approximated by the input grid).
        per_example = max(1, k_all * x.shape[2] * x.shape[3] * torch.finfo(acc).bits // 8)
        chunk_size = max(1, DEFAULT_PATCH_BUDGET_BYTES // per_example)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    lead = (groups,) if groups > 1 else ()
    if diagonal:
        total = torch.zeros(*lead, k, dtype=acc, device=x.device)
    elif groups > 1:
        total = torch.zeros(groups, k, k, dtype=acc, device=x.device)
    else:
        total = torch.zeros(k, k, dtype=acc, device=x.device)
    blocks = _row_blocks(k)
    col_sum = torch.zeros(*lead, k, dtype=acc, device=x.device) if homogeneous else None
    num_rows = 0
    for start in range(0, m, chunk_size):
        rows = patch_rows(
            x[start : start + chunk_size].to(acc), (kh, kw), stride=stride, padding=padding, dilation=dilation
        )
        if diagonal:
            total += rows.square().sum(dim=1).reshape(total.shape)
        elif groups > 1:
            grouped = rows.reshape(groups, k, rows.shape[1])
            total.baddbmm_(grouped, grouped.mT)
        else:
            for lo, hi in blocks:
                total[lo:hi, :hi].addmm_(rows[lo:hi], rows[:hi].T)
        if col_sum is not None:
            col_sum += rows.sum(dim=1).reshape(col_sum.shape)
        num_rows += rows.shape[1]
    if not diagonal and groups == 1:
        # Mirror the strict lower triangle: the result is exactly symmetric.
        total = total.tril() + total.tril(-1).T
    elif not diagonal:
        total = symmetrize(total)
    return homogeneous_moment(total, col_sum, num_rows, m, diagonal=diagonal)


def conv_omega_sua(
    x: Tensor,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    padding: tuple[Pair, Pair] = ((0, 0), (0, 0)),
    dilation: int | Sequence[int] = 1,
    homogeneous: bool = True,
) -> Tensor:
    """``Omega`` under spatially uncorrelated activations (SUA, Sec. 4.2, Theorem 4).

    SUA models activations at distinct positions as uncorrelated, with per-position
    mean ``M(j)`` and covariance ``Sigma(j, j')`` (both pooled over examples and input
    positions). The expected per-example ``[[A]]_H^T [[A]]_H`` is then::

        Omega[(j,δ), (j',δ')] = β(δ,δ') (Sigma(j,j') 1[δ = δ'] + M(j) M(j'))
        Omega[(j,δ), 0]       = β(δ) M(j),        Omega[0, 0] = |T|

    with ``β(δ,δ')`` the number of output positions whose patch has both offsets inside
    the image and ``β(δ) = β(δ,δ)`` (Eqn 24, computed here for any stride, padding and
    dilation by expanding an all-ones image). This is the idealized PRONG of Theorem 4
    with the ``β`` terms kept. Same shape and scaling as :func:`conv_omega`.
    """
    _, j, h, w = x.shape
    acc = accumulation_dtype(x.dtype)
    pixels = x.to(acc).transpose(0, 1).reshape(j, -1)  # J x (M H W): every in-image position
    mean = pixels.mean(dim=1)
    cov = (pixels @ pixels.T).div_(pixels.shape[1]) - torch.outer(mean, mean)
    ones = torch.ones(1, 1, h, w, dtype=acc, device=x.device)
    inside = expand_patches(ones, kernel_size, stride=stride, padding=padding, dilation=dilation)[0]
    beta = inside @ inside.T  # (|Δ|, |Δ|): beta(δ, δ')
    beta_diag = beta.diagonal()
    omega = torch.kron(cov, torch.diag(beta_diag)) + torch.kron(torch.outer(mean, mean), beta)
    if not homogeneous:
        return omega
    k = omega.shape[0]
    out = omega.new_empty(k + 1, k + 1)
    out[0, 0] = inside.shape[1]
    out[0, 1:] = torch.kron(mean, beta_diag)
    out[1:, 0] = out[0, 1:]
    out[1:, 1:] = omega
    return out


def linear_omega(a: Tensor, *, homogeneous: bool = True, diagonal: bool = False) -> Tensor:
    """``Psi_hat = (1/M) sum_rows a_bar a_bar^T`` for a Linear input ``a`` of shape ``(M, ..., in)``.

    Dim 0 indexes the ``M`` examples; any further leading dims are treated as
    positions (|T| = their product), exactly like the rows of a conv's ``[[A]]``:
    summed over all rows and divided by ``M`` only. For a plain ``(M, in)`` input this
    is standard K-FAC ``E[a_bar a_bar^T]`` (Eqn 6) with ``a_bar = (1, a)``.
    ``diagonal=True`` returns only the diagonal.
    """
    m = a.shape[0]
    rows = a.reshape(-1, a.shape[-1]).to(accumulation_dtype(a.dtype))
    sum_aa = rows.square().sum(dim=0) if diagonal else rows.T @ rows
    col_sum = rows.sum(dim=0) if homogeneous else None
    return homogeneous_moment(sum_aa, col_sum, rows.shape[0], m, diagonal=diagonal)


def gamma_sum(ds: Tensor, *, channel_dim: int, groups: int = 1, diagonal: bool = False) -> tuple[Tensor, int]:
    """``(DS^T DS, rows)`` of one backward pass: the unnormalised Gamma sum and its row count ``M|T|``.

    ``ds`` has the layer output's shape; ``channel_dim`` holds the ``I`` output channels.
    ``groups = g > 1`` gives ``(g, I/g, I/g)``: output group ``i``'s channels only (a
    grouped conv's block-diagonal structure). ``diagonal=True`` gives only the diagonal.
    """
    # (I, M|T|): channels first, then one GEMM with its own transpose.
    cols = ds.movedim(channel_dim, 0).reshape(ds.shape[channel_dim], -1)
    cols = cols.to(accumulation_dtype(cols.dtype))
    rows = cols.shape[1]
    if diagonal:
        out = cols.square().sum(dim=1)
        return (out.reshape(groups, -1) if groups > 1 else out), rows
    if groups > 1:
        grouped = cols.reshape(groups, -1, rows)
        return grouped @ grouped.mT, rows
    return cols @ cols.T, rows


def gamma_from_derivatives(
    derivatives: Iterable[Tensor], *, channel_dim: int, groups: int = 1, diagonal: bool = False
) -> Tensor:
    """``Gamma_hat = 1/(M|T|) sum_k DS_k^T DS_k`` (Eqn 32).

    Each ``DS_k`` holds the derivatives of the per-example loss w.r.t. the layer
    output for one backward pass: shape ``(M, I, *spatial)`` for a conv
    (``channel_dim=1``) or ``(M, ..., I)`` for a Linear (``channel_dim=-1``). Every
    pass covers all ``M|T|`` rows once, so each is divided by ``M|T|``. Several passes
    (one per column of a square root of the output Fisher) are summed, which turns
    the one-sample Monte-Carlo estimate into the exact expectation over targets.
    ``groups``/``diagonal``: see :func:`gamma_sum`.
    """
    total: Tensor | None = None
    for ds in derivatives:
        part, rows = gamma_sum(ds, channel_dim=channel_dim, groups=groups, diagonal=diagonal)
        part = part.div_(max(rows, 1))
        total = part if total is None else total.add_(part)
    if total is None:
        raise ValueError("gamma_from_derivatives needs at least one derivative tensor")
    return total


def symmetrize(mat: Tensor) -> Tensor:
    """``(mat + mat^T) / 2`` over the last two dims: symmetric in exact arithmetic is not after rounding."""
    return (mat + mat.mT) * 0.5


def mean_diagonal(factor: Tensor, diagonal: bool = False) -> Tensor:
    """``tr(F) / dim(F)`` per block (leading dims kept); ``diagonal``: ``factor`` is ``diag(F)``."""
    return factor.mean(dim=-1) if diagonal else torch.diagonal(factor, dim1=-2, dim2=-1).mean(dim=-1)


def pi_trace_norm(
    omega: Tensor, gamma: Tensor, *, omega_diagonal: bool = False, gamma_diagonal: bool = False
) -> Tensor:
    """``pi = sqrt((tr(Omega)/dim Omega) / (tr(Gamma)/dim Gamma))`` (Eqn 10, trace norm).

    Returns a tensor of the factors' batch shape (0-d for one block) without a host
    sync. Guard: when either trace is zero, negative or non-finite the formula is
    meaningless and ``pi = 1`` is returned (the damping is then split evenly).
    """
    ratio = mean_diagonal(omega, omega_diagonal) / mean_diagonal(gamma, gamma_diagonal)
    pi = torch.sqrt(ratio)
    good = torch.isfinite(pi) & (pi > 0)
    return torch.where(good, pi, torch.ones_like(pi))


def add_to_diagonal(factor: Tensor, value: Tensor, diagonal: bool = False) -> Tensor:
    """``F + value I`` in place (``value`` has the batch shape, broadcast over each block's diagonal)."""
    target = factor if diagonal else torch.diagonal(factor, dim1=-2, dim2=-1)
    target.add_(value.unsqueeze(-1))
    return factor


def damped_factors(
    omega: Tensor,
    gamma: Tensor,
    damping_total: float,
    *,
    omega_diagonal: bool = False,
    gamma_diagonal: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Factored Tikhonov damping, Eqn 28.

    ``Omega_d = Omega + pi sqrt(λ + γ) I`` and ``Gamma_d = Gamma + (1/pi) sqrt(λ + γ) I``
    with ``damping_total = λ + γ`` (weight decay plus damping) and ``pi`` from
    :func:`pi_trace_norm`, one ``pi`` per block of a batch. Full factors are symmetrised
    first. Returns ``(Omega_d, Gamma_d, pi)``.
    """
    if damping_total < 0 or not math.isfinite(damping_total):
        raise ValueError(f"weight decay + damping (λ + γ) must be finite and >= 0, got {damping_total}")
    omega_s = omega.clone() if omega_diagonal else symmetrize(omega)
    gamma_s = gamma.clone() if gamma_diagonal else symmetrize(gamma)
    pi = pi_trace_norm(omega_s, gamma_s, omega_diagonal=omega_diagonal, gamma_diagonal=gamma_diagonal)
    root = math.sqrt(damping_total)
    add_to_diagonal(omega_s, pi * root, omega_diagonal)
    add_to_diagonal(gamma_s, root / pi, gamma_diagonal)
    return omega_s, gamma_s, pi


def cholesky_inverse_fast(mat: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of a symmetric positive-definite ``mat`` (or a batch) through Cholesky, without a host sync.

    Returns ``(inverse, ok)`` where ``ok`` is a 0-d bool tensor: every factorisation
    succeeded and the inverse is finite. Callers batch the ``ok`` flags into one sync
    and send failures to :func:`inverse_fallback`.
    """
    chol, info = torch.linalg.cholesky_ex(mat)
    ok = (info == 0).all() & torch.isfinite(chol).all()
    # A failed factor may hold zeros on its diagonal, on which the triangular solve would
    # produce inf (or raise); substitute the identity and let `ok` carry the failure instead.
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    chol = torch.where(ok, chol, eye)
    # inv = L^-T L^-1: one triangular solve and one GEMM, about twice as fast on CPU as
    # torch.cholesky_inverse for the 4608-wide factors of a ResNet-18.
    chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    inv = symmetrize(chol_inv.mT @ chol_inv)
    return inv, ok & torch.isfinite(inv).all()


def diagonal_inverse_fast(diag: Tensor) -> tuple[Tensor, Tensor]:
    """``1 / d`` for a damped diagonal factor, with the same ``ok`` flag as :func:`cholesky_inverse_fast`."""
    ok = (diag > 0).all() & torch.isfinite(diag).all()
    safe = torch.where(diag > 0, diag, torch.ones_like(diag))
    return safe.reciprocal(), ok


#: Relative jitters (times the mean diagonal) tried, in order, when Cholesky fails.
_JITTERS = (1e-8, 1e-6, 1e-4)


def inverse_fallback(mat: Tensor, diagonal: bool = False) -> tuple[Tensor | None, str]:
    """Slow, robust inverse of a symmetric PSD-ish ``mat`` whose Cholesky failed.

    Order: Cholesky with increasing diagonal jitter (relative to the mean diagonal,
    or absolute when that is 0), the same in float64, then an eigendecomposition in
    float64 with eigenvalues clamped from below. A batch ``(g, k, k)`` is handled block
    by block; ``diagonal=True`` clamps the entries of ``diag(mat)`` from below. Returns
    ``(inverse in mat.dtype, description of what worked)``, or ``(None, reason)`` when
    ``mat`` is non-finite or nothing worked. Host syncs are fine here: this is the failure path.
    """
    if not bool(torch.isfinite(mat).all()):
        return None, "factor is not finite"
    if diagonal:
        top = float(mat.abs().max()) if mat.numel() else 1.0
        floor = max(top * 1e-12, 1e-30)
        return mat.clamp(min=floor).reciprocal(), f"diagonal entries clamped to >= {floor:.3g}"
    if mat.dim() > 2:
        parts = [inverse_fallback(block) for block in mat.reshape(-1, *mat.shape[-2:])]
        if any(inv is None for inv, _ in parts):
            return None, next(note for inv, note in parts if inv is None)
        notes = sorted({note for _, note in parts})
        return torch.stack([inv for inv, _ in parts if inv is not None]).reshape(mat.shape), "; ".join(notes)
    mat = symmetrize(mat)
    dtypes = [mat.dtype] if mat.dtype == torch.float64 else [mat.dtype, torch.float64]
    for dt in dtypes:
        m = mat.to(dt)
        scale = float(m.diagonal().abs().mean())
        scale = scale if scale > 0 and math.isfinite(scale) else 1.0
        eye = torch.eye(m.shape[0], dtype=dt, device=m.device)
        for rel in _JITTERS:
            inv, ok = cholesky_inverse_fast(m + (rel * scale) * eye)
            if bool(ok):
                return inv.to(mat.dtype), f"Cholesky with jitter {rel * scale:.3g} in {dt}"
    m = mat.to(torch.float64)
    try:
        evals, evecs = torch.linalg.eigh(m)
    except RuntimeError as err:  # eigh can fail to converge on pathological input
        return None, f"eigendecomposition failed ({err})"
    top = float(evals.abs().max()) if evals.numel() else 1.0
    floor = max(top * 1e-12, 1e-30)
    evals = evals.clamp(min=floor)
    inv = (evecs / evals) @ evecs.T
    if not bool(torch.isfinite(inv).all()):
        return None, "eigendecomposition gave a non-finite inverse"
    return inv.to(mat.dtype), f"eigendecomposition with eigenvalues clamped to >= {floor:.3g}"


def eigh_psd(mat: Tensor, diagonal: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(d, Q)`` with ``mat = Q diag(d) Q^T`` for the symmetrised ``mat``, ``d`` clamped to ``>= 0``.

    Factors are PSD in exact arithmetic (Sec. 3.1); tiny negative eigenvalues are
    rounding error and would make ``d_G d_O^T + λ + γ`` smaller than
    ``λ + γ`` in Eqn 43. Batches ``(g, k, k)`` are decomposed per block. A diagonal
    factor is its own eigendecomposition: ``(d clamped, None)`` (``Q = I``).
    """
    if diagonal:
        return mat.clamp(min=0), None
    evals, evecs = torch.linalg.eigh(symmetrize(mat))
    return evals.clamp(min=0), evecs


def _left(inv: Tensor, grad: Tensor, diagonal: bool) -> Tensor:
    """``inv @ grad`` for a full ``inv`` or ``diag(inv) @ grad`` for a diagonal one."""
    return inv.unsqueeze(-1) * grad if diagonal else inv @ grad


def _right(grad: Tensor, inv: Tensor, diagonal: bool) -> Tensor:
    """``grad @ inv`` for a full ``inv`` or ``grad @ diag(inv)`` for a diagonal one."""
    return grad * inv.unsqueeze(-2) if diagonal else grad @ inv


def kron_solve_pi(
    grad: Tensor,
    gamma_inv: Tensor,
    omega_inv: Tensor,
    *,
    gamma_diagonal: bool = False,
    omega_diagonal: bool = False,
) -> Tensor:
    """``(Omega_d ⊗ Gamma_d)^{-1} vec(G) = vec(Gamma_d^{-1} G Omega_d^{-1})`` (Eqn 29), per block."""
    return _right(_left(gamma_inv, grad, gamma_diagonal), omega_inv, omega_diagonal)


def kron_solve_eigen(
    grad: Tensor,
    q_gamma: Tensor | None,
    d_gamma: Tensor,
    q_omega: Tensor | None,
    d_omega: Tensor,
    damping_total: Tensor | float,
) -> Tensor:
    """``(Omega ⊗ Gamma + (λ + γ) I)^{-1} vec(G)``, exact damping (Eqns 39-44).

    ``V1 = Q_G^T G Q_O`` (42), ``V2 = V1 / (d_G d_O^T + λ + γ)`` (43, with the
    weight decay added to the paper's ``gamma`` so the target is Eqn 9's
    ``F + (λ + γ) I``), result ``Q_G V2 Q_O^T`` (44). ``Q = None`` stands for the
    identity (a diagonal factor); leading batch dims are independent blocks.
    """
    v1 = grad if q_gamma is None else q_gamma.mT @ grad
    v1 = v1 if q_omega is None else v1 @ q_omega
    v2 = v1 / (d_gamma.unsqueeze(-1) * d_omega.unsqueeze(-2) + damping_total)
    v2 = v2 if q_gamma is None else q_gamma @ v2
    return v2 if q_omega is None else v2 @ q_omega.mT
