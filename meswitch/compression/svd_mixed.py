"""`--method svd-mixed`: mixed precision over the delta's singular vectors (Delta-CoMe style).

A fine-tuning delta's spectrum decays: a few singular directions carry much of its energy and a
long tail carries little each. Here the delta is stored as its factors only, D ~= A B, the
singular-vector pairs in consecutive blocks of different bit widths: the top pairs in 8 bits,
the next ones in 3 or 2 bits (or 1), the tail dropped.

1. SVD of the activation-weighted delta, D diag(w) = U S V^T with w_i = sqrt(s_i) (s_i: the
   calibration second moment of input i, as in lowrank.weighted_lowrank), so that the kept
   directions are those of the expected output error; the weighting is undone on the right:
   A = U sqrt(S), B = sqrt(S) V^T diag(1/w) (the singular values split evenly between the two).
2. Bit widths per pair (allocate_widths): every pair j may be dropped or stored at a width b in
   WIDTHS. Storing pair j costs its bytes exactly (the packed codes of A's column and B's row,
   plus a float16 step size and offset for each), and leaves an expected error
   sigma_j^2 * err(b), err(b) = 2 q_b + q_b^2 with q_b the relative mean squared error of the
   b-bit quantizer on a Gaussian vector (REL_MSE, measured with quantizer.fit_affine); a
   dropped pair leaves sigma_j^2. The cheapest way down this error curve is the same for every
   pair (its lower convex hull over the widths); the hull's steps of all pairs are taken in order
   of error removed per bit, sigma_j^2 * (drop in err) / (bytes added), until the next one no
   longer fits in `bits` bits per parameter of the matrix. Pairs with larger singular values
   come first at every step, so the widths never increase along the spectrum: runs of equal
   width are the blocks.
3. Each block's rows of A^T and of B are quantized with the existing quantizer, one step size
   and offset per row (per singular vector); B's rows with the column weights s (the output
   error), A^T's rows unweighted. Rounding A alone would leave B fitted to the unrounded A, so
   (quantized least squares, in the weighted space) B is refitted to the rounded A before it
   is rounded: B = argmin ||A_q B - D diag(w)||, then A to the rounded B, and so on for REFITS
   rounds. On SmolLM2 deltas this removes 15-23% of the relative error at 2.25 bits and 5-6%
   at 1 bit (the dropped tail, which no refit recovers, is most of what remains).

Every stored byte counts in the effective bits, and the allocation never exceeds the target.
Embeddings and the LM head go through the same SVD (their rows are gathered from the factors).
These deltas are not tuned by --tune-steps (their factors are not trainable step sizes).
"""
from __future__ import annotations

import torch

from .delta import SvdBlock, SvdDelta
from .lowrank import _column_scale
from .packing import pack_codes, packed_row_bytes
from .quantizer import dequantize_codes, fit_affine, quantize_codes

# Widths a singular-vector pair may be stored at; relative MSE of the b-bit quantizer (with its
# clipping search) on Gaussian rows of 1024 values (torch.manual_seed(0), 200 rows).
REL_MSE = {1: 0.366, 2: 0.120, 3: 0.0379, 4: 0.0114, 8: 5.5e-5}
WIDTHS = tuple(sorted(REL_MSE))
REFITS = 2  # rounds of refitting one factor to the other's quantized values (0: plain rounding)
PARAM_BYTES = 8  # a float16 step size and offset for the row of A^T and for the row of B


def pair_bytes(out: int, cols: int, bits: int) -> int:
    """Bytes that storing one singular-vector pair at `bits` costs (0 bits: dropped)."""
    return 0 if bits == 0 else packed_row_bytes(out, bits) + packed_row_bytes(cols, bits) + PARAM_BYTES


def _hull_steps(out: int, cols: int) -> list[tuple[int, int, float]]:
    """The lower convex hull of (bytes, relative error) over dropped + WIDTHS, as steps
    (from width, to width, error removed per byte), in decreasing efficiency."""
    points = [(0, 0, 1.0)] + [(b, pair_bytes(out, cols, b), 2 * REL_MSE[b] + REL_MSE[b] ** 2) for b in WIDTHS]
    steps, cur = [], points[0]
    while True:
        better = [p for p in points if p[1] > cur[1] and p[2] < cur[2]]
        if not better:
            return steps
        nxt = max(better, key=lambda p: ((cur[2] - p[2]) / (p[1] - cur[1]), -p[1]))
        steps.append((cur[0], nxt[0], (cur[2] - nxt[2]) / (nxt[1] - cur[1])))
        cur = nxt


def allocate_widths(sigma: torch.Tensor, out: int, cols: int, bits: float) -> list[int]:
    """Bit width of each singular-vector pair (0: dropped), non-increasing, whose bytes fit in
    bits * out * cols / 8 (see the module docstring)."""
    budget = bits * out * cols / 8
    energy = (sigma.double() ** 2).tolist()
    steps = _hull_steps(out, cols)
    # (efficiency, pair, step): sorted by efficiency, ties broken towards larger singular values
    # and earlier steps, so a pair's steps come in their order.
    order = sorted(((e * eff, j, k) for j, e in enumerate(energy) if e > 0 for k, (_, _, eff) in enumerate(steps)),
                   key=lambda t: (-t[0], t[1], t[2]))
    widths, spent = [0] * len(energy), 0
    for _, j, k in order:
        frm, to, _ = steps[k]
        assert widths[j] == frm
        cost = pair_bytes(out, cols, to) - pair_bytes(out, cols, frm)
        if spent + cost > budget:
            break
        widths[j], spent = to, spent + cost
    return widths


def _blocks(widths: list[int]) -> list[tuple[int, int, int]]:
    """(start, stop, bits) of each run of equal non-zero width."""
    runs, start = [], 0
    for j in range(1, len(widths) + 1):
        if j == len(widths) or widths[j] != widths[start]:
            if widths[start]:
                runs.append((start, j, widths[start]))
            start = j
    return runs


def _quantize_blocks(x: torch.Tensor, blocks: list[tuple[int, int, int]], col_weight: torch.Tensor | None):
    """Each block's rows of x at its width, one step size and offset per row: [(codes, scale,
    offset)] per block, and x as those codes decode (float32, what the runtime computes with)."""
    parts, decoded = [], torch.empty_like(x)
    for start, stop, width in blocks:
        p = fit_affine(x[start:stop], width, 0, col_weight)
        codes = quantize_codes(x[start:stop], p, width)
        decoded[start:stop] = dequantize_codes(codes, p)
        parts.append((pack_codes(codes, width), p.scale.cpu().contiguous(), p.offset.cpu().contiguous()))
    return parts, decoded


def svd_mixed_matrix(delta: torch.Tensor, bits: float, col_weight: torch.Tensor | None = None,
                     refits: int = REFITS) -> SvdDelta:
    """A 2-D delta as quantized singular-vector blocks at about `bits` bits per parameter."""
    delta = delta.float()
    out, cols = delta.shape
    w = _column_scale(cols, col_weight, delta.device)
    dw = delta * w[None, :]
    u, sigma, vh = torch.linalg.svd(dw, full_matrices=False)
    widths = allocate_widths(sigma, out, cols, bits)
    r = sum(1 for b in widths if b)
    blocks = _blocks(widths[:r])
    if not blocks:  # no pair fits the budget: nothing stored
        d = SvdDelta((out, cols), [])
        d.validate()
        return d
    root = sigma[:r].sqrt()
    s = None if col_weight is None else col_weight.to(delta.device, torch.float32)
    a_parts, a_q = _quantize_blocks((u[:, :r] * root[None, :]).t(), blocks, None)  # rows of A^T
    b_w = vh[:r] * root[:, None]  # B diag(w), [r, in]
    # Quantized least squares (see the module docstring): B refitted to the quantized A, then A
    # to the quantized B, ..., each before it is quantized, in the activation-weighted space.
    for i in range(refits + 1):
        if i:
            a_parts, a_q = _quantize_blocks(torch.linalg.lstsq(b_w.t(), dw.t()).solution, blocks, None)
        if refits:
            b_w = torch.linalg.lstsq(a_q.t(), dw).solution
        b_parts, b_q = _quantize_blocks(b_w / w[None, :], blocks, s)
        b_w = b_q * w[None, :]
    d = SvdDelta((out, cols), [SvdBlock(width, *a, *b) for (_, _, width), a, b in zip(blocks, a_parts, b_parts)])
    d.validate()
    return d
