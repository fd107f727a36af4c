"""Soak test of `meswitch serve`: N clients for T seconds, a memory budget that holds only part of
the experts, and an admin thread that adds and removes an expert through the admin API meanwhile.

    .venv/bin/python benchmarks/soak.py [--workdir .cache/demo] [--clients 16] [--seconds 600]
                                        [--max-memory 200MiB] [--admin-every 20] [--threads 2]

The server serves a copy of the demo bundle (the admin calls write to it) in float32, so that a
greedy answer does not depend on what it is batched with. Before the load, every (model, question)
pair is asked alone: that is its reference answer. During the load each client sends greedy
requests (half of them streaming) for `auto`, `base`, every expert and the expert the admin
thread keeps adding and removing (`soak-extra`, a copy of the first expert, so it has that
expert's reference answers). Reported:

- requests, errors by HTTP status (a 404 for `soak-extra` while it is removed is expected and
  counted apart), lost responses (connection errors, timeouts, a stream that ends without its
  final chunk), garbled responses (an answer that differs from the reference of the expert that
  answered it), latency p50/p99, the server's RSS every 5 s, admin calls and their failures.
- Targets: 0 5xx, 0 lost, 0 garbled, RSS flat after warm-up: the mean of the last fifth of the
  run within 10% of the mean of its second fifth.

Results: benchmarks/results/soak.json and soak.md (with --out).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_load import QUESTIONS, ROOT, pct, rss_of, wait_for_models  # noqa: E402

EXTRA = "soak-extra"
ADMIN_KEY = "soak-admin-key"


def admin_call(url: str, method: str, path: str, body: dict | None = None) -> int:
    req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_KEY}"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def start_server(bundle: Path, source_dir: Path, args) -> tuple[subprocess.Popen, str]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    env = dict(os.environ, HF_HUB_OFFLINE="1", MESWITCH_ADMIN_KEY=ADMIN_KEY)
    proc = subprocess.Popen([sys.executable, "-m", "meswitch.cli", "serve", str(bundle), "--port", str(port),
                             "--threads", str(args.threads), "--dtype", "float32", "--max-memory", args.max_memory,
                             "--source-dir", str(source_dir)], env=env, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"


def ask(client: openai.OpenAI, model: str, q: str, max_tokens: int, stream: bool) -> tuple[str, str, bool]:
    """-> (text, the expert that answered, complete: the response ended as it should)."""
    messages = [{"role": "user", "content": q}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.model, r.choices[0].finish_reason in ("stop", "length")
    pieces, answered, finished = [], model, False
    for ch in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                             stream=True):
        answered = ch.model
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        if ch.choices and ch.choices[0].finish_reason:
            finished = True
    return "".join(pieces), answered, finished


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "demo"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--max-memory", default="200MiB", help="server memory budget (the demo's experts need about "
                                                           "110 MiB each, packed + compute-ready)")
    ap.add_argument("--admin-every", type=float, default=20, help="seconds between adding and removing soak-extra")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for soak.json / soak.md (default: print only)")
    args = ap.parse_args()
    source = Path(args.workdir) / "bundle"
    if not (source / "manifest.json").exists():
        sys.exit(f"no bundle at {source}: run `make demo` first")
    live = Path(args.workdir) / "soak" / "bundle"
    shutil.rmtree(live.parent, ignore_errors=True)
    shutil.copytree(source, live)
    proc, url = start_server(live, source.parent, args)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    try:
        models = wait_for_models(client, proc, 300)
        experts = [m for m in models if m not in ("auto", "base")]
        # reference answers, each request alone (the server idle otherwise)
        refs = {}
        for model in ["base", *experts]:
            for q in QUESTIONS:
                refs[(model, q)] = ask(client, model, q, args.max_tokens, False)[0]
        for q in QUESTIONS:
            refs[(EXTRA, q)] = refs[(experts[0], q)]
        print(f"references: {len(refs)} answers; load: {args.clients} clients for {args.seconds:g} s", flush=True)

        stats = {"requests": 0, "ok": 0, "errors": {}, "error_samples": [], "expected_404": 0, "lost": 0,
                 "garbled": 0, "latency": [], "samples": [], "admin_calls": 0, "admin_failures": []}
        lock = threading.Lock()
        rss = []
        t_start = time.time()
        stop_at = t_start + args.seconds
        extra_present = threading.Event()

        def client_loop(i: int) -> None:
            rng = random.Random(i)
            targets = ["auto", "base", *experts, EXTRA]
            while time.time() < stop_at:
                model, q = rng.choice(targets), rng.choice(QUESTIONS)
                t0 = time.perf_counter()
                try:
                    text, answered, complete = ask(client, model, q, args.max_tokens, stream=bool(i % 2))
                    with lock:
                        stats["requests"] += 1
                        stats["latency"].append(time.perf_counter() - t0)
                        ref = refs.get((answered, q))
                        if not complete:
                            stats["lost"] += 1
                        elif ref is None or text != ref:
                            stats["garbled"] += 1
                            if len(stats["samples"]) < 5:
                                stats["samples"].append({"model": model, "answered": answered, "q": q, "got": text,
                                                         "ref": ref})
                        else:
                            stats["ok"] += 1
                except openai.APIStatusError as e:
                    with lock:
                        stats["requests"] += 1
                        if e.status_code == 404 and model == EXTRA:
                            stats["expected_404"] += 1
                        else:
                            stats["errors"][str(e.status_code)] = stats["errors"].get(str(e.status_code), 0) + 1
                            if len(stats["error_samples"]) < 5:
                                stats["error_samples"].append(f"{model}: {e.status_code} {e.message}")
                except (openai.APIConnectionError, openai.APITimeoutError):
                    with lock:
                        stats["requests"] += 1
                        stats["lost"] += 1

        def admin_loop() -> None:
            while time.time() < stop_at:
                if extra_present.is_set():
                    status = admin_call(url, "DELETE", f"/admin/experts/{EXTRA}")
                    extra_present.clear()
                else:
                    status = admin_call(url, "POST", "/admin/experts",
                                        {"name": EXTRA, "source": source.name, "source_name": experts[0]})
                    extra_present.set()
                with lock:
                    stats["admin_calls"] += 1
                    if status != 200:
                        stats["admin_failures"].append(status)
                time.sleep(args.admin_every / 2)

        def rss_loop() -> None:
            while time.time() < stop_at:
                rss.append((round(time.time() - t_start, 1), rss_of(proc.pid) / 2**20))
                time.sleep(5)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        threads += [threading.Thread(target=admin_loop), threading.Thread(target=rss_loop)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t_start
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    n = len(rss)
    warm = [m for _, m in rss[n // 5: 2 * n // 5]] or [m for _, m in rss]
    last = [m for _, m in rss[4 * n // 5:]] or [m for _, m in rss]
    growth = statistics.mean(last) / statistics.mean(warm) if rss else float("nan")
    five_xx = sum(v for k, v in stats["errors"].items() if k.startswith("5"))
    res = {"clients": args.clients, "seconds": wall, "max_tokens": args.max_tokens, "max_memory": args.max_memory,
           "threads": args.threads, "admin_every_s": args.admin_every, "requests": stats["requests"],
           "ok": stats["ok"], "errors_by_status": stats["errors"], "error_samples": stats["error_samples"],
           "expected_404_while_removed": stats["expected_404"],
           "lost": stats["lost"], "garbled": stats["garbled"], "garbled_samples": stats["samples"],
           "latency_p50_s": pct(stats["latency"], 0.5), "latency_p99_s": pct(stats["latency"], 0.99),
           "admin_calls": stats["admin_calls"], "admin_failures": stats["admin_failures"],
           "rss_mib_over_time": rss, "rss_last_fifth_vs_second_fifth": growth,
           "targets_met": {"no_5xx": five_xx == 0, "no_lost": stats["lost"] == 0, "no_garbled": stats["garbled"] == 0,
                           "rss_flat_within_10pct": abs(growth - 1) <= 0.10}}
    md = ["# Soak test (`meswitch serve`, demo bundle, float32)", "",
          f"Command: `.venv/bin/python benchmarks/soak.py --clients {args.clients} --seconds {args.seconds:g} "
          f"--max-memory {args.max_memory} --admin-every {args.admin_every:g} --threads {args.threads}`", "",
          "| clients | seconds | requests | 5xx | other errors | lost | garbled | p50 | p99 | admin calls (failed) | RSS last/warm |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
          f"| {args.clients} | {wall:.0f} | {stats['requests']} | {five_xx} | "
          f"{sum(stats['errors'].values()) - five_xx} | {stats['lost']} | {stats['garbled']} | "
          f"{res['latency_p50_s']:.2f} s | {res['latency_p99_s']:.2f} s | {stats['admin_calls']} "
          f"({len(stats['admin_failures'])}) | {growth:.2f}x |", ""]
    print("\n".join(md))
    print(json.dumps({k: v for k, v in res.items() if k != "rss_mib_over_time"}, indent=1))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps(res, indent=2) + "\n")
        (out / "soak.md").write_text("\n".join(md))
    if not all(res["targets_met"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
