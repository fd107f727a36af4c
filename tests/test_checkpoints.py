import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import meswitch.bundle.materialize as materialize_mod
from conftest import derive_expert, random_model, save_checkpoint
from meswitch.checkpoints import Checkpoint, CheckpointError, compare_architectures, fingerprint
from meswitch.compression.calibration import CalibrationError, load_samples, tokenize_samples
from meswitch.cli import main


def test_sharded_checkpoints_read_lazily_and_materialize_sharded(tmp_path, tokenizer, monkeypatch):
    base = random_model(seed=31)
    bdir = tmp_path / "base"
    base.to(torch.bfloat16).save_pretrained(bdir, max_shard_size="60KB")
    tokenizer.save_pretrained(bdir)
    assert (bdir / "model.safetensors.index.json").is_file()
    sharded = Checkpoint.open(bdir)
    single = Checkpoint.open(save_checkpoint(random_model(seed=31), tokenizer, tmp_path / "single"))
    assert sharded.weight_names() == single.weight_names()
    assert fingerprint(sharded) == fingerprint(single)
    edir = save_checkpoint(derive_expert(random_model(seed=31), seed=32), tokenizer, tmp_path / "expert")
    assert main(["compress", "--base", str(bdir), "--expert", f"e={edir}", "--out", str(tmp_path / "b"),
                 "--method", "fp16"]) == 0
    monkeypatch.setattr(materialize_mod, "SHARD_BYTES", 50_000)
    assert main(["materialize", str(tmp_path / "b"), "e", "--out", str(tmp_path / "m")]) == 0
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    got = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "m").named_parameters())
    want = dict(AutoModelForCausalLM.from_pretrained(edir).named_parameters())
    for name, w in want.items():
        assert torch.equal(got[name], w), name


def test_fingerprint_changes_with_any_value(tmp_path, tokenizer):
    m = random_model(seed=41)
    a = fingerprint(Checkpoint.open(save_checkpoint(m, tokenizer, tmp_path / "a")))
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[3, 5] += 0.5
    b = fingerprint(Checkpoint.open(save_checkpoint(m, tokenizer, tmp_path / "b")))
    assert a != b and a.startswith("blake2b-128:")
    # Same values stored in float32 instead of bfloat16: same fingerprint.
    m32 = random_model(seed=41).to(torch.bfloat16).to(torch.float32)
    c = fingerprint(Checkpoint.open(save_checkpoint(m32, tokenizer, tmp_path / "c", dtype=torch.float32)))
    assert c == a


def test_pickled_and_missing_checkpoints_are_refused(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="safetensors only"):
        Checkpoint.open(tmp_path / "p")
    with pytest.raises(CheckpointError, match="not found"):
        Checkpoint.open(tmp_path / "nothing")
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="directory or a .gguf"):
        Checkpoint.open(tmp_path / "w.bin")


def test_shape_differences_are_listed(tmp_path, tokenizer):
    from transformers import LlamaConfig

    a = save_checkpoint(random_model(seed=1), tokenizer, tmp_path / "a")
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    b = save_checkpoint(AutoModelForCausalLM.from_config(cfg), tokenizer, tmp_path / "b")
    diffs = compare_architectures(Checkpoint.open(a), Checkpoint.open(b))
    assert "config.intermediate_size: base 128 vs expert 96" in diffs
    assert any("model.layers.0.mlp.up_proj.weight: shape [128, 64] in base vs [96, 64] in expert" in d for d in diffs)


def test_calibration_files(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line\n")
    assert load_samples(tmp_path / "a.txt") == [{"text": "first line"}, {"text": "second line"}]
    (tmp_path / "b.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    samples = load_samples(tmp_path / "b.jsonl")
    assert samples[0] == {"prompt": "hi", "response": "hello"} and "messages" in samples[1]
    seqs = tokenize_samples(tokenizer, samples, max_len=8)
    assert all(2 <= len(s) <= 8 for s in seqs)
    (tmp_path / "c.json").write_text(json.dumps(["plain text sample"]))
    assert load_samples(tmp_path / "c.json") == [{"text": "plain text sample"}]
    assert len(load_samples(None)) >= 16  # the built-in set
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{oops\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2: invalid JSON"):
        load_samples(tmp_path / "bad.jsonl")
    (tmp_path / "d.jsonl").write_text('{"question": "no known field"}\n')
    with pytest.raises(CalibrationError, match="needs a 'text', 'prompt' or 'messages' field"):
        load_samples(tmp_path / "d.jsonl")
    (tmp_path / "e.csv").write_text("a,b\n")
    with pytest.raises(CalibrationError, match=".txt, .jsonl or .json"):
        load_samples(tmp_path / "e.csv")


def test_fingerprint_is_cached_by_file_identity_and_rechecked_when_a_file_changes(tmp_path, tokenizer, monkeypatch, capsys):
    import os

    import meswitch.checkpoints as ck

    bdir = save_checkpoint(random_model(seed=51), tokenizer, tmp_path / "base")
    hashed = []
    real = ck._hash_tensors
    monkeypatch.setattr(ck, "_hash_tensors", lambda c, p: hashed.append(c.reference) or real(c, p))
    first = fingerprint(Checkpoint.open(bdir))
    assert fingerprint(Checkpoint.open(bdir)) == first and len(hashed) == 1  # second time: no tensor read
    # Rewrite one weight in place, keeping the file's size and modification time: the inode's
    # change time still moves, so the fingerprint is computed again and no longer matches.
    f = bdir / "model.safetensors"
    st = f.stat()
    ckpt = Checkpoint.open(bdir)
    original = f.read_bytes()
    data = bytearray(original)
    data[-2] ^= 0x40  # a bit of the last stored value
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
    changed = fingerprint(ckpt)
    assert changed != first and len(hashed) == 2
    # A bundle compressed against the first base refuses the changed one.
    edir = save_checkpoint(derive_expert(random_model(seed=51), seed=52), tokenizer, tmp_path / "expert")
    f.write_bytes(original)
    assert fingerprint(Checkpoint.open(bdir)) == first
    assert main(["compress", "--base", str(bdir), "--expert", f"e={edir}", "--out", str(tmp_path / "b"),
                 "--method", "fp16"]) == 0
    f.write_bytes(bytes(data))
    assert main(["materialize", str(tmp_path / "b"), "e", "--out", str(tmp_path / "m")]) == 1
    assert "base mismatch" in capsys.readouterr().err


def test_streamed_safetensors_files_read_back_with_the_library(tmp_path):
    from safetensors import safe_open

    from meswitch.tensorfile import DictSource, LazyTensors, write_safetensors

    tensors = {"b.i32": torch.arange(7, dtype=torch.int32), "a.f16": torch.randn(3, 5).half(),
               "c.u8": torch.randint(0, 255, (9,), dtype=torch.uint8), "d.bf16": torch.randn(2, 2).bfloat16(),
               "e.f32": torch.randn(4), "f.empty": torch.zeros(0, 3, dtype=torch.int32)}
    write_safetensors(tmp_path / "x.safetensors", DictSource(tensors), {"k": "v"})
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"k": "v"} and set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    lazy = LazyTensors([tmp_path / "x.safetensors"])
    assert {k: (dt, shape) for k, dt, shape in lazy.specs()} == {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    write_safetensors(tmp_path / "y.safetensors", lazy)  # copied one tensor at a time
    with safe_open(tmp_path / "y.safetensors", framework="pt") as f:
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
