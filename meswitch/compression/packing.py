"""Bit packing of b-bit integer codes into bytes.

Layout (documented in docs/FORMAT.md): each row of a [rows, cols] code matrix is packed on its
own into ceil(cols * bits / 8) bytes, so rows can be unpacked independently. Inside a row the
codes form a little-endian bit stream: code j occupies bits [j*b, (j+1)*b) of the row, bit 0 being
the least significant bit of byte 0. For b = 2 this puts four codes in a byte, code 0 in the two
low bits; for b = 3, eight codes fill three bytes; b = 8 is the identity.
"""
from __future__ import annotations

import numpy as np
import torch

SUPPORTED_BITS = (1, 2, 3, 4, 8)


def packed_row_bytes(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; choose one of {SUPPORTED_BITS}")


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 2-D tensor of integer codes in [0, 2**bits) into a uint8 tensor [rows, row_bytes]."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"expected a 2-D code matrix, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    arr = c.to(torch.uint8).numpy()
    if bits == 8:
        return torch.from_numpy(arr.copy())
    # [rows, cols, bits] bit planes, little-endian within a code, then one stream per row.
    planes = (arr[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1
    stream = planes.reshape(rows, cols * bits)
    packed = np.packbits(stream, axis=1, bitorder="little")
    assert packed.shape[1] == packed_row_bytes(cols, bits)
    return torch.from_numpy(packed)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 [rows, row_bytes] -> uint8 codes [rows, cols]."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError("packed codes must be a 2-D uint8 tensor")
    rows, nbytes = packed.shape
    if nbytes != packed_row_bytes(cols, bits):
        raise ValueError(
            f"packed row has {nbytes} bytes, expected {packed_row_bytes(cols, bits)} "
            f"for {cols} codes of {bits} bits"
        )
    arr = packed.numpy()
    if bits == 8:
        return torch.from_numpy(arr.copy())
    stream = np.unpackbits(arr, axis=1, count=cols * bits, bitorder="little")
    planes = stream.reshape(rows, cols, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    codes = (planes * weights).sum(axis=2, dtype=np.uint8)
    return torch.from_numpy(codes)
