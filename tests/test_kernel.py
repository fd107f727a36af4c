"""The CPU delta kernel against the reference: dequantize the stored delta, multiply with PyTorch.

Every instruction set the machine has is checked in turn (AVX-512 with BF16 dot products,
AVX-512, AVX2, portable code): the
kernel's own switch (`select_isa`) picks each one, so a layout or dispatch bug of any of them fails
here on a machine that has them. CI additionally runs this file under ATEN_CPU_CAPABILITY=avx2.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meswitch.compression.delta import QuantizedDelta
from meswitch.compression.packing import pack_codes
from meswitch.compression.quantizer import AffineParams, num_groups
from meswitch.runtime import cpu_kernel
from meswitch.runtime.backend import CpuKernelBackend, ReferenceBackend

FP32_REL = 1e-5
ISAS = ["avx512_bf16", "avx512", "avx2", "generic"]


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not cpu_kernel.available():
        pytest.fail(f"the CPU kernel must build here: {cpu_kernel.unavailable_reason()}")
    yield
    cpu_kernel.select_isa("auto")


def isa_or_skip(name: str) -> str:
    got = cpu_kernel.select_isa(name)
    if got != name:
        pytest.skip(f"this CPU has no {name} (best: {got})")
    return got


def make_delta(out, cols, bits, salient, group, seed, scale_rows=True) -> QuantizedDelta:
    """Random codes, step sizes and salient columns in the stored layout (docs/FORMAT.md)."""
    g = torch.Generator().manual_seed(seed)
    sal = torch.randperm(cols, generator=g)[:salient].sort().values.to(torch.int32)
    n = cols - salient
    groups = num_groups(n, group)
    rows = out if scale_rows else 1
    scale = (torch.rand(rows, groups, generator=g) * 0.01 + 0.001).to(torch.float16)
    offset = (-scale.float() * torch.rand(rows, groups, generator=g) * (1 << bits)).to(torch.float16)
    codes = torch.randint(0, 1 << bits, (out, n), generator=g)
    d = QuantizedDelta((out, cols), bits, pack_codes(codes, bits),
                       AffineParams(scale, offset, group if groups > 1 else 0), sal,
                       (torch.randn(out, salient, generator=g) * 0.05).to(torch.float16))
    d.validate()
    return d


def kernel_product(x, d: QuantizedDelta, segments, y=None):
    """Run the kernel over `segments` [(a, b)] of x, all with delta d; returns y."""
    p = cpu_kernel.pack(d)
    y = torch.zeros(x.shape[0], d.shape[0], dtype=x.dtype) if y is None else y
    table = torch.full((len(segments), 1), p.desc.data_ptr(), dtype=torch.int64)
    bounds = torch.tensor(segments, dtype=torch.int64).reshape(-1, 2)
    torch.ops.meswitch.segmented_delta_mm(x, y, table, bounds, 0, 1 << 30)
    return y


def reference_product(x, d, segments):
    y = torch.zeros(x.shape[0], d.shape[0])
    for a, b in segments:
        y[a:b] = x[a:b].double().matmul(d.dequantize().double().t()).float()
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_kernel_equals_the_dequantized_product(isa, bits):
    isa_or_skip(isa)
    cases = [  # (out, in, salient, group): odd shapes, 0 / 1 / several salient columns, groups
        (64, 128, 0, 0), (37, 101, 1, 0), (130, 577, 6, 0), (19, 300, 0, 64), (21, 513, 0, 128),
        (9, 250, 0, 48), (16, 200, 0, 100), (33, 1100, 11, 0),
    ]
    for i, (out, cols, sal, group) in enumerate(cases):
        d = make_delta(out, cols, bits, sal, group, seed=100 * bits + i)
        for tokens in (1, 2, 3, 4, 5, 8, 17, 200):
            x = torch.randn(tokens + 2, cols)
            segs = [(1, 1 + tokens)]
            got, want = kernel_product(x, d, segs), reference_product(x, d, segs)
            err = (got - want).abs().max() / want.abs().max()
            assert err < FP32_REL, (out, cols, sal, group, tokens, float(err))
            assert torch.all(got[0] == 0) and torch.all(got[-1] == 0)  # rows outside the segment untouched


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bfloat16_activations_are_within_one_bf16_rounding(isa, bits):
    """bf16 activations (AVX-512 BF16 takes its dot-product kernel for 1, 2 and 4 bits; the rest,
    and every other instruction set, the float path): y + x @ D^T rounded once to bf16."""
    isa_or_skip(isa)
    cases = [  # (out, in, salient, group): one and several blocks, tails, groups of whole blocks
        (40, 576, 6, 0), (37, 101, 1, 0), (19, 1100, 0, 256), (21, 513, 3, 128), (9, 250, 0, 48),
        (64, 64, 0, 0), (17, 1536, 15, 512), (5, 3, 3, 0),
    ]
    for i, (out, cols, sal, group) in enumerate(cases):
        d = make_delta(out, cols, bits, sal, group, seed=10 * bits + i)
        for tokens in (1, 2, 3, 4, 7, 8, 9, 17, 40):
            x = torch.randn(tokens + 2, cols).to(torch.bfloat16)
            y0 = torch.randn(tokens + 2, out).to(torch.bfloat16)
            segs = [(1, 1 + tokens)]
            got = kernel_product(x, d, segs, y=y0.clone()).float()
            want = y0.float() + reference_product(x.float(), d, segs)
            # half a bf16 step of the exact value, plus float32 accumulation error where the sum cancels
            size = y0.float().abs() + x.float().abs() @ d.dequantize().abs().t()
            assert torch.all((got - want).abs() <= want.abs() * 2.0 ** -8 + 1e-6 * size), (out, cols, sal, group, tokens)
            assert torch.equal(got[0], y0[0].float()) and torch.equal(got[-1], y0[-1].float())


@pytest.mark.parametrize("isa", ISAS)
def test_kernel_segments_bfloat16_and_one_step_size_per_matrix(isa):
    isa_or_skip(isa)
    d = make_delta(48, 200, 2, 3, 0, seed=7, scale_rows=False)
    assert d.params.scale.shape == (1, 1)
    x = torch.randn(12, 200)
    segs = [(0, 3), (3, 3), (5, 12)]  # an empty segment; rows 3-4 in no segment
    want = reference_product(x, d, segs)
    got = kernel_product(x, d, segs)
    assert (got - want).abs().max() / want.abs().max() < FP32_REL
    assert torch.all(got[3:5] == 0)
    xb = x.to(torch.bfloat16)
    base = torch.randn(12, 48).to(torch.bfloat16)
    got_b = kernel_product(xb, d, segs, y=base.clone())
    want_b = base.float() + reference_product(xb.float(), d, segs)
    # the sum is rounded once to bf16: within half a bf16 step of the exact value
    assert torch.all((got_b.float() - want_b).abs() <= want_b.abs() * 2.0 ** -8 + 1e-6)


def test_several_experts_in_one_call_and_the_dense_route(tmp_path):
    be = CpuKernelBackend(dense_min_tokens=16)
    ref = ReferenceBackend()
    deltas = [make_delta(40, 96, b, s, 0, seed=b) for b, s in ((2, 2), (1, 0), (3, 1))]
    tables = [be.expert_table([None, be.prepare(d, torch.float32)]) for d in deltas]
    rtables = [ref.expert_table([None, ref.prepare(d, torch.float32)]) for d in deltas]
    segs = [(0, 0, 1), (1, 1, 5), (2, 5, 30)]  # 1 token, 4 tokens, 25 tokens (dense route)
    x = torch.randn(33, 96)
    y = torch.zeros(33, 40)
    be.segmented_matmul(x, y, be.plan([(tables[e], a, b) for e, a, b in segs]), 1)
    want = torch.zeros(33, 40)
    ref.segmented_matmul(x, want, ref.plan([(rtables[e], a, b) for e, a, b in segs]), 1)
    assert (y - want).abs().max() < FP32_REL * want.abs().max()
    assert torch.all(y[30:] == 0)
    y0 = y.clone()
    be.segmented_matmul(x, y, be.plan([(tables[e], a, b) for e, a, b in segs]), 0)  # layer 0: no deltas
    assert torch.equal(y, y0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_computes_long_segments_with_the_merged_weight(dtype):
    """backend.linear: base rows, short segments (kernel), long segments (one GEMM with W + D,
    rounded once as materialize rounds it), and a long segment of an expert without a delta on
    the layer (base rows), against the base product plus the reference backend's deltas."""
    be = CpuKernelBackend(dense_min_tokens=16)
    ref = ReferenceBackend()
    deltas = [make_delta(40, 96, b, s, 0, seed=20 + b) for b, s in ((2, 2), (4, 0))]
    tables = [be.expert_table([None, be.prepare(d, dtype)]) for d in deltas] + [be.expert_table([None, None])]
    rtables = [ref.expert_table([None, ref.prepare(d, torch.float32)]) for d in deltas] + [ref.expert_table([None, None])]
    segs = [(0, 1, 5), (1, 5, 30), (2, 30, 50), (0, 52, 70)]  # short, long, long without delta, long; rows 0, 50-52, 70+ base
    x = torch.randn(73, 96).to(dtype)
    w, bias = (torch.randn(40, 96) * 0.1).to(dtype), torch.randn(40).to(dtype)
    y = be.linear(x, w, bias, be.plan([(tables[e], a, b) for e, a, b in segs]), 1)
    want = F.linear(x.float(), w.float(), bias.float())
    ref.segmented_matmul(x.float(), want, ref.plan([(rtables[e], a, b) for e, a, b in segs]), 1)
    tol = FP32_REL if dtype == torch.float32 else 2.0 ** -7
    assert ((y.float() - want).abs() <= tol * want.abs().max()).all()
    for e, a, b in (segs[1], segs[3]):  # exactly the materialized expert's weight in the model dtype
        assert torch.equal(y[a:b], F.linear(x[a:b], (w.float() + deltas[e].dequantize()).to(dtype), bias))
    assert torch.equal(y[70:], F.linear(x[70:], w, bias))
    y0 = be.linear(x, w, bias, be.plan([(tables[e], a, b) for e, a, b in segs]), 0)  # layer 0: no deltas
    assert torch.equal(y0, F.linear(x, w, bias))


def test_compute_ready_is_the_stored_form():
    be = CpuKernelBackend()
    d = make_delta(256, 576, 2, 6, 0, seed=3)
    ready = be.prepare(d, torch.bfloat16)
    assert ready.delta.packed.data_ptr() == d.packed.data_ptr()  # read in place, not copied
    assert ready.nbytes == be.ready_nbytes(d, torch.bfloat16) == cpu_kernel.DESC_FIELDS * 8
    assert ready.nbytes < 0.01 * d.nbytes


@pytest.mark.parametrize("isa", ISAS)
def test_dequantize_and_rows(isa):
    isa_or_skip(isa)
    for bits, sal, group in ((2, 5, 0), (3, 0, 32), (8, 1, 0), (1, 0, 128)):
        d = make_delta(70, 333, bits, sal, group, seed=bits)
        p = cpu_kernel.pack(d)
        assert torch.equal(cpu_kernel.dequantize(p), d.dequantize())
        ids = torch.tensor([69, 0, 5, 5])
        assert torch.equal(cpu_kernel.dequantize(p, torch.float32, ids), d.dequantize()[ids])
        assert torch.equal(cpu_kernel.dequantize(p, torch.bfloat16), d.dequantize().to(torch.bfloat16))
        for dtype in (torch.float32, torch.bfloat16, torch.float16):  # base + delta, rounded once
            base = torch.randn(70, 333).to(dtype)
            want = (base.float() + d.dequantize()).to(dtype)
            assert torch.equal(cpu_kernel.dequantize(p, dtype, base=base), want)
            buf = torch.full((70, 333), float("nan"), dtype=dtype)  # written into a given buffer
            got = cpu_kernel.dequantize(p, dtype, base=base, out=buf)
            assert got.data_ptr() == buf.data_ptr() and torch.equal(buf, want)
    with pytest.raises(RuntimeError, match="out of range"):
        cpu_kernel.dequantize(p, torch.float32, torch.tensor([70]))
    with pytest.raises(RuntimeError, match="base must be"):
        cpu_kernel.dequantize(p, torch.float32, base=torch.zeros(70, 332))
    with pytest.raises(RuntimeError, match="out must be"):
        cpu_kernel.dequantize(p, torch.float32, out=torch.zeros(70, 333, dtype=torch.bfloat16))


def test_hand_made_codes_through_the_format_definition():
    """Codes written by hand (not by the compressor), reconstructed from FORMAT.md's definition."""
    cols, out, bits = 77, 5, 2
    codes = torch.arange(out * (cols - 2)).reshape(out, cols - 2) % 4
    scale = torch.tensor([[0.5], [1.0], [2.0], [-1.0], [0.25]], dtype=torch.float16)
    offset = torch.tensor([[-1.0], [0.0], [1.0], [2.0], [-0.5]], dtype=torch.float16)
    sal_idx = torch.tensor([3, 40], dtype=torch.int32)
    sal_val = torch.full((out, 2), 7.0, dtype=torch.float16)
    d = QuantizedDelta((out, cols), bits, pack_codes(codes, bits), AffineParams(scale, offset, 0), sal_idx, sal_val)
    dense = torch.empty(out, cols)
    qcols = [c for c in range(cols) if c not in (3, 40)]
    dense[:, qcols] = codes.float() * scale.float() + offset.float()
    dense[:, [3, 40]] = 7.0
    x = torch.randn(3, cols)
    got = kernel_product(x, d, [(0, 3)])
    assert torch.allclose(got, x @ dense.t(), rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused():
    d = make_delta(16, 64, 2, 0, 0, seed=1)
    p = cpu_kernel.pack(d)
    x, y = torch.randn(2, 63), torch.zeros(2, 16)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.meswitch.segmented_delta_mm(x, y, p.desc.data_ptr() * torch.ones(1, 1, dtype=torch.int64),
                                              torch.tensor([[0, 2]]), 0, 100)
    with pytest.raises(RuntimeError, match="outside the batch"):
        torch.ops.meswitch.segmented_delta_mm(torch.randn(2, 64), y, p.desc.data_ptr() * torch.ones(1, 1, dtype=torch.int64),
                                              torch.tensor([[0, 3]]), 0, 100)
    with pytest.raises(RuntimeError, match="descriptor"):
        cpu_kernel.dequantize(cpu_kernel.PackedDelta(d, torch.zeros(16, dtype=torch.int64), ()))
    with pytest.raises(RuntimeError, match="instruction set"):
        cpu_kernel.select_isa("sse9")
