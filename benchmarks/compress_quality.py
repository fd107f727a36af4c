"""Layer-by-layer compression against the whole-model pipeline on real SmolLM2 experts (issue 14).

Runs on the work directory of benchmarks/evaluate.py (its data/ splits and fine-tuned experts/),
with its protocol: 64 calibration samples of 256 tokens per expert (from its training split), 1%
salient channels, quality on the 64 held-out answers: answer-token perplexity -> gain retained
= (ppl_base - ppl) / (ppl_base - ppl_expert), also on the loss (log perplexity), KL(expert ||
compressed) and top-1 agreement with the expert.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/compress_quality.py --base BASE --workdir WORKDIR \\
        [--experts math code instructions] [--bits 2 1] [--variants ...]
    # the table again from the cached results (nothing computed):
    python benchmarks/compress_quality.py --base BASE --workdir WORKDIR --report --variants ...

Variants (B = bits):
  whole-B        the whole-model pipeline, untuned: evaluate.py's mixed-B (the code before issue 14)
  whole-B-e2e    ... with 32 steps of end-to-end KL distillation: evaluate.py's mixed-B-tuned
  layer-B        the layer-by-layer pipeline, untuned (the same codes as whole-B, checked here)
  layer-B-block  ... with 32 block-wise tuning steps per layer (--lr, default the CLI's)
  layer-B-e2e    ... with 32 end-to-end steps after the layers
  layer-B-both   ... block-wise, then end-to-end
Every result is cached as JSON under WORKDIR/layerwise/NAME/; the table goes to
benchmarks/results/compress_quality.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import gc
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import evaluate as ev  # noqa: E402  (the issue-6 evaluation: data, experts, protocol, metrics)

STEPS = 32
RESULTS = ROOT / "benchmarks" / "results"


def result_file(work: Path, name: str, variant: str) -> Path:
    return work / "layerwise" / name / f"{variant}.json"


def whole_variants(ctx, bits: int, wanted: list[str]) -> dict[str, dict]:
    """evaluate.py's own mixed-B and mixed-B-tuned (cached by it under WORKDIR/variants)."""
    untuned = next(v for v in ev.VARIANTS if v[0] == f"mixed-{bits}")
    tuned = next(v for v in ev.VARIANTS if v[0] == f"mixed-{bits}-tuned")
    if f"whole-{bits}" in wanted or f"whole-{bits}-e2e" in wanted:
        ev.run_variants(ctx, untuned, [tuned] if f"whole-{bits}-e2e" in wanted else [])
    out = {}
    for v, src in ((f"whole-{bits}", untuned[0]), (f"whole-{bits}-e2e", tuned[0])):
        f = ev.result_path(ctx.work, ctx.name, src)
        if v in wanted and f.is_file():
            out[v] = json.loads(f.read_text())
    return out


def layer_variant(ctx, files, variant: str, bits: int, tune: str | None, lr: float | None) -> dict:
    from meswitch.compression.methods import CompressionSpec
    from meswitch.compression.pipeline import CalibrationConfig, compress_expert
    from meswitch.compression.student import build_student

    f = result_file(ctx.work, ctx.name, variant)
    if f.is_file():
        return json.loads(f.read_text())
    spec = CompressionSpec(method="mixed", bits=bits, salient=ev.DEFAULT_SALIENT).validate()
    calib = CalibrationConfig(path=str(files[ctx.name]["calib"]), max_len=ev.CALIB_MAX_LEN, max_samples=ev.CALIB,
                              heldout_fraction=0)
    t0 = time.time()
    r = compress_expert(ctx.base, ctx.expert, spec, calib, tune_steps=STEPS if tune else 0, tune=tune or "blockwise",
                        lr=lr, name=f"{ctx.name}/{variant}", workdir=ctx.work / "layerwise-work" / ctx.name / variant,
                        base_fingerprint=ctx.base_fp, progress=ctx.progress, log=ev.log)
    seconds = time.time() - t0
    deltas = r.deltas
    same = None
    if tune is None:  # untuned: the codes of the whole-model pipeline, from its own statistics
        from meswitch.compression.pipeline import compress_tensors

        whole = compress_tensors(ctx.base, ctx.expert, spec, ctx.moments, False)
        same = all(_same(whole[k], deltas[k]) for k in whole) and set(whole) == set(deltas)
        ev.log(f"[{ctx.name}] {variant}: same codes, step sizes and salient channels as whole-{bits}: {same}")
        del whole
    student = build_student(ctx.base, deltas, ctx.vocab, "cpu", ctx.dtype, torch.float32)
    metrics = ev.measure(student, ctx.heldout, ctx.teacher)
    del student
    bundle = ctx.work / "bundles-layerwise" / ctx.name / variant
    nbytes = ev.write_bundle(ctx, bundle, deltas, {"method": "mixed", "params": spec.as_dict(), "quality": metrics,
                                                   "tuning": r.tuning})
    shutil.rmtree(bundle)
    r.cleanup()
    n = ctx.expert.num_parameters()
    out = {"expert": ctx.name, "variant": variant, "bits": bits, "tune": tune, "tune_steps": STEPS if tune else 0,
           "lr": r.tuning.get("lr"), "bytes": nbytes, "effective_bits": 8 * nbytes / n, "metrics": metrics,
           "tuning": {k: v for k, v in r.tuning.items() if not k.startswith("layer_mse") and k != "blockwise"},
           "seconds": round(seconds, 1), **({"same_codes_as_whole": same} if same is not None else {})}
    ev.save_json(f, out)
    ev.log(f"[{ctx.name}] {variant}: ppl {metrics['ppl']:.3f}, KL {metrics['kl']:.4f}, "
           f"top-1 {metrics['top1_agreement']:.3f} ({seconds:.0f} s)")
    del deltas
    gc.collect()
    return out


def _same(a, b) -> bool:
    if a.kind != b.kind:
        return False
    if a.kind == "dense":
        return torch.equal(a.values, b.values)
    return (torch.equal(a.packed, b.packed) and torch.equal(a.salient_idx, b.salient_idx)
            and torch.equal(a.params.scale, b.params.scale) and torch.equal(a.params.offset, b.params.offset))


def gains(base: dict, r: dict) -> dict:
    b, e, v = base["base"]["ppl"], base["expert_metrics"]["ppl"], r["metrics"]["ppl"]
    return {"gain_ppl": ev.gain(b, e, v), "gain_loss": (math.log(b) - math.log(v)) / (math.log(b) - math.log(e))}


def markdown(rows: list[dict], bases: dict) -> str:
    names = [n for n in ev.DOMAINS if n in bases]
    L = ["Held-out answers of each expert's domain (64 per domain); gain retained on perplexity (on the loss in "
         "parentheses), KL(expert || compressed) in nats, top-1 agreement with the expert, seconds to compress "
         "(2 CPU cores shared with other jobs; one torch thread).", "",
         "| variant | bits |" + "".join(f" {n} gain | {n} KL | {n} top-1 | {n} s |" for n in names),
         "| --- | ---: |" + " ---: | ---: | ---: | ---: |" * len(names)]
    by = {(r["expert"], r["variant"]): r for r in rows}
    order = []
    for r in rows:
        if r["variant"] not in order:
            order.append(r["variant"])
    for v in order:
        rs = [by.get((n, v)) for n in names]
        bits = next(r["effective_bits"] for r in rs if r)
        cells = ""
        for n, r in zip(names, rs):
            if r is None:
                cells += " - | - | - | - |"
                continue
            g = gains(bases[n], r)
            cells += (f" {100 * g['gain_ppl']:.1f}% ({100 * g['gain_loss']:.1f}%) | {r['metrics']['kl']:.4f} | "
                      f"{r['metrics']['top1_agreement']:.3f} | {r.get('seconds', 0):.0f} |")
        L.append(f"| {v} | {bits:.3f} |{cells}")
    return "\n".join(L) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--workdir", required=True, help="benchmarks/evaluate.py's work directory (data/, experts/)")
    p.add_argument("--experts", nargs="+", default=list(ev.DOMAINS), choices=ev.DOMAINS)
    p.add_argument("--bits", nargs="+", type=int, default=[2, 1])
    p.add_argument("--variants", nargs="+", default=["whole", "whole-e2e", "layer", "layer-block", "layer-both"],
                   help="any of whole, whole-e2e, layer, layer-block, layer-e2e, layer-both")
    p.add_argument("--lr", type=float, default=None, help="block-wise learning rate (default: the CLI's)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report", action="store_true",
                   help="only rebuild the table from the results cached in WORKDIR (nothing is computed)")
    args = p.parse_args()
    work, base = Path(args.workdir), Path(args.base)
    if args.report:
        publish(*cached_rows(work, args.experts, args.bits, args.variants))
        return
    files = ev.stage_data(work)
    rows, bases = [], {}
    modes = {"layer": None, "layer-block": "blockwise", "layer-e2e": "end-to-end", "layer-both": "both"}
    for name in args.experts:
        if not (ev.expert_dir(work, name) / "model.safetensors").is_file():
            ev.log(f"[{name}] no expert in {work}: skipped")
            continue
        ctx = ev.ExpertContext(work, base, name, files, not args.quiet, STEPS)
        bases[name] = ev.run_base(ctx)
        for bits in args.bits:
            wanted = [v.replace("whole", f"whole-{bits}", 1) for v in args.variants if v.startswith("whole")]
            rows += [{**r, "variant": v} for v, r in whole_variants(ctx, bits, wanted).items()]
            for v in args.variants:
                if v in modes:
                    vname = v.replace("layer", f"layer-{bits}", 1) + (f"-lr{args.lr:g}" if args.lr and modes[v] else "")
                    rows.append(layer_variant(ctx, files, vname, bits, modes[v], args.lr))
        del ctx
        gc.collect()
    publish(rows, bases)


def cached_rows(work: Path, experts: list[str], bits: list[int], variants: list[str]) -> tuple[list[dict], dict]:
    """The rows of every variant already measured (whole-model ones cached by evaluate.py)."""
    rows, bases = [], {}
    for name in experts:
        f = ev.result_path(work, name, "base")
        if not f.is_file():
            continue
        bases[name] = json.loads(f.read_text())
        for b in bits:
            for v in variants:
                vname = v.replace("whole", f"whole-{b}", 1).replace("layer", f"layer-{b}", 1)
                if v.startswith("whole"):
                    f = ev.result_path(work, name, f"mixed-{b}" + ("-tuned" if v.endswith("e2e") else ""))
                else:
                    f = result_file(work, name, vname)
                if f.is_file():
                    rows.append({**json.loads(f.read_text()), "variant": vname})
    return rows, bases


def publish(rows: list[dict], bases: dict) -> None:
    """Merge `rows` into benchmarks/results/compress_quality.json and rewrite the table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.update(gains(bases[r["expert"]], r))
    out = RESULTS / "compress_quality.json"
    old = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    keep = [r for r in old["rows"] if (r["expert"], r["variant"]) not in {(x["expert"], x["variant"]) for x in rows}]
    allrows = keep + rows
    allbases = {**old.get("bases", {}), **bases}
    out.write_text(json.dumps({"steps": STEPS, "bases": allbases, "rows": allrows}, indent=2) + "\n")
    md = markdown(allrows, allbases)
    (RESULTS / "compress_quality.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
