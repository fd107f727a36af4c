"""What the machine computes fast: the compute dtype meswitch uses when none is given ("auto").

bfloat16 halves memory traffic, but only CPUs with native bf16 arithmetic compute it fast
(x86: AVX-512 BF16 or AMX; ARM: the BF16 extension). Elsewhere PyTorch emulates it, and it
runs about 2x slower than float32 (measured on a 2-core AVX2 EPYC: one 8 x 576 x 1536 linear
took 1.41 ms in bf16 against 0.70 ms in fp32). So "auto" means bfloat16 where the CPU has
native bf16 and float32 otherwise; on a CUDA device, bfloat16 where the GPU supports it.

The probe reads the CPU's feature flags (Linux /proc/cpuinfo). It honours
ATEN_CPU_CAPABILITY: set to `avx2` or `default`, PyTorch dispatches as on an older CPU, and
meswitch then behaves as on a CPU without native bf16 too (how CI checks the AVX2 path on an
AVX-512 machine).
"""
from __future__ import annotations

import functools
import os
import platform

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
_X86_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if cap in ("default", "avx2"):
        return False
    flags = _cpu_flags()
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return bool(flags & _X86_BF16_FLAGS)
    if machine in ("aarch64", "arm64"):
        return "bf16" in flags
    return False


def auto_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The fast compute dtype on `device`: bfloat16 where it is native, float32 otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """'auto' / None -> auto_dtype(device); a name from DTYPES -> its dtype; a dtype -> itself."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return auto_dtype(device)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPE_CHOICES)})")
    return DTYPES[dtype]
