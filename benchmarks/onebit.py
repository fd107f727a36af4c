"""Issue 15: about 1 bit per parameter (and the 2-bit point) on the real SmolLM2 experts.

Every variant is measured in ONE run, on the same experts, calibration and held-out data, with
benchmarks/evaluate.py's machinery (ExpertContext: calibration moments, distillation targets and
the expert's held-out answer distributions; `measure`: answer-token perplexity, KL(expert ||
variant), top-1 agreement; `write_bundle`: the real bundle file whose size is the effective bits).
Gain retained = (ppl_base - ppl_variant) / (ppl_base - ppl_expert).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice -n 10 python benchmarks/onebit.py --base BASE \\
        --workdir WORK --experts math code [--report]

WORK must hold experts/NAME (fine-tuned checkpoints, e.g. from `evaluate.py --stage finetune`) and
data/NAME_{calib,heldout}.jsonl (evaluate.py's splits). Results are cached per variant under
WORK/onebit/NAME/*.json (a run resumes); --report writes benchmarks/results/onebit.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import copy
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import evaluate as ev  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TUNE = ev.DEFAULT_TUNE
# (name, method, bits, salient, rank_bits, tune_steps), in the order they run (the CPU is shared:
# the untuned comparison at matched bits first, then the tuned rows, then the 2-bit point).
# Tuned rows use the same 32 distillation steps as evaluate.py's mixed-1-tuned, starting from the
# same compression as their untuned row (compressed once, kept in memory).
VARIANTS = [
    ("lowrank-1-r0.2", "lowrank", 1, 0.0, 0.2, 0),
    ("mixed-1", "mixed", 1, ev.DEFAULT_SALIENT, 0.0, 0),
    ("bitdelta", "bitdelta", 1, 0.0, 0.0, 0),
    ("lowrank-1-r0.2-tuned", "lowrank", 1, 0.0, 0.2, TUNE),
    ("mixed-1-tuned", "mixed", 1, ev.DEFAULT_SALIENT, 0.0, TUNE),
    ("bitdelta-tuned", "bitdelta", 1, 0.0, 0.0, TUNE),
    ("mixed-2", "mixed", 2, ev.DEFAULT_SALIENT, 0.0, 0),
    ("lowrank-2-r0.1", "lowrank", 2, 0.0, 0.1, 0),
    ("mixed-2-tuned", "mixed", 2, ev.DEFAULT_SALIENT, 0.0, TUNE),
    ("lowrank-2-r0.1-tuned", "lowrank", 2, 0.0, 0.1, TUNE),
    ("lowrank-1-r0.1", "lowrank", 1, 0.0, 0.1, 0),
]


def result_file(work: Path, expert: str, variant: str) -> Path:
    return work / "onebit" / expert / f"{variant}.json"


def save_row(ctx, work: Path, vname: str, v: tuple, deltas, metrics: dict, tuning: dict,
             compress_s: float, tune_s: float) -> dict:
    _, method, bits, salient, rank_bits, tune = v
    spec = {"method": method, "bits": bits, "salient": salient, "rank_bits": rank_bits, "tune_steps": tune}
    bundle = work / "onebit-bundles" / ctx.name / vname
    nbytes = ev.write_bundle(ctx, bundle, deltas, {"method": method, "params": spec, "quality": metrics})
    ranks = [d.rank for d in deltas.values() if getattr(d, "rank", 0)]
    n = ctx.expert.num_parameters()
    r = {"expert": ctx.name, "variant": vname, **spec, "bytes": nbytes, "num_parameters": n,
         "effective_bits": 8 * nbytes / n, "metrics": metrics, "tuning": tuning,
         "compress_seconds": round(compress_s, 1), "tune_seconds": round(tune_s, 1),
         "lowrank_matrices": len(ranks), "mean_rank": sum(ranks) / len(ranks) if ranks else 0}
    ev.save_json(result_file(work, ctx.name, vname), r)
    import shutil
    shutil.rmtree(bundle)
    ev.log(f"[{ctx.name}] {vname}: {r['effective_bits']:.3f} bits, ppl {metrics['ppl']:.3f}, KL {metrics['kl']:.4f}, "
           f"top-1 {metrics['top1_agreement']:.3f} (compress {compress_s:.0f} s, tune {tune_s:.0f} s)")
    return r


def run_expert(work: Path, base: Path, name: str, files, progress: bool) -> None:
    from meswitch.compression.methods import CompressionSpec
    from meswitch.compression.pipeline import compress_tensors
    from meswitch.compression.student import build_student, tune_step_sizes

    todo = [v for v in VARIANTS if not result_file(work, name, v[0]).is_file()]
    if not todo:
        return
    ctx = ev.ExpertContext(work, base, name, files, progress, TUNE)
    b = ev.run_base(ctx)
    ev.save_json(result_file(work, name, "base"), b)
    compressed: dict[tuple, tuple] = {}  # (method, bits, salient, rank_bits) -> (deltas, seconds)
    for v in todo:
        vname, method, bits, salient, rank_bits, tune = v
        key = (method, bits, salient, rank_bits)
        if key not in compressed:
            t0 = time.time()
            spec = CompressionSpec(method=method, bits=bits if method != "bitdelta" else 2, salient=salient,
                                   rank_bits=rank_bits).validate()
            compressed[key] = (compress_tensors(ctx.base, ctx.expert, spec, ctx.moments, progress), time.time() - t0)
        deltas, compress_s = compressed[key]
        d = {k: copy.copy(x) for k, x in deltas.items()}  # tuning replaces step sizes and factors
        student = build_student(ctx.base, d, ctx.vocab, "cpu", ctx.dtype, torch.float32)
        tuning, tune_s = {}, 0.0
        if tune:
            t1 = time.time()
            k = min(tune, len(ctx.calib))
            tuning = tune_step_sizes(student, ctx.base, d, ctx.calib[:k], ctx.calib_lp[:k], tune,
                                     progress=progress, weight_dtype=ctx.dtype)
            tune_s = time.time() - t1
        save_row(ctx, work, vname, v, d, ev.measure(student, ctx.heldout, ctx.teacher), tuning, compress_s, tune_s)
        del student, d
        gc.collect()


ORDER = ["bitdelta", "bitdelta-tuned", "lowrank-1-r0.1", "lowrank-1-r0.2", "lowrank-1-r0.2-tuned", "mixed-1",
         "mixed-1-tuned", "lowrank-2-r0.1", "lowrank-2-r0.1-tuned", "mixed-2", "mixed-2-tuned"]


def report(work: Path, experts: list[str]) -> None:
    rows, bases = [], {}
    for name in experts:
        bf = result_file(work, name, "base")
        if not bf.is_file():
            continue
        b = json.loads(bf.read_text())
        bases[name] = {"base_ppl": b["base"]["ppl"], "expert_ppl": b["expert_metrics"]["ppl"],
                       "answer_tokens": b["base"]["answer_tokens"], "samples": b["base"]["samples"]}
        for v in ORDER:
            f = result_file(work, name, v)
            if f.is_file():
                r = json.loads(f.read_text())
                r["gain_retained"] = ev.gain(b["base"]["ppl"], b["expert_metrics"]["ppl"], r["metrics"]["ppl"])
                rows.append(r)
    RESULTS.mkdir(parents=True, exist_ok=True)
    limit = f" --limit {ev.LIMIT}" if ev.LIMIT else ""
    cmd = ("HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice -n 10 python benchmarks/onebit.py --base /work/cache/base "
           f"--workdir WORK{limit} --experts NAME  (once per expert), then --report --experts " + " ".join(experts))
    (RESULTS / "onebit.json").write_text(json.dumps({"command": cmd, "experts": bases, "rows": rows}, indent=2) + "\n")
    names = [n for n in experts if n in bases]
    L = ["# About 1 bit per parameter (issue 15)", "",
         "Same experts, calibration and held-out data for every row, measured in one run. Gain retained = "
         "(ppl_base - ppl) / (ppl_base - ppl_expert) on held-out answer tokens; KL(expert || variant) and "
         "top-1 agreement with the expert, means over answer tokens. Bits: bundle file bytes * 8 / parameters.", "",
         f"Command: `{cmd}`", "",
         "| variant | " + " | ".join(f"{n} bits | {n} gain | {n} KL | {n} top-1 | {n} compress s | {n} tune s"
                                  for n in names) + " |",
         "| --- |" + " ---: |" * (6 * len(names))]
    by = {(r["expert"], r["variant"]): r for r in rows}
    for v in ORDER:
        cells = []
        for n in names:
            r = by.get((n, v))
            if r is None:
                cells.append(" - | - | - | - | - | - ")
            else:
                cells.append(f" {r['effective_bits']:.3f} | {100 * r['gain_retained']:.1f}% | {r['metrics']['kl']:.4f} | "
                             f"{r['metrics']['top1_agreement']:.3f} | {r['compress_seconds']:.0f} | {r['tune_seconds']:.0f} ")
        if any((n, v) in by for n in names):
            L.append(f"| {v} |" + "|".join(cells) + "|")
    L += ["", "Base / expert held-out answer perplexity: " + ", ".join(
        f"{n}: {bases[n]['base_ppl']:.3f} / {bases[n]['expert_ppl']:.3f} ({bases[n]['samples']} samples, "
        f"{bases[n]['answer_tokens']} answer tokens)" for n in names)]
    (RESULTS / "onebit.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--experts", nargs="+", default=["math", "code"], choices=ev.DOMAINS)
    p.add_argument("--report", action="store_true", help="only write benchmarks/results/onebit.{json,md}")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--limit", type=int, default=None, help="at most this many calibration and held-out samples per expert (the same for every row)")
    args = p.parse_args()
    ev.LIMIT = args.limit
    work = Path(args.workdir)
    files = {n: {s: work / "data" / f"{n}_{s}.jsonl" for s in ("calib", "heldout")} for n in args.experts}
    if not args.report:
        for name in args.experts:
            run_expert(work, Path(args.base), name, files, not args.quiet)
    report(work, args.experts)


if __name__ == "__main__":
    main()
