"""Load test of `meswitch serve` on the demo's SmolLM2 bundle, through the official openai client.

Starts the server in a subprocess, then N concurrent clients send chat requests for T seconds,
spread over `auto` (routed), each expert and the base. Reports requests/s, generated tokens/s,
latency p50/p99, time to first token (streaming clients), errors (must be 0), and the server's
resident memory before and after.

    .venv/bin/python benchmarks/server_load.py [--workdir .cache/demo] [--clients 8] [--seconds 60]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "Tom has 12 apples and gives 5 to Anna. How many apples are left?",
    "A shop sells pens at 3 dollars each. How much do 7 pens cost?",
    "Write a Python function that returns the largest element of a list.",
    "Write a Python function that counts the vowels in a string.",
    "Give me three tips for staying focused while studying.",
    "What is the capital of France? Answer in one sentence.",
]


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def wait_for_models(client: openai.OpenAI, proc: subprocess.Popen, seconds: float = 180) -> list[str]:
    """The served model ids, once the server answers (exits if it died or did not start in time)."""
    deadline = time.time() + seconds
    while True:
        try:
            return [m.id for m in client.models.list().data]
        except openai.APIConnectionError:
            if proc.poll() is not None or time.time() > deadline:
                sys.exit(f"server did not start:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.5)


def pct(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "demo"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    bundle = Path(args.workdir) / "bundle"
    if not (bundle / "manifest.json").exists():
        sys.exit(f"no bundle at {bundle}: run `make demo` first")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "meswitch.cli", "serve", str(bundle), "--port", str(port),
                             "--threads", str(args.threads), "--max-batch", str(max(8, args.clients))],
                            env=env, stderr=subprocess.PIPE, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    models = wait_for_models(client, proc)
    targets = [m for m in models]  # auto, base and every expert
    client.chat.completions.create(model=targets[-1], messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    rss_before = rss_of(proc.pid)
    lat, ttft, tokens, errors, per_model = [], [], [0], [], {}
    lock = threading.Lock()
    stop_at = time.time() + args.seconds

    def worker(i: int) -> None:
        rng = random.Random(i)
        while time.time() < stop_at:
            model = targets[rng.randrange(len(targets))]
            q = QUESTIONS[rng.randrange(len(QUESTIONS))]
            t0 = time.perf_counter()
            try:
                if i % 2:  # half the clients stream
                    first, n, answered = None, 0, model
                    stream = client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": q}], max_tokens=args.max_tokens,
                        stream=True, stream_options={"include_usage": True})
                    for ch in stream:
                        answered = ch.model
                        if ch.choices and ch.choices[0].delta.content and first is None:
                            first = time.perf_counter() - t0
                        if ch.usage:
                            n = ch.usage.completion_tokens
                else:
                    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                       max_tokens=args.max_tokens)
                    first, n, answered = None, r.usage.completion_tokens, r.model
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    tokens[0] += n
                    if first is not None:
                        ttft.append(first)
                    key = f"{model}->{answered}"
                    per_model[key] = per_model.get(key, 0) + 1
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    t_start = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t_start
    rss_after = rss_of(proc.pid)
    proc.terminate()
    proc.wait(30)
    res = {"clients": args.clients, "seconds": wall, "max_tokens": args.max_tokens, "threads": args.threads,
           "requests": len(lat), "errors": len(errors), "error_samples": errors[:5],
           "requests_per_s": len(lat) / wall, "tokens_per_s": tokens[0] / wall,
           "latency_p50_s": pct(lat, 0.5), "latency_p99_s": pct(lat, 0.99),
           "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
           "rss_before_mib": rss_before / 2**20, "rss_after_mib": rss_after / 2**20, "routed": per_model,
           "mean_latency_s": statistics.mean(lat) if lat else float("nan")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "server_load.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["# Server load test (SmolLM2-135M demo bundle, CPU)", "",
          f"Command: `.venv/bin/python benchmarks/server_load.py --clients {args.clients} --seconds {args.seconds:g} "
          f"--max-tokens {args.max_tokens} --threads {args.threads}`", "",
          "| clients | requests | errors | req/s | tokens/s | latency p50 | latency p99 | TTFT p50 (stream) | RSS before -> after |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
          f"| {args.clients} | {len(lat)} | {len(errors)} | {res['requests_per_s']:.2f} | {res['tokens_per_s']:.1f} | "
          f"{res['latency_p50_s']:.2f} s | {res['latency_p99_s']:.2f} s | {res['ttft_p50_s']:.2f} s | "
          f"{res['rss_before_mib']:.0f} -> {res['rss_after_mib']:.0f} MiB |", ""]
    (out / "server_load.md").write_text("\n".join(md))
    print("\n".join(md))
    print(json.dumps(per_model, indent=1))
    if errors:
        print("errors:", *errors[:5], sep="\n  ")
        sys.exit(1)


if __name__ == "__main__":
    main()
