"""Compute backends: how a stored delta becomes compute-ready, and how `x @ delta^T` is computed
for all experts of a batch at once.

The delta layers (layers.py) call a backend and nothing else for their delta products, so a CPU
kernel, a GPU kernel or the reference path plug in without touching the layers (the split vLLM
makes between its LoRA layers and its punica wrapper). The protocol:

    prepare(delta, dtype)        -> ReadyDelta   once per expert and linear layer, when it turns hot
    ready_nbytes(delta, dtype)   -> int          memory prepare() adds beyond the packed delta
    expert_table(ready)          -> table        once per hot expert: its ready deltas by layer index
    plan(segments)               -> plan         once per forward pass: [(table, a, b)] token ranges
    segmented_matmul(x, y, plan, layer)          y[a:b] += x[a:b] @ delta_e^T for every segment
    linear(x, weight, bias, plan, layer) -> y    the whole layer: x @ W^T + b, plus every segment's delta
    prepare_rows(delta)          -> rows source  once per hot expert, for its embedding delta
    rows_nbytes(delta)           -> int          memory prepare_rows() adds beyond the packed delta
    gather_rows(source, ids)     -> float32 rows of the delta, for embedding lookups

A delta with a low-rank part (`--method lowrank`: D = Q + A B) is never made dense by the kernel
backends: Q goes through the kernel like any quantized delta and A B is added as two thin GEMMs,
y += (x B^T) A^T (LowRankReady). A delta stored as factors only (`--method svd-mixed`, SvdDelta:
D = A B) is a LowRankReady with no kernel part: its quantized factors are dequantized to the
compute dtype at prepare() (A [out, r] and B [r, in], small) and only the two thin GEMMs run.

Segments are contiguous token ranges of one expert each (the engine orders tokens by expert),
the layout of Punica's SGMV and DeltaZip's SBMM: one call per layer covers every expert.
`linear` is what the delta layers call: the base product plus segmented_matmul, except that the
kernel backends compute a long segment (dense_min_tokens tokens or more: prompt prefill) of a
delta stored as codes alone as one GEMM with W + D (rounded once to the model dtype, as
`materialize` builds the expert's weight), instead of the base GEMM plus a second GEMM with the
dequantized delta.

Backends shipped here:
- `cpu` (CpuKernelBackend): meswitch's own kernel (cpu_kernel.py, kernels/delta_cpu.cpp) reads
  the stored b-bit codes in place; compute-ready costs 128 bytes per matrix. Segments of
  DENSE_MIN_TOKENS tokens or more (prompt prefill) are faster as one GEMM with W + D, built from
  the codes for the call (`linear`).
- `reference` (ReferenceBackend): every delta dequantized to a dense matrix in the model dtype
  and multiplied with PyTorch. Simple and obviously right; it costs a dense copy per expert.
- `triton` (TritonBackend): the GPU kernel (triton_kernel.py) reads the stored codes in device
  memory, all segments of a layer in one launch; on a CPU it runs under TRITON_INTERPRET=1 (tests).
`auto` picks, on a CUDA device, `triton` when triton is installed (else the reference, with a
warning); on the CPU, `cpu` when its kernel builds and loads, and the reference otherwise.

Every backend works on the device its deltas live on: the store moves an expert's stored
tensors to the model's device before prepare() (store.py), so the reference backend serves a
CUDA model too, and plans carry their index tensors to that device.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from ..compression.delta import CompressedDelta, DenseDelta, QuantizedDelta, SvdDelta
from ..compression.quantizer import expand_groups
from . import cpu_kernel, triton_kernel
from .cpu_kernel import PackedDelta
from .triton_kernel import TritonReady

# From here on, one GEMM with W + D rebuilt for the call beats the base GEMM plus the kernel
# (benchmarks/results/kernels_merged.json, bf16: 1.24-1.76x their time at 16 tokens, 0.61-0.87x at 64).
DENSE_MIN_TOKENS = 32
# The Triton kernel's segments up to this length; longer ones dequantize and GEMM. A guess (no GPU
# measured yet): benchmarks/gpu.py measures both routes per layer.
TRITON_DENSE_MIN_TOKENS = 128


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


@dataclass
class DenseReady:
    """A delta as a dense matrix in the model dtype (reference path, and dense 16-bit deltas)."""
    weight: torch.Tensor  # [out, in]
    source: CompressedDelta

    @property
    def nbytes(self) -> int:
        if isinstance(self.source, DenseDelta) and self.weight.data_ptr() == self.source.values.data_ptr():
            return 0  # the stored tensor itself
        return _nbytes(self.weight)


@dataclass
class LowRankReady:
    """A quantized delta with a low-rank part (D = Q + A B): Q as the kernel reads it (`main`), and
    the factors A [out, r], B [r, in] in the compute dtype (the stored float16 tensors themselves
    when that is the dtype), applied as two thin GEMMs, y += (x B^T) A^T. With `main` None the
    delta is the factors alone (an SvdDelta's, dequantized: every byte of them is the ready form's)."""
    main: PackedDelta | TritonReady | None
    a: torch.Tensor
    b: torch.Tensor

    @property
    def nbytes(self) -> int:
        if self.main is None:
            return _nbytes(self.a, self.b)
        d = self.main.delta
        own = {d.lowrank_a.data_ptr(), d.lowrank_b.data_ptr()}
        return self.main.nbytes + sum(_nbytes(t) for t in (self.a, self.b) if t.data_ptr() not in own)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], self.b.shape[1]) if self.main is None else self.main.shape

    def add_product(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += x @ (A B)^T, as (x B^T) A^T."""
        y.add_(F.linear(F.linear(x, self.b), self.a))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of A B in float32 (the product QuantizedDelta.dequantize adds)."""
        return self.a.index_select(0, ids).float() @ self.b.float()


def lowrank_extra_nbytes(delta: CompressedDelta, dtype: torch.dtype) -> int:
    """Memory of the low-rank factors in the compute dtype, beyond the stored float16 ones (an
    SvdDelta's factors are all new: dequantized from its codes)."""
    stored_as_is = isinstance(delta, QuantizedDelta) and dtype == torch.float16
    if not isinstance(delta, (QuantizedDelta, SvdDelta)) or not delta.rank or stored_as_is:
        return 0
    return delta.rank * (delta.shape[0] + delta.shape[1]) * dtype.itemsize


def svd_rows_nbytes(delta: CompressedDelta) -> int:
    """What prepare_rows adds for an embedding stored as factors only: both factors in float32
    (every other kind is read in its stored form)."""
    return lowrank_extra_nbytes(delta, torch.float32) if isinstance(delta, SvdDelta) else 0


ReadyDelta = PackedDelta | TritonReady | DenseReady | LowRankReady


def kernel_part(r: ReadyDelta | None) -> PackedDelta | TritonReady | None:
    """What a kernel reads of a ready delta: the codes (without any low-rank part), or None."""
    r = r.main if isinstance(r, LowRankReady) else r
    return r if isinstance(r, (PackedDelta, TritonReady)) else None


def needs_python(r: ReadyDelta | None) -> bool:
    """A ready delta computed (at least partly) outside the kernel: 16-bit, or with a low-rank part."""
    return isinstance(r, (DenseReady, LowRankReady))


@runtime_checkable
class DeltaBackend(Protocol):
    name: str

    def prepare(self, delta: CompressedDelta, dtype: torch.dtype) -> ReadyDelta: ...

    def ready_nbytes(self, delta: CompressedDelta, dtype: torch.dtype) -> int: ...

    def expert_table(self, ready: Sequence[ReadyDelta | None]) -> object: ...

    def plan(self, segments: Sequence[tuple[object, int, int]]) -> object: ...

    def segmented_matmul(self, x: torch.Tensor, y: torch.Tensor, plan: object, layer: int) -> None: ...

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan: object,
               layer: int) -> torch.Tensor: ...

    def prepare_rows(self, delta: CompressedDelta) -> object: ...

    def rows_nbytes(self, delta: CompressedDelta) -> int: ...

    def gather_rows(self, source: object, ids: torch.Tensor) -> torch.Tensor: ...


# ----- the reference backend ---------------------------------------------------------------------
class ReferenceBackend:
    """Dequantize each delta once to the model dtype; products with PyTorch, segment by segment."""
    name = "reference"

    def prepare(self, delta: CompressedDelta, dtype: torch.dtype) -> DenseReady:
        if isinstance(delta, DenseDelta):
            return DenseReady(delta.values.to(dtype), delta)
        return DenseReady(delta.dequantize().to(dtype), delta)

    def ready_nbytes(self, delta: CompressedDelta, dtype: torch.dtype) -> int:
        if len(delta.shape) != 2:
            return 0
        if isinstance(delta, DenseDelta) and delta.values.dtype == dtype:
            return 0
        return delta.shape[0] * delta.shape[1] * dtype.itemsize

    def expert_table(self, ready: Sequence[ReadyDelta | None]) -> list:
        return list(ready)

    def plan(self, segments: Sequence[tuple[object, int, int]]) -> list:
        return list(segments)

    def segmented_matmul(self, x: torch.Tensor, y: torch.Tensor, plan: list, layer: int) -> None:
        for table, a, b in plan:
            r = table[layer]
            if r is not None:
                y[a:b].add_(F.linear(x[a:b], r.weight))

    def linear(self, x, weight, bias, plan, layer) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        self.segmented_matmul(x, y, plan, layer)
        return y

    def prepare_rows(self, delta: CompressedDelta) -> CompressedDelta | LowRankReady:
        if isinstance(delta, SvdDelta):  # float32 factors: rows as SvdDelta.dequantize computes them
            a, b = delta.factors()
            return LowRankReady(None, a, b)
        return delta

    def rows_nbytes(self, delta: CompressedDelta) -> int:
        return svd_rows_nbytes(delta)

    def gather_rows(self, source: CompressedDelta | LowRankReady, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(source, DenseDelta):
            return source.values.index_select(0, ids).float()
        if isinstance(source, LowRankReady):
            return source.rows(ids)
        return dequantize_rows(source, ids)


def dequantize_rows(d: QuantizedDelta, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the dequantized delta, float32 [len(ids), in], without dequantizing the rest."""
    from ..compression.packing import unpack_codes

    cols = d.shape[1]
    rows = torch.empty(ids.numel(), cols, dtype=torch.float32, device=d.packed.device)
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
    if d.rank:
        rows += d.lowrank_a.index_select(0, ids).float() @ d.lowrank_b.float()
    return rows


# ----- the kernel backends (CPU and Triton): products straight from the stored codes --------------
class StoredCodesBackend:
    """What the CPU and Triton backends share: quantized deltas are read in their stored form
    (`_pack`: a descriptor, no copy); 16-bit deltas and segments of dense_min_tokens tokens or
    more (prompt prefill) go through PyTorch (`_python_segments`), the latter as one
    dequantization (`_dequantize`) plus a GEMM. Subclasses run the kernel over the rest."""
    name = "kernel"
    dense_min_tokens = DENSE_MIN_TOKENS

    def _pack(self, delta: QuantizedDelta) -> ReadyDelta:
        raise NotImplementedError

    def _pack_nbytes(self, delta: QuantizedDelta) -> int:
        raise NotImplementedError

    def _dequantize(self, r: ReadyDelta, dtype: torch.dtype, rows: torch.Tensor | None = None,
                    table=None, layer: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def _ready(self, delta: QuantizedDelta | SvdDelta, dtype: torch.dtype) -> ReadyDelta:
        if isinstance(delta, SvdDelta):  # factors only: no kernel part
            a, b = delta.factors()
            return LowRankReady(None, a.to(dtype), b.to(dtype))
        p = self._pack(delta)
        return LowRankReady(p, delta.lowrank_a.to(dtype), delta.lowrank_b.to(dtype)) if delta.rank else p

    def prepare(self, delta: CompressedDelta, dtype: torch.dtype) -> ReadyDelta:
        if isinstance(delta, (QuantizedDelta, SvdDelta)):
            return self._ready(delta, dtype)
        return DenseReady(delta.values.to(dtype), delta)

    def ready_nbytes(self, delta: CompressedDelta, dtype: torch.dtype) -> int:
        if len(delta.shape) != 2:
            return 0
        if isinstance(delta, SvdDelta):
            return lowrank_extra_nbytes(delta, dtype)
        if isinstance(delta, QuantizedDelta):
            return self._pack_nbytes(delta) + lowrank_extra_nbytes(delta, dtype)
        return 0 if delta.values.dtype == dtype else delta.shape[0] * delta.shape[1] * dtype.itemsize

    def _kernel_segments(self, x: torch.Tensor, y: torch.Tensor, plan, layer: int) -> None:
        """y[a:b] += x[a:b] @ D^T for the plan's short segments (the kernel's)."""
        raise NotImplementedError

    def _merged_weight(self, r: ReadyDelta, weight: torch.Tensor, table, layer: int) -> torch.Tensor:
        """W + D in W's dtype, added in float32 and rounded once (r: codes alone, no low-rank part)."""
        d = self._dequantize(r, torch.float32, table=table, layer=layer)
        return d.add_(weight).to(weight.dtype)  # one float32 temporary

    def segmented_matmul(self, x: torch.Tensor, y: torch.Tensor, plan, layer: int) -> None:
        self._kernel_segments(x, y, plan, layer)
        self._python_segments(x, y, plan.python_segments, layer)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, plan, layer: int) -> torch.Tensor:
        """x @ W^T + b plus every segment's delta; long segments of deltas stored as codes alone
        as one GEMM with W + D, the other rows with W."""
        def mergeable(seg) -> bool:  # long, and codes alone (16-bit or low-rank parts stay in _python_segments)
            t, a, b = seg
            return b - a >= self.dense_min_tokens and isinstance(t.ready[layer], (PackedDelta, TritonReady))

        merged = [s for s in plan.python_segments if mergeable(s)]
        if not merged:
            y = F.linear(x, weight, bias)
            self.segmented_matmul(x, y, plan, layer)
            return y
        y = x.new_empty(x.shape[0], weight.shape[0])
        start = 0
        for t, a, b in sorted(merged, key=lambda s: s[1]):  # segments do not overlap
            if start < a:
                y[start:a] = F.linear(x[start:a], weight, bias)
            y[a:b] = F.linear(x[a:b], self._merged_weight(t.ready[layer], weight, t, layer), bias)
            start = b
        if start < x.shape[0]:
            y[start:] = F.linear(x[start:], weight, bias)
        self._kernel_segments(x, y, plan, layer)
        self._python_segments(x, y, [s for s in plan.python_segments if not mergeable(s)], layer)
        return y

    def _python_segments(self, x: torch.Tensor, y: torch.Tensor, segments: list, layer: int) -> None:
        """Segments the kernel left: 16-bit deltas, long segments of quantized ones (the kernel
        skips those), and the low-rank parts of deltas that have one (of every segment)."""
        for table, a, b in segments:
            r = table.ready[layer]
            if isinstance(r, DenseReady):
                y[a:b].add_(F.linear(x[a:b], r.weight))
                continue
            if kernel_part(r) is not None and b - a >= self.dense_min_tokens:
                y[a:b].add_(F.linear(x[a:b], self._dequantize(kernel_part(r), x.dtype, table=table, layer=layer)))
            if isinstance(r, LowRankReady):
                r.add_product(x[a:b], y[a:b])

    def prepare_rows(self, delta: CompressedDelta) -> ReadyDelta | DenseDelta:
        if isinstance(delta, SvdDelta):  # float32 factors: rows as SvdDelta.dequantize computes them
            return self._ready(delta, torch.float32)
        return self._ready(delta, torch.float16) if isinstance(delta, QuantizedDelta) else delta  # factors as stored

    def rows_nbytes(self, delta: CompressedDelta) -> int:
        if isinstance(delta, QuantizedDelta):
            return self._pack_nbytes(delta)  # the stored codes, described (float16 factors as stored)
        return svd_rows_nbytes(delta)

    def gather_rows(self, source: ReadyDelta | DenseDelta, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(source, DenseDelta):
            return source.values.index_select(0, ids).float()
        if kernel_part(source) is None:
            return source.rows(ids)
        rows = self._dequantize(kernel_part(source), torch.float32, ids)
        if isinstance(source, LowRankReady):
            rows += source.rows(ids)
        return rows


@dataclass
class CpuExpertTable:
    addresses: torch.Tensor  # int64 [layers]: descriptor address of the layer's packed delta, 0 if none
    ready: list[ReadyDelta | None]
    has_dense: bool  # some layer holds a DenseReady (16-bit delta) or a LowRankReady: partly computed outside the kernel


@dataclass
class CpuPlan:
    table: torch.Tensor | None  # int64 [segments, layers]
    bounds: torch.Tensor | None  # int64 [segments, 2]
    python_segments: list[tuple[CpuExpertTable, int, int]]  # long segments, and experts with dense deltas


class CpuKernelBackend(StoredCodesBackend):
    """Products straight from the stored codes (kernels/delta_cpu.cpp), all segments in one call."""
    name = "cpu"

    def __init__(self, dense_min_tokens: int = DENSE_MIN_TOKENS):
        cpu_kernel.load()  # raises KernelUnavailable
        self.dense_min_tokens = dense_min_tokens
        self._scratch = threading.local()  # the merged weight of `linear`, one layer at a time

    def _pack(self, delta: QuantizedDelta) -> PackedDelta:
        return cpu_kernel.pack(delta)

    def _pack_nbytes(self, delta: QuantizedDelta) -> int:
        return cpu_kernel.DESC_FIELDS * 8

    def _dequantize(self, r, dtype, rows=None, table=None, layer=0) -> torch.Tensor:
        return cpu_kernel.dequantize(r, dtype, rows)

    def expert_table(self, ready: Sequence[ReadyDelta | None]) -> CpuExpertTable:
        addresses = torch.tensor([0 if (p := kernel_part(r)) is None else p.desc.data_ptr() for r in ready],
                                 dtype=torch.int64)
        return CpuExpertTable(addresses, list(ready), any(needs_python(r) for r in ready))

    def plan(self, segments: Sequence[tuple[CpuExpertTable, int, int]]) -> CpuPlan:
        if not segments:
            return CpuPlan(None, None, [])
        table = torch.stack([t.addresses for t, _, _ in segments])
        bounds = torch.tensor([[a, b] for _, a, b in segments], dtype=torch.int64)
        python = [(t, a, b) for t, a, b in segments if t.has_dense or b - a >= self.dense_min_tokens]
        return CpuPlan(table, bounds, python)

    def _merged_weight(self, r, weight, table, layer) -> torch.Tensor:
        # Written into a buffer kept per thread: a fresh tensor of a 7B model's layer size costs
        # more in page faults (measured: 14 ms for 32 MiB) than building the weight.
        scratch = getattr(self._scratch, "buf", None)
        if scratch is None or scratch.dtype != weight.dtype or scratch.numel() < weight.numel():
            scratch = self._scratch.buf = torch.empty(weight.numel(), dtype=weight.dtype)
        out = scratch[:weight.numel()].view(weight.shape)
        return cpu_kernel.dequantize(r, weight.dtype, base=weight.contiguous(), out=out)

    def _kernel_segments(self, x: torch.Tensor, y: torch.Tensor, plan: CpuPlan, layer: int) -> None:
        if plan.table is not None:  # segments of dense_min_tokens or more are skipped by the kernel
            torch.ops.meswitch.segmented_delta_mm(x, y, plan.table, plan.bounds, layer, self.dense_min_tokens)


# ----- the Triton (GPU) kernel backend --------------------------------------------------------------
@dataclass
class TritonExpertTable:
    descs: torch.Tensor  # int64 [layers, DESC_FIELDS] on the device; a zero row: no delta there
    ready: list[ReadyDelta | None]
    has_dense: bool  # some layer holds a DenseReady or a LowRankReady: (partly) computed outside the kernel


@dataclass
class TritonPlan:
    rows: torch.Tensor | None  # int64 [segments, 3] on the device: (table address, a, b), kernel segments
    max_tokens: int  # the longest kernel segment
    python_segments: list[tuple[TritonExpertTable, int, int]]  # long segments, and experts with dense deltas


class TritonBackend(StoredCodesBackend):
    """Products straight from the stored codes in device memory (triton_kernel.py): one launch per
    layer for every segment shorter than dense_min_tokens; longer ones (prompt prefill) are one
    GEMM with W + D rebuilt into a scratch matrix, like the CPU backend's (`linear`)."""
    name = "triton"

    def __init__(self, device: str | torch.device = "cuda", dense_min_tokens: int = TRITON_DENSE_MIN_TOKENS):
        self.device = torch.device(device)
        triton_kernel.check_available(self.device)  # raises TritonUnavailable
        self.dense_min_tokens = dense_min_tokens

    def _pack(self, delta: QuantizedDelta) -> TritonReady:
        return triton_kernel.prepare(delta)

    def _pack_nbytes(self, delta: QuantizedDelta) -> int:
        return triton_kernel.ready_nbytes(delta)

    def _dequantize(self, r, dtype, rows=None, table=None, layer=0) -> torch.Tensor:
        return triton_kernel.dequantize(r, dtype, rows, desc=None if table is None else table.descs[layer])

    def expert_table(self, ready: Sequence[ReadyDelta | None]) -> TritonExpertTable:
        descs = torch.zeros(len(ready), triton_kernel.DESC_FIELDS, dtype=torch.int64)
        for i, r in enumerate(ready):
            if (p := kernel_part(r)) is not None:
                descs[i] = p.desc
        return TritonExpertTable(descs.to(self.device), list(ready), any(needs_python(r) for r in ready))

    def plan(self, segments: Sequence[tuple[TritonExpertTable, int, int]]) -> TritonPlan:
        kernel = [(t, a, b) for t, a, b in segments if b - a < self.dense_min_tokens]
        python = [(t, a, b) for t, a, b in segments if t.has_dense or b - a >= self.dense_min_tokens]
        rows = None
        if kernel:  # one small host-to-device copy per forward pass, none per layer
            rows = torch.tensor([[t.descs.data_ptr(), a, b] for t, a, b in kernel], dtype=torch.int64,
                                device=self.device)
        return TritonPlan(rows, max((b - a for _, a, b in kernel), default=0), python)

    def _kernel_segments(self, x: torch.Tensor, y: torch.Tensor, plan: TritonPlan, layer: int) -> None:
        if plan.rows is not None:  # short segments only (plan)
            triton_kernel.segmented_delta_mm(x, y, plan.rows, layer, plan.max_tokens)


BACKENDS = ("auto", "cpu", "triton", "reference")


def get_backend(name: str = "auto", device: str | torch.device = "cpu") -> DeltaBackend:
    """The backend `name` for a model on `device` (raises KernelUnavailable / TritonUnavailable
    when an explicitly named one cannot run there)."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cpu":
            try:
                return CpuKernelBackend()
            except cpu_kernel.KernelUnavailable as e:
                warnings.warn(f"{e}; using the reference backend (dense deltas, more memory)", stacklevel=2)
                return ReferenceBackend()
        try:
            return TritonBackend(device)
        except triton_kernel.TritonUnavailable as e:
            warnings.warn(f"{e}; using the reference backend (dense deltas, more memory)", stacklevel=2)
            return ReferenceBackend()
    if name == "cpu":
        if device.type != "cpu":
            raise cpu_kernel.KernelUnavailable(f"the CPU kernel computes on the CPU, not on {device}")
        return CpuKernelBackend()
    if name == "triton":
        return TritonBackend(device)
    if name == "reference":
        return ReferenceBackend()
    raise ValueError(f"unknown delta backend {name!r} (available: {', '.join(BACKENDS)})")
