"""Compressed representations of one tensor's delta (W_expert - W_base), and their storage.

Two kinds exist:
- QuantizedDelta: a 2-D delta whose non-salient input columns are b-bit codes with per-row
  (or per-group) step sizes and offsets, and whose salient columns are kept in float16.
- DenseDelta: the whole delta in float16 (or float32 where float16 would not be exact and the
  method promised a lossless result). Used for norms, biases and `--method fp16`.

A QuantizedDelta may also carry a low-rank part (format version 2, `--method lowrank`): float16
factors A [out, r] and B [r, in] whose product is added to the reconstruction, D = Q + A B.

- SvdDelta (format version 2, `--method svd-mixed`): the delta as factors only, D = A B, stored
  as blocks of singular-vector pairs, each block's rows of A^T and of B quantized at its own bit
  width with one step size and offset per row.

Either may carry `extra_rows`: rows of an embedding / LM head that the expert added to the
vocabulary, stored whole (they have no base rows to be a delta of).

Each kind turns itself into named tensors plus a small JSON-able description
(`to_tensors`, `from_tensors`); the bundle format (meswitch.bundle) stores those. Every tensor
stored counts toward `nbytes`, which is what effective bits per parameter are computed from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .packing import packed_row_bytes, unpack_codes
from .quantizer import AffineParams, dequantize_codes


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass
class QuantizedDelta:
    shape: tuple[int, int]  # [out, in] of the base part of the delta
    bits: int
    packed: torch.Tensor  # uint8 [out, packed_row_bytes(in - k, bits)]
    params: AffineParams  # scale/offset float16 [out or 1, groups]
    salient_idx: torch.Tensor  # int32 [k], sorted
    salient_values: torch.Tensor  # float16 [out, k]
    extra_rows: torch.Tensor | None = None
    # Optional low-rank part: D = (codes, salient columns) + lowrank_a @ lowrank_b, both float16.
    lowrank_a: torch.Tensor | None = None  # [out, r]
    lowrank_b: torch.Tensor | None = None  # [r, in]
    kind: str = field(default="quantized", init=False)

    @property
    def rank(self) -> int:
        return 0 if self.lowrank_a is None else int(self.lowrank_a.shape[1])

    def lowrank_product(self) -> torch.Tensor:
        """A @ B in float32 (the low-rank part of the reconstruction)."""
        return self.lowrank_a.float() @ self.lowrank_b.float()

    @property
    def n_quantized_cols(self) -> int:
        return self.shape[1] - self.salient_idx.numel()

    def quantized_columns(self) -> torch.Tensor:
        keep = torch.ones(self.shape[1], dtype=torch.bool)
        keep[self.salient_idx.long()] = False
        return keep.nonzero().squeeze(1)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.packed, self.bits, self.n_quantized_cols)

    def stored_tensors(self) -> tuple[torch.Tensor, ...]:
        """(codes, step sizes, offsets, salient indices, salient values), contiguous and in the
        stored dtypes, as kernels read them in place (the tensors themselves when a bundle holds
        them so; copies otherwise)."""
        return (self.packed.contiguous(), self.params.scale.to(torch.float16).contiguous(),
                self.params.offset.to(torch.float16).contiguous(), self.salient_idx.to(torch.int32).contiguous(),
                self.salient_values.to(torch.float16).contiguous())

    def dequantize(self) -> torch.Tensor:
        """The reconstructed delta of the base rows, float32 [out, in]."""
        return self.dequantize_rows(0, self.shape[0])

    def dequantize_rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of the reconstructed delta, float32 (each row is packed on its own)."""
        b = min(b, self.shape[0])
        cols = self.shape[1]
        delta = torch.empty(b - a, cols, dtype=torch.float32, device=self.packed.device)
        if self.n_quantized_cols:
            p = self.params
            if p.scale.shape[0] != 1:  # [1, groups]: one step size per matrix, broadcast over rows
                p = AffineParams(p.scale[a:b], p.offset[a:b], p.group_size)
            codes = unpack_codes(self.packed[a:b], self.bits, self.n_quantized_cols)
            delta[:, self.quantized_columns()] = dequantize_codes(codes, p)
        if self.salient_idx.numel():
            delta[:, self.salient_idx.long()] = self.salient_values[a:b].float()
        if self.rank:
            delta += self.lowrank_a[a:b].float() @ self.lowrank_b.float()
        return delta

    @property
    def nbytes(self) -> int:
        return sum(
            _nbytes(t)
            for t in (
                self.packed,
                self.params.scale,
                self.params.offset,
                self.salient_idx,
                self.salient_values,
                self.extra_rows,
                self.lowrank_a,
                self.lowrank_b,
            )
        )

    def to_tensors(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {
            f"{prefix}.codes": self.packed,
            f"{prefix}.scale": self.params.scale,
            f"{prefix}.offset": self.params.offset,
            f"{prefix}.salient_idx": self.salient_idx,
            f"{prefix}.salient_values": self.salient_values,
        }
        if self.extra_rows is not None:
            tensors[f"{prefix}.extra_rows"] = self.extra_rows
        meta = {
            "kind": "quantized",
            "shape": list(self.shape),
            "bits": self.bits,
            "group_size": self.params.group_size,
        }
        if self.rank:  # format version 2
            tensors[f"{prefix}.lowrank_a"] = self.lowrank_a
            tensors[f"{prefix}.lowrank_b"] = self.lowrank_b
            meta["rank"] = self.rank
        return tensors, meta

    @classmethod
    def from_tensors(cls, prefix: str, meta: dict, get) -> "QuantizedDelta":
        shape = tuple(int(v) for v in meta["shape"])
        bits = int(meta["bits"])
        q = cls(
            shape=shape,  # type: ignore[arg-type]
            bits=bits,
            packed=get(f"{prefix}.codes"),
            params=AffineParams(get(f"{prefix}.scale"), get(f"{prefix}.offset"), int(meta["group_size"])),
            salient_idx=get(f"{prefix}.salient_idx"),
            salient_values=get(f"{prefix}.salient_values"),
            extra_rows=get(f"{prefix}.extra_rows", None),
        )
        if meta.get("rank"):
            q.lowrank_a, q.lowrank_b = get(f"{prefix}.lowrank_a"), get(f"{prefix}.lowrank_b")
        q.validate()
        return q

    def validate(self) -> None:
        out, cols = self.shape
        k = self.salient_idx.numel()
        expect = (out, packed_row_bytes(cols - k, self.bits))
        if tuple(self.packed.shape) != expect or self.packed.dtype != torch.uint8:
            raise ValueError(f"packed codes have shape {tuple(self.packed.shape)}, expected {expect}")
        if tuple(self.salient_values.shape) != (out, k):
            raise ValueError("salient values do not match the salient indices")
        if k and (int(self.salient_idx.min()) < 0 or int(self.salient_idx.max()) >= cols):
            raise ValueError("salient index out of range")
        if self.params.scale.shape != self.params.offset.shape or self.params.scale.shape[0] not in (1, out):
            raise ValueError("step sizes / offsets have the wrong shape")
        if (self.lowrank_a is None) != (self.lowrank_b is None):
            raise ValueError("low-rank factors must come together")
        if self.rank and (
            tuple(self.lowrank_a.shape) != (out, self.rank) or tuple(self.lowrank_b.shape) != (self.rank, cols)
            or self.lowrank_a.dtype != torch.float16 or self.lowrank_b.dtype != torch.float16
        ):
            raise ValueError(f"low-rank factors must be float16 [{out}, r] and [r, {cols}]")


@dataclass
class DenseDelta:
    values: torch.Tensor  # float16 or float32, the base part's shape
    extra_rows: torch.Tensor | None = None
    # Lossless mode only: flat indices (int64) and exact expert values of the few elements that
    # base + float32 delta does not reproduce (a weight that moved across many binades).
    patch_index: torch.Tensor | None = None
    patch_values: torch.Tensor | None = None
    kind: str = field(default="dense", init=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def dequantize(self) -> torch.Tensor:
        return self.values.float()

    def dequantize_rows(self, a: int, b: int) -> torch.Tensor:
        return self.values[a:b].float()

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for t in (self.values, self.extra_rows, self.patch_index, self.patch_values))

    def to_tensors(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"{prefix}.values": self.values}
        for field_name in ("extra_rows", "patch_index", "patch_values"):
            t = getattr(self, field_name)
            if t is not None:
                tensors[f"{prefix}.{field_name}"] = t
        return tensors, {"kind": "dense", "shape": list(self.values.shape)}

    @classmethod
    def from_tensors(cls, prefix: str, meta: dict, get) -> "DenseDelta":
        d = cls(
            values=get(f"{prefix}.values"),
            extra_rows=get(f"{prefix}.extra_rows", None),
            patch_index=get(f"{prefix}.patch_index", None),
            patch_values=get(f"{prefix}.patch_values", None),
        )
        if list(d.values.shape) != list(meta["shape"]):
            raise ValueError(f"dense delta has shape {list(d.values.shape)}, expected {meta['shape']}")
        if (d.patch_index is None) != (d.patch_values is None):
            raise ValueError(f"{prefix}: patch indices and values must come together")
        if d.patch_index is not None and d.patch_index.numel() and (
            int(d.patch_index.min()) < 0 or int(d.patch_index.max()) >= d.values.numel()
        ):
            raise ValueError(f"{prefix}: patch index out of range")
        return d


SVD_PARTS = ("a_codes", "a_scale", "a_offset", "b_codes", "b_scale", "b_offset")


@dataclass
class SvdBlock:
    """`rank` consecutive singular-vector pairs at one bit width: the rows of A^T [rank, out] and
    of B [rank, in] as packed codes, each row with its own float16 step size and offset."""
    bits: int
    a_codes: torch.Tensor  # uint8 [rank, packed_row_bytes(out, bits)]
    a_scale: torch.Tensor  # float16 [rank, 1]
    a_offset: torch.Tensor  # float16 [rank, 1]
    b_codes: torch.Tensor  # uint8 [rank, packed_row_bytes(in, bits)]
    b_scale: torch.Tensor  # float16 [rank, 1]
    b_offset: torch.Tensor  # float16 [rank, 1]

    @property
    def rank(self) -> int:
        return int(self.a_codes.shape[0])

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, p) for p in SVD_PARTS)

    def factors(self, out: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A^T rows [rank, out], B rows [rank, in]) in float32."""
        a = dequantize_codes(unpack_codes(self.a_codes, self.bits, out), AffineParams(self.a_scale, self.a_offset, 0))
        b = dequantize_codes(unpack_codes(self.b_codes, self.bits, cols), AffineParams(self.b_scale, self.b_offset, 0))
        return a, b


@dataclass
class SvdDelta:
    shape: tuple[int, int]  # [out, in]
    blocks: list[SvdBlock]  # in order along the spectrum; D = sum over blocks of A_blk B_blk
    extra_rows: torch.Tensor | None = None
    kind: str = field(default="svd", init=False)

    @property
    def rank(self) -> int:
        return sum(b.rank for b in self.blocks)

    @property
    def device(self) -> torch.device:
        return self.blocks[0].a_codes.device if self.blocks else torch.device("cpu")

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [out, r], B [r, in]) in float32, D = A @ B (r = 0: empty factors)."""
        out, cols = self.shape
        if not self.blocks:
            return torch.zeros(out, 0, device=self.device), torch.zeros(0, cols, device=self.device)
        parts = [blk.factors(out, cols) for blk in self.blocks]
        return torch.cat([a for a, _ in parts]).t().contiguous(), torch.cat([b for _, b in parts])

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_rows(0, self.shape[0])

    def dequantize_rows(self, a: int, b: int) -> torch.Tensor:
        """Rows [a, b) of A @ B, float32 (the factors are small: they are dequantized whole)."""
        fa, fb = self.factors()
        return fa[a:min(b, self.shape[0])] @ fb

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for blk in self.blocks for t in blk.tensors()) + _nbytes(self.extra_rows)

    def to_tensors(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"{prefix}.svd{i}.{p}": t for i, blk in enumerate(self.blocks) for p, t in zip(SVD_PARTS, blk.tensors())}
        if self.extra_rows is not None:
            tensors[f"{prefix}.extra_rows"] = self.extra_rows
        meta = {"kind": "svd", "shape": list(self.shape),
                "blocks": [{"rank": blk.rank, "bits": blk.bits} for blk in self.blocks]}
        return tensors, meta

    @classmethod
    def from_tensors(cls, prefix: str, meta: dict, get) -> "SvdDelta":
        blocks = [SvdBlock(int(rec["bits"]), *(get(f"{prefix}.svd{i}.{p}") for p in SVD_PARTS))
                  for i, rec in enumerate(meta["blocks"])]
        d = cls(tuple(int(v) for v in meta["shape"]), blocks, get(f"{prefix}.extra_rows", None))  # type: ignore[arg-type]
        if [blk.rank for blk in blocks] != [int(rec["rank"]) for rec in meta["blocks"]]:
            raise ValueError(f"{prefix}: block ranks do not match the layout record")
        d.validate()
        return d

    def validate(self) -> None:
        out, cols = self.shape
        if self.rank > min(out, cols):
            raise ValueError(f"rank {self.rank} exceeds min({out}, {cols})")
        for blk in self.blocks:
            r = blk.rank
            want = {"a_codes": (r, packed_row_bytes(out, blk.bits)), "b_codes": (r, packed_row_bytes(cols, blk.bits))}
            for p, t in zip(SVD_PARTS, blk.tensors()):
                dtype = torch.uint8 if p.endswith("codes") else torch.float16
                if r < 1 or t.dtype != dtype or tuple(t.shape) != want.get(p, (r, 1)):
                    raise ValueError(f"svd block {p} has shape {tuple(t.shape)} / {t.dtype}, expected "
                                     f"{want.get(p, (r, 1))} / {dtype}")


CompressedDelta = QuantizedDelta | DenseDelta | SvdDelta


def delta_from_tensors(prefix: str, meta: dict, get) -> CompressedDelta:
    kind = meta.get("kind")
    if kind == "quantized":
        return QuantizedDelta.from_tensors(prefix, meta, get)
    if kind == "svd":
        return SvdDelta.from_tensors(prefix, meta, get)
    if kind == "dense":
        return DenseDelta.from_tensors(prefix, meta, get)
    raise ValueError(f"unknown delta kind {kind!r} for {prefix}")


def apply_delta(base: torch.Tensor, delta: CompressedDelta, dtype: torch.dtype) -> torch.Tensor:
    """W_expert ~= W_base + delta, cast to `dtype`; added vocabulary rows are appended."""
    if tuple(base.shape) != tuple(delta.shape):
        raise ValueError(f"delta of shape {tuple(delta.shape)} does not fit a base tensor of shape {tuple(base.shape)}")
    extra = 0 if delta.extra_rows is None else delta.extra_rows.shape[0]
    return apply_delta_rows(base, delta, 0, base.shape[0] + extra, dtype)


def apply_delta_rows(base_rows: torch.Tensor, delta: CompressedDelta, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [a, b) of apply_delta, given the base's rows [a, min(b, base rows)): the same
    arithmetic, element for element, so a tensor rebuilt in chunks equals one rebuilt whole."""
    rows = delta.shape[0]
    parts = []
    if a < rows:
        stop = min(b, rows)
        w = (base_rows.float() + delta.dequantize_rows(a, stop).reshape(base_rows.shape)).to(dtype)
        if isinstance(delta, DenseDelta) and delta.patch_index is not None:
            per_row = w[0].numel() if w.dim() > 1 else 1
            idx = delta.patch_index.long()
            inside = (idx >= a * per_row) & (idx < stop * per_row)
            w.view(-1)[idx[inside] - a * per_row] = delta.patch_values[inside].to(dtype)
        parts.append(w)
    if b > rows and delta.extra_rows is not None:
        parts.append(delta.extra_rows[max(a, rows) - rows: b - rows].to(dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def delta_to(delta: CompressedDelta, device: torch.device | str) -> CompressedDelta:
    """The same delta with every stored tensor on `device` (itself when they are there already)."""
    device = torch.device(device)
    if isinstance(delta, SvdDelta):
        tensors = [t for blk in delta.blocks for t in blk.tensors()] + [t for t in (delta.extra_rows,) if t is not None]
        if all(t.device == device for t in tensors):
            return delta
        return SvdDelta(delta.shape, [SvdBlock(blk.bits, *(t.to(device) for t in blk.tensors())) for blk in delta.blocks],
                        None if delta.extra_rows is None else delta.extra_rows.to(device))
    if delta.packed.device == device if isinstance(delta, QuantizedDelta) else delta.values.device == device:
        return delta
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    if isinstance(delta, QuantizedDelta):
        p = delta.params
        return QuantizedDelta(delta.shape, delta.bits, move(delta.packed),
                              AffineParams(move(p.scale), move(p.offset), p.group_size), move(delta.salient_idx),
                              move(delta.salient_values), move(delta.extra_rows), move(delta.lowrank_a),
                              move(delta.lowrank_b))
    return DenseDelta(move(delta.values), move(delta.extra_rows), move(delta.patch_index), move(delta.patch_values))
