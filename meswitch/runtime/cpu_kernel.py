"""The CPU delta kernel (kernels/delta_cpu.cpp): building it, loading it, and describing deltas to it.

The kernel is C++ compiled at first use with torch.utils.cpp_extension (g++ and ninja, no CUDA),
then cached under ~/.cache/meswitch/kernels (or $MESWITCH_KERNEL_CACHE) in a directory named
after the torch version and a hash of the sources, so a changed source or another torch builds
anew. `make venv` builds it once up front (`python -m meswitch.runtime.cpu_kernel`).

It registers the torch ops `meswitch::segmented_delta_mm`, `meswitch::dequantize` and
`meswitch::select_isa`. It dispatches at run time on the CPU's instruction set (AVX-512 with
BF16 dot products, AVX-512, AVX2, or portable code, which is also what ARM64 gets, vectorised
for NEON by the compiler); ATEN_CPU_CAPABILITY and MESWITCH_CPU_ISA cap the choice (`avx2`,
`generic`; MESWITCH_CPU_ISA also `avx512`, AVX-512 without the bf16 kernel), so one machine
can run every lower level's code for testing.

A delta is described to the kernel by a descriptor: DESC_FIELDS int64 values holding its shape,
bit width, grouping and the addresses of its stored tensors (codes, step sizes, offsets,
salient indices and values). The kernel reads those tensors in place: the compute-ready form of
a packed delta is the packed delta itself plus 128 bytes. Whoever holds a descriptor must hold
the tensors it points to (PackedDelta below does).
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compression.delta import QuantizedDelta

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCES = ("delta_cpu.cpp", "delta_cpu_desc.h", "delta_cpu_impl.h", "delta_cpu_bf16.h")
DESC_MAGIC = 0x4D45535744310001  # must match delta_cpu.cpp
DESC_FIELDS = 16
CFLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-Wno-unused-function"]


class KernelUnavailable(RuntimeError):
    """The CPU kernel could not be built or loaded (no compiler, no ninja, ...)."""


_lock = threading.Lock()
_state: dict = {}


def _source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((KERNEL_DIR / name).read_bytes())
    h.update(" ".join(CFLAGS).encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    root = os.environ.get("MESWITCH_KERNEL_CACHE") or Path.home() / ".cache" / "meswitch" / "kernels"
    tag = f"cpu-torch{torch.__version__.replace('+', '_')}-{_source_hash()}"
    return Path(root) / tag


def load() -> None:
    """Build (once per source version) and load the kernel; raises KernelUnavailable."""
    with _lock:
        if "error" in _state:
            raise _state["error"]
        if _state.get("loaded"):
            return
        try:
            _build_and_load()
            _state["loaded"] = True
        except Exception as e:  # compiler missing, headers missing, ...
            _state["error"] = KernelUnavailable(f"the meswitch CPU kernel is not available: {e}")
            raise _state["error"] from e


def _build_and_load() -> None:
    from torch.utils import cpp_extension

    directory = build_dir()
    name = "meswitch_cpu_" + directory.name.rsplit("-", 1)[-1]
    library = directory / f"{name}.so"
    if not library.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        print(f"meswitch: building the CPU delta kernel into {directory} (once; about 30 s)", file=sys.stderr,
              flush=True)
        cpp_extension.load(name=name, sources=[str(KERNEL_DIR / "delta_cpu.cpp")], extra_cflags=CFLAGS,
                           extra_include_paths=[str(KERNEL_DIR)], build_directory=str(directory),
                           is_python_module=False, verbose=False)
    else:
        torch.ops.load_library(str(library))


def available() -> bool:
    try:
        load()
        return True
    except KernelUnavailable:
        return False


def unavailable_reason() -> str | None:
    err = _state.get("error")
    return None if err is None else str(err)


def select_isa(name: str = "") -> str:
    """The instruction set the kernel uses now; `name` ("auto", "avx512_bf16", "avx512", "avx2",
    "generic") switches to the best one the CPU supports up to that one."""
    load()
    return torch.ops.meswitch.select_isa(name)


@dataclass
class PackedDelta:
    """A quantized delta as the kernel reads it: the stored tensors, plus their descriptor."""
    delta: QuantizedDelta
    desc: torch.Tensor  # int64 [DESC_FIELDS]
    keep: tuple  # the tensors the descriptor points to (the delta's own, or contiguous copies)

    @property
    def nbytes(self) -> int:
        """Memory beyond the stored delta: the descriptor, and copies made for layout (normally none)."""
        own = {t.data_ptr() for t in (self.delta.packed, self.delta.params.scale, self.delta.params.offset,
                                      self.delta.salient_idx, self.delta.salient_values)}
        extra = sum(t.numel() * t.element_size() for t in self.keep if t.data_ptr() not in own)
        return self.desc.numel() * 8 + extra

    @property
    def shape(self) -> tuple[int, int]:
        return self.delta.shape


def pack(d: QuantizedDelta) -> PackedDelta:
    """Describe a stored delta to the kernel (no copy when its tensors are contiguous and in the
    stored dtypes, which is how bundles hold them)."""
    out, cols = d.shape
    codes, scale, offset, sal_idx, sal_val = d.stored_tensors()
    n = d.n_quantized_cols
    groups = scale.shape[1]
    group_size = d.params.group_size if groups > 1 else max(n, 1)
    fields = [DESC_MAGIC, out, cols, d.bits, n, group_size, groups, groups if scale.shape[0] > 1 else 0,
              sal_idx.numel(), codes.shape[1], codes.data_ptr(), scale.data_ptr(), offset.data_ptr(),
              sal_idx.data_ptr(), sal_val.data_ptr(), 0]
    assert len(fields) == DESC_FIELDS
    return PackedDelta(d, torch.tensor(fields, dtype=torch.int64), (codes, scale, offset, sal_idx, sal_val))


def dequantize(p: PackedDelta, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None,
               base: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The delta (or some of its rows) as a dense matrix in `dtype`, rebuilt by the kernel. With
    `base` (the base weight, [out, in] in `dtype`): the base's rows + the delta's, added in float32
    and rounded once to `dtype`, as `materialize` computes the expert's weight. `out`: a
    contiguous tensor of the result's shape and dtype to write into (returned)."""
    return torch.ops.meswitch.dequantize(p.desc, rows, dtype, base, out)


if __name__ == "__main__":  # `python -m meswitch.runtime.cpu_kernel`: build now, report the ISA
    try:
        print(f"meswitch CPU kernel: {build_dir()} ({select_isa()})")
    except KernelUnavailable as e:
        sys.exit(str(e))
