"""The Triton (GPU) delta kernel against the reference, and the runtime with the triton backend.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here for the
backend's check): the same kernel source, executed with numpy, so indexing, masking, bit
extraction and the per-segment descriptors are checked on any machine. What the interpreter
cannot check (compilation for a real GPU, tensor-core rounding, speed) is covered by the CUDA
tests at the end, which run where a GPU exists, and by benchmarks/gpu.py.
"""
from __future__ import annotations

import pytest
import torch
from test_kernel import make_delta, reference_product

pytest.importorskip("triton", reason="the gpu extra (triton) is not installed")

from meswitch.runtime import Switch  # noqa: E402
from meswitch.runtime.backend import ReferenceBackend, TritonBackend, get_backend  # noqa: E402
from meswitch.runtime import triton_kernel  # noqa: E402

FP32_REL = 1e-5
CASES = [  # (out, in, salient, group): odd shapes, 0 / 1 / several salient columns, groups
    (37, 101, 1, 0), (19, 300, 0, 64), (9, 250, 0, 48), (70, 130, 6, 0), (16, 200, 3, 100),
]
CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def triton_product(be, x, deltas, segments, dtype=torch.float32, y=None):
    """Run the backend over segments [(delta index, a, b)], each delta in layer 1 of its expert's table."""
    tables = [be.expert_table([None, be.prepare(d, dtype)]) for d in deltas]
    y = torch.zeros(x.shape[0], deltas[0].shape[0], dtype=x.dtype, device=x.device) if y is None else y
    be.segmented_matmul(x, y, be.plan([(tables[e], a, b) for e, a, b in segments]), 1)
    return y


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_triton_kernel_equals_the_dequantized_product(bits):
    be = TritonBackend("cpu")
    for i, (out, cols, sal, group) in enumerate(CASES):
        d = make_delta(out, cols, bits, sal, group, seed=100 * bits + i)
        for tokens in (1, 3, 17, 64):
            x = torch.randn(tokens + 2, cols)
            got = triton_product(be, x, [d], [(0, 1, 1 + tokens)])
            want = reference_product(x, d, [(1, 1 + tokens)])
            err = (got - want).abs().max() / want.abs().max()
            assert err < FP32_REL, (out, cols, sal, group, tokens, float(err))
            assert torch.all(got[0] == 0) and torch.all(got[-1] == 0)  # rows outside the segment untouched


def test_several_experts_of_different_widths_in_one_launch_with_empty_segments():
    be = TritonBackend("cpu")
    # one layer shape, experts quantized differently: bits, salient count, groups, one step size per matrix
    deltas = [make_delta(45, 150, 2, 0, 0, seed=1), make_delta(45, 150, 3, 4, 32, seed=2),
              make_delta(45, 150, 1, 1, 0, seed=3, scale_rows=False), make_delta(45, 150, 4, 0, 64, seed=4)]
    segs = [(0, 0, 5), (1, 5, 5), (2, 5, 6), (3, 8, 40), (1, 40, 41)]  # an empty one; rows 6-7 in none
    x = torch.randn(43, 150)
    got = triton_product(be, x, deltas, segs)
    want = torch.zeros(43, 45)
    for e, a, b in segs:
        want[a:b] = reference_product(x, deltas[e], [(a, b)])[a:b]
    assert (got - want).abs().max() < FP32_REL * want.abs().max()
    assert torch.all(got[6:8] == 0) and torch.all(got[41:] == 0)
    # a layer without a delta for these experts (layer 0 of each table) adds nothing
    tables = [be.expert_table([None, be.prepare(d, torch.float32)]) for d in deltas]
    y = torch.zeros(43, 45)
    be.segmented_matmul(x, y, be.plan([(tables[e], a, b) for e, a, b in segs]), 0)
    assert torch.all(y == 0)


def test_the_dense_route_and_16_bit_deltas_match_the_reference():
    be, ref = TritonBackend("cpu", dense_min_tokens=8), ReferenceBackend()
    q = make_delta(33, 90, 3, 2, 0, seed=5)
    from meswitch.compression.delta import DenseDelta

    dense = DenseDelta((torch.randn(33, 90) * 0.01).to(torch.float16))
    x = torch.randn(30, 90)
    segs = [(0, 0, 3), (0, 3, 20), (1, 20, 30)]  # kernel, dense route (17 >= 8 tokens), a 16-bit delta
    tb = [be.expert_table([None, be.prepare(d, torch.float32)]) for d in (q, dense)]
    tr = [ref.expert_table([None, ref.prepare(d, torch.float32)]) for d in (q, dense)]
    got, want = torch.zeros(30, 33), torch.zeros(30, 33)
    be.segmented_matmul(x, got, be.plan([(tb[e], a, b) for e, a, b in segs]), 1)
    ref.segmented_matmul(x, want, ref.plan([(tr[e], a, b) for e, a, b in segs]), 1)
    assert (got - want).abs().max() < FP32_REL * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_activations(dtype):
    """The GPU path multiplies in the model dtype (the delta tile rounded to it, fp32 accumulation),
    as the reference backend's dense delta does: within that rounding of the exact product."""
    be = TritonBackend("cpu")
    d = make_delta(40, 200, 2, 3, 0, seed=9)
    x = torch.randn(12, 200).to(dtype)
    base = torch.randn(12, 40).to(dtype)
    got = triton_product(be, x, [d], [(0, 0, 5), (0, 7, 12)], dtype, y=base.clone())
    exact = base.float() + reference_product(x.float(), d, [(0, 5), (7, 12)])
    scale = reference_product(x.float().abs(), make_delta(40, 200, 2, 3, 0, seed=9), [(0, 12)]).abs().max()
    assert (got.float() - exact).abs().max() < 2.0 ** -7 * (exact.abs().max() + scale)
    assert torch.equal(got[5:7], base[5:7])


def test_rows_and_dequantize():
    be = TritonBackend("cpu")
    for bits, sal, group in ((2, 5, 0), (3, 0, 32), (8, 1, 0), (1, 0, 128), (4, 2, 16)):
        d = make_delta(23, 170, bits, sal, group, seed=bits)
        full = d.dequantize()
        rows = torch.tensor([22, 0, 5, 5])
        assert torch.equal(be.gather_rows(be.prepare_rows(d), rows), full[rows])
        assert torch.equal(triton_kernel.dequantize(be.prepare(d, torch.float32), torch.float32), full)
        assert be.gather_rows(be.prepare_rows(d), torch.tensor([], dtype=torch.long)).shape == (0, 170)


def test_compute_ready_is_the_stored_form():
    be = TritonBackend("cpu")
    for sal in (0, 6):
        d = make_delta(256, 576, 2, sal, 0, seed=3)
        ready = be.prepare(d, torch.bfloat16)
        assert ready.delta.packed.data_ptr() == d.packed.data_ptr()  # read in place, not copied
        assert ready.nbytes == be.ready_nbytes(d, torch.bfloat16)
        assert ready.nbytes <= 0.1 * d.nbytes  # within the +10% the issue allows (the column map)


def test_backend_choice():
    assert get_backend("triton", "cpu").name == "triton"  # interpreter (TRITON_INTERPRET=1 here)
    assert get_backend("auto", "cpu").name == "cpu"
    with pytest.raises(RuntimeError, match="CPU"):
        get_backend("cpu", "cuda")
    if not CUDA:
        with pytest.warns(UserWarning, match="no CUDA device"):
            assert get_backend("auto", "cuda").name == "reference"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(triton_kernel.TritonUnavailable, match="TRITON_INTERPRET"):
        TritonBackend("cpu")


@pytest.mark.parametrize("arch,dtype", [(80, "bf16"), (90, "bf16"), (90, "fp32")])
def test_the_kernels_compile_for_gpus(arch, dtype, monkeypatch):
    """Compiled to a cubin for an A100 (sm_80) / H100-H200 (sm_90) with the ptxas bundled in the
    triton wheel: no GPU needed to catch what the interpreter lets through (types, layouts)."""
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when it is unset
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from triton.runtime.jit import JITFunction

    target = GPUTarget("cuda", arch, 32)
    blocks = dict(BLOCK_M=triton_kernel.BLOCK_M, BLOCK_N=triton_kernel.BLOCK_N, BLOCK_K=triton_kernel.BLOCK_K)
    sig = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "plan_ptr": "*i64", "layer": "i32", "OUT": "i32",
           "stride_x": "i32", "stride_y": "i32"}
    consts = dict(blocks, BLOCK_S=triton_kernel.BLOCK_S, DESC=triton_kernel.DESC_FIELDS, IEEE=dtype == "fp32",
                  UPCAST=False)
    try:
        k = compile(ASTSource(JITFunction(triton_kernel._segmented_delta_kernel), {**sig, **{c: "constexpr" for c in consts}},
                              consts), target=target)
    except RuntimeError as e:  # no ptxas in this triton build
        if "ptxas" in str(e):
            pytest.skip(f"cannot compile for CUDA here: {e}")
        raise
    assert k.asm["cubin"]
    sig = {"desc_ptr": "*i64", "rows_ptr": "*i64", "out_ptr": f"*{dtype}", "n_rows": "i32", "stride_out": "i32"}
    consts = dict(HAS_ROWS=True, BLOCK_R=16, BLOCK_K=64)
    k = compile(ASTSource(JITFunction(triton_kernel._dequantize_kernel), {**sig, **{c: "constexpr" for c in consts}},
                          consts), target=target)
    assert k.asm["cubin"]


# ----- the runtime with the triton backend ------------------------------------------------------
def test_served_with_triton_equals_the_cpu_kernel(rt):
    """The engine, delta layers, store and embedding rows with backend "triton" (interpreted):
    the same greedy tokens as the CPU kernel, for a mixed batch of both experts and the base."""
    prompts = ["Tom has 12 apples", "def add(a, b):", "The quick brown fox", "Tom has 12 apples"]
    experts = ["math", "code", None, None]
    outs = {}
    for backend in ("cpu", "triton"):
        with Switch.load(rt / "bundle", dtype="float32", backend=backend) as sw:
            assert sw.store.backend.name == backend
            outs[backend] = [c.token_ids for c in sw.generate(prompts, expert=experts, temperature=0, max_tokens=6)]
    assert outs["triton"] == outs["cpu"]
    assert outs["cpu"][0] != outs["cpu"][3]  # the expert's delta changes the tokens: the comparison could fail


@pytest.mark.skipif(CUDA, reason="a CUDA device exists")
def test_asking_for_a_gpu_without_one_is_a_clear_error(rt, capsys):
    from meswitch.cli import main
    from meswitch.runtime.switch import DeviceUnavailableError

    with pytest.raises(DeviceUnavailableError, match="no CUDA device"):
        Switch.load(rt / "bundle", device="cuda")
    assert main(["generate", str(rt / "bundle"), "--device", "cuda", "--prompt", "hi"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


# ----- on a GPU (skipped without one) -----------------------------------------------------------
cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")


@cuda
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_cuda_kernel_equals_the_dequantized_product(bits, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    be = TritonBackend("cuda")
    from meswitch.compression.delta import delta_to

    for i, (out, cols, sal, group) in enumerate(CASES + [(4096, 4096, 40, 0), (11008, 4096, 0, 128)]):
        d = make_delta(out, cols, bits, sal, group, seed=100 * bits + i)
        for tokens in (1, 7, 64, 300):
            x = torch.randn(tokens + 2, cols)
            want = reference_product(x, d, [(1, 1 + tokens)])
            got = triton_product(be, x.cuda(), [delta_to(d, "cuda")], [(0, 1, 1 + tokens)]).cpu()
            assert (got - want).abs().max() / want.abs().max() < FP32_REL, (out, cols, tokens)


@cuda
def test_cuda_greedy_equals_the_materialized_expert_and_mixed_batches(rt, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    from transformers import AutoModelForCausalLM

    prompts = ["Tom has 12 apples", "def add(a, b):", "The quick brown fox", "Write a Python function"]
    experts = ["math", "code", None, "math"]
    with Switch.load(rt / "bundle", dtype="float32", device="cuda") as sw:
        assert sw.store.backend.name == "triton"
        alone = [sw.generate(p, expert=e, temperature=0, max_tokens=12).token_ids for p, e in zip(prompts, experts)]
        together = sw.generate(prompts, expert=experts, temperature=0, max_tokens=12)
        assert [c.token_ids for c in together] == alone
        sampled = [sw.generate(prompts[0], expert="math", temperature=0.8, seed=5, max_tokens=8).token_ids
                   for _ in range(2)]
        assert sampled[0] == sampled[1]  # seeded sampling on the device is reproducible
        for p, e, got in zip(prompts, experts, alone):
            ref = AutoModelForCausalLM.from_pretrained(rt / ("base" if e is None else f"mat_{e}"),
                                                       dtype=torch.float32).eval()
            ids = sw.encode(p, e)
            want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(ids):].tolist()
            assert got == want, e


@cuda
def test_cuda_quantization_matches_the_cpu():
    """`compress --device cuda`: the salient and clipping searches on the GPU give the CPU's result
    (up to float summation order: nearly every code equal, the same salient columns)."""
    from meswitch.compression.methods import quantize_matrix

    g = torch.Generator().manual_seed(0)
    delta = torch.randn(256, 512, generator=g) * 0.01
    delta[:, 7] *= 40  # a clear outlier column
    w = torch.rand(512, generator=g)
    cpu = quantize_matrix(delta, 2, 0, 5, w)
    gpu = quantize_matrix(delta.cuda(), 2, 0, 5, w.cuda())
    assert gpu.packed.device.type == "cuda"
    assert torch.equal(gpu.salient_idx.cpu(), cpu.salient_idx) and 7 in cpu.salient_idx.tolist()
    assert (gpu.codes().cpu() == cpu.codes()).float().mean() > 0.999
    assert (gpu.dequantize().cpu() - cpu.dequantize()).abs().max() < 0.1 * delta.abs().max()
