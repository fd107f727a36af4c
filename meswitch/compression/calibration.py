"""Calibration data and the statistics measured on it.

Calibration prompts come from a file per expert (`--calib NAME=FILE`), one file for all, or the
small built-in set shipped in meswitch/data/calibration.jsonl. Accepted files:
- .txt: one sample per non-empty line, used as raw text;
- .jsonl / .json: objects with "text" (raw text), "prompt" (+ optional "response"), or
  "messages" (a chat); prompts and chats go through the tokenizer's chat template when it has one.

For every linear layer the expert is run on the calibration samples and only the per-input
channel second moment s_i = sum over tokens of x_i^2 is kept (no activations are stored).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

BUILTIN_NAME = "builtin"


class CalibrationError(ValueError):
    pass


def _sample_from_obj(obj, where: str) -> dict:
    if isinstance(obj, str):
        return {"text": obj}
    if not isinstance(obj, dict):
        raise CalibrationError(f"{where}: expected an object or a string, got {type(obj).__name__}")
    if isinstance(obj.get("messages"), list):
        return {"messages": obj["messages"]}
    if isinstance(obj.get("prompt"), str):
        s = {"prompt": obj["prompt"]}
        if isinstance(obj.get("response"), str):
            s["response"] = obj["response"]
        return s
    if isinstance(obj.get("text"), str):
        return {"text": obj["text"]}
    raise CalibrationError(f"{where}: needs a 'text', 'prompt' or 'messages' field")


def parse_samples(text: str, suffix: str, where: str) -> list[dict]:
    samples: list[dict] = []
    if suffix == ".txt":
        samples = [{"text": line.strip()} for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationError(f"{where}:{i}: invalid JSON ({e.msg})") from e
                samples.append(_sample_from_obj(obj, f"{where}:{i}"))
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"{where}: invalid JSON ({e.msg})") from e
        if not isinstance(data, list):
            raise CalibrationError(f"{where}: expected a JSON list of samples")
        samples = [_sample_from_obj(o, f"{where}[{i}]") for i, o in enumerate(data)]
    else:
        raise CalibrationError(f"{where}: calibration files are .txt, .jsonl or .json")
    if not samples:
        raise CalibrationError(f"{where}: no calibration samples")
    return samples


def load_samples(path: str | Path | None) -> list[dict]:
    """Samples from a file, or the built-in set when path is None."""
    if path is None:
        text = resources.files("meswitch").joinpath("data/calibration.jsonl").read_text()
        return parse_samples(text, ".jsonl", BUILTIN_NAME)
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"calibration file not found: {p}")
    return parse_samples(p.read_text(encoding="utf-8"), p.suffix.lower(), str(p))


def tokenize_samples(tokenizer, samples: list[dict], max_len: int) -> list[torch.Tensor]:
    """Token ids (1-D LongTensor) per sample, truncated to max_len, at least 2 tokens each."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    seqs = []
    for s in samples:
        if "text" in s or not has_template:
            text = s.get("text") or s.get("prompt") or "\n".join(m.get("content", "") for m in s.get("messages", []))
            if "response" in s:
                text = text + "\n" + s["response"]
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        else:
            msgs = s.get("messages") or [{"role": "user", "content": s["prompt"]}]
            if "response" in s:
                msgs = msgs + [{"role": "assistant", "content": s["response"]}]
            ids = tokenizer.apply_chat_template(
                msgs, tokenize=True, add_generation_prompt="response" not in s and msgs[-1]["role"] == "user"
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        ids = list(ids)[:max_len]
        if len(ids) >= 2:
            seqs.append(torch.tensor(ids, dtype=torch.long))
    if not seqs:
        raise CalibrationError("every calibration sample tokenized to fewer than 2 tokens")
    return seqs


def split_heldout(seqs: list[torch.Tensor], fraction: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(calibration, held-out): every k-th sample is held out, at least one of each when possible."""
    if len(seqs) < 2 or fraction <= 0:
        return seqs, seqs[:0]
    k = max(2, round(1 / fraction))
    held = [s for i, s in enumerate(seqs) if i % k == k - 1] or [seqs[-1]]
    calib = [s for i, s in enumerate(seqs) if not any(s is h for h in held)]
    return calib, held


@torch.no_grad()
def collect_input_moments(model: nn.Module, seqs: list[torch.Tensor], progress: bool = True) -> dict[str, torch.Tensor]:
    """s_i = sum over tokens of x_i^2 for the inputs of every nn.Linear, keyed by module name."""
    moments: dict[str, torch.Tensor] = {}
    hooks = []

    def make_hook(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            acc = moments.get(name)
            s = (x * x).sum(dim=0).cpu()
            moments[name] = s if acc is None else acc + s

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(make_hook(name)))
    device = next(model.parameters()).device
    try:
        for ids in tqdm(seqs, desc="calibrate", disable=not progress, leave=False):
            model(input_ids=ids[None].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return moments


@torch.no_grad()
def next_token_logprobs(
    model: nn.Module, seqs: list[torch.Tensor], progress: bool = False, desc: str = "teacher",
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """log softmax of the model's next-token logits for each sequence, [T, vocab] in `dtype`
    (float32 for measurements; float16 halves the memory of distillation targets)."""
    device = next(model.parameters()).device
    out = []
    for ids in tqdm(seqs, desc=desc, disable=not progress, leave=False):
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0]
        out.append(torch.log_softmax(logits.float(), dim=-1).to(dtype).cpu())
    return out
