"""`--method lowrank` (issue 15): quantized residual + float16 low-rank factors, D = Q + A B.

- its effective bits are what it stores, and the rank follows the --rank-bits budget;
- on a delta with low-rank structure it beats plain `mixed` at 1 bit with at least as many bits;
- the bundle file (delta format version 2) reconstructs by docs/FORMAT.md's definition, read here
  with safetensors and the bit-stream unpacker, not with meswitch's own reader;
- files without a low-rank part are still written as version 1; a version-1 file that claims a
  low-rank part, and unknown versions, are refused;
- the runtime (cpu backend: kernel + two thin GEMMs; reference backend) equals the materialized
  expert in float32 in a batch mixing a low-rank expert, a plain mixed expert and the base.
"""
from __future__ import annotations

import contextlib
import json
import struct

import pytest
import torch
from conftest import CORPUS, save_lively_experts
from safetensors import safe_open
from test_runtime import FP32_LOGIT_TOL, PROMPTS, ragged_logits
from transformers import AutoModelForCausalLM

from meswitch.bundle.format import Bundle, BundleError
from meswitch.cli import main
from meswitch.compression.delta import QuantizedDelta
from meswitch.compression.lowrank import lowrank_matrix, rank_for_budget, weighted_lowrank
from meswitch.compression.methods import CompressionSpec, compress_matrix, quantize_matrix
from meswitch.compression.packing import unpack_codes_reference
from meswitch.runtime import Switch
from meswitch.runtime.backend import LowRankReady


def structured_delta(out=256, cols=384, rank=3, seed=0):
    """A fine-tune-like delta: a few strong directions under dense noise, and input channels of
    very different activation energy."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(out, rank, generator=g) @ torch.randn(rank, cols, generator=g) * 2e-3
    delta = low + 1e-3 * torch.randn(out, cols, generator=g)
    s = torch.rand(cols, generator=g) ** 4 * 100 + 0.01
    return delta, s


def weighted_error(delta, d_hat, s) -> float:
    return float((((delta - d_hat) ** 2) * s[None]).sum() / ((delta ** 2) * s[None]).sum())


def bits(q) -> float:
    return 8 * q.nbytes / (q.shape[0] * q.shape[1])


def test_effective_bits_are_what_it_stores():
    delta, s = structured_delta()
    q = lowrank_matrix(delta, 1, 0.25, 0, 0, s)
    r = rank_for_budget(256, 384, 0.25)
    assert q.rank == r == int(0.25 * 256 * 384 // (16 * 640))
    tensors, meta = q.to_tensors("T")
    assert meta["rank"] == r and q.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert tensors["T.lowrank_a"].dtype == tensors["T.lowrank_b"].dtype == torch.float16
    factor_bits = 8 * (tensors["T.lowrank_a"].nbytes + tensors["T.lowrank_b"].nbytes) / delta.numel()
    assert factor_bits <= 0.25
    # 1-bit codes + one step size and offset per row + the factors: nothing else.
    assert bits(q) == pytest.approx(1 + 32 / 384 + factor_bits, abs=1e-9)
    assert rank_for_budget(64, 64, 0.2) == 0  # too small for a float16 factor: plain mixed
    assert lowrank_matrix(delta[:64, :64], 1, 0.2).rank == 0


def test_it_beats_mixed_at_one_bit_on_a_delta_with_low_rank_structure():
    delta, s = structured_delta()
    lr = lowrank_matrix(delta, 1, 0.4, 0, 0, s)
    assert lr.rank == 3
    # mixed-1 given at least as many bits (more salient 16-bit columns until it has them)
    k = next(k for k in range(1, 100) if bits(quantize_matrix(delta, 1, 0, k, s)) >= bits(lr))
    mixed = quantize_matrix(delta, 1, 0, k, s)
    assert bits(mixed) >= bits(lr)
    e_lr, e_mixed = weighted_error(delta, lr.dequantize(), s), weighted_error(delta, mixed.dequantize(), s)
    assert e_lr < 0.5 * e_mixed, (e_lr, e_mixed)
    # and the alternation helps: better than 1-bit codes plus the same rank fitted to their error
    q = quantize_matrix(delta, 1, 0, 0, s).dequantize()
    a, b = weighted_lowrank(delta - q, lr.rank, s.sqrt())
    assert e_lr < 0.8 * weighted_error(delta, q + a.float() @ b.float(), s)


def test_spec_and_registry():
    spec = CompressionSpec(method="lowrank", bits=1, salient=0, rank_bits=0.3).validate()
    q = compress_matrix(structured_delta()[0], spec)
    assert isinstance(q, QuantizedDelta) and q.rank == rank_for_budget(256, 384, 0.3)
    assert spec.as_dict()["rank_bits"] == 0.3 and "rank_bits" not in CompressionSpec().as_dict()
    with pytest.raises(ValueError, match="--rank-bits"):
        CompressionSpec(method="lowrank", rank_bits=-1).validate()


# ----- bundles and the runtime -------------------------------------------------------------------
def two_expert_bundle(d, tokenizer, math_args: list[str]):
    """d/bundle with the tiny lively experts: math compressed with `math_args`, code with plain
    mixed; float32 materialized copies in d/mat_math, d/mat_code."""
    save_lively_experts(d, tokenizer)
    calib = d / "calib.txt"
    calib.write_text("\n".join(CORPUS) + "\n")
    common = ["--base", str(d / "base"), "--out", str(d / "bundle"), "--calib", str(calib), "--heldout", "0"]
    assert main(["compress", *common, "--expert", f"math={d / 'math'}", *math_args]) == 0
    assert main(["compress", *common, "--expert", f"code={d / 'code'}"]) == 0
    for name in ("math", "code"):
        assert main(["materialize", str(d / "bundle"), name, "--out", str(d / f"mat_{name}"), "--dtype", "float32"]) == 0
    return d


@pytest.fixture(scope="module")
def lr(tmp_path_factory, tokenizer):
    """Tiny experts: math compressed with lowrank (1 bit, 2 bits/param of factors: the tiny
    matrices need that for rank >= 1), code with plain mixed; float32 materialized copies."""
    return two_expert_bundle(tmp_path_factory.mktemp("lowrank"), tokenizer, [
        "--method", "lowrank", "--bits", "1", "--rank-bits", "2", "--salient", "0", "--tune-steps", "2"])


def weights_file(d, name):
    b = Bundle.open(d / "bundle")
    return b.path / b.entry(name)["weights"]


@contextlib.contextmanager
def math_file_v2(d):
    """(base and float32 materialized math state dicts, math's delta file open with safetensors,
    its layout records); the file must be version 2."""
    base = AutoModelForCausalLM.from_pretrained(d / "base", dtype=torch.float32).state_dict()
    mat = AutoModelForCausalLM.from_pretrained(d / "mat_math", dtype=torch.float32).state_dict()
    with safe_open(weights_file(d, "math"), framework="pt") as f:
        assert f.metadata()["format_version"] == "2"
        yield base, mat, f, json.loads(f.metadata()["tensors"])


def test_the_file_reconstructs_by_the_format_definition(lr):
    """docs/FORMAT.md, kind `quantized` with a low-rank part, read with safetensors only."""
    with math_file_v2(lr) as (base, mat, f, layout):
        ranked = 0
        for t, rec in layout.items():
            if rec["kind"] != "quantized":
                continue
            out, cols = rec["shape"]
            sal = f.get_tensor(f"{t}.salient_idx").long()
            n = cols - sal.numel()
            codes = unpack_codes_reference(f.get_tensor(f"{t}.codes"), rec["bits"], n).float()
            assert rec["group_size"] == 0
            scale, offset = f.get_tensor(f"{t}.scale").float(), f.get_tensor(f"{t}.offset").float()
            d = torch.empty(out, cols)
            other = torch.tensor([c for c in range(cols) if c not in set(sal.tolist())], dtype=torch.long)
            d[:, other] = codes * scale + offset
            d[:, sal] = f.get_tensor(f"{t}.salient_values").float()
            if rec.get("rank"):
                ranked += 1
                a, b = f.get_tensor(f"{t}.lowrank_a"), f.get_tensor(f"{t}.lowrank_b")
                assert a.shape == (out, rec["rank"]) and b.shape == (rec["rank"], cols)
                d += a.float() @ b.float()
            w = base[t].float() + d  # materialized in float32
            assert torch.equal(w, mat[t]), t
        assert ranked >= 7  # every linear layer of the tiny model has a rank >= 1 at 2 bits/param
    with safe_open(weights_file(lr, "code"), framework="pt") as f:
        assert f.metadata()["format_version"] == "1"  # no low-rank part: still a version-1 file


def rewrite_header(path, fn) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    fn(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("version,message", [("1", "needs delta format version 2"), ("3", "version '3'")])
def test_versions_are_checked(lr, tmp_path, version, message):
    import shutil

    d = tmp_path / "bundle"
    shutil.copytree(lr / "bundle", d)
    b = Bundle.open(d)
    f = d / b.entry("math")["weights"]
    rewrite_header(f, lambda h: h["__metadata__"].update(format_version=version))
    with pytest.raises(BundleError, match=message):
        b.load_deltas("math", verify=False)
    assert b.load_deltas("code", verify=False)  # the version-1 expert beside it still loads


def assert_mixed_batch_equals_materialized(sw, d) -> list[torch.Tensor]:
    """One ragged batch mixing math, code and the base, with a prompt >= 32 tokens (the cpu
    backend's dequantize-then-GEMM route): every row's logits equal those of the float32
    materialized expert (d/mat_<name>) or of the base. Returns the logits."""
    long_prompt = " ".join(CORPUS)[:400]
    reqs = [(e, sw.encode(p, e)) for e, p in zip(["math", "code", None, "math", "math"], [*PROMPTS, long_prompt])]
    assert len(reqs[-1][1]) >= 32
    got = ragged_logits(sw, reqs)
    for (expert, ids), logits in zip(reqs, got):
        path = d / ("base" if expert is None else f"mat_{expert}")
        want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(input_ids=torch.tensor([ids])).logits[0]
        assert (logits - want).abs().max() < FP32_LOGIT_TOL, (expert, float((logits - want).abs().max()))
    return got


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_runtime_equals_the_materialized_experts_in_a_mixed_batch(lr, backend):
    with Switch.load(lr / "bundle", dtype="float32", backend=backend) as sw:
        hot = sw.store.acquire_blocking("math")
        if backend == "cpu":  # the low-rank part stays two thin factors, never a dense matrix
            assert sum(isinstance(r, LowRankReady) for r in hot.linear) >= 7
        assert sw.store._ready_bytes(sw.store.read_packed("math")) == hot.nbytes  # reserved = held
        sw.store.release(hot)
        hot = sw.store.acquire_blocking("code")  # a plain mixed expert too
        assert sw.store._ready_bytes(sw.store.read_packed("code")) == hot.nbytes
        sw.store.release(hot)
        assert_mixed_batch_equals_materialized(sw, lr)
        # the low-rank part is a large share of every delta that has one (leaving it out would fail)
        deltas = Bundle.open(lr / "bundle").load_deltas("math")
        share = [float(d.lowrank_product().norm() / d.dequantize().norm()) for d in deltas.values()
                 if getattr(d, "rank", 0)]
        assert len(share) >= 7 and min(share) > 0.3, share
        text = sw.generate(PROMPTS[0], expert="math", temperature=0, max_tokens=8)
        mat = AutoModelForCausalLM.from_pretrained(lr / "mat_math", dtype=torch.float32)
        ids = sw.encode(PROMPTS[0], "math")
        want = mat.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert text.token_ids == want[0, len(ids):].tolist()


def _with_lowrank(d: QuantizedDelta, rank: int, seed: int) -> QuantizedDelta:
    g = torch.Generator().manual_seed(seed)
    out, cols = d.shape
    d.lowrank_a = (0.05 * torch.randn(out, rank, generator=g)).half()
    d.lowrank_b = (0.05 * torch.randn(rank, cols, generator=g)).half()
    d.validate()
    return d


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernel_backends_add_the_low_rank_part_on_every_route(backend, monkeypatch):
    """Short segments (kernel + two thin GEMMs), long ones (dequantize + GEMM + the factors), a
    delta without a low-rank part in the same call, and embedding rows: all equal the
    reference backend, which multiplies by the whole dequantized delta (codes + A B)."""
    from test_kernel import make_delta

    be = kernel_backend(backend, monkeypatch)
    lr = _with_lowrank(make_delta(40, 130, 1, 3, 0, seed=7), 5, seed=1)
    assert_backends_agree_on_every_route(be, lr, make_delta(40, 130, 2, 0, 0, seed=8))
    assert isinstance(be.prepare(lr, torch.float32), LowRankReady)


def kernel_backend(backend: str, monkeypatch):
    """The cpu or triton (TRITON_INTERPRET=1; skipped without triton) backend, dense route from 8 tokens."""
    from meswitch.runtime.backend import CpuKernelBackend, TritonBackend

    if backend == "triton":
        pytest.importorskip("triton", reason="the gpu extra (triton) is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        return TritonBackend("cpu", dense_min_tokens=8)
    return CpuKernelBackend(dense_min_tokens=8)


def assert_backends_agree_on_every_route(be, delta, plain) -> None:
    """`delta` ([40, 130]) beside `plain` in one call, short and long (>= 8 tokens) segments of
    each, and its embedding rows: backend `be` equals the reference backend (whole dequantized delta)."""
    from meswitch.runtime.backend import ReferenceBackend

    ref = ReferenceBackend()
    x = torch.randn(30, 130)
    segs = [(0, 0, 3), (1, 3, 6), (0, 6, 20), (1, 20, 30)]
    got, want = torch.zeros(30, 40), torch.zeros(30, 40)
    for b, y in ((be, got), (ref, want)):
        tables = [b.expert_table([None, b.prepare(d, torch.float32)]) for d in (delta, plain)]
        b.segmented_matmul(x, y, b.plan([(tables[e], a, c) for e, a, c in segs]), 1)
    assert (got - want).abs().max() < 1e-5 * want.abs().max()
    ids = torch.tensor([39, 0, 7, 7])
    for b in (be, ref):
        assert torch.allclose(b.gather_rows(b.prepare_rows(delta), ids), delta.dequantize()[ids], atol=1e-6)
