"""`--method lowrank`: a b-bit salient-aware quantization plus a low-rank part, D ~= Q + A B.

Fine-tuning deltas have a few dominant directions (on SmolLM2 experts the top 4 singular
directions of the activation-weighted delta hold 20-55% of its energy) under a noise-like rest.
A 1-bit code spends its two levels per row on the whole delta; here a rank-r product takes the
dominant directions and the codes quantize what is left. Both parts are fitted by alternating:

    L = lowrank(delta)
    repeat ALTERNATIONS times:  Q = quantize(delta - L);  L = lowrank(delta - Q)
    Q = quantize(delta - L)                       (the codes see the float16 factors as stored)

`quantize` is `mixed` (methods.quantize_matrix: salient columns in 16 bits, b-bit codes with
activation-weighted step sizes), and `lowrank` is the truncated SVD of the error weighted by the
calibration second moments s_i of the layer's inputs: A B minimises
sum_i s_i ||(X - A B)[:, i]||^2, the expected output error, exactly (diagonal column weights:
SVD of X diag(sqrt s), then B = B' diag(1/sqrt s)).

The rank of each matrix follows from a bit budget, `--rank-bits` (bits per parameter spent on
the float16 factors): r = floor(rank_bits * out * in / (16 * (out + in))), so a small k_proj gets
fewer directions than an MLP matrix for the same cost per parameter. Every factor is stored and
counts in the effective bits.
"""
from __future__ import annotations

import torch

from .delta import QuantizedDelta

ALTERNATIONS = 3
FACTOR_DTYPE = torch.float16
MAX_RANK_FRACTION = 0.25  # beyond this a low-rank factorization stops being cheap storage


def rank_for_budget(out: int, cols: int, rank_bits: float) -> int:
    """The largest rank whose float16 factors cost at most rank_bits bits per parameter."""
    r = int(rank_bits * out * cols // (16 * (out + cols)))
    return max(0, min(r, int(MAX_RANK_FRACTION * min(out, cols))))


def _column_scale(cols: int, col_weight: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """sqrt(s_i), with s floored at 1e-6 of its mean (a channel no calibration token used would
    otherwise divide by zero)."""
    if col_weight is None or float(col_weight.sum()) <= 0:
        return torch.ones(cols, device=device)
    s = col_weight.to(device, torch.float32)
    return s.clamp_min(float(s.mean()) * 1e-6).sqrt()


def weighted_lowrank(x: torch.Tensor, rank: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 factors (A [out, r], B [r, in]) of the rank-r A B minimising ||(x - A B) diag(w)||_F.
    Randomized SVD (seeded: the same delta always gives the same factors) with enough power
    iterations to match the exact truncated SVD on these spectra."""
    xw = x * w[None, :]
    q = min(rank + 10, *xw.shape)
    devices = [xw.device] if xw.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(xw, q=q, niter=4)
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.sqrt()
    a = u * root[None, :]
    b = (v * root[None, :]).t() / w[None, :]
    return a.to(FACTOR_DTYPE).contiguous(), b.to(FACTOR_DTYPE).contiguous()


def lowrank_matrix(
    delta: torch.Tensor,
    bits: int,
    rank_bits: float,
    salient_k: int = 0,
    group_size: int = 0,
    col_weight: torch.Tensor | None = None,
) -> QuantizedDelta:
    """Quantized residual + rank-r factors of a 2-D delta (r from the rank_bits budget; r = 0
    gives exactly `mixed`)."""
    from .methods import quantize_matrix  # methods imports this module for its registry

    delta = delta.float()
    out, cols = delta.shape
    rank = rank_for_budget(out, cols, rank_bits)
    if rank == 0:
        return quantize_matrix(delta, bits, group_size, salient_k, col_weight)
    w = _column_scale(cols, col_weight, delta.device)

    def product(a, b):
        return a.float() @ b.float()

    a, b = weighted_lowrank(delta, rank, w)
    for _ in range(ALTERNATIONS):
        q = quantize_matrix(delta - product(a, b), bits, group_size, salient_k, col_weight).dequantize()
        a, b = weighted_lowrank(delta - q, rank, w)
    qd = quantize_matrix(delta - product(a, b), bits, group_size, salient_k, col_weight)
    qd.lowrank_a, qd.lowrank_b = a, b
    qd.validate()
    return qd
