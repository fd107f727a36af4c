"""The GPU delta kernel, in Triton: `y[a:b] += x[a:b] @ delta_e^T` for every expert segment of a
batch in one launch per linear layer, read straight from the stored b-bit codes.

The layout of the work is Punica's SGMV (and DeltaZip's SBMM): the grid is (output block,
segment, token block); each program reads its segment's bounds and its expert's descriptor for
this layer, dequantizes a [BLOCK_N, BLOCK_K] tile of the delta in registers (codes, per-row or
per-group step size and offset) and multiplies it with the segment's tokens on the tensor cores;
the 16-bit salient columns are a second small product in the same program. Segments of
different experts may have different bit widths, group sizes and salient counts: all of that is
read from the descriptor at run time, so one compiled kernel serves every expert.

Codes are read in the stored layout (docs/FORMAT.md: each row a little-endian bit stream). Code
j of a row starts at bit j*b; reading the 16-bit window of bytes (j*b)//8 and (j*b)//8 + 1 and
shifting by (j*b) % 8 yields it for every width 1, 2, 3, 4 and 8 (a 3-bit code may straddle two
bytes, never three; the second byte is read only where a code straddles). No re-layout is needed; the only addition at load time is, for a delta
with salient columns, the int32 map from quantized column to input column (4 bytes per input
column: 0.4% of a 2-bit 4096 x 4096 matrix) and a 16 x int64 descriptor per matrix.

Addresses travel as int64 in the descriptors and are cast to pointers inside the kernel (as
Punica's kernels do): whoever holds a descriptor holds the tensors it points to (TritonReady).

On a CPU the same kernels run under Triton's interpreter (TRITON_INTERPRET=1), which is how
the tests check them on machines without a GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..compression.delta import QuantizedDelta

try:  # triton is an optional extra (`pip install meswitch[gpu]`); the CPU paths never need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

DESC_FIELDS = 16
# descriptor fields (int64 each)
F_PRESENT, F_CODES, F_SCALE, F_OFFSET, F_COLMAP, F_SAL_IDX, F_SAL_VAL = 0, 1, 2, 3, 4, 5, 6
F_BITS, F_N, F_ROW_BYTES, F_GROUP, F_SCALE_STRIDE, F_K, F_OUT = 7, 8, 9, 10, 11, 12, 13

BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_S = 16, 64, 64, 16  # tl.dot needs every dimension >= 16


class TritonUnavailable(RuntimeError):
    """Triton is not installed, or there is neither a CUDA device nor TRITON_INTERPRET=1."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_available(device: torch.device) -> None:
    """Raise TritonUnavailable unless the Triton kernels can run on `device`."""
    if triton is None:
        raise TritonUnavailable("triton is not installed (pip install 'meswitch[gpu]')")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TritonUnavailable("no CUDA device is available")
        return
    if device.type == "cpu" and interpreting():
        return
    raise TritonUnavailable(f"the Triton kernels run on CUDA devices (or on the CPU under TRITON_INTERPRET=1), "
                            f"not on {device}")


@dataclass
class TritonReady:
    """A quantized delta as the Triton kernels read it: its stored tensors (on the device), the
    column map when it has salient columns, and its descriptor."""
    delta: QuantizedDelta
    desc: torch.Tensor  # int64 [DESC_FIELDS], on the CPU (tables copy it to the device)
    keep: tuple  # the tensors the descriptor points to

    @property
    def nbytes(self) -> int:
        """Memory beyond the stored delta: descriptor, column map, copies made for layout (normally none)."""
        d = self.delta
        own = {t.data_ptr() for t in (d.packed, d.params.scale, d.params.offset, d.salient_idx, d.salient_values)}
        extra = sum(t.numel() * t.element_size() for t in self.keep if t.data_ptr() not in own)
        return DESC_FIELDS * 8 + extra

    @property
    def shape(self) -> tuple[int, int]:
        return self.delta.shape


def ready_nbytes(d: QuantizedDelta) -> int:
    """What prepare() adds to a stored delta: the descriptor, and the column map with salient columns."""
    k = d.salient_idx.numel()
    return DESC_FIELDS * 8 + (4 * (d.shape[1] - k) if k else 0)


def prepare(d: QuantizedDelta) -> TritonReady:
    """Describe a stored delta (already on its device) to the kernels; copies only what is not
    contiguous or not in the stored dtypes (bundles hold neither)."""
    out, cols = d.shape
    codes, scale, offset, sal_idx, sal_val = d.stored_tensors()
    n, k = d.n_quantized_cols, sal_idx.numel()
    colmap = d.quantized_columns().to(device=codes.device, dtype=torch.int32) if k else None
    groups = scale.shape[1]
    group = d.params.group_size if groups > 1 else 1 << 40  # one group: every column in group 0
    fields = [0] * DESC_FIELDS
    fields[F_PRESENT] = 1
    fields[F_CODES], fields[F_SCALE], fields[F_OFFSET] = codes.data_ptr(), scale.data_ptr(), offset.data_ptr()
    fields[F_COLMAP] = colmap.data_ptr() if colmap is not None else 0
    fields[F_SAL_IDX], fields[F_SAL_VAL] = sal_idx.data_ptr(), sal_val.data_ptr()
    fields[F_BITS], fields[F_N], fields[F_ROW_BYTES] = d.bits, n, codes.shape[1]
    fields[F_GROUP], fields[F_SCALE_STRIDE] = group, groups if scale.shape[0] > 1 else 0
    fields[F_K], fields[F_OUT] = k, out
    keep = tuple(t for t in (codes, scale, offset, sal_idx, sal_val, colmap) if t is not None)
    return TritonReady(d, torch.tensor(fields, dtype=torch.int64), keep)


# The kernels are plain functions here, compiled per device kind by _kernel(): Triton's JIT on a
# CUDA device, its interpreter on the CPU. (The choice is not left to @triton.jit, which decides
# once at import from TRITON_INTERPRET: a process may use both, e.g. the tests on a GPU machine.)
if triton is not None:
    def _segmented_delta_kernel(x_ptr, y_ptr, plan_ptr, layer, OUT, stride_x, stride_y,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_S: tl.constexpr, DESC: tl.constexpr, IEEE: tl.constexpr,
                                UPCAST: tl.constexpr):
        # IEEE: float32 activations, multiplied in float32 (not TF32). Otherwise the delta tile is
        # rounded to the activations' 16-bit dtype and multiplied on the tensor cores with float32
        # accumulation. UPCAST: the same products computed in float32 (exact for 16-bit
        # operands), for Triton's interpreter, whose tl.dot mishandles bfloat16.
        pid_n = tl.program_id(0)
        seg = tl.program_id(1)
        pid_m = tl.program_id(2)
        # plan row: the address of the expert's descriptor table [layers, DESC], then a and b
        d = tl.load(plan_ptr + 3 * seg).to(tl.pointer_type(tl.int64)) + layer * DESC
        a = tl.load(plan_ptr + 3 * seg + 1)
        b = tl.load(plan_ptr + 3 * seg + 2)
        m0 = a + pid_m * BLOCK_M
        present = tl.load(d + 0)
        if (m0 < b) & (present != 0):
            codes = tl.load(d + 1).to(tl.pointer_type(tl.uint8))
            scale = tl.load(d + 2).to(tl.pointer_type(tl.float16))
            offset = tl.load(d + 3).to(tl.pointer_type(tl.float16))
            colmap_addr = tl.load(d + 4)
            sal_idx = tl.load(d + 5).to(tl.pointer_type(tl.int32))
            sal_val = tl.load(d + 6).to(tl.pointer_type(tl.float16))
            bits = tl.load(d + 7).to(tl.int32)
            n = tl.load(d + 8).to(tl.int32)
            row_bytes = tl.load(d + 9)
            group = tl.load(d + 10)
            scale_stride = tl.load(d + 11)
            k_sal = tl.load(d + 12).to(tl.int32)
            colmap = colmap_addr.to(tl.pointer_type(tl.int32))
            code_mask = (1 << bits) - 1

            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < b
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mask_n = offs_n < OUT
            x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x
            acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # (tl.zeros is a jit function: not interpretable here)
            code_rows = codes + offs_n.to(tl.int64)[:, None] * row_bytes
            scale_rows = offs_n.to(tl.int64)[:, None] * scale_stride

            for k0 in range(0, n, BLOCK_K):
                q = k0 + tl.arange(0, BLOCK_K)
                mask_q = q < n
                if colmap_addr != 0:
                    col = tl.load(colmap + q, mask=mask_q, other=0)
                else:
                    col = q
                xt = tl.load(x_rows + col[None, :], mask=mask_m[:, None] & mask_q[None, :], other=0.0)
                bit = q * bits
                byte = (bit >> 3).to(tl.int64)
                shift = bit & 7
                tile_mask = mask_n[:, None] & mask_q[None, :]
                lo = tl.load(code_rows + byte[None, :], mask=tile_mask, other=0).to(tl.int32)
                # the next byte only where the code straddles into it (3-bit codes): for 1, 2, 4
                # and 8 bits every lane of this load is masked off, so it reads nothing
                hi = tl.load(code_rows + byte[None, :] + 1, mask=tile_mask & (shift + bits > 8)[None, :],
                             other=0).to(tl.int32)
                code = ((lo | (hi << 8)) >> shift[None, :]) & code_mask
                g = scale_rows + (q.to(tl.int64) // group)[None, :]
                s = tl.load(scale + g, mask=tile_mask, other=0.0).to(tl.float32)
                o = tl.load(offset + g, mask=tile_mask, other=0.0).to(tl.float32)
                w = code.to(tl.float32) * s + o  # [BLOCK_N, BLOCK_K]: the delta tile, rebuilt
                if IEEE:
                    acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
                elif UPCAST:
                    acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(xt.dtype).to(tl.float32)), acc,
                                 input_precision="ieee")
                else:
                    acc = tl.dot(xt, tl.trans(w.to(xt.dtype)), acc)

            for s0 in range(0, k_sal, BLOCK_S):  # the 16-bit salient columns
                si = s0 + tl.arange(0, BLOCK_S)
                mask_s = si < k_sal
                col = tl.load(sal_idx + si, mask=mask_s, other=0)
                xt = tl.load(x_rows + col[None, :], mask=mask_m[:, None] & mask_s[None, :], other=0.0)
                w = tl.load(sal_val + offs_n.to(tl.int64)[:, None] * k_sal + si[None, :],
                            mask=mask_n[:, None] & mask_s[None, :], other=0.0)
                if IEEE:
                    acc = tl.dot(xt, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
                elif UPCAST:
                    acc = tl.dot(xt.to(tl.float32), tl.trans(w.to(xt.dtype).to(tl.float32)), acc,
                                 input_precision="ieee")
                else:
                    acc = tl.dot(xt, tl.trans(w.to(xt.dtype)), acc)

            y_tile = y_ptr + offs_m.to(tl.int64)[:, None] * stride_y + offs_n[None, :]
            out_mask = mask_m[:, None] & mask_n[None, :]
            y_old = tl.load(y_tile, mask=out_mask, other=0.0).to(tl.float32)
            tl.store(y_tile, (y_old + acc).to(y_ptr.dtype.element_ty), mask=out_mask)

    def _dequantize_kernel(desc_ptr, rows_ptr, out_ptr, n_rows, stride_out,
                           HAS_ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[i, colmap[q]] = code * step + offset for rows `rows` (or all rows) of one delta."""
        pid_r = tl.program_id(0)
        pid_k = tl.program_id(1)
        codes = tl.load(desc_ptr + 1).to(tl.pointer_type(tl.uint8))
        scale = tl.load(desc_ptr + 2).to(tl.pointer_type(tl.float16))
        offset = tl.load(desc_ptr + 3).to(tl.pointer_type(tl.float16))
        colmap_addr = tl.load(desc_ptr + 4)
        colmap = colmap_addr.to(tl.pointer_type(tl.int32))
        bits = tl.load(desc_ptr + 7).to(tl.int32)
        n = tl.load(desc_ptr + 8).to(tl.int32)
        row_bytes = tl.load(desc_ptr + 9)
        group = tl.load(desc_ptr + 10)
        scale_stride = tl.load(desc_ptr + 11)
        i = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_i = i < n_rows
        if HAS_ROWS:
            r = tl.load(rows_ptr + i, mask=mask_i, other=0).to(tl.int64)
        else:
            r = i.to(tl.int64)
        q = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_q = q < n
        if colmap_addr != 0:
            col = tl.load(colmap + q, mask=mask_q, other=0)
        else:
            col = q
        bit = q * bits
        byte = (bit >> 3).to(tl.int64)
        shift = bit & 7
        tile_mask = mask_i[:, None] & mask_q[None, :]
        code_rows = codes + r[:, None] * row_bytes
        lo = tl.load(code_rows + byte[None, :], mask=tile_mask, other=0).to(tl.int32)
        hi = tl.load(code_rows + byte[None, :] + 1, mask=tile_mask & (shift + bits > 8)[None, :],
                     other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> shift[None, :]) & ((1 << bits) - 1)
        g = r[:, None] * scale_stride + (q.to(tl.int64) // group)[None, :]
        s = tl.load(scale + g, mask=tile_mask, other=0.0).to(tl.float32)
        o = tl.load(offset + g, mask=tile_mask, other=0.0).to(tl.float32)
        w = code.to(tl.float32) * s + o
        tl.store(out_ptr + i.to(tl.int64)[:, None] * stride_out + col[None, :],
                 w.to(out_ptr.dtype.element_ty), mask=tile_mask)


_compiled: dict = {}


def _kernel(fn, device: torch.device):
    """fn compiled for `device`: Triton's JIT on CUDA, its interpreter on the CPU (cached)."""
    interpret = device.type != "cuda"
    key = (fn.__name__, interpret)
    k = _compiled.get(key)
    if k is None:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            k = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            k = JITFunction(fn)
        _compiled[key] = k
    return k


def segmented_delta_mm(x: torch.Tensor, y: torch.Tensor, plan: torch.Tensor, layer: int, max_tokens: int) -> None:
    """y[a:b] += x[a:b] @ delta^T for every segment: plan is int64 [S, 3] on x's device, each row
    (address of an expert's descriptor table [layers, DESC_FIELDS] on the device, a, b); the
    delta is row `layer` of that table (skipped when absent). x: [T, in], y: [T, out] (unit column
    strides); max_tokens: an upper bound of b - a over the segments (the grid's third axis)."""
    segments = plan.shape[0]
    if segments == 0 or max_tokens <= 0:
        return
    out = y.shape[1]
    assert x.stride(1) == 1 and y.stride(1) == 1 and x.dtype == y.dtype and plan.is_contiguous()
    grid = (triton.cdiv(out, BLOCK_N), segments, triton.cdiv(max_tokens, BLOCK_M))
    _kernel(_segmented_delta_kernel, x.device)[grid](x, y, plan, layer, out, x.stride(0), y.stride(0),
                                  BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_S=BLOCK_S,
                                  DESC=DESC_FIELDS, IEEE=x.dtype == torch.float32,
                                  UPCAST=x.device.type != "cuda")


def dequantize(r: TritonReady, dtype: torch.dtype, rows: torch.Tensor | None = None,
               desc: torch.Tensor | None = None) -> torch.Tensor:
    """The delta (or rows `rows` of it) as a dense [rows, in] matrix in `dtype`, on its device.
    desc: the descriptor already on the device (else it is copied there)."""
    d = r.delta
    device = d.packed.device
    out_rows = d.shape[0] if rows is None else rows.numel()
    dense = torch.empty(out_rows, d.shape[1], dtype=dtype, device=device)
    if out_rows == 0:
        return dense
    if d.n_quantized_cols:
        desc = r.desc.to(device) if desc is None else desc
        ids = rows.to(device=device, dtype=torch.int64).contiguous() if rows is not None else desc
        grid = (triton.cdiv(out_rows, 16), triton.cdiv(d.n_quantized_cols, 64))
        _kernel(_dequantize_kernel, device)[grid](desc, ids, dense, out_rows, dense.stride(0), HAS_ROWS=rows is not None,
                                 BLOCK_R=16, BLOCK_K=64)
    if d.salient_idx.numel():
        vals = d.salient_values if rows is None else d.salient_values.index_select(0, rows.to(device))
        dense[:, d.salient_idx.to(device=device, dtype=torch.long)] = vals.to(dtype)
    return dense
