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
    c = codes.cpu().to(torch.int64)
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
    if bits == 8:
        return packed.clone()
    if packed.device.type != "cpu":
        return _unpack_on_device(packed, bits, cols)
    return _unpack_fast(packed, bits, cols)


def _unpack_on_device(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Unpacking with torch ops on the tensor's own device (a GPU): code j is read from the 16-bit
    window of bytes (j*b)//8 and (j*b)//8 + 1, shifted by (j*b) % 8 (no code spans three bytes)."""
    rows, nbytes = packed.shape
    p = torch.nn.functional.pad(packed, (0, 1)).to(torch.int32)
    bit = torch.arange(cols, device=packed.device) * bits
    byte, shift = bit // 8, (bit % 8).to(torch.int32)
    window = p[:, byte] | (p[:, byte + 1] << 8)
    return ((window >> shift) & ((1 << bits) - 1)).to(torch.uint8)


def _unpack_fast(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Shift-and-mask unpacking with numpy (runs at expert load time, so speed matters; numpy's
    uint8 kernels are ~20x faster than torch's here). 1, 2 and 4-bit codes never straddle a
    byte; 3-bit codes come 8 to a 3-byte word, read through 16-bit windows where they straddle."""
    rows, nbytes = packed.shape
    a = packed.numpy()
    mask = (1 << bits) - 1
    if bits in (1, 2, 4):
        codes = np.stack([(a >> s) & mask for s in range(0, 8, bits)], axis=-1)
        return torch.from_numpy(codes.reshape(rows, -1)[:, :cols].copy())
    words = (nbytes + 2) // 3
    b = np.zeros((rows, words * 3), dtype=np.uint8)
    b[:, :nbytes] = a
    b = b.reshape(rows, words, 3)
    b0, b1, b2 = b[..., 0], b[..., 1], b[..., 2]
    w01 = b0.astype(np.uint16) | (b1.astype(np.uint16) << 8)
    w12 = b1.astype(np.uint16) | (b2.astype(np.uint16) << 8)
    o = np.empty((rows, words, 8), dtype=np.uint8)
    o[..., 0] = b0 & 7
    o[..., 1] = (b0 >> 3) & 7
    o[..., 2] = (w01 >> 6) & 7
    o[..., 3] = (b1 >> 1) & 7
    o[..., 4] = (b1 >> 4) & 7
    o[..., 5] = (w12 >> 7) & 7
    o[..., 6] = (b2 >> 2) & 7
    o[..., 7] = b2 >> 5
    return torch.from_numpy(o.reshape(rows, -1)[:, :cols].copy())


def unpack_codes_reference(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Bit-stream unpacking with numpy, straight from the layout definition (tests check the fast path against it)."""
    rows = packed.shape[0]
    arr = packed.numpy()
    if bits == 8:
        return torch.from_numpy(arr.copy())
    stream = np.unpackbits(arr, axis=1, count=cols * bits, bitorder="little")
    planes = stream.reshape(rows, cols, bits)
    weights = (1 << np.arange(bits, dtype=np.uint8)).astype(np.uint8)
    codes = (planes * weights).sum(axis=2, dtype=np.uint8)
    return torch.from_numpy(codes)
