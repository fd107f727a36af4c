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
  tasks     GSM8K exact match, HumanEval pass@1, Alpaca answer ranking for base, expert and the key
            variants (subsets, see TASK_* constants)
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

# Fine-tuning: batch 4, 150 steps, peak LR 5e-5 (linear warmup over 10% of the steps, cosine to
# 10%), bf16 autocast, response-only loss (scripts/finetune.py), seed 0. math's seq-len covers ~90%
# of GSM8K answers whole. Sized for a shared 2-core CPU: one thread, about 35 min for all three.
FINETUNE = {
    "math": {"steps": 150, "batch": 4, "seq_len": 320, "lr": 5e-5},
    "code": {"steps": 150, "batch": 4, "seq_len": 256, "lr": 5e-5},
    "instructions": {"steps": 150, "batch": 4, "seq_len": 256, "lr": 5e-5},
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


def stage_finetune(work: Path, base: Path, files) -> None:
    for name, cfg in FINETUNE.items():
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
DEFAULT_TUNE = 64  # one pass over the 64 calibration samples
VARIANTS = [
    ("fp16", "fp16", 16, 0, 0, 1),
    ("mixed-2", "mixed", 2, DEFAULT_SALIENT, 0, 1),
    ("mixed-2-tuned", "mixed", 2, DEFAULT_SALIENT, DEFAULT_TUNE, 1),
    ("rtn-2", "rtn", 2, 0, 0, 1),
    ("bitdelta", "bitdelta", 1, 0, 0, 1),
    ("bitdelta-tuned", "bitdelta", 1, 0, DEFAULT_TUNE, 1),
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
    # ablation: tuning steps at 2 bits, 1% salient (0 = mixed-2, 64 = mixed-2-tuned)
    ("mixed-2-tuned8", "mixed", 2, DEFAULT_SALIENT, 8, 3),
    ("mixed-2-tuned16", "mixed", 2, DEFAULT_SALIENT, 16, 3),
    ("mixed-2-tuned32", "mixed", 2, DEFAULT_SALIENT, 32, 3),
    ("mixed-2-tuned128", "mixed", 2, DEFAULT_SALIENT, 128, 3),
]


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

    def __init__(self, work: Path, base_dir: Path, name: str, files, progress: bool):
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
        self.calib_lp = next_token_logprobs(model, self.calib, progress, "expert (calibration)", torch.float16)
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


def run_variant(ctx: ExpertContext, variant: tuple, keep_bundle: bool) -> dict | None:
    from meswitch.compression.methods import CompressionSpec
    from meswitch.compression.pipeline import compress_tensors
    from meswitch.compression.student import build_student, tune_step_sizes

    vname, method, bits, salient, tune, _ = variant
    path = result_path(ctx.work, ctx.name, vname)
    if path.is_file():
        return json.loads(path.read_text())
    t0 = time.time()
    spec = CompressionSpec(method=method, bits=bits if method in ("mixed", "rtn") else 2, salient=salient).validate()
    deltas = compress_tensors(ctx.base, ctx.expert, spec, ctx.moments, ctx.progress)
    t_compress = time.time() - t0
    student = build_student(ctx.base, deltas, ctx.vocab, "cpu", ctx.dtype, torch.float32)
    tuning = {}
    if tune:
        tuning = tune_step_sizes(student, ctx.base, deltas, ctx.calib, ctx.calib_lp, tune,
                                 progress=ctx.progress, weight_dtype=ctx.dtype)
    m = measure(student, ctx.heldout, ctx.teacher)
    del student
    gc.collect()
    bundle_dir = ctx.work / "bundles" / ctx.name / vname
    params = {**spec.as_dict(), "tune_steps": tune}
    nbytes = write_bundle(ctx, bundle_dir, deltas, {"method": method, "params": params, "quality": m, "tuning": tuning})
    if not keep_bundle:
        shutil.rmtree(bundle_dir)
    n = ctx.expert.num_parameters()
    r = {"expert": ctx.name, "variant": vname, "method": method, "bits": bits, "salient": salient,
         "tune_steps": tune, "bytes": nbytes, "num_parameters": n, "effective_bits": 8 * nbytes / n,
         "metrics": m, "tuning": tuning, "compress_seconds": round(t_compress, 1),
         "seconds": round(time.time() - t0, 1)}
    save_json(path, r)
    log(f"[{ctx.name}] {vname}: {r['effective_bits']:.3f} bits/param, ppl {m['ppl']:.3f}, KL {m['kl']:.4f}, "
        f"top-1 {m['top1_agreement']:.3f} ({r['seconds']:.0f} s)")
    return r


KEEP_BUNDLES = {"fp16", "mixed-2-tuned", "rtn-2", "bitdelta", "bitdelta-tuned", "mixed-3-tuned", "mixed-1-tuned"}


def stage_compress(work: Path, base: Path, files, max_priority: int, experts: list[str], ablate: list[str],
                   progress: bool) -> None:
    # Priority by priority across experts: the main table is complete for every expert before
    # the other bit widths, and those before the ablations.
    contexts: dict[str, ExpertContext] = {}
    beats = {}
    for name in experts:  # first: does each expert beat the base on its own domain?
        if not result_path(work, name, "base").is_file():
            contexts.clear()
            gc.collect()
            contexts[name] = ExpertContext(work, base, name, files, progress)
        r = run_base(contexts[name]) if name in contexts else json.loads(result_path(work, name, "base").read_text())
        beats[name] = r["expert_metrics"]["ppl"] < r["base"]["ppl"] or NO_CHECK
        if not beats[name]:
            log(f"[{name}] WARNING: the expert does not beat the base on its held-out data; no variants for it")
    experts = [n for n in experts if beats[n]]
    for prio in range(1, max_priority + 1):
        for name in experts:
            todo = [v for v in VARIANTS if v[5] == prio and (prio < 3 or name in ablate)
                    and not result_path(work, name, v[0]).is_file()]
            if not todo and result_path(work, name, "base").is_file():
                continue
            if name not in contexts:
                contexts.clear()  # one expert's cached distributions in memory at a time
                gc.collect()
                contexts[name] = ExpertContext(work, base, name, files, progress)
            ctx = contexts[name]
            run_base(ctx)
            for v in todo:
                run_variant(ctx, v, v[0] in KEEP_BUNDLES)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(ROOT / ".cache" / "demo" / "base"), help="base checkpoint (SmolLM2-135M-Instruct)")
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "eval"))
    p.add_argument("--stage", default="all",
                   choices=["data", "finetune", "check", "compress", "tasks", "report", "all"])
    p.add_argument("--experts", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    p.add_argument("--max-priority", type=int, default=3, help="1: main variants, 2: + other bit widths, 3: + ablations")
    p.add_argument("--ablate", nargs="*", default=["math"], help="experts that get the ablations")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--limit", type=int, default=None, help="smoke test: at most this many calibration / held-out samples")
    p.add_argument("--no-check", action="store_true", help="smoke test: skip the expert-beats-base check")
    args = p.parse_args()
    global LIMIT, NO_CHECK
    LIMIT, NO_CHECK = args.limit, args.no_check
    work, base = Path(args.workdir), Path(args.base)
    work.mkdir(parents=True, exist_ok=True)
    files = stage_data(work)
    if args.stage in ("finetune", "all"):
        stage_finetune(work, base, files)
    if args.stage in ("check", "compress", "all"):
        sys.path.insert(0, str(ROOT))
        stage_compress(work, base, files, 0 if args.stage == "check" else args.max_priority, args.experts,
                       args.ablate, not args.quiet)


if __name__ == "__main__":
    main()
