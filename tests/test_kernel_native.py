"""The portable CPU kernel (what ARM64 runs) as a standalone program, natively and for ARM64.

tests/native/kernel_check.cpp drives the kernel's portable code (delta_cpu_impl.h, MESWITCH_ISA 0)
without PyTorch's libraries and checks it against a plain reconstruction of the delta. Built with
the kernel's own compiler flags: natively here, and for ARM64 with a cross compiler, run under
qemu, where those are installed (Debian: g++-aarch64-linux-gnu qemu-user-static); otherwise that
test is skipped and says what to install.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from meswitch.runtime import cpu_kernel

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "tests" / "native" / "kernel_check.cpp"


def build_and_run(compiler: str, out: Path, runner: list[str], extra: list[str]) -> str:
    torch_include = cpp_extension.include_paths()[0]
    cmd = [compiler, "-std=c++17", *cpu_kernel.CFLAGS, "-Wno-psabi", *extra, f"-I{torch_include}",
           f"-I{cpu_kernel.KERNEL_DIR}", str(SOURCE), "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "of 240 cases within 1e-5 relative" in run.stdout, run.stdout
    return run.stdout


def test_portable_kernel_natively(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    assert compiler, "the CPU kernel needs a C++ compiler (g++)"
    assert "240 of 240" in build_and_run(compiler, tmp_path / "kernel_check", [], [])


def test_portable_kernel_on_arm64(tmp_path):
    compiler = shutil.which("aarch64-linux-gnu-g++")
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if not (compiler and qemu):
        pytest.skip("no ARM64 cross compiler and emulator here (Debian: apt install g++-aarch64-linux-gnu "
                    "qemu-user-static)")
    assert "240 of 240" in build_and_run(compiler, tmp_path / "kernel_check_arm64", [qemu], ["-static"])
