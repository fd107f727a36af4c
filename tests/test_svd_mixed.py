"""`--method svd-mixed` (issue 15): the delta as quantized singular-vector blocks, D = A B.

- its effective bits are what it stores (every byte), within the --bits target, at 1 bit too;
- the allocation gives more bits to larger singular values, and beats mixed / lowrank at matched
  or fewer bits on a delta with a decaying spectrum;
- the bundle file (delta format version 2, kind `svd`) reconstructs by docs/FORMAT.md's
  definition, read with safetensors and the bit-stream unpacker only;
- version 1 with an svd record, unknown versions and malformed records are refused;
- the runtime (cpu, reference, and triton under TRITON_INTERPRET=1) equals the materialized
  expert in float32 in a batch mixing the svd expert, a mixed expert and the base.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from test_lowrank import (assert_backends_agree_on_every_route, assert_mixed_batch_equals_materialized, kernel_backend,
                          math_file_v2, rewrite_header, two_expert_bundle, weighted_error, weights_file)
from test_runtime import FP32_LOGIT_TOL, PROMPTS
from transformers import AutoModelForCausalLM

from meswitch.bundle.format import Bundle, BundleError
from meswitch.cli import main
from meswitch.compression.delta import SvdDelta, delta_to
from meswitch.compression.lowrank import lowrank_matrix
from meswitch.compression.methods import CompressionSpec, compress_matrix, quantize_matrix
from meswitch.compression.packing import unpack_codes_reference
from meswitch.compression.svd_mixed import allocate_widths, pair_bytes, svd_mixed_matrix
from meswitch.runtime import Switch
from meswitch.runtime.backend import LowRankReady


def decaying_delta(out=192, cols=320, seed=0):
    """A fine-tune-like delta: singular values decaying as 1/j, and input channels of very
    different activation energy."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g))
    v, _ = torch.linalg.qr(torch.randn(cols, out, generator=g))
    sigma = 1.0 / torch.arange(1, out + 1).float()
    s = torch.rand(cols, generator=g) ** 4 * 100 + 0.01
    return 0.01 * (u * sigma) @ v.t(), s


def bits(q) -> float:
    return 8 * q.nbytes / (q.shape[0] * q.shape[1])


@pytest.mark.parametrize("target", [1, 2])
def test_effective_bits_are_what_it_stores(target):
    delta, s = decaying_delta()
    q = svd_mixed_matrix(delta, target, s)
    tensors, meta = q.to_tensors("T")
    assert q.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert meta == {"kind": "svd", "shape": [192, 320], "blocks": [{"rank": b.rank, "bits": b.bits} for b in q.blocks]}
    # every pair's bytes: codes of A's column and B's row, a float16 step size and offset for each
    assert q.nbytes == sum(b.rank * pair_bytes(192, 320, b.bits) for b in q.blocks)
    assert target - 0.05 < bits(q) <= target  # the budget is met, and nearly spent
    widths = [b.bits for b in q.blocks]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(widths) >= 2
    assert 0 < q.rank < 192  # the tail is dropped


def test_allocation_follows_the_spectrum():
    sigma = torch.tensor([10.0, 5, 1, 0.5, 0.1, 0.0])
    w = allocate_widths(sigma, 64, 64, 1)
    assert w == sorted(w, reverse=True) and w[0] == 8 and w[-1] == 0  # zero energy is never stored
    assert sum(pair_bytes(64, 64, b) for b in w) <= 64 * 64 / 8
    assert allocate_widths(sigma, 64, 64, 0.01) == [0] * 6  # no pair fits: nothing stored


@pytest.mark.parametrize("target", [1, 2.25])
def test_refitting_the_factors_lowers_the_error_at_the_same_bytes(target):
    delta, s = decaying_delta()
    plain, refit = svd_mixed_matrix(delta, target, s, refits=0), svd_mixed_matrix(delta, target, s)
    assert [(b.rank, b.bits) for b in plain.blocks] == [(b.rank, b.bits) for b in refit.blocks]
    assert plain.nbytes == refit.nbytes
    e_plain, e_refit = (weighted_error(delta, q.dequantize(), s) for q in (plain, refit))
    assert e_refit < 0.97 * e_plain, (e_refit, e_plain)


def test_it_beats_mixed_and_lowrank_on_a_decaying_spectrum():
    delta, s = decaying_delta()
    svd = svd_mixed_matrix(delta, 1, s)
    lr = lowrank_matrix(delta, 1, 0.2, 0, 0, s)
    mixed = quantize_matrix(delta, 1, 0, 0, s)
    assert bits(svd) <= 1 < bits(mixed) < bits(lr)
    e_svd, e_lr, e_mixed = (weighted_error(delta, q.dequantize(), s) for q in (svd, lr, mixed))
    assert e_svd < 0.7 * e_lr < e_mixed, (e_svd, e_lr, e_mixed)


def test_spec_registry_and_rows():
    spec = CompressionSpec(method="svd-mixed", bits=2, salient=0.5).validate()
    delta, s = decaying_delta()
    q = compress_matrix(delta, spec, s)
    assert isinstance(q, SvdDelta) and spec.as_dict() == {"method": "svd-mixed", "bits": 2, "compress_embeddings": True}
    full = q.dequantize()
    assert torch.equal(torch.cat([q.dequantize_rows(0, 50), q.dequantize_rows(50, 192)]), full)
    assert delta_to(q, "cpu") is q
    # svd-mixed's --bits is a target average: any value in (0, 8], fractional ones too
    frac = CompressionSpec(method="svd-mixed", bits=1.5).validate()
    assert frac.bits == 1.5 and CompressionSpec(method="svd-mixed", bits=5.0).validate().bits == 5
    q15 = compress_matrix(delta, frac, s)
    assert bits(q) <= 2 and 1 < bits(q15) <= 1.5
    assert weighted_error(delta, q15.dequantize(), s) > weighted_error(delta, full, s)
    for bad in (0, -1, 8.5):
        with pytest.raises(ValueError, match="--bits"):
            CompressionSpec(method="svd-mixed", bits=bad).validate()
    with pytest.raises(ValueError, match="--bits"):  # the other methods' --bits is a code width
        CompressionSpec(method="mixed", bits=1.5).validate()
    assert main(["compress", "--base", "b", "--expert", "e=x", "--out", "o", "--method", "svd-mixed",
                 "--tune-steps", "2"]) != 0  # refused: svd-mixed deltas are not tuned


# ----- bundles and the runtime -------------------------------------------------------------------
@pytest.fixture(scope="module")
def sv(tmp_path_factory, tokenizer):
    """Tiny experts: math compressed with svd-mixed at 1 bit, code with plain mixed; float32
    materialized copies."""
    return two_expert_bundle(tmp_path_factory.mktemp("svd"), tokenizer, ["--method", "svd-mixed", "--bits", "1"])


def test_a_fractional_bit_target_through_the_cli(tmp_path, tokenizer):
    """--bits 1.5 (svd-mixed only): kept in the manifest as given, met by every matrix, and the
    runtime equals the materialized expert."""
    d = two_expert_bundle(tmp_path, tokenizer, ["--method", "svd-mixed", "--bits", "1.5"])
    assert Bundle.open(d / "bundle").entry("math")["params"]["bits"] == 1.5
    with safe_open(weights_file(d, "math"), framework="pt") as f:
        layout = json.loads(f.metadata()["tensors"])
        for t, rec in layout.items():
            if rec["kind"] == "svd":
                stored = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith(f"{t}.svd"))
                assert 0 < 8 * stored <= 1.5 * rec["shape"][0] * rec["shape"][1], t
    with Switch.load(d / "bundle", dtype="float32", backend="cpu") as sw:
        assert_mixed_batch_equals_materialized(sw, d)
    common = ["compress", "--base", str(d / "base"), "--out", str(tmp_path / "other"), "--expert", f"x={d / 'math'}"]
    assert main([*common, "--method", "mixed", "--bits", "1.5"]) != 0  # a code width must be whole


def test_the_file_reconstructs_by_the_format_definition(sv):
    """docs/FORMAT.md, kind `svd`, read with safetensors only."""
    with math_file_v2(sv) as (base, mat, f, layout):
        n_svd = 0
        for t, rec in layout.items():
            if rec["kind"] != "svd":
                continue
            n_svd += 1
            out, cols = rec["shape"]
            a_cols, b_rows = [], []
            for i, blk in enumerate(rec["blocks"]):
                def part(name, n):
                    codes = unpack_codes_reference(f.get_tensor(f"{t}.svd{i}.{name}_codes"), blk["bits"], n).float()
                    scale, offset = f.get_tensor(f"{t}.svd{i}.{name}_scale"), f.get_tensor(f"{t}.svd{i}.{name}_offset")
                    assert scale.shape == offset.shape == (blk["rank"], 1) and scale.dtype == torch.float16
                    return codes * scale.float() + offset.float()
                a_cols.append(part("a", out))
                b_rows.append(part("b", cols))
            d = torch.cat(a_cols).t() @ torch.cat(b_rows)  # A [out, r] @ B [r, in], float32
            stored = sum(f.get_tensor(k).nbytes for k in f.keys() if k.startswith(f"{t}.svd"))
            assert 0 < 8 * stored <= out * cols  # at most 1 bit per parameter, every stored byte counted
            assert torch.equal(base[t].float() + d, mat[t]), t
        assert n_svd == 15  # the 7 linear layers of each of the 2 layers, and the (tied) embedding
    with safe_open(weights_file(sv, "code"), framework="pt") as f:
        assert f.metadata()["format_version"] == "1"  # no svd tensor: still a version-1 file


@pytest.mark.parametrize("edit,message", [
    (lambda h: h["__metadata__"].update(format_version="1"), "needs delta format version 2"),
    (lambda h: h["__metadata__"].update(format_version="3"), "version '3'"),
    (lambda h: _record(h).update(blocks=[{**_record(h)["blocks"][0], "bits": 5}, *_record(h)["blocks"][1:]]),
     "unsupported bit width 5"),
    (lambda h: _record(h)["blocks"][0].update(rank=_record(h)["blocks"][0]["rank"] + 1), "has shape"),
    (lambda h: _record(h)["blocks"][0].update(rank=0), "invalid rank 0"),
    (lambda h: _record(h).update(blocks=_record(h)["blocks"][:-1]), "more svd blocks stored"),
    (lambda h: _record(h).update(blocks={"rank": 1}), "must be a list"),
    (lambda h: h.update({"model.embed_tokens.weight.svd0.a_scale": {**h["model.embed_tokens.weight.svd0.a_scale"],
                                                                   "dtype": "BF16"}}), "dtype BF16"),
])
def test_bad_files_are_refused(sv, tmp_path, edit, message):
    d = tmp_path / "bundle"
    shutil.copytree(sv / "bundle", d)
    b = Bundle.open(d)
    f = d / b.entry("math")["weights"]
    rewrite_header(f, lambda h: _edit_layout(h, edit))
    with pytest.raises(BundleError, match=message):
        b.load_deltas("math", verify=False)
    assert b.load_deltas("code", verify=False)  # the version-1 expert beside it still loads


def _record(h) -> dict:
    return h["__layout__"]["model.embed_tokens.weight"]


def _edit_layout(h, edit) -> None:
    """Apply `edit` to the header with its layout decoded (as h['__layout__']), then re-encode it."""
    h["__layout__"] = json.loads(h["__metadata__"]["tensors"])
    edit(h)
    h["__metadata__"]["tensors"] = json.dumps(h.pop("__layout__"))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_runtime_equals_the_materialized_experts_in_a_mixed_batch(sv, backend):
    with Switch.load(sv / "bundle", dtype="float32", backend=backend) as sw:
        hot = sw.store.acquire_blocking("math")
        if backend == "cpu":  # factors only: two thin GEMMs, no kernel part, never a dense matrix
            ready = [r for r in hot.linear if isinstance(r, LowRankReady)]
            assert len(ready) == 15 and all(r.main is None for r in ready)
            r = ready[0]
            assert r.nbytes == 4 * r.a.shape[1] * (r.a.shape[0] + r.b.shape[1])
        # What the store reserves is what the hot form holds: with a tied embedding that is the
        # factors twice (float32 rows for the lookups, the head's in the compute dtype).
        assert isinstance(hot.embed, LowRankReady) and hot.embed.nbytes > 0
        assert sw.store._ready_bytes(sw.store.read_packed("math")) == hot.nbytes
        sw.store.release(hot)
        got = assert_mixed_batch_equals_materialized(sw, sv)
        base = AutoModelForCausalLM.from_pretrained(sv / "base", dtype=torch.float32)
        ids = sw.encode(PROMPTS[0], "math")
        assert (base(input_ids=torch.tensor([ids])).logits[0] - got[0]).abs().max() > 10 * FP32_LOGIT_TOL  # the delta counts


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_kernel_backends_on_every_route(backend, monkeypatch):
    """Short and long segments of an svd delta beside a plain quantized delta, and embedding rows:
    equal to the reference backend (the whole dequantized delta); the ready form's memory is the
    dequantized factors, counted."""
    from test_kernel import make_delta

    be = kernel_backend(backend, monkeypatch)
    delta, s = decaying_delta(40, 130, seed=3)
    sv = svd_mixed_matrix(delta * 100, 2, s)
    assert_backends_agree_on_every_route(be, sv, make_delta(40, 130, 2, 0, 0, seed=8))
    assert be.ready_nbytes(sv, torch.float32) == be.prepare(sv, torch.float32).nbytes == 4 * sv.rank * (40 + 130)
