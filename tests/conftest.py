"""Tiny random Llama-family models and a tiny tokenizer, built inside the tests (no downloads)."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import tempfile  # noqa: E402

# The base-fingerprint cache of this test session, not the user's (~/.cache/meswitch).
os.environ["MESWITCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="meswitch-test-cache-")

import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = [
    "Tom has 12 apples and gives 5 to Anna. How many apples are left? 12 - 5 = 7.",
    "def add(a, b):\n    return a + b",
    "The quick brown fox jumps over the lazy dog.",
    "Write a Python function that reverses a string.",
    "A train travels 60 km in 1.5 hours; its speed is 40 km per hour.",
    "Explain why the sky is blue in one short paragraph.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
VOCAB = 320


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 8,
        special_tokens=["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str = "llama", tied: bool = True, vocab: int = VOCAB, layers: int = 2, hidden: int = 64,
                intermediate: int = 128):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    return cls(**common)


def random_model(family: str = "llama", tied: bool = True, seed: int = 0, vocab: int = VOCAB, **shape):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tied, vocab, **shape))
    with torch.no_grad():  # norms away from exactly 1.0 so their deltas are non-trivial
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def derive_expert(base, seed: int = 1, scale: float = 0.02, outlier_cols: int = 0):
    """A fake fine-tune: base + low-rank + small dense noise (+ optional outlier input columns)."""
    expert = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expert.parameters():
            if p.dim() == 2:
                out, cols = p.shape
                a = torch.randn(out, 4, generator=g) * scale
                b = torch.randn(4, cols, generator=g)
                d = a @ b / 2 + scale * 0.3 * torch.randn(out, cols, generator=g)
                if outlier_cols:
                    idx = torch.randperm(cols, generator=g)[:outlier_cols]
                    d[:, idx] *= 25
                p.add_(d)
            else:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return expert


def lively(model, factor: float = 8.0):
    """Scale a random model's matrices so greedy decoding wanders instead of repeating one token."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(factor)
    return model


def save_lively_experts(d: Path, tokenizer) -> None:
    """d/base (a lively tiny Llama) and two experts derived from it, d/math and d/code."""
    base = lively(random_model("llama", tied=True, seed=0))
    save_checkpoint(base, tokenizer, d / "base")
    for name, seed in (("math", 1), ("code", 2)):
        save_checkpoint(derive_expert(base, seed=seed, scale=0.05), tokenizer, d / name)


def flip_byte(path: Path, offset: int = -1) -> None:
    """Corrupt a file in place: one byte changed."""
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 0xFF
    Path(path).write_bytes(bytes(data))


MATH_Q = ["How many apples are left if Tom has 12 and eats 5?", "What is 7 times 8?", "A train goes 60 km in 2 hours; speed?",
          "Anna has 3 boxes of 4 pens. How many pens?", "What is 15 minus 9?", "If 5 kg cost 20 dollars, what does 1 kg cost?"]
CODE_Q = ["Write a Python function that reverses a list.", "def add(a, b): fix this function", "How do I sort a dict by value in Python?",
          "Write a function to check if a string is a palindrome.", "Implement binary search in Python.", "Fix the bug in this for loop."]


def make_served_bundle(d: Path, tokenizer) -> Path:
    """d/bundle: the lively experts math and code (described) with a lexical router, as served in
    the server tests."""
    from meswitch.cli import main

    save_lively_experts(d, tokenizer)
    (d / "calib.txt").write_text("\n".join(CORPUS) + "\n")
    assert main(["compress", "--base", str(d / "base"), "--expert", f"math={d / 'math'}", "--expert",
                 f"code={d / 'code'}", "--out", str(d / "bundle"), "--calib", str(d / "calib.txt"),
                 "--description", "math=grade-school arithmetic", "--description", "code=Python programming"]) == 0
    (d / "math.txt").write_text("\n".join(MATH_Q * 3) + "\n")
    (d / "code.txt").write_text("\n".join(CODE_Q * 3) + "\n")
    assert main(["router", "train", str(d / "bundle"), "--backend", "lexical", "--examples", f"math={d / 'math.txt'}",
                 "--examples", f"code={d / 'code.txt'}", "--threshold", "0.3"]) == 0
    return d / "bundle"


def save_checkpoint(model, tokenizer, path: Path, dtype=torch.bfloat16) -> Path:
    path = Path(path)
    model.to(dtype).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    model.to(torch.float32)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def served_bundle(tmp_path_factory, tokenizer) -> Path:
    """make_served_bundle, once for the session (the server tests, single-process and Ray)."""
    return make_served_bundle(tmp_path_factory.mktemp("srv"), tokenizer)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer):
    """A bf16 Llama base and two experts saved as HF directories."""
    d = tmp_path_factory.mktemp("tiny")
    base = random_model("llama", tied=True, seed=0)
    paths = {"base": save_checkpoint(base, tokenizer, d / "base")}
    for name, seed in (("math", 1), ("code", 2)):
        paths[name] = save_checkpoint(derive_expert(base, seed=seed), tokenizer, d / name)
    return paths


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    import json

    lines = [json.dumps({"prompt": p}) for p in CORPUS] + [json.dumps({"text": t}) for t in CORPUS]
    f.write_text("\n".join(lines) + "\n")
    return f


@pytest.fixture(scope="session")
def rt(tmp_path_factory, tokenizer):
    """A tiny bundle (experts math, code) over a lively base, plus float32 materialized experts
    (read-only: tests that change a bundle copy it first)."""
    from meswitch.cli import main

    d = tmp_path_factory.mktemp("rt")
    save_lively_experts(d, tokenizer)
    calib = d / "calib.txt"
    calib.write_text("\n".join(CORPUS) + "\n")
    assert main(["compress", "--base", str(d / "base"), "--expert", f"math={d / 'math'}",
                 "--expert", f"code={d / 'code'}", "--out", str(d / "bundle"), "--calib", str(calib),
                 "--description", "math=arithmetic"]) == 0
    for name in ("math", "code"):
        assert main(["materialize", str(d / "bundle"), name, "--out", str(d / f"mat_{name}"), "--dtype", "float32"]) == 0
    return d
