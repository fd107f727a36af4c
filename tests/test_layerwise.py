"""Layer-by-layer compression (issue 14): the same statistics and codes as a whole-model pass,
resumable after a crash, and memory that does not grow with depth."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import meswitch.compression.layerwise as layerwise
from conftest import derive_expert, random_model, save_checkpoint
from meswitch.bundle import Bundle
from meswitch.checkpoints import Checkpoint
from meswitch.cli import main, partial_dir
from meswitch.compression.calibration import collect_input_moments, load_samples, next_token_logprobs, split_heldout, tokenize_samples
from meswitch.compression.layerwise import _load_dict
from meswitch.compression.methods import CompressionSpec
from meswitch.compression.pipeline import CalibrationConfig, compress_expert, compress_tensors
from meswitch.compression.quality import compare_to_expert
from meswitch.compression.student import build_student

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def deep_models(tmp_path_factory, tokenizer):
    """A 4-layer tiny Llama base with an untied LM head, and an expert of it."""
    d = tmp_path_factory.mktemp("deep")
    base = random_model(tied=False, seed=3, layers=4)
    return {"base": save_checkpoint(base, tokenizer, d / "base"),
            "expert": save_checkpoint(derive_expert(base, seed=4), tokenizer, d / "expert")}


@pytest.mark.parametrize("family, tied, model_dtype", [("llama", True, torch.float32), ("qwen2", False, torch.bfloat16)])
def test_layer_by_layer_gives_the_whole_model_statistics_codes_and_quality(family, tied, model_dtype, tmp_path, tokenizer,
                                                                           calib_file):
    base_m = random_model(family, tied=tied, seed=5)
    base = Checkpoint.open(save_checkpoint(base_m, tokenizer, tmp_path / "base"))
    expert = Checkpoint.open(save_checkpoint(derive_expert(base_m, seed=6, outlier_cols=2), tokenizer, tmp_path / "e"))
    spec = CompressionSpec()
    work = tmp_path / "work"
    result = compress_expert(base, expert, spec, CalibrationConfig(path=str(calib_file)), model_dtype=model_dtype,
                             workdir=work, progress=False, log=lambda m: None)

    # The whole-model way: one forward pass of the expert model with hooks, then every tensor.
    seqs = tokenize_samples(expert.load_tokenizer(), load_samples(calib_file), 128)
    calib, heldout = split_heldout(seqs, 0.25)
    model = expert.load_model(model_dtype)
    moments = collect_input_moments(model, calib, progress=False)
    expert_lp = next_token_logprobs(model, heldout)
    layer_moments = {k: v for f in sorted((work / "teacher").glob("m*.safetensors")) for k, v in _load_dict(f).items()}
    layer_moments["lm_head"] = _load_dict(work / "teacher" / "final.safetensors")["lm_head_moment"]
    assert set(layer_moments) == set(moments) and len(moments) == 2 * 7 + 1
    for k in moments:  # the same hidden states through the same layer code: bit for bit
        assert torch.equal(layer_moments[k], moments[k]), k

    whole = compress_tensors(base, expert, spec, moments, progress=False)
    got = result.deltas
    assert set(got) == set(whole)
    for name, w in whole.items():
        g = got[name]
        assert g.kind == w.kind, name
        if w.kind == "quantized":
            assert torch.equal(g.packed, w.packed) and torch.equal(g.salient_idx, w.salient_idx), name
            assert torch.equal(g.params.scale, w.params.scale) and torch.equal(g.params.offset, w.params.offset), name
        else:
            assert torch.equal(g.values, w.values), name

    student = build_student(base, whole, expert.shape("model.embed_tokens.weight")[0], "cpu", expert.dtype(), model_dtype)
    want = compare_to_expert(student, heldout, expert_lp)
    q = result.quality
    assert q["kl"] == pytest.approx(want["kl"], rel=1e-4, abs=1e-7)
    assert q["top1_agreement"] == want["top1_agreement"]
    assert q["ppl_expert"] == pytest.approx(want["ppl_expert"], rel=1e-5)
    assert q["ppl_reconstructed"] == pytest.approx(want["ppl_reconstructed"], rel=1e-5)
    result.cleanup()


def _bundle_tensors(out: Path, name: str) -> dict[str, torch.Tensor]:
    b = Bundle.open(out)
    entry = b.entry(name)
    from safetensors import safe_open

    with safe_open(out / entry["weights"], framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_resume_after_a_crash_gives_the_same_bundle(deep_models, tmp_path, calib_file, monkeypatch, capsys):
    args = ["compress", "--base", str(deep_models["base"]), "--expert", f"e={deep_models['expert']}",
            "--calib", str(calib_file), "--tune-steps", "3", "--tune", "blockwise"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    assert not partial_dir(ref).exists()  # cleaned up once the bundle has the expert

    # Crash while layer 2 is being written: layers 0-1 are finished, the bundle must not exist.
    out = tmp_path / "b"
    real_write = layerwise.DeltaStore.write

    def crashing_write(self, part, deltas):
        if part == "1-layer00002":
            raise KeyboardInterrupt("simulated crash")
        return real_write(self, part, deltas)

    monkeypatch.setattr(layerwise.DeltaStore, "write", crashing_write)
    assert main([*args, "--out", str(out)]) == 130
    assert not out.exists()
    state = json.loads((partial_dir(out) / "e" / "state.json").read_text())
    assert state["teacher_final"] and state["student_layers"] == 2
    assert "--resume" in capsys.readouterr().err

    # Resume: the teacher pass and layers 0-1 are not redone (the layer code would crash if
    # layer 1 were compressed again); the result is the uninterrupted run's, tensor for tensor.
    monkeypatch.setattr(layerwise.DeltaStore, "write", real_write)
    compressed = []
    real_named = layerwise.compress_named
    monkeypatch.setattr(layerwise, "compress_named", lambda n, *a, **k: compressed.append(n) or real_named(n, *a, **k))
    assert main([*args, "--out", str(out), "--resume"]) == 0
    assert "resuming: teacher 4 layers + final, student 2 layers" in capsys.readouterr().err
    assert not any(n.startswith(("model.layers.0.", "model.layers.1.", "model.embed")) for n in compressed)
    assert any(n.startswith("model.layers.3.") for n in compressed)
    want, got = _bundle_tensors(ref, "e"), _bundle_tensors(out, "e")
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    a, b = Bundle.open(ref).experts["e"], Bundle.open(out).experts["e"]
    assert a["quality"] == b["quality"] and a["tuning"] == b["tuning"]
    assert not partial_dir(out).exists()


def test_resume_refuses_other_settings_and_an_existing_bundle_stays_whole(deep_models, tmp_path, calib_file,
                                                                          monkeypatch, capsys, tiny_models):
    out = tmp_path / "b"
    args = ["compress", "--base", str(deep_models["base"]), "--calib", str(calib_file), "--out", str(out)]
    assert main([*args, "--expert", f"first={deep_models['expert']}"]) == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    monkeypatch.setattr(layerwise.LayerwiseRun, "final_step", lambda *a: (_ for _ in ()).throw(RuntimeError("disk full")))
    assert main([*args, "--expert", f"second={deep_models['expert']}"]) == 1
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before  # no half-written expert
    assert (partial_dir(out) / "second" / "state.json").is_file()
    capsys.readouterr()
    monkeypatch.undo()
    assert main([*args, "--expert", f"second={deep_models['expert']}", "--bits", "3", "--resume"]) == 1
    assert "made with other inputs or settings (spec differ)" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("tune", ["blockwise", "end-to-end", "both"])
def test_each_tuning_mode_lowers_the_calibration_kl(deep_models, tmp_path, calib_file, tune):
    base, expert = Checkpoint.open(deep_models["base"]), Checkpoint.open(deep_models["expert"])
    r = compress_expert(base, expert, CompressionSpec(bits=2), CalibrationConfig(path=str(calib_file)), tune_steps=8,
                        tune=tune, workdir=tmp_path / "w", progress=False, log=lambda m: None)
    t = r.tuning
    assert t["mode"] == tune and t["kl_after"] < 0.9 * t["kl_before"], t
    # Every projection; the end-to-end distillation also tunes the (untied) LM head.
    assert t["tuned_matrices"] == 4 * 7 + (tune != "blockwise")
    if tune != "end-to-end":  # block-wise: every layer's output moved closer to the expert layer's
        block = t["blockwise"] if tune == "both" else t
        mse = block["layer_mse_before"], block["layer_mse_after"]
        assert len(mse[0]) == 4 and all(after < before for before, after in zip(*mse))
    if tune == "both":
        assert t["kl_after"] < t["kl_blockwise"] < t["kl_before"]
    r.cleanup()


MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    import meswitch.compression.layerwise as lw
    from meswitch.cli import main

    # The peak from the first layer on: Linux resets the high-water mark (VmHWM) when "5" is
    # written to /proc/self/clear_refs. (getrusage's ru_maxrss would not do: it carries the RSS
    # of the parent at fork, here pytest's, across exec.)
    real = lw.LayerwiseRun.teacher_pass
    def teacher_pass(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return real(self)
    lw.LayerwiseRun.teacher_pass = teacher_pass
    d, depth = sys.argv[1], sys.argv[2]
    rc = main(["compress", "--base", f"{d}/base{depth}", "--expert", f"e={d}/expert{depth}", "--out", f"{d}/bundle{depth}",
               "--method", "rtn", "--calib-samples", "4", "--calib-max-len", "32", "--heldout", "0", "--tune-steps", "1"])
    assert rc == 0
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps(hwm * 1024))
""")


def test_peak_memory_does_not_grow_with_depth(tmp_path, tokenizer):
    """1 and 5 decoder layers of 1.8M parameters (7 MB each in float32), each compressed in a
    fresh process: from the first layer to the bundle written, the peak RSS may not rise by more
    than 12 MB for the four extra layers, less than half of one more copy of their weights
    (28 MB). glibc is told to return freed memory at once (mmap above 64 KiB, no trim
    threshold), so the peak is that of live memory, not of the allocator's slack. Measured at
    3.4M parameters per layer: +1 MB; the whole-model pipeline this replaced: +263 MB."""
    peaks = []
    for depth in (1, 5):
        base = random_model(tied=False, seed=7, layers=depth, hidden=384, intermediate=1024)
        save_checkpoint(base, tokenizer, tmp_path / f"base{depth}")
        save_checkpoint(derive_expert(base, seed=8, scale=0.01), tokenizer, tmp_path / f"expert{depth}")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        r = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path), str(depth)], capture_output=True,
                           text=True, cwd=ROOT, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        peaks.append(json.loads(r.stdout.strip().splitlines()[-1]))
    shallow, deep = peaks
    assert deep - shallow < 12 * 2**20, (shallow / 2**20, deep / 2**20)
