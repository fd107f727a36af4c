"""Compression methods for one delta matrix, all in one code path.

- mixed    (ME-Switch): salient-aware mixed precision. Input channel i of the delta gets the
           score E_i = s_i * ||delta[:, i] - Q(delta)[:, i]||^2, the output error it contributes
           (s_i = sum over calibration tokens of x_i^2). The top-k channels stay in float16;
           the step sizes are fitted again on the remaining channels, which are quantized.
- rtn      the same quantizer with no salient channels.
- bitdelta sign(delta) times one scale per matrix (mean |delta|), as in BitDelta.
- lowrank  `mixed` of the delta minus a rank-r part, plus that part as float16 factors, fitted
           by alternating (lowrank.py); the rank comes from a bit budget, --rank-bits.
- svd-mixed  the delta as its activation-weighted singular-vector pairs only, in blocks of
           different bit widths (8 / 4 / 3 / 2 / 1 bits, the tail dropped) allocated greedily by
           singular-value energy to meet --bits per parameter (any target in (0, 8]; svd_mixed.py,
           Delta-CoMe style); each factor refitted to the other's rounded values before rounding.
- fp16     the delta itself in 16 bits (float32 where float16 would not reproduce the expert).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .delta import CompressedDelta, DenseDelta, QuantizedDelta
from .lowrank import lowrank_matrix
from .packing import SUPPORTED_BITS, pack_codes
from .quantizer import AffineParams, dequantize_codes, fit_affine, quantize_codes
from .svd_mixed import svd_mixed_matrix

METHODS = ("mixed", "rtn", "bitdelta", "fp16", "lowrank", "svd-mixed")
VALUE_DTYPE = torch.float16


def check_salient(salient: float) -> float:
    """A salient-channel setting is a count (integer >= 1) or a fraction in [0, 1)."""
    if salient < 0 or (salient >= 1 and salient != int(salient)):
        raise ValueError(f"--salient must be a count (integer >= 1) or a fraction in [0, 1), got {salient}")
    return salient


@dataclass
class CompressionSpec:
    method: str = "mixed"
    # Bits per quantized weight (1, 2, 3, 4, 8); --method svd-mixed: the target average bits per
    # parameter, any value in (0, 8] (e.g. 1.0 or 2.25), every stored byte counted.
    bits: float = 2
    # Salient input channels per matrix: a count if >= 1, else a fraction of the input features.
    salient: float = 0.01
    group_size: int = 0  # 0: one step size per output channel
    compress_embeddings: bool = True  # False keeps embeddings / LM head as a 16-bit delta
    rank_bits: float = 0.2  # lowrank only: bits per parameter spent on the low-rank factors

    def validate(self) -> "CompressionSpec":
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "svd-mixed":
            if not 0 < self.bits <= 8:
                raise ValueError(f"--bits (the target average bits per parameter) must be in (0, 8], got {self.bits}")
            self.bits = int(self.bits) if float(self.bits).is_integer() else float(self.bits)
        elif self.method in ("mixed", "rtn", "lowrank"):
            if self.bits not in SUPPORTED_BITS:
                raise ValueError(f"--bits must be one of {SUPPORTED_BITS} for --method {self.method}, got {self.bits}")
            self.bits = int(self.bits)
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
        if self.method == "svd-mixed":  # no salient channels, no groups: one step size per singular vector
            d = {"method": self.method, "bits": self.bits, "compress_embeddings": self.compress_embeddings}
        if self.method in ("bitdelta", "fp16"):
            d = {"method": self.method, "compress_embeddings": self.compress_embeddings}
            if self.method == "bitdelta":
                d["bits"] = 1
        return d


# A delta is quantized CHUNK_ELEMENTS at a time (ranges of whole rows: every step size and
# offset belongs to one row), so the working set stays at about six times 16 MiB whatever the
# tensor: a 152k x 3584 embedding needs no more memory than a 4k x 4k projection.
CHUNK_ELEMENTS = 1 << 22


@dataclass
class DeltaRows:
    """A 2-D delta read by ranges of rows: `read(a, b)` returns rows [a, b) in float32, from a
    tensor in memory or lazily from base and expert checkpoints. `pair(a, b)` (lossless fp16
    only) returns the same rows of base and expert as stored."""

    shape: tuple[int, int]
    read: Callable[[int, int], torch.Tensor]
    chunk_elements: int = CHUNK_ELEMENTS
    pair: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def of(cls, delta: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> "DeltaRows":
        return cls(tuple(delta.shape), lambda a, b: delta[a:b].float(), chunk_elements)

    def chunks(self):
        """(first row, rows) for each chunk, in order."""
        rows, cols = self.shape
        step = max(1, self.chunk_elements // max(cols, 1))
        for a in range(0, rows, step):
            b = min(rows, a + step)
            yield a, self.read(a, b)


def _rows(delta) -> DeltaRows:
    return delta if isinstance(delta, DeltaRows) else DeltaRows.of(delta)


def channel_errors(delta, bits: int, group_size: int, col_weight: torch.Tensor | None) -> torch.Tensor:
    """E_i = s_i * ||delta[:, i] - Q(delta)[:, i]||^2 for every input channel i (each row
    quantized with its own fitted step size, chunk by chunk)."""
    rows = _rows(delta)
    err = None
    for _, d in rows.chunks():
        p = fit_affine(d, bits, group_size, col_weight)
        e = ((dequantize_codes(quantize_codes(d, p, bits), p) - d) ** 2).sum(dim=0)
        err = e if err is None else err + e
    s = torch.ones_like(err) if col_weight is None else col_weight.to(err.device, torch.float32)
    return s * err


def select_salient(delta, bits: int, k: int, group_size: int = 0, col_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (sorted, int32) of the k input channels with the largest output error."""
    if k <= 0:
        return torch.zeros(0, dtype=torch.int32)
    scores = channel_errors(delta, bits, group_size, col_weight)
    return torch.topk(scores, k).indices.sort().values.cpu().to(torch.int32)


def quantize_matrix(
    delta,
    bits: int,
    group_size: int = 0,
    salient_k: int = 0,
    col_weight: torch.Tensor | None = None,
) -> QuantizedDelta:
    """Mixed-precision quantization of a 2-D delta (a tensor or DeltaRows; salient_k = 0 gives
    plain RTN). Rows are independent, so quantizing chunk by chunk gives the same codes."""
    rows = _rows(delta)
    out, cols = rows.shape
    idx = select_salient(rows, bits, salient_k, group_size, col_weight)
    keep = torch.ones(cols, dtype=torch.bool)
    keep[idx.long()] = False
    w = None if col_weight is None else col_weight.float()[keep]
    packed, scales, offsets, salient = [], [], [], []
    group = 0
    for _, d in rows.chunks():
        rest = d[:, keep.to(d.device)]
        params = fit_affine(rest, bits, group_size, w)
        group = params.group_size
        packed.append(pack_codes(quantize_codes(rest, params, bits), bits))
        scales.append(params.scale.cpu())
        offsets.append(params.offset.cpu())
        salient.append(d[:, idx.long().to(d.device)].to(VALUE_DTYPE).cpu())
    return QuantizedDelta(
        shape=(out, cols),
        bits=bits,
        packed=torch.cat(packed),
        params=AffineParams(torch.cat(scales), torch.cat(offsets), group),
        salient_idx=idx,
        salient_values=torch.cat(salient).contiguous(),
    )


def bitdelta_matrix(delta) -> QuantizedDelta:
    """sign(delta) * alpha with alpha = mean |delta|, written as a 1-bit code with one
    step size (2 alpha) and one offset (-alpha) for the whole matrix."""
    rows = _rows(delta)
    out, cols = rows.shape
    total = sum(float(d.abs().sum(dtype=torch.float64)) for _, d in rows.chunks())
    alpha = torch.tensor(total / (out * cols)).to(VALUE_DTYPE).float()
    params = AffineParams(
        scale=(2 * alpha).reshape(1, 1).to(VALUE_DTYPE), offset=(-alpha).reshape(1, 1).to(VALUE_DTYPE), group_size=0
    )
    packed = torch.cat([pack_codes((d > 0).to(torch.uint8), 1) for _, d in rows.chunks()])
    return QuantizedDelta(
        shape=(out, cols),
        bits=1,
        packed=packed,
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
    if base is None or expert is None:
        return DenseDelta(delta.to(VALUE_DTYPE).contiguous())
    flat = delta.reshape(1, -1)
    return dense_rows(DeltaRows((1, flat.shape[1]), lambda a, b: flat.float(), 1 << 62,
                                lambda a, b: (base.reshape(1, -1), expert.reshape(1, -1))), delta.shape)


def _misses(base: torch.Tensor, values: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """Flat mask of the elements where base + values, in the expert's dtype, is not the expert."""
    return ((base.float() + values.float()).to(expert.dtype) != expert).reshape(-1)


def dense_rows(rows: DeltaRows, shape: tuple[int, ...] | None = None) -> DenseDelta:
    """dense_delta chunk by chunk (lossless when rows.pair gives base and expert rows)."""
    shape = tuple(shape or rows.shape)
    if rows.pair is None:
        return DenseDelta(torch.cat([d.to(VALUE_DTYPE).cpu() for _, d in rows.chunks()]).reshape(shape))
    # A patch costs an int32 index and a 16-bit value (6 bytes); float32 values cost 2 bytes
    # more per element than float16: past a third of the elements, float32 is cheaper.
    numel = rows.shape[0] * rows.shape[1]
    wrong16 = 0
    for a, d in rows.chunks():
        b, e = rows.pair(a, a + d.shape[0])
        wrong16 += int(_misses(b, d.to(VALUE_DTYPE).cpu(), e).sum())
    value_dtype = torch.float32 if wrong16 * 3 > numel else VALUE_DTYPE
    index_dtype = torch.int32 if numel < 2**31 else torch.int64
    values, idx, patch = [], [], []
    for a, d in rows.chunks():
        b, e = rows.pair(a, a + d.shape[0])
        v = d.to(value_dtype).cpu()
        wrong = _misses(b, v, e)
        values.append(v)
        if wrong.any():
            i = wrong.nonzero().squeeze(1)
            idx.append((i + a * rows.shape[1]).to(index_dtype))
            patch.append(e.reshape(-1)[i].contiguous())
    values_t = torch.cat(values).reshape(shape).contiguous()
    if not idx:
        return DenseDelta(values_t)
    return DenseDelta(values_t, patch_index=torch.cat(idx), patch_values=torch.cat(patch))


def compress_matrix(
    delta,
    spec: CompressionSpec,
    col_weight: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    expert: torch.Tensor | None = None,
) -> CompressedDelta:
    """Compress one 2-D delta (a tensor, or DeltaRows read chunk by chunk) with the method of
    `spec`. fp16 needs base and expert (as tensors, or DeltaRows.pair) to be lossless."""
    rows = _rows(delta)
    if len(rows.shape) != 2:
        raise ValueError(f"compress_matrix expects a 2-D delta, got shape {tuple(rows.shape)}")
    if spec.method == "fp16":
        if base is not None and expert is not None:
            rows = DeltaRows(rows.shape, rows.read, rows.chunk_elements, lambda a, b: (base[a:b], expert[a:b]))
        return dense_rows(rows)
    if spec.method == "bitdelta":
        return bitdelta_matrix(rows)
    k = spec.salient_count(rows.shape[1])
    if spec.method == "svd-mixed":  # the SVD needs the whole matrix: one tensor in float32
        return svd_mixed_matrix(rows.read(0, rows.shape[0]), spec.bits, col_weight)
    if spec.method == "lowrank":  # the SVD needs the whole matrix: one tensor in float32
        return lowrank_matrix(rows.read(0, rows.shape[0]), spec.bits, spec.rank_bits, k, spec.group_size, col_weight)
    return quantize_matrix(rows, spec.bits, spec.group_size, k, col_weight)
