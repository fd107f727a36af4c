"""Compression methods for one delta matrix, all in one code path.

- mixed    (ME-Switch): salient-aware mixed precision. Input channel i of the delta gets the
           score E_i = s_i * ||delta[:, i] - Q(delta)[:, i]||^2, the output error it contributes
           (s_i = sum over calibration tokens of x_i^2). The top-k channels stay in float16;
           the step sizes are fitted again on the remaining channels, which are quantized.
- rtn      the same quantizer with no salient channels.
- bitdelta sign(delta) times one scale per matrix (mean |delta|), as in BitDelta.
- lowrank  `mixed` of the delta minus a rank-r part, plus that part as float16 factors, fitted
           by alternating (lowrank.py); the rank comes from a bit budget, --rank-bits.
- fp16     the delta itself in 16 bits (float32 where float16 would not reproduce the expert).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .delta import CompressedDelta, DenseDelta, QuantizedDelta
from .lowrank import lowrank_matrix
from .packing import SUPPORTED_BITS, pack_codes
from .quantizer import AffineParams, dequantize_codes, fit_affine, quantize_codes

METHODS = ("mixed", "rtn", "bitdelta", "fp16", "lowrank")
VALUE_DTYPE = torch.float16


def check_salient(salient: float) -> float:
    """A salient-channel setting is a count (integer >= 1) or a fraction in [0, 1)."""
    if salient < 0 or (salient >= 1 and salient != int(salient)):
        raise ValueError(f"--salient must be a count (integer >= 1) or a fraction in [0, 1), got {salient}")
    return salient


@dataclass
class CompressionSpec:
    method: str = "mixed"
    bits: int = 2
    # Salient input channels per matrix: a count if >= 1, else a fraction of the input features.
    salient: float = 0.01
    group_size: int = 0  # 0: one step size per output channel
    compress_embeddings: bool = True  # False keeps embeddings / LM head as a 16-bit delta
    rank_bits: float = 0.2  # lowrank only: bits per parameter spent on the low-rank factors

    def validate(self) -> "CompressionSpec":
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method in ("mixed", "rtn", "lowrank") and self.bits not in SUPPORTED_BITS:
            raise ValueError(f"--bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        check_salient(self.salient)
        if self.group_size < 0:
            raise ValueError(f"--group-size must be >= 0, got {self.group_size}")
        if not 0 <= self.rank_bits <= 8:
            raise ValueError(f"--rank-bits must be in [0, 8], got {self.rank_bits}")
        return self

    def salient_count(self, in_features: int) -> int:
        if self.method not in ("mixed", "lowrank"):
            return 0
        k = int(self.salient) if self.salient >= 1 else int(round(self.salient * in_features))
        # Keep at least one column quantized so the matrix stays a quantized matrix.
        return max(0, min(k, in_features - 1))

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.method != "lowrank":
            d.pop("rank_bits")
        if self.method in ("bitdelta", "fp16"):
            d = {"method": self.method, "compress_embeddings": self.compress_embeddings}
            if self.method == "bitdelta":
                d["bits"] = 1
        return d


def channel_errors(delta: torch.Tensor, bits: int, group_size: int, col_weight: torch.Tensor | None) -> torch.Tensor:
    """E_i = s_i * ||delta[:, i] - Q(delta)[:, i]||^2 for every input channel i."""
    p = fit_affine(delta, bits, group_size, col_weight)
    err = ((dequantize_codes(quantize_codes(delta, p, bits), p) - delta) ** 2).sum(dim=0)
    s = torch.ones(delta.shape[1]) if col_weight is None else col_weight.float()
    return s * err


def select_salient(
    delta: torch.Tensor, bits: int, k: int, group_size: int = 0, col_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices (sorted, int32) of the k input channels with the largest output error."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.int32)
    scores = channel_errors(delta, bits, group_size, col_weight)
    return torch.topk(scores, k).indices.sort().values.to(torch.int32)


def quantize_matrix(
    delta: torch.Tensor,
    bits: int,
    group_size: int = 0,
    salient_k: int = 0,
    col_weight: torch.Tensor | None = None,
) -> QuantizedDelta:
    """Mixed-precision quantization of a 2-D delta (salient_k = 0 gives plain RTN)."""
    delta = delta.float()
    out, cols = delta.shape
    idx = select_salient(delta, bits, salient_k, group_size, col_weight)
    keep = torch.ones(cols, dtype=torch.bool)
    keep[idx.long()] = False
    rest = delta[:, keep]
    w = None if col_weight is None else col_weight.float()[keep]
    params = fit_affine(rest, bits, group_size, w)
    codes = quantize_codes(rest, params, bits)
    return QuantizedDelta(
        shape=(out, cols),
        bits=bits,
        packed=pack_codes(codes, bits),
        params=params,
        salient_idx=idx,
        salient_values=delta[:, idx.long()].to(VALUE_DTYPE).contiguous(),
    )


def bitdelta_matrix(delta: torch.Tensor) -> QuantizedDelta:
    """sign(delta) * alpha with alpha = mean |delta|, written as a 1-bit code with one
    step size (2 alpha) and one offset (-alpha) for the whole matrix."""
    delta = delta.float()
    out, cols = delta.shape
    alpha = delta.abs().mean().to(VALUE_DTYPE).float()
    params = AffineParams(
        scale=(2 * alpha).reshape(1, 1).to(VALUE_DTYPE), offset=(-alpha).reshape(1, 1).to(VALUE_DTYPE), group_size=0
    )
    codes = (delta > 0).to(torch.uint8)
    return QuantizedDelta(
        shape=(out, cols),
        bits=1,
        packed=pack_codes(codes, 1),
        params=params,
        salient_idx=torch.zeros(0, dtype=torch.int32),
        salient_values=torch.zeros(out, 0, dtype=VALUE_DTYPE),
    )


def dense_delta(
    delta: torch.Tensor, base: torch.Tensor | None = None, expert: torch.Tensor | None = None
) -> DenseDelta:
    """The delta in float16. When base and expert are given the result must reproduce the
    expert exactly in its own dtype: the elements float16 misses (tiny weights, weights that
    moved across many binades) are stored as exact patches; if they are many, the delta is
    stored in float32 instead, with patches for whatever float32 still misses."""
    values = delta.to(VALUE_DTYPE).contiguous()
    if base is None or expert is None:
        return DenseDelta(values)
    wrong = ((base.float() + values.float()).to(expert.dtype) != expert).reshape(-1)
    # A patch costs an int32 index and a 16-bit value (6 bytes); float32 values cost 2 bytes
    # more per element than float16: past a third of the elements, float32 is cheaper.
    if int(wrong.sum()) * 3 > wrong.numel():
        values = delta.float().contiguous()
        wrong = ((base.float() + values).to(expert.dtype) != expert).reshape(-1)
    if not wrong.any():
        return DenseDelta(values)
    idx = wrong.nonzero().squeeze(1).to(torch.int32 if wrong.numel() < 2**31 else torch.int64)
    return DenseDelta(values, patch_index=idx, patch_values=expert.reshape(-1)[idx.long()].contiguous())


def compress_matrix(
    delta: torch.Tensor,
    spec: CompressionSpec,
    col_weight: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    expert: torch.Tensor | None = None,
) -> CompressedDelta:
    """Compress one 2-D delta with the method of `spec`. base/expert are only needed by fp16."""
    if delta.dim() != 2:
        raise ValueError(f"compress_matrix expects a 2-D delta, got shape {tuple(delta.shape)}")
    if spec.method == "fp16":
        return dense_delta(delta, base, expert)
    if spec.method == "bitdelta":
        return bitdelta_matrix(delta)
    k = spec.salient_count(delta.shape[1])
    if spec.method == "lowrank":
        return lowrank_matrix(delta, spec.bits, spec.rank_bits, k, spec.group_size, col_weight)
    return quantize_matrix(delta, spec.bits, spec.group_size, k, col_weight)
