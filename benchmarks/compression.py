"""Compression methods side by side on the demo's SmolLM2 experts (run `make demo` first).

Each configuration compresses both experts into its own bundle with `meswitch compress` and
the manifest's numbers are collected: effective bits per parameter (every stored byte), size
ratio against the 16-bit expert, and quality against the uncompressed expert on held-out
samples (KL, top-1 agreement, perplexities).

Calibration / held-out samples: real data when ../shared/data is present (GSM8K train for the
math expert, CodeAlpaca for the code expert; benchmarks may read it, the project never ships
it), else the demo's generated calibration files. 25% of the samples are held out.

    .venv/bin/python benchmarks/compression.py [--workdir .cache/demo] [--samples 64]
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"

CONFIGS = [
    ("fp16 (lossless)", ["--method", "fp16"]),
    ("bitdelta 1-bit", ["--method", "bitdelta"]),
    ("rtn 2-bit", ["--method", "rtn", "--bits", "2"]),
    ("rtn 2-bit, groups of 64", ["--method", "rtn", "--bits", "2", "--group-size", "64"]),
    ("mixed 2-bit, 1% salient", ["--method", "mixed", "--bits", "2", "--salient", "0.01"]),
    ("mixed 2-bit, 1% salient, tuned", ["--method", "mixed", "--bits", "2", "--salient", "0.01", "--tune-steps", "64"]),
    ("rtn 3-bit", ["--method", "rtn", "--bits", "3"]),
    ("mixed 3-bit, 1% salient", ["--method", "mixed", "--bits", "3", "--salient", "0.01"]),
]


def real_calibration(out: Path, n: int, seed: int = 0) -> dict[str, Path] | None:
    """Write calibration files from ../shared data, or return None if it is not there."""
    gsm = SHARED / "gsm8k" / "train.jsonl"
    code = SHARED / "codealpaca" / "code_alpaca_2k.json"
    if not (gsm.is_file() and code.is_file()):
        return None
    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in gsm.read_text().splitlines() if line.strip()]
    math = [{"prompt": r["question"], "response": r["answer"]} for r in rng.sample(rows, n)]
    items = json.loads(code.read_text())
    picked = rng.sample(items, n)
    codes = [{"prompt": (r["instruction"] + ("\n" + r["input"] if r.get("input") else "")), "response": r["output"]}
             for r in picked]
    files = {}
    for name, samples in (("math", math), ("code", codes)):
        f = out / f"{name}_real.jsonl"
        f.write_text("".join(json.dumps(s) + "\n" for s in samples))
        files[name] = f
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "demo"))
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--only", nargs="*", help="run only configurations whose label contains one of these")
    p.add_argument("--out", default=None, help="write the table (markdown) and raw numbers (json) here")
    args = p.parse_args()
    work = Path(args.workdir)
    base, experts = work / "base", {n: work / "experts" / n for n in ("math", "code")}
    if not (base / "model.safetensors").is_file() or not all((e / "model.safetensors").is_file() for e in experts.values()):
        sys.exit(f"no demo models under {work}: run `make demo` first")
    bench = work / "bench"
    calib = real_calibration(bench / "calib", args.samples)
    source = "GSM8K / CodeAlpaca (../shared/data)"
    if calib is None:
        calib = {n: work / "data" / f"{n}_calib.jsonl" for n in experts}
        source = "demo-generated calibration files"
    rows = []
    for label, flags in CONFIGS:
        if args.only and not any(o in label for o in args.only):
            continue
        out = bench / label.replace(" ", "_").replace(",", "").replace("%", "pct").replace("(", "").replace(")", "")
        cmd = [sys.executable, "-m", "meswitch.cli", "compress", "--base", str(base), "--out", str(out), "--overwrite",
               "--calib-samples", str(args.samples), *flags]
        for n, e in experts.items():
            cmd += ["--expert", f"{n}={e}", "--calib", f"{n}={calib[n]}"]
        t = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        m = json.loads((out / "manifest.json").read_text())
        for n in experts:
            e = m["experts"][n]
            rows.append({"config": label, "expert": n, "seconds": round(time.time() - t, 1), **{
                k: e[k] for k in ("effective_bits", "compression_ratio_vs_16bit", "bytes")}, **e["quality"],
                "tuning": e.get("tuning", {})})
        print(f"{label}: done in {time.time() - t:.0f} s", file=sys.stderr)

    lines = [f"Held-out samples: {source}, {args.samples} per expert, 25% held out.", "",
             "| configuration | expert | bits/param | vs 16-bit | KL (nats) | top-1 agree | ppl expert -> compressed |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['expert']} | {r['effective_bits']:.3f} | {r['compression_ratio_vs_16bit']:.2f}x "
                     f"| {r['kl']:.4f} | {r['top1_agreement']:.3f} | {r['ppl_expert']:.3f} -> {r['ppl_reconstructed']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
