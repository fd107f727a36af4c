"""Compute backends for the delta layers: how a stored delta becomes compute-ready, and how
`x @ delta^T` is computed for the tokens of one expert.

The delta layers (layers.py) only call a backend's three methods, so a faster CPU kernel or a
GPU kernel plugs in as another backend without touching the layers (the split vLLM makes
between its LoRA layers and its punica wrapper):

    prepare(delta, dtype)      -> ReadyDelta     once per expert and tensor, when it turns hot
    matmul(x, ready)           -> x @ delta^T    x: [tokens, in] of one expert, in the model dtype
    gather_rows(delta, ids)    -> delta[ids]     float32 rows, for embedding lookups

TorchBackend, the one shipped, uses PyTorch's own CPU kernels:
- bfloat16 models: b-bit codes (b <= 4) become PyTorch's packed int4 layout and run through
  `aten._weight_int4pack_mm_for_cpu` (weight-only int4 GEMM, per-group scale and zero point).
  2-bit codes take 4 bits there: compute-ready costs 2x the packed size, still 4x less than a
  bf16 delta. Salient fp16 columns are a small dense product on the side. For many tokens at
  once (prefill) the int4 kernel is slower than dequantizing the delta once and using a dense
  GEMM, so above DENSE_MIN_TOKENS tokens the dense route is taken.
- Everything else (float32/float16 models, 8-bit codes, group layouts the kernel cannot express,
  dense fp16 deltas): the delta dequantized to a dense matrix in the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..compression.delta import CompressedDelta, DenseDelta, QuantizedDelta
from ..compression.quantizer import expand_groups

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what the CPU int4 kernel accepts, largest first
INT4_ROW_BLOCK = 32  # its packed layout tiles output rows by 32
DENSE_MIN_TOKENS = 128  # from here on, dequantize-then-GEMM beats the int4 kernel (benchmarks/runtime.py)


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class Int4Ready:
    """The quantized columns' codes, in their stored (compact) order and padded to a multiple of
    32 columns, in the int4 kernel's layout. The input is gathered into the same order on the
    fly (`columns`), and the salient fp16 columns are a small dense product on the side:
        x @ delta^T = int4mm(x[:, columns] padded) + x[:, salient_idx] @ salient^T"""
    weight: torch.Tensor  # uint8, aten int4pack layout of codes [out, n_padded]
    scales_zeros: torch.Tensor  # [n_padded / group, out, 2]: w = (code - 8) * scale + zero
    group_size: int
    columns: torch.Tensor | None  # int64 [n_quantized]: input columns in code order (None: all, in order)
    n_padded: int
    salient_idx: torch.Tensor  # int64 [k]
    salient: torch.Tensor  # model dtype [out, k]
    source: QuantizedDelta  # the packed form, kept for the dense (prefill) route

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight, self.scales_zeros, self.columns, self.salient_idx, self.salient)


@dataclass
class DenseReady:
    weight: torch.Tensor  # [out, in] in the model dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight)


ReadyDelta = Int4Ready | DenseReady


def _unpack_int4_layout_probe() -> bool:
    """The CPU int4 kernel exists in this PyTorch build (2.5+ on x86/ARM)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


class TorchBackend:
    name = "torch"

    def __init__(self, use_int4: bool | None = None):
        self.use_int4 = _unpack_int4_layout_probe() if use_int4 is None else use_int4

    # ----- preparation ----------------------------------------------------------------------
    def prepare(self, delta: CompressedDelta, dtype: torch.dtype) -> ReadyDelta:
        if isinstance(delta, QuantizedDelta) and self._int4_ok(delta, dtype):
            return self._prepare_int4(delta, dtype)
        return DenseReady(delta.dequantize().to(dtype))

    def ready_nbytes(self, delta: CompressedDelta, dtype: torch.dtype) -> int:
        """What prepare() will allocate, without doing it (an upper bound for 1-D deltas)."""
        if len(delta.shape) != 2:
            return delta.shape[0] * dtype.itemsize
        out, cols = delta.shape
        if isinstance(delta, QuantizedDelta) and self._int4_ok(delta, dtype):
            padded, group = _int4_geometry(delta)
            k = delta.salient_idx.numel()
            return (out * padded // 2 + (padded // group) * out * 2 * dtype.itemsize
                    + k * (8 + out * dtype.itemsize) + (8 * delta.n_quantized_cols if k else 0))
        return out * cols * dtype.itemsize

    def _int4_ok(self, d: QuantizedDelta, dtype: torch.dtype) -> bool:
        if not self.use_int4 or dtype != torch.bfloat16 or d.bits > 4:
            return False
        out, cols = d.shape
        if out % INT4_ROW_BLOCK:
            return False
        if d.params.scale.shape[1] == 1:
            return True
        # Per-group step sizes map onto the kernel's groups when the group size is one it supports
        # and the (padded) code rows split into whole groups.
        return d.params.group_size in INT4_GROUP_SIZES and d.n_quantized_cols % d.params.group_size == 0

    def _prepare_int4(self, d: QuantizedDelta, dtype: torch.dtype) -> Int4Ready:
        out = d.shape[0]
        padded, group = _int4_geometry(d)
        scale = d.params.scale.float().expand(out, -1)
        offset = d.params.offset.float().expand(out, -1)
        if scale.shape[1] == 1:
            scale, offset = scale.expand(out, padded // group), offset.expand(out, padded // group)
        # The kernel decodes (code - 8) * scale + zero; ours is code * scale + offset.
        scales_zeros = torch.stack([scale, offset + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(dtype)
        weight = int4_layout(d, padded)
        sal = d.salient_idx.long()
        columns = None if sal.numel() == 0 else d.quantized_columns()
        return Int4Ready(weight, scales_zeros, group, columns, padded, sal, d.salient_values.to(dtype), d)

    # ----- compute -----------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor, ready: ReadyDelta) -> torch.Tensor:
        """x @ delta^T for x [tokens, in]."""
        if isinstance(ready, DenseReady):
            return F.linear(x, ready.weight)
        if x.shape[0] >= DENSE_MIN_TOKENS:
            return F.linear(x, ready.source.dequantize().to(x.dtype))
        xq = x if ready.columns is None else x.index_select(-1, ready.columns)
        if xq.shape[-1] != ready.n_padded:
            xq = F.pad(xq, (0, ready.n_padded - xq.shape[-1]))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xq.contiguous(), ready.weight, ready.group_size, ready.scales_zeros)
        if ready.salient_idx.numel():
            y = y + F.linear(x.index_select(-1, ready.salient_idx), ready.salient)
        return y

    def gather_rows(self, delta: CompressedDelta, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized delta, float32 [len(ids), in], without dequantizing the rest."""
        if isinstance(delta, DenseDelta):
            return delta.values.index_select(0, ids).float()
        return dequantize_rows(delta, ids)


def _int4_geometry(d: QuantizedDelta) -> tuple[int, int]:
    """(columns of the int4 matrix, kernel group size) for a delta's quantized columns."""
    padded = max(INT4_ROW_BLOCK, -(-d.n_quantized_cols // INT4_ROW_BLOCK) * INT4_ROW_BLOCK)
    if d.params.scale.shape[1] > 1:
        return padded, d.params.group_size
    return padded, next(g for g in INT4_GROUP_SIZES if padded % g == 0)


def int4_layout(d: QuantizedDelta, padded: int) -> torch.Tensor:
    """The codes of `d` (compact order, zero-padded to `padded` columns) in the packed layout of
    aten._weight_int4pack_mm_for_cpu. For row counts divisible by 64 the layout is built with
    numpy (rows 64b+j and 64b+32+j share a byte per column, blocks stored column-major), which
    is several times faster than aten._convert_weight_to_int4pack_for_cpu on int32 codes; the
    tests check both agree. Other row counts use the aten conversion."""
    out = d.shape[0]
    codes = d.codes().numpy()
    if codes.shape[1] != padded:
        codes = np.pad(codes, ((0, 0), (0, padded - codes.shape[1])))
    if out % 64:
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(codes).to(torch.int32), 1)
    return torch.from_numpy(int4_layout_from_codes(codes))


def int4_layout_from_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [out, cols] (< 16, out % 64 == 0, cols even) -> uint8 [out, cols / 2] int4pack layout."""
    out, cols = codes.shape
    c = codes.reshape(out // 64, 2, 32, cols)
    b = c[:, 0] | (c[:, 1] << 4)  # [blocks, 32, cols]
    return np.ascontiguousarray(b.transpose(0, 2, 1)).reshape(out, cols // 2)


def dequantize_rows(d: QuantizedDelta, ids: torch.Tensor) -> torch.Tensor:
    from ..compression.packing import unpack_codes

    cols = d.shape[1]
    rows = torch.empty(ids.numel(), cols, dtype=torch.float32)
    if d.n_quantized_cols:
        codes = unpack_codes(d.packed.index_select(0, ids), d.bits, d.n_quantized_cols).float()
        scale, offset = d.params.scale, d.params.offset
        if scale.shape[0] != 1:
            scale, offset = scale.index_select(0, ids), offset.index_select(0, ids)
        n = d.n_quantized_cols
        rows[:, d.quantized_columns()] = codes * expand_groups(scale.float(), n, d.params.group_size) + expand_groups(
            offset.float(), n, d.params.group_size
        )
    if d.salient_idx.numel():
        rows[:, d.salient_idx.long()] = d.salient_values.index_select(0, ids).float()
    return rows


def get_backend(name: str = "torch") -> TorchBackend:
    if name == "torch":
        return TorchBackend()
    if name == "torch-dense":
        return TorchBackend(use_int4=False)
    raise ValueError(f"unknown delta backend {name!r} (available: torch, torch-dense)")
