"""End to end on tiny random Llama-family models: compress -> bundle -> inspect -> materialize."""
from __future__ import annotations

import functools
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import derive_expert, random_model, save_checkpoint
from meswitch.bundle import Bundle
from meswitch.checkpoints import Checkpoint
from meswitch.cli import main
from meswitch.compression.calibration import load_samples, next_token_logprobs, split_heldout, tokenize_samples
from meswitch.compression.quality import compare_to_expert

# Stated tolerance of the default method (2-bit mixed precision) on these tiny models: the
# reconstructed delta of every matrix is within 45% of the true delta in Frobenius norm (2-bit
# codes keep roughly two thirds of a delta's energy), 16-bit tensors within float16 rounding.
DELTA_REL_TOL = 0.45


# A compressed expert must be much closer to the expert than the base is: a compressor that
# dropped, zeroed or halved the deltas would leave KL(expert || result) near KL(expert || base)
# (or a quarter of it), so every quality check is bounded by a fraction of that gap.
KL_FRACTION_OF_BASE = 0.2


def compress(*args, capsys=None) -> int:
    return main(["compress", *map(str, args)])


@functools.cache
def expert_vs_base(base_dir, expert_dir, calib=None, samples: int = 64, heldout: float = 0.25) -> dict:
    """KL(expert || base) and top-1 agreement on the held-out samples `compress` measures on
    (the same file, sample count, length and split)."""
    base, expert = Checkpoint.open(base_dir), Checkpoint.open(expert_dir)
    seqs = tokenize_samples(expert.load_tokenizer(), load_samples(calib)[:samples], 128)
    held = split_heldout(seqs, heldout)[1]
    return compare_to_expert(base.load_model(), held, next_token_logprobs(expert.load_model(), held))


def expected_payload(ckpt: Checkpoint, bits: int, salient: float) -> int:
    """Bytes of a `mixed` delta file's tensors, from the shapes alone (docs/FORMAT.md): per matrix,
    packed codes + float16 step size and offset per row + int32 index and float16 column per
    salient channel; 16-bit values for every other tensor."""
    total = 0
    for name in ckpt.weight_names():
        shape = ckpt.shape(name)
        if len(shape) == 2:
            out, cols = shape
            k = max(0, min(round(salient * cols), cols - 1))
            total += out * math.ceil((cols - k) * bits / 8) + out * 2 * 2 + k * 4 + out * k * 2
        else:
            total += 2 * math.prod(shape)
    return total


def snapshot(bundle_dir):
    """Every file's bytes, to prove a failed command left the bundle as it was."""
    return {p.relative_to(bundle_dir): p.read_bytes() for p in sorted(bundle_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_models, calib_file):
    out = tmp_path_factory.mktemp("b") / "bundle"
    rc = compress("--base", tiny_models["base"], "--expert", f"math={tiny_models['math']}",
                  "--expert", f"code={tiny_models['code']}", "--out", out, "--calib", calib_file,
                  "--description", "math=grade-school arithmetic", "--tune-steps", 8)
    assert rc == 0
    return out


def test_manifest_records_what_was_built(bundle, tiny_models, calib_file):
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["format"] == "meswitch-bundle" and m["format_version"] == 1
    assert m["base"]["fingerprint"].startswith("blake2b-128:")
    assert set(m["experts"]) == {"math", "code"}
    e = m["experts"]["math"]
    assert e["description"] == "grade-school arithmetic"
    assert e["method"] == "mixed" and e["params"]["bits"] == 2 and e["params"]["tune_steps"] == 8
    assert e["source"] == str(tiny_models["math"])
    # Effective bits count the whole file: bytes on disk * 8 / parameters.
    size = (bundle / e["weights"]).stat().st_size
    assert e["bytes"] == size
    assert e["effective_bits"] == pytest.approx(8 * size / e["num_parameters"])
    expert = Checkpoint.open(tiny_models["math"])
    assert e["num_parameters"] == expert.num_parameters()
    # Every stored byte is accounted for: 2-bit codes, step sizes, 1% salient channels, 16-bit
    # norms, and a safetensors header (JSON, well under 200 bytes per stored array).
    assert e["payload_bytes"] == expected_payload(expert, bits=2, salient=0.01)
    assert 0 < size - e["payload_bytes"] < 200 * 5 * len(expert.weight_names())
    q = e["quality"]
    gap = expert_vs_base(tiny_models["base"], tiny_models["math"], calib_file)
    assert 0 <= q["kl"] <= KL_FRACTION_OF_BASE * gap["kl"] and q["heldout_samples"] >= 1
    assert gap["top1_agreement"] < q["top1_agreement"] <= 1
    assert e["tuning"]["mode"] == "blockwise" and e["tuning"]["kl_after"] < e["tuning"]["kl_before"]
    assert all(a < b for a, b in zip(e["tuning"]["layer_mse_after"], e["tuning"]["layer_mse_before"]))
    assert (bundle / e["aux_dir"] / "tokenizer.json").is_file()


def test_inspect_prints_a_table(bundle, capsys):
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    for word in ("math", "code", "mixed", "eff. bits", "grade-school arithmetic", "tuning KL"):
        assert word in out
    t = Bundle.open(bundle).experts["math"]["tuning"]
    assert f"{t['kl_before']:.4f} -> {t['kl_after']:.4f}" in out
    assert main(["inspect", str(bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experts"]["code"]["method"] == "mixed"


def test_materialized_expert_loads_with_plain_transformers(bundle, tiny_models, tmp_path, tokenizer):
    out = tmp_path / "math"
    assert main(["materialize", str(bundle), "math", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    expert = AutoModelForCausalLM.from_pretrained(tiny_models["math"])
    base = Checkpoint.open(tiny_models["base"])
    rebuilt, true = dict(model.named_parameters()), dict(expert.named_parameters())
    for name, w in true.items():
        if name == "lm_head.weight":
            continue
        assert rebuilt[name].dtype == w.dtype == torch.bfloat16
        d_true = w.float() - base.get_for(name).float()
        err = (rebuilt[name].float() - w.float()).norm() / d_true.norm().clamp_min(1e-12)
        tol = DELTA_REL_TOL if w.dim() == 2 else 0.01
        assert err < tol, (name, float(err))
    ids = tokenizer("Tom has 12 apples and gives 5 to Anna. A train travels 60 km.", return_tensors="pt").input_ids
    base_model = AutoModelForCausalLM.from_pretrained(tiny_models["base"])

    def kl(m):
        with torch.no_grad():
            p = torch.log_softmax(expert(ids).logits.float(), -1)
            q = torch.log_softmax(m(ids).logits.float(), -1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    assert kl(model) < KL_FRACTION_OF_BASE * kl(base_model)
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_fp16_method_materializes_the_expert_exactly(tiny_models, tmp_path):
    out = tmp_path / "b16"
    assert compress("--base", tiny_models["base"], "--expert", f"math={tiny_models['math']}",
                    "--out", out, "--method", "fp16") == 0
    assert main(["materialize", str(out), "math", "--out", str(tmp_path / "m")]) == 0
    got, want = Checkpoint.open(tmp_path / "m"), Checkpoint.open(tiny_models["math"])
    assert got.weight_names() == want.weight_names()
    for name in want.weight_names():
        assert torch.equal(got.get(name), want.get(name)), name
    e = Bundle.open(out).experts["math"]
    assert e["quality"]["kl"] < 1e-6 and e["quality"]["top1_agreement"] == 1.0
    # 16-bit values plus exact patches and the safetensors header (large next to 94k parameters).
    assert 15.9 < e["effective_bits"] < 18.5


@pytest.mark.parametrize("method, max_bits", [("rtn", 3.2), ("bitdelta", 1.3)])
def test_comparison_methods_share_the_code_path(tiny_models, tmp_path, method, max_bits):
    out = tmp_path / method
    assert compress("--base", tiny_models["base"], "--expert", f"code={tiny_models['code']}",
                    "--out", out, "--method", method, "--keep-embeddings-16bit") == 0
    e = Bundle.open(out).experts["code"]
    assert e["method"] == method
    deltas = Bundle.open(out).load_deltas("code")
    q = deltas["model.layers.0.mlp.up_proj.weight"]
    assert q.kind == "quantized" and q.salient_idx.numel() == 0
    assert deltas["model.embed_tokens.weight"].kind == "dense"
    # 2-bit RTN keeps most of the gain; BitDelta's one bit per weight (untuned) about half.
    gap = expert_vs_base(tiny_models["base"], tiny_models["code"])["kl"]
    assert e["quality"]["kl"] < {"rtn": KL_FRACTION_OF_BASE, "bitdelta": 0.6}[method] * gap
    # Embeddings stay 16-bit here, so bits/param sit above the matrices' own bits.
    layer_bits = 8 * q.nbytes / (q.shape[0] * q.shape[1])
    assert layer_bits < max_bits


def test_salient_channels_carry_the_outlier_channels_of_an_expert(tmp_path, tokenizer, calib_file):
    """ME-Switch's point: a fine-tune that moved a few input channels a lot (25x) is kept far
    better by two 16-bit channels per matrix than by the same quantizer without them."""
    base = random_model(seed=13)
    bdir = save_checkpoint(base, tokenizer, tmp_path / "base")
    edir = save_checkpoint(derive_expert(base, seed=14, outlier_cols=2), tokenizer, tmp_path / "expert")
    kl = {}
    for method in ("mixed", "rtn"):
        out = tmp_path / method
        assert compress("--base", bdir, "--expert", f"e={edir}", "--out", out, "--method", method, "--salient", 2,
                        "--calib", calib_file) == 0
        kl[method] = Bundle.open(out).experts["e"]["quality"]["kl"]
        q = Bundle.open(out).load_deltas("e")["model.layers.1.self_attn.o_proj.weight"]
        assert q.salient_idx.numel() == (2 if method == "mixed" else 0)
    assert kl["mixed"] < 0.5 * kl["rtn"], kl


def test_adding_an_expert_to_an_existing_bundle(tiny_models, tmp_path):
    out = tmp_path / "grow"
    assert compress("--base", tiny_models["base"], "--expert", f"math={tiny_models['math']}", "--out", out) == 0
    math_entry = Bundle.open(out).experts["math"]
    math_bytes = (out / math_entry["weights"]).read_bytes()
    assert compress("--base", tiny_models["base"], "--expert", f"code={tiny_models['code']}", "--out", out) == 0
    b = Bundle.open(out)
    assert set(b.experts) == {"math", "code"} and b.experts["math"]["files"] == math_entry["files"]
    assert (out / b.experts["math"]["weights"]).read_bytes() == math_bytes
    for name in b.experts:
        b.verify_files(name)


@pytest.fixture(scope="module")
def small_bundle_once(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("small") / "small"
    assert compress("--base", tiny_models["base"], "--expert", f"math={tiny_models['math']}",
                    "--out", out, "--calib-samples", 6) == 0
    return out


@pytest.fixture()
def small_bundle(small_bundle_once, tmp_path):
    """A fresh copy per test (tests corrupt it); compressed once per module."""
    return shutil.copytree(small_bundle_once, tmp_path / "small")


def test_a_different_base_is_refused_and_the_bundle_left_intact(small_bundle, tiny_models, tmp_path, tokenizer, capsys):
    other = save_checkpoint(random_model(seed=7), tokenizer, tmp_path / "other_base")
    before = snapshot(small_bundle)
    rc = compress("--base", other, "--expert", f"code={tiny_models['code']}", "--out", small_bundle)
    assert rc == 1
    assert "base mismatch" in capsys.readouterr().err
    assert snapshot(small_bundle) == before
    rc = main(["materialize", str(small_bundle), "math", "--base", str(other), "--out", str(tmp_path / "x")])
    assert rc == 1 and "base mismatch" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_corrupted_or_missing_files_are_refused(small_bundle, tmp_path, capsys):
    f = small_bundle / Bundle.open(small_bundle).experts["math"]["weights"]
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["materialize", str(small_bundle), "math", "--out", str(tmp_path / "m")]) == 1
    assert "corrupted" in capsys.readouterr().err
    f.unlink()
    assert main(["materialize", str(small_bundle), "math", "--out", str(tmp_path / "m")]) == 1
    assert "missing" in capsys.readouterr().err


def test_unknown_format_version_is_refused(small_bundle, capsys):
    m = json.loads((small_bundle / "manifest.json").read_text())
    m["format_version"] = 99
    (small_bundle / "manifest.json").write_text(json.dumps(m))
    assert main(["inspect", str(small_bundle)]) == 1
    assert "format version 99 is not supported" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--bits", "5"], "--bits must be one of"),
        (["--calib", "nosuch=calib.txt"], "not one of the experts"),
        (["--calib", "/nonexistent/calib.txt"], "not found"),
        (["--expert", "math=/nonexistent"], "expert name given twice"),
        (["--expert", "bad/name=/tmp"], "invalid expert name"),
        (["--description", "other=text"], "unknown expert"),
        (["--tune-steps", "3", "--method", "fp16"], "nothing to tune"),
        (["--calib", "BADCALIB"], "invalid JSON"),
    ],
)
def test_bad_arguments_fail_clearly_and_leave_the_bundle_intact(small_bundle, tiny_models, extra, message, capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    extra = [str(bad) if e == "BADCALIB" else e for e in extra]
    before = snapshot(small_bundle)
    rc = compress("--base", tiny_models["base"], "--expert", f"math={tiny_models['math']}", "--out", small_bundle, *extra)
    assert rc in (1, 2)
    assert message in capsys.readouterr().err
    assert snapshot(small_bundle) == before


@pytest.mark.parametrize("flag, value", [("--calib-samples", "0"), ("--group-size", "-1"), ("--salient", "2.5"),
                                         ("--bits", "two"), ("--method", "gptq")])
def test_malformed_options_are_rejected_by_the_parser(flag, value, tiny_models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        compress("--base", tiny_models["base"], "--expert", f"math={tiny_models['math']}", "--out", tmp_path / "b",
                 flag, value)
    assert exc.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_existing_expert_needs_overwrite(small_bundle, tiny_models, capsys):
    before = snapshot(small_bundle)
    assert compress("--base", tiny_models["base"], "--expert", f"math={tiny_models['code']}", "--out", small_bundle) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(small_bundle) == before


def test_a_different_architecture_is_explained(small_bundle, tiny_models, tmp_path, tokenizer, capsys):
    wide = save_checkpoint(random_model(seed=3, tied=False), tokenizer, tmp_path / "untied")
    before = snapshot(small_bundle)
    assert compress("--base", tiny_models["base"], "--expert", f"odd={wide}", "--out", small_bundle) == 1
    err = capsys.readouterr().err
    assert "is not a fine-tune of base" in err and "config.tie_word_embeddings: base True vs expert False" in err
    assert snapshot(small_bundle) == before


def test_failed_new_bundle_leaves_nothing(tiny_models, tmp_path):
    out = tmp_path / "never"
    assert compress("--base", tiny_models["base"], "--expert", f"math={tiny_models['math']}", "--out", out,
                    "--calib", tmp_path / "missing.jsonl") == 2
    assert not out.exists()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_families_round_trip(family, tmp_path, tokenizer):
    base = random_model(family, tied=False, seed=11)
    bdir = save_checkpoint(base, tokenizer, tmp_path / "base")
    edir = save_checkpoint(derive_expert(base, seed=12), tokenizer, tmp_path / "expert")
    out = tmp_path / "bundle"
    assert compress("--base", bdir, "--expert", f"e={edir}", "--out", out, "--bits", "3", "--group-size", "32") == 0
    deltas = Bundle.open(out).load_deltas("e")
    assert "lm_head.weight" in deltas
    if family == "qwen2":  # q/k/v biases are stored as 16-bit deltas
        assert deltas["model.layers.0.self_attn.q_proj.bias"].kind == "dense"
    assert deltas["model.layers.0.self_attn.q_proj.weight"].params.scale.shape[1] == 2
    assert main(["materialize", str(out), "e", "--out", str(tmp_path / "m")]) == 0
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert m.config.model_type == family
    # Random tiny models predict near-uniform distributions, so top-1 agreement is noisy here;
    # the KL to the expert is the meaningful check.
    assert Bundle.open(out).experts["e"]["quality"]["kl"] < KL_FRACTION_OF_BASE * expert_vs_base(bdir, edir)["kl"]


def test_expert_with_added_tokens_stores_new_rows_whole(tmp_path, tokenizer):
    base = random_model(seed=21)
    bdir = save_checkpoint(base, tokenizer, tmp_path / "base")
    expert = derive_expert(base, seed=22)
    expert.resize_token_embeddings(base.config.vocab_size + 8)
    with torch.no_grad():
        expert.get_input_embeddings().weight[-8:] = torch.randn(8, 64) * 0.02
    edir = save_checkpoint(expert, tokenizer, tmp_path / "expert")
    out = tmp_path / "bundle"
    assert compress("--base", bdir, "--expert", f"big={edir}", "--out", out) == 0
    d = Bundle.open(out).load_deltas("big")["model.embed_tokens.weight"]
    assert d.shape == (base.config.vocab_size, 64) and d.extra_rows.shape == (8, 64)
    assert main(["materialize", str(out), "big", "--out", str(tmp_path / "m")]) == 0
    got = Checkpoint.open(tmp_path / "m").get("model.embed_tokens.weight")
    want = Checkpoint.open(edir).get("model.embed_tokens.weight")
    assert got.shape == want.shape and torch.equal(got[-8:], want[-8:])


def test_console_script_reports_errors_without_traceback(tmp_path):
    exe = shutil.which("meswitch") or str(__import__("pathlib").Path(sys.executable).parent / "meswitch")
    r = subprocess.run([exe, "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "not a meswitch bundle" in r.stderr and "Traceback" not in r.stderr


def test_models_can_run_in_bfloat16_for_calibration_tuning_and_quality(tiny_models, tmp_path):
    out = tmp_path / "bf16"
    assert compress("--base", tiny_models["base"], "--expert", f"math={tiny_models['math']}", "--out", out,
                    "--model-dtype", "bfloat16", "--tune-steps", 6) == 0
    e = Bundle.open(out).experts["math"]
    gap = expert_vs_base(tiny_models["base"], tiny_models["math"])["kl"]
    assert e["quality"]["kl"] < KL_FRACTION_OF_BASE * gap and e["tuning"]["steps"] == 6
    assert e["dtype"] == "bfloat16"
    assert main(["materialize", str(out), "math", "--out", str(tmp_path / "m")]) == 0
