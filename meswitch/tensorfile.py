"""safetensors files written one tensor at a time, and read lazily from several files.

safetensors' own writers (`save_file`, `serialize_file`) take every tensor of a file at once, in
memory. Two files here are too large for that: a compressed expert, produced layer by layer
(about 2 GB at 7B and 2 bits), and a model converted from GGUF (its full size). They are written
by `write_safetensors` from a source that hands out one tensor at a time, so memory stays at the
largest tensor. The layout is the library's (8-byte little-endian header length; a JSON header
with `__metadata__` and, per tensor, dtype, shape and data_offsets; then the data, tensors
ordered by decreasing element size then name, so each is aligned to its element size). Files are
read back with safetensors' own `safe_open`, which validates them. Small in-memory files keep
using `safetensors.torch.save_file`.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open

# torch dtype <-> safetensors dtype code (the codes of the safetensors format).
DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class TensorSource(Protocol):
    """Tensors known by name, dtype and shape before any is loaded."""

    def specs(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]: ...

    def get(self, name: str) -> torch.Tensor: ...


class DictSource:
    """An in-memory dict as a TensorSource."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def specs(self):
        return [(k, v.dtype, tuple(v.shape)) for k, v in self.tensors.items()]

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class LazyTensors:
    """Tensors stored in several safetensors files, loaded one at a time on request."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, Path] = {}
        self._specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for f in files:
            with safe_open(f, framework="pt") as sf:
                for k in sf.keys():
                    if k in self.where:
                        raise ValueError(f"tensor {k} is in both {self.where[k]} and {f}")
                    sl = sf.get_slice(k)
                    self.where[k] = Path(f)
                    self._specs[k] = (CODE_DTYPES[sl.get_dtype()], tuple(sl.get_shape()))

    def specs(self):
        return [(k, dt, shape) for k, (dt, shape) in self._specs.items()]

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.where[name], framework="pt") as sf:
            return sf.get_tensor(name)


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * torch.empty(0, dtype=dtype).element_size()


def write_safetensors(path: str | os.PathLike, source: TensorSource, metadata: dict[str, str] | None = None) -> None:
    """Write every tensor of `source` into one safetensors file, loading one tensor at a time."""
    if sys.byteorder != "little":  # the format stores little-endian data; so does every supported CPU
        raise RuntimeError("write_safetensors needs a little-endian machine")
    specs = sorted(source.specs(), key=lambda s: (-torch.empty(0, dtype=s[1]).element_size(), s[0]))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in specs:
        if dtype not in DTYPE_CODES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, dtype, shape in specs:
            t = source.get(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, announced {dtype} {tuple(shape)}")
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data.data)
            del t, data
