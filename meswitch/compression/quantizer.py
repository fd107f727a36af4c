"""Asymmetric b-bit quantizer with per-output-channel (optionally per-group) step sizes.

For a matrix x of shape [out, n] and groups of `group_size` consecutive input columns
(one group spanning the whole row when group_size is 0):

    code   = clamp(round((x - offset) / scale), 0, 2**bits - 1)       (uint8)
    x_hat  = code * scale + offset

`scale` is the step size and `offset` the zero point expressed in weight units
(offset = -scale * integer_zero_point in the textbook form; a float offset keeps 1-bit codes
useful on a delta centred at zero). Both are stored as float16, and codes are always computed
with the float16-rounded values so that what is stored reconstructs exactly what was measured.

The range [lo, hi] of each group is fitted by a search over clipping ratios: the ratio that
minimises the (optionally column-weighted) squared error of the group wins. With column
weights s_i = sum_t x_i^2 of the layer's inputs, this minimises the expected output error of the
layer rather than the weight error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .packing import SUPPORTED_BITS

# Clipping ratios tried for every group; 1.0 is plain min/max.
DEFAULT_CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(17))  # 1.0 .. 0.2
SCALE_DTYPE = torch.float16


@dataclass
class AffineParams:
    scale: torch.Tensor  # [out, groups] float16
    offset: torch.Tensor  # [out, groups] float16
    group_size: int  # 0 = one group per row


def num_groups(n_cols: int, group_size: int) -> int:
    if group_size <= 0 or group_size >= n_cols:
        return 1
    return (n_cols + group_size - 1) // group_size


def expand_groups(p: torch.Tensor, n_cols: int, group_size: int) -> torch.Tensor:
    """Broadcast a per-group tensor [rows, groups] to per-column [rows, n_cols]."""
    if p.shape[1] == 1:
        return p.expand(p.shape[0], n_cols)
    gs = group_size
    return p.repeat_interleave(gs, dim=1)[:, :n_cols]


def grouped(x: torch.Tensor, group_size: int, pad_value: float | None = None) -> torch.Tensor:
    """[rows, n] -> [rows, G, gs]. The last group is padded with `pad_value`, or by default with
    copies of its last column (which changes neither its min nor its max)."""
    rows, n = x.shape
    g = num_groups(n, group_size)
    gs = n if g == 1 else group_size
    pad = g * gs - n
    if pad:
        fill = x[:, -1:].expand(rows, pad) if pad_value is None else x.new_full((rows, pad), pad_value)
        x = torch.cat([x, fill], dim=1)
    return x.reshape(rows, g, gs)


def _check(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; choose one of {SUPPORTED_BITS}")
    return (1 << bits) - 1


def quantize_codes(x: torch.Tensor, params: AffineParams, bits: int) -> torch.Tensor:
    qmax = _check(bits)
    n = x.shape[1]
    scale = expand_groups(params.scale.float(), n, params.group_size)
    offset = expand_groups(params.offset.float(), n, params.group_size)
    codes = torch.round((x.float() - offset) / scale).clamp_(0, qmax)
    return codes.to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, params: AffineParams) -> torch.Tensor:
    n = codes.shape[1]
    scale = expand_groups(params.scale.float(), n, params.group_size)
    offset = expand_groups(params.offset.float(), n, params.group_size)
    return codes.float() * scale + offset


def fit_affine(
    x: torch.Tensor,
    bits: int,
    group_size: int = 0,
    col_weight: torch.Tensor | None = None,
    clip_grid: tuple[float, ...] = DEFAULT_CLIP_GRID,
) -> AffineParams:
    """Fit per-(row, group) step sizes and offsets to x [out, n] by a clipping search."""
    qmax = _check(bits)
    x = x.float()
    out, n = x.shape
    if n == 0:
        raise ValueError("cannot quantize a matrix with no columns")
    xg = grouped(x, group_size)  # [out, G, gs]
    if col_weight is None:
        w = torch.ones(n, device=x.device)
    else:
        w = col_weight.to(x.device, torch.float32).clamp_min(0)
        w = w / w.mean().clamp_min(1e-30) if w.sum() > 0 else torch.ones(n, device=x.device)
    wg = grouped(w[None, :], group_size, pad_value=0.0)  # [1, G, gs]; padding carries no weight

    lo0 = xg.amin(dim=-1)
    hi0 = xg.amax(dim=-1)
    best_err = torch.full(lo0.shape, float("inf"), device=x.device)
    best_scale = torch.ones(lo0.shape, dtype=SCALE_DTYPE, device=x.device)
    best_offset = torch.zeros(lo0.shape, dtype=SCALE_DTYPE, device=x.device)
    for ratio in clip_grid:
        lo, hi = lo0 * ratio, hi0 * ratio
        scale = ((hi - lo) / qmax).to(SCALE_DTYPE)
        # A constant group (or one whose step underflows float16) gets step 1 and codes 0.
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        offset = lo.to(SCALE_DTYPE)
        s, o = scale.float()[..., None], offset.float()[..., None]
        # In-place chain: codes, then reconstruction error, without extra temporaries.
        r = (xg - o).div_(s).round_().clamp_(0, qmax).mul_(s).add_(o).sub_(xg).square_()
        err = r.mul_(wg).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_offset = torch.where(better, offset, best_offset)
    return AffineParams(best_scale, best_offset, group_size if num_groups(n, group_size) > 1 else 0)


def quantize_dequantize(
    x: torch.Tensor, bits: int, group_size: int = 0, col_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Fake-quantize x: fit, quantize and reconstruct (float32)."""
    p = fit_affine(x, bits, group_size, col_weight)
    return dequantize_codes(quantize_codes(x, p, bits), p)
