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
    """Codes at their original column positions (salient columns hold code 0, the matrix is
    zero-padded to a multiple of 32 columns) in the int4 kernel's layout. `salient_fix` is each
    salient value minus what code 0 decodes to there, so that
        x @ delta^T = int4mm(x) + x[:, salient_idx] @ salient_fix^T."""
    weight: torch.Tensor  # uint8, aten int4pack layout of codes [out, in_padded]
    scales_zeros: torch.Tensor  # [in_padded / group, out, 2]: w = (code - 8) * scale + zero
    group_size: int
    in_features: int
    in_padded: int
    salient_idx: torch.Tensor  # int64 [k]
    salient_fix: torch.Tensor  # [k, out] float32: oneDNN's bf16 GEMM is 2-3x slower than fp32 at k ~ 15
    source: QuantizedDelta  # the packed form, kept for the dense (prefill) route

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight, self.scales_zeros, self.salient_idx, self.salient_fix)


@dataclass
class DenseReady:
    weight: torch.Tensor  # [out, in] in the model dtype

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight)


ReadyDelta = Int4Ready | DenseReady


def _int4_kernel_available() -> bool:
    """The CPU int4 kernel exists in this PyTorch build (2.5+ on x86/ARM)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


class TorchBackend:
    name = "torch"

    def __init__(self, use_int4: bool | None = None):
        self.use_int4 = _int4_kernel_available() if use_int4 is None else use_int4

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
            return out * padded // 2 + (padded // group) * out * 2 * dtype.itemsize + k * (8 + out * 4)
        return out * cols * dtype.itemsize

    def _int4_ok(self, d: QuantizedDelta, dtype: torch.dtype) -> bool:
        if not self.use_int4 or dtype != torch.bfloat16 or d.bits > 4:
            return False
        if d.shape[0] % INT4_ROW_BLOCK:
            return False
        if d.params.scale.shape[1] == 1:
            return True
        # Per-group step sizes map onto the kernel's groups when they cover whole blocks of the
        # original columns: no salient columns taken out, a group size the kernel supports.
        cols = d.shape[1]
        return (d.salient_idx.numel() == 0 and d.params.group_size in INT4_GROUP_SIZES
                and cols % d.params.group_size == 0)

    def _prepare_int4(self, d: QuantizedDelta, dtype: torch.dtype) -> Int4Ready:
        out, cols = d.shape
        padded, group = _int4_geometry(d)
        scale = d.params.scale.float().expand(out, -1)
        offset = d.params.offset.float().expand(out, -1)
        if scale.shape[1] == 1:
            scale, offset = scale.expand(out, padded // group), offset.expand(out, padded // group)
        # The kernel decodes (kcode - 8) * scale + zero; ours is code * scale + offset. Codes are
        # stored shifted, kcode = code + 8 - c with c = 2**(bits-1), so that zero = offset + c * scale
        # is near 0 for a centred delta and its bf16 rounding error stays small: that error is the
        # same for every column of a row, so it adds up coherently over the whole input.
        c = 1 << (d.bits - 1)
        scales_zeros = torch.stack([scale, offset + c * scale], dim=-1).transpose(0, 1).contiguous().to(dtype)
        weight = int4_layout(d, padded, shift=8 - c)
        sal = d.salient_idx.long()
        if sal.numel():
            # What code 0 decodes to in the kernel's own (rounded) arithmetic, per row.
            sz = scales_zeros.float()
            zero_value = (-8 * sz[0, :, 0] + sz[0, :, 1]).unsqueeze(1)
            fix = (d.salient_values.float() - zero_value).t().contiguous()
        else:
            fix = torch.zeros(0, out)
        return Int4Ready(weight, scales_zeros, group, cols, padded, sal, fix, d)

    # ----- compute -----------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor, ready: ReadyDelta) -> torch.Tensor:
        """x @ delta^T for x [tokens, in]."""
        if isinstance(ready, DenseReady):
            return F.linear(x, ready.weight)
        if x.shape[0] >= DENSE_MIN_TOKENS:
            return F.linear(x, ready.source.dequantize().to(x.dtype))
        xp = x if ready.in_padded == ready.in_features else F.pad(x, (0, ready.in_padded - ready.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xp.contiguous(), ready.weight, ready.group_size, ready.scales_zeros)
        if ready.salient_idx.numel():
            y.add_(torch.mm(x.index_select(-1, ready.salient_idx).float(), ready.salient_fix))
        return y

    def gather_rows(self, delta: CompressedDelta, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized delta, float32 [len(ids), in], without dequantizing the rest."""
        if isinstance(delta, DenseDelta):
            return delta.values.index_select(0, ids).float()
        return dequantize_rows(delta, ids)


def _int4_geometry(d: QuantizedDelta) -> tuple[int, int]:
    """(columns of the int4 matrix, kernel group size)."""
    padded = -(-d.shape[1] // INT4_ROW_BLOCK) * INT4_ROW_BLOCK
    if d.params.scale.shape[1] > 1:
        return padded, d.params.group_size
    return padded, next(g for g in INT4_GROUP_SIZES if padded % g == 0)


def int4_layout(d: QuantizedDelta, padded: int, shift: int = 0) -> torch.Tensor:
    """The codes of `d` (+ shift) at their original columns (0 in salient and padding columns) in the
    packed layout of aten._weight_int4pack_mm_for_cpu. For row counts divisible by 64 the layout
    is built with numpy (rows 64b+j and 64b+32+j share a byte per column, blocks stored
    column-major), several times faster than aten._convert_weight_to_int4pack_for_cpu on int32
    codes; the tests check that both agree. Other row counts use the aten conversion."""
    out, cols = d.shape
    compact = d.codes().numpy()
    if shift:
        compact = compact + np.uint8(shift)
    parts, prev = [], 0
    # Salient columns go back in as zero columns: slices and one concatenate (fast in numpy).
    for j, pos in enumerate(d.salient_idx.tolist()):
        parts += [compact[:, prev: pos - j], np.zeros((out, 1), dtype=np.uint8)]
        prev = pos - j
    parts.append(compact[:, prev:])
    if padded > cols:
        parts.append(np.zeros((out, padded - cols), dtype=np.uint8))
    codes = np.concatenate(parts, axis=1) if len(parts) > 1 else compact
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
