"""Runtime benchmark on SmolLM2-135M: memory, cold switch and mixed-expert decode throughput.

Needs the demo bundle (`make demo`: .cache/demo/base and .cache/demo/bundle with experts math
and code). Experts beyond the two real ones are synthetic: a real expert's compressed file with
its rows rotated (same sizes and statistics, different weights), for the memory and speed parts.

1. Resident memory (RSS of a fresh process, minus the same process with nothing loaded) with
   1, 4 and 16 experts, all compute-ready, against N full 16-bit experts loaded the ordinary way
   (AutoModelForCausalLM.from_pretrained), and against the size of base + N compressed deltas.
2. Cold switch: disk -> first token (packed load + compute-ready form + one token) for one expert,
   against loading the full expert checkpoint (from_pretrained; and safetensors.load_file +
   load_state_dict into a resident model, the fastest way to swap full weights).
3. Decode throughput of 8 concurrent requests spread over 1, 2, 4 and 8 experts, and of 16
   requests over 16 experts, against the bare base model in the same engine, dtype and batch
   size (the traffic limit 1 / (1 + E*b/B) beside each ratio: E experts of b effective bits next
   to B-bit base weights), and against swapping merged expert weights into the model between
   groups of requests (each group served alone; the merged weights are precomputed and resident,
   so a swap is only a copy: the fastest merged baseline).
4. Prefill: 8 chat prompts and their first token over 1 and 4 experts, against the bare base.
5. Where the time goes: torch profiler over decode steps of 8 requests on 4 experts.

The dtype is the runtime's default ("auto": bfloat16 where the CPU has native bf16, else float32;
--dtype to force one) for meswitch, the base and the merged baseline alike.

    .venv/bin/python benchmarks/runtime.py [--workdir .cache/demo] [--threads 1] [--tokens 48] [--dtype auto]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHAT = [
    "Tom has 12 apples and gives 5 to Anna. How many apples are left?",
    "Write a Python function that reverses a string.",
    "A train travels 60 km in 1.5 hours. What is its speed?",
    "Explain what a hash map is in two sentences.",
]


def rss_bytes() -> int:
    from meswitch.runtime.store import release_freed_memory

    release_freed_memory()  # the same for every configuration: freed temporaries are not counted
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ----- bundles with synthetic experts ---------------------------------------------------------------
def build_bundle(src: Path, out: Path, n: int) -> Path:
    """A copy of the demo bundle with n experts: the real ones, then synthetic ones."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from meswitch.bundle.format import Bundle

    if (out / "manifest.json").exists() and len(Bundle.open(out).experts) == n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src, out)
    b = Bundle.open(out)
    real = sorted(b.experts)
    for name in real[n:]:
        b.remove_expert(name)
    i = 0
    while len(b.experts) < n:
        donor = real[i % len(real)]
        f = src / b.experts[donor]["weights"]
        tensors = load_file(f)
        with safe_open(f, framework="pt") as sf:
            meta = dict(sf.metadata())
        shift = 1 + i
        # Rotate every per-row tensor of a matrix together (codes, step sizes, offsets, salient
        # values): a different expert with the same statistics and sizes.
        rolled = {k: (torch.roll(v, shift, 0) if v.dim() == 2 and v.shape[0] > 1 else v) for k, v in tensors.items()}
        name = f"synth{i:02d}"
        meta["expert"] = name
        staged = b.stage_raw(name, rolled, meta, lambda d, donor=donor: shutil.copytree(b.aux_dir(donor), d))
        entry = {k: v for k, v in b.experts[donor].items() if k not in ("name", "weights", "aux_dir", "files", "created")}
        entry["description"] = f"synthetic copy of {donor} (rows rotated by {shift})"
        b.commit([(staged, entry)])
        i += 1
    return out


# ----- 1. memory (each measurement in a fresh process) ---------------------------------------------------
def child_memory(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    before = rss_bytes()
    if args.mode == "empty":
        # The baseline process: every library and model class imported, no weights. Building
        # the model on the meta device loads transformers' modeling code (about 110 MiB of
        # heap and 25 MiB of code pages for Llama), which every process that runs the model
        # pays whatever it holds: code, not data, so not counted against the weights.
        from transformers import AutoConfig, AutoModelForCausalLM

        from meswitch.runtime import Switch  # noqa: F401
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.full), dtype=torch.bfloat16)
        return {"rss": rss_bytes() - before, "rss_total": rss_bytes()}
    if args.mode == "full":
        from transformers import AutoModelForCausalLM

        models = [AutoModelForCausalLM.from_pretrained(args.full, dtype=torch.bfloat16) for _ in range(args.n)]  # 16-bit experts
        with torch.inference_mode():  # page every weight in (safetensors may map them lazily)
            for m in models:
                m(input_ids=torch.tensor([[1, 2, 3]]))
        return {"rss_total": rss_bytes(), "models": len(models)}
    from meswitch.runtime import Switch

    sw = Switch.load(args.bundle, dtype=args.dtype, base_fingerprint_check=False, threads=args.threads)
    names = sw.experts[: args.n]
    for name in names:  # every expert resident and compute-ready
        sw.store.release(sw.store.acquire_blocking(name))
    sw.generate("hello", expert=None, max_tokens=1)  # page the base weights in, as for the full experts
    # serve 8 requests over the experts (up to 8 of them): a KV cache in use, as when serving
    sw.generate([[{"role": "user", "content": CHAT[i % 4]}] for i in range(8)],
                expert=[names[i % min(8, len(names))] for i in range(8)], max_tokens=4, temperature=0)
    s = sw.stats()
    base_bytes = sum(p.numel() * p.element_size() for p in sw.model.parameters())
    out = {"rss_total": rss_bytes(), "expert_memory_bytes": s["expert_memory_bytes"], "kv_cache_bytes": s["kv_cache_bytes"],
           "base_param_bytes": base_bytes, "residency": s["residency"], "dtype": str(sw.dtype)}
    sw.close()
    return out


def run_child(*extra) -> dict:
    cmd = [sys.executable, __file__, "--child", *map(str, extra)]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"child {extra} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def measure_memory(bundles: dict[int, Path], full_dir: Path, threads: int, dtype: str) -> list[dict]:
    from meswitch.bundle.format import Bundle

    empty = run_child("--mode", "empty", "--full", full_dir, "--threads", threads)["rss_total"]
    full_bytes = sum(f.stat().st_size for f in full_dir.glob("*.safetensors"))
    rows = []
    for n, bdir in sorted(bundles.items()):
        b = Bundle.open(bdir)
        deltas = sum((bdir / e["weights"]).stat().st_size for e in b.experts.values())
        full = run_child("--mode", "full", "--n", n, "--full", full_dir, "--threads", threads)["rss_total"] - empty
        r = run_child("--mode", "switch", "--bundle", bdir, "--n", n, "--threads", threads, "--dtype", dtype)
        resident = r["rss_total"] - empty
        # the base as held in the run's dtype (a float32 run holds twice the 16-bit file) + the delta files
        ref = r["base_param_bytes"] + deltas
        accounted = r["base_param_bytes"] + r["expert_memory_bytes"]
        rows.append({"experts": n, "hot": n, "dtype": r["dtype"], "switch_rss_mib": resident / 2**20,
                     "switch_rss_without_kv_mib": (resident - r["kv_cache_bytes"]) / 2**20,
                     "ratio_without_kv": (resident - r["kv_cache_bytes"]) / ref, "delta_files_mib": deltas / 2**20,
                     "base_plus_deltas_mib": ref / 2**20, "ratio_to_base_plus_deltas": resident / ref,
                     "full_experts_rss_mib": full / 2**20, "full_experts_file_mib": n * full_bytes / 2**20,
                     "saving_vs_full": full / resident, "expert_memory_mib": r["expert_memory_bytes"] / 2**20,
                     "accounted_mib": accounted / 2**20, "accounted_ratio": accounted / ref})
        print(f"  memory: {n} experts, all compute-ready: switch {resident / 2**20:.0f} MiB "
              f"({resident / ref:.2f}x base+deltas {ref / 2**20:.0f} MiB), full experts {full / 2**20:.0f} MiB", flush=True)
    # What the further compute-ready experts add to the process (beyond the first row's), against
    # what their files hold.
    for r in rows[1:]:
        r["marginal_rss_per_file_byte"] = ((r["switch_rss_without_kv_mib"] - rows[0]["switch_rss_without_kv_mib"])
                                           / (r["delta_files_mib"] - rows[0]["delta_files_mib"]))
    return rows


# ----- 2. cold switch --------------------------------------------------------------------------------
def measure_cold_switch(bundle: Path, full_dir: Path, threads: int, dtype: str, reps: int = 5) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from meswitch.runtime import Switch

    torch.set_num_threads(threads)
    sw = Switch.load(bundle, dtype=dtype, base_fingerprint_check=False, threads=threads)
    name = sw.experts[0]
    prompt = "Hello"
    sw.generate(prompt, expert=name, max_tokens=1)  # read once: page cache warm, file verified, as for the full checkpoint below
    cold, load_part, build_part, hot = [], [], [], []
    for _ in range(reps):
        # hot: the same request with the expert already compute-ready (what a switch adds = cold - hot)
        t = time.perf_counter()
        sw.generate(prompt, expert=name, max_tokens=1)
        hot.append(time.perf_counter() - t)
        # cold: disk -> first token (load the packed delta, build the compute-ready form, one forward)
        assert sw.store.evict(name)  # back to disk, as when evicted under the memory budget
        s0 = dict(sw.store.stats)
        t = time.perf_counter()
        sw.generate(prompt, expert=name, max_tokens=1)
        cold.append(time.perf_counter() - t)
        load_part.append(sw.store.stats["load_seconds"] - s0["load_seconds"])
        build_part.append(sw.store.stats["build_seconds"] - s0["build_seconds"])
    sw.close()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.bfloat16)  # warm the page cache
    full, state, resident = [], [], []
    model = AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.bfloat16)
    for _ in range(reps):
        # the full expert already resident: the forward pass alone (what loading adds = full - resident)
        t = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids)
        resident.append(time.perf_counter() - t)
        # full expert: load -> first token (safetensors maps lazily: the forward pass reads the weights)
        t = time.perf_counter()
        m = AutoModelForCausalLM.from_pretrained(full_dir, dtype=torch.bfloat16)
        with torch.inference_mode():
            m(input_ids=ids)
        full.append(time.perf_counter() - t)
        del m
        t = time.perf_counter()
        sd = {}
        for f in sorted(full_dir.glob("*.safetensors")):
            sd.update(load_file(f))
        model.load_state_dict(sd, strict=False)
        with torch.inference_mode():
            model(input_ids=ids)
        state.append(time.perf_counter() - t)
    med = statistics.median
    r = {"compressed_cold_s": med(cold), "compressed_load_s": med(load_part), "compressed_build_s": med(build_part),
         "full_from_pretrained_s": med(full), "full_load_state_dict_s": med(state),
         "compressed_hot_s": med(hot), "full_resident_forward_s": med(resident)}
    r["speedup_vs_from_pretrained"] = r["full_from_pretrained_s"] / r["compressed_cold_s"]
    # The time the switch itself adds, the first token's forward pass taken off on both sides.
    r["compressed_switch_added_s"] = r["compressed_cold_s"] - r["compressed_hot_s"]
    r["full_load_added_s"] = r["full_from_pretrained_s"] - r["full_resident_forward_s"]
    r["switch_added_speedup"] = r["full_load_added_s"] / max(r["compressed_switch_added_s"], 1e-9)
    r["speedup_vs_load_state_dict"] = r["full_load_state_dict_s"] / r["compressed_cold_s"]
    print("  cold switch: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    return r


# ----- 3. throughput ---------------------------------------------------------------------------------
def chats(n):
    return [[{"role": "user", "content": CHAT[i % len(CHAT)]}] for i in range(n)]


def run_batch(sw, experts, tokens):
    t = time.perf_counter()
    outs = sw.generate(chats(len(experts)), expert=experts, temperature=0, max_tokens=tokens, ignore_eos=True)
    dt = time.perf_counter() - t
    assert all(o.finish_reason == "length" for o in outs), [o.error for o in outs]
    return sum(o.completion_tokens for o in outs) / dt


def merged_weights(sw, expert: str) -> dict:
    """The expert's weights merged into the base's (W + delta), in the model's dtype, for every
    tensor the expert changes: what a server without delta layers keeps per expert."""
    import torch

    from meswitch.compression.delta import apply_delta

    params = dict(sw.model.named_parameters())
    pmap = {pname.replace(".base.", "."): pname for pname in params}  # delta layers hold the base module as `.base`
    with torch.no_grad():
        return {pmap[t]: apply_delta(params[pmap[t]].detach(), d, params[pmap[t]].dtype)
                for t, d in sw.store.read_packed(expert).items()}


def merged_swap(sw, experts, tokens, merged: dict):
    """Serve each expert's group alone with its precomputed merged weights copied into the
    model's parameters, then restore the base: what a server without delta layers does to share
    one model between experts, at its fastest (the merging itself is not timed)."""
    import torch

    params = dict(sw.model.named_parameters())
    original = {k: params[k].detach().clone() for m in merged.values() for k in m}
    groups: dict[str, int] = {}
    for e in experts:
        groups[e] = groups.get(e, 0) + 1
    t = time.perf_counter()
    total = 0
    swap_seconds = 0.0
    for expert, count in groups.items():
        ts = time.perf_counter()
        with torch.no_grad():
            for k, v in merged[expert].items():
                params[k].copy_(v)
        swap_seconds += time.perf_counter() - ts
        outs = sw.generate(chats(count), expert=None, temperature=0, max_tokens=tokens, ignore_eos=True)
        total += sum(o.completion_tokens for o in outs)
    dt = time.perf_counter() - t
    with torch.no_grad():
        for k, v in original.items():
            params[k].copy_(v)
    return total / dt, swap_seconds


def traffic_limit(experts: int, bits: float, dtype) -> float:
    """1 / (1 + E*b/B): the throughput ratio if every product were memory-bound, E experts of b
    effective bits read beside B-bit base weights each step."""
    import torch

    return 1.0 / (1.0 + experts * bits / torch.finfo(dtype).bits)


def bracketed(measure_base, measure_ours, repeats: int) -> list[tuple[float, float]]:
    """`repeats` rounds of base, meswitch, base (each meswitch number bracketed: the machine is
    noisy): [(mean of the two base numbers, the meswitch number)] per round."""
    rounds = []
    for _ in range(repeats):
        base = measure_base()
        ours = measure_ours()
        rounds.append(((base + measure_base()) / 2, ours))
    return rounds


def measure_throughput(bundle: Path, threads: int, tokens: int, dtype: str, repeats: int = 1) -> list[dict]:
    from meswitch.bundle.format import Bundle
    from meswitch.runtime import Switch

    b = Bundle.open(bundle)
    bits = statistics.mean(e["effective_bits"] for e in b.experts.values())
    sw = Switch.load(bundle, dtype=dtype, base_fingerprint_check=False, threads=threads, max_batch=16)
    names = sw.experts
    for name in names:  # every expert compute-ready first: this measures decoding, not loading
        sw.store.release(sw.store.acquire_blocking(name))
    run_batch(sw, [None] * 8, 4)  # warm-up
    rows = []
    med = statistics.median
    for n, batch in ((1, 8), (2, 8), (4, 8), (8, 8), (16, 16)):
        experts = [names[i % n] for i in range(batch)]
        # the medians are reported, every round is kept
        rounds = [{"base_tok_s": base, "meswitch_tok_s": ours, "ratio": ours / base}
                  for base, ours in bracketed(lambda: run_batch(sw, [None] * batch, tokens),
                                              lambda: run_batch(sw, experts, tokens), repeats)]
        merged = {e: merged_weights(sw, e) for e in dict.fromkeys(experts)} if n <= 8 else None
        swap, swap_s = merged_swap(sw, experts, tokens, merged) if merged else (None, None)
        del merged
        base_tps, ours = med(r["base_tok_s"] for r in rounds), med(r["meswitch_tok_s"] for r in rounds)
        limit = traffic_limit(n, bits, sw.dtype)
        rows.append({"experts": n, "requests": batch, "tokens_per_request": tokens, "dtype": str(sw.dtype),
                     "effective_bits": bits, "base_tok_s": base_tps, "meswitch_tok_s": ours,
                     "merged_swap_tok_s": swap, "merged_swap_copy_s": swap_s,
                     "ratio_to_base": med(r["ratio"] for r in rounds), "rounds": rounds,
                     "traffic_limit": limit, "ratio_to_merged_swap": ours / swap if swap else None})
        each = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
        print(f"  throughput: {batch} requests over {n} experts: {ours:.1f} tok/s = {rows[-1]['ratio_to_base']:.2f}x base "
              f"(rounds {each}; base {base_tps:.1f} tok/s; traffic limit {limit:.2f})"
              + (f", {ours / swap:.2f}x merged swap ({swap:.1f}, {swap_s:.2f} s copying)" if swap else ""), flush=True)
    sw.close()
    return rows


def measure_prefill(bundle: Path, threads: int, dtype: str, repeats: int = 3) -> list[dict]:
    """Prompt processing: 8 chat prompts (one prefill pass, ~350 tokens) and their first token, on
    the bare base and spread over 1 and 4 experts; `repeats` rounds of base, meswitch, base."""
    from meswitch.runtime import Switch

    sw = Switch.load(bundle, dtype=dtype, base_fingerprint_check=False, threads=threads, max_batch=16)
    names = sw.experts
    for name in names[:4]:
        sw.store.release(sw.store.acquire_blocking(name))

    def first_token(experts) -> float:
        t = time.perf_counter()
        sw.generate(chats(len(experts)), expert=experts, temperature=0, max_tokens=1, ignore_eos=True)
        return time.perf_counter() - t

    first_token([None] * 8)
    rows = []
    for n in (1, 4):
        experts = [names[i % n] for i in range(8)]
        rounds = [{"base_s": base, "meswitch_s": ours, "ratio": ours / base}
                  for base, ours in bracketed(lambda: first_token([None] * 8), lambda: first_token(experts), repeats)]
        med = statistics.median
        rows.append({"experts": n, "requests": 8, "base_s": med(r["base_s"] for r in rounds),
                     "meswitch_s": med(r["meswitch_s"] for r in rounds), "time_ratio": med(r["ratio"] for r in rounds),
                     "rounds": rounds})
        print(f"  prefill: 8 prompts over {n} experts: {rows[-1]['meswitch_s']:.3f} s vs base {rows[-1]['base_s']:.3f} s "
              f"= {rows[-1]['time_ratio']:.2f}x the base's time", flush=True)
    sw.close()
    return rows


# ----- 4. profile ---------------------------------------------------------------------------------
def profile_decode(bundle: Path, threads: int, dtype: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from meswitch.runtime import Switch

    sw = Switch.load(bundle, dtype=dtype, base_fingerprint_check=False, threads=threads, start=False)
    names = sw.experts
    for name in names[:4]:
        sw.store.release(sw.store.acquire_blocking(name))
    reqs = [sw.submit(c, names[i % 4], temperature=0, max_tokens=64, ignore_eos=True) for i, c in enumerate(chats(8))]
    while any(r.cursor < len(r.prompt_ids) for r in reqs):
        sw.engine.step()
    for _ in range(3):
        sw.engine.step()
    steps = 10
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            sw.engine.step()
        wall = (time.perf_counter() - t) / steps
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    top = [{"op": e.key, "share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps,
            "ms_per_step": e.self_cpu_time_total / steps / 1000} for e in events[:12]]
    sw.close()
    print(f"  profile: {wall * 1000:.1f} ms per decode step (8 requests, 4 experts)")
    for t in top[:8]:
        print(f"    {t['op']:<50} {t['share'] * 100:5.1f}%  {t['ms_per_step']:6.1f} ms/step  {t['calls_per_step']:6.0f} calls/step")
    return {"ms_per_step": wall * 1000, "top_ops": top}


# ----- report --------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    isa = f", kernel {res['kernel_isa']}, PyTorch {res['aten_cpu_capability']}" if "kernel_isa" in res else ""
    lines = [f"# Runtime benchmark (SmolLM2-135M, {res['dtype']}, CPU: {res['machine']}{isa})", "",
             f"Command: `.venv/bin/python benchmarks/runtime.py --threads {res['threads']} --tokens {res['tokens']}`"
             f" (dtype {res['dtype_arg']}). Synthetic experts are real compressed experts with rotated rows.", ""]
    if "memory" in res:
        lines += ["## Resident memory (every expert compute-ready)", "",
                  "Tensors = base weights (in the run's dtype) + expert deltas held by the store, counted exactly; "
                  "RSS = resident memory of a fresh process after serving 8 requests, minus a process with the "
                  "same libraries and model code loaded but no weights (includes the KV cache, the tokenizer and "
                  "allocator slack; without KV: the KV cache's bytes taken off). Marginal = RSS added by the "
                  "experts beyond the first row's, per byte of their delta files.", "",
                  "| experts | meswitch tensors | meswitch RSS | base + compressed deltas | tensors / that | RSS / that "
                  "| RSS without KV / that | marginal | N full 16-bit experts (RSS) | saving (RSS) |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["memory"]:
            marginal = f"{r['marginal_rss_per_file_byte']:.2f}x" if "marginal_rss_per_file_byte" in r else "-"
            lines.append(f"| {r['experts']} | {r['accounted_mib']:.0f} MiB | {r['switch_rss_mib']:.0f} MiB | "
                         f"{r['base_plus_deltas_mib']:.0f} MiB | {r['accounted_ratio']:.2f}x | {r['ratio_to_base_plus_deltas']:.2f}x | "
                         f"{r['ratio_without_kv']:.2f}x | {marginal} | "
                         f"{r['full_experts_rss_mib']:.0f} MiB | {r['saving_vs_full']:.1f}x |")
    if "cold_switch" in res:
        c = res["cold_switch"]
        lines += ["", "## Cold switch (one expert: disk -> first token; page cache warm for both)", "",
                  "| path | seconds |", "| --- | ---: |",
                  f"| meswitch: load packed delta + build compute-ready form + 1 token | {c['compressed_cold_s']:.3f} "
                  f"(load {c['compressed_load_s']:.3f} + build {c['compressed_build_s']:.3f}) |",
                  f"| full 16-bit expert: `from_pretrained` + 1 token | {c['full_from_pretrained_s']:.3f} (meswitch {c['speedup_vs_from_pretrained']:.2f}x faster) |",
                  f"| full 16-bit expert: `load_file` + `load_state_dict` into a resident model + 1 token | {c['full_load_state_dict_s']:.3f} "
                  f"(meswitch {c['speedup_vs_load_state_dict']:.2f}x faster) |"]
        if "compressed_hot_s" in c:
            lines += [f"| what switching adds (first token's forward taken off: meswitch cold - hot {c['compressed_hot_s']:.3f}; "
                      f"full - resident forward {c['full_resident_forward_s']:.3f}) | meswitch {c['compressed_switch_added_s']:.3f} "
                      f"vs full {c['full_load_added_s']:.3f}: {c['switch_added_speedup']:.2f}x |"]
    if "throughput" in res:
        lines += ["", "## Decode throughput", "",
                  "Traffic limit = 1 / (1 + E*b/B): the ratio if every product were bound by reading weights "
                  "(E experts of b effective bits beside B-bit base weights).", "",
                  "| requests | experts | meswitch tok/s | bare base tok/s | ratio to base | traffic limit | merged-swap tok/s | ratio to merged swap |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["throughput"]:
            swap = (f"{r['merged_swap_tok_s']:.1f} | {r['ratio_to_merged_swap']:.2f}" if r["merged_swap_tok_s"]
                    else "not run (16 merged copies) | -")
            lines.append(f"| {r['requests']} | {r['experts']} | {r['meswitch_tok_s']:.1f} | {r['base_tok_s']:.1f} | "
                         f"{r['ratio_to_base']:.2f} | {r['traffic_limit']:.2f} | {swap} |")
    if "prefill" in res:
        lines += ["", "## Prefill: 8 prompts and their first token (time; 1.00x = as fast as the bare base)", "",
                  "| experts | meswitch s | bare base s | meswitch / base |", "| ---: | ---: | ---: | ---: |"]
        for r in res["prefill"]:
            lines.append(f"| {r['experts']} | {r['meswitch_s']:.3f} | {r['base_s']:.3f} | {r['time_ratio']:.2f}x |")
    if "profile" in res:
        p = res["profile"]
        lines += ["", f"## Where the time goes (8 requests over 4 experts: {p['ms_per_step']:.1f} ms per decode step)", "",
                  "| op | share | ms/step | calls/step |", "| --- | ---: | ---: | ---: |"]
        for t in p["top_ops"][:8]:
            lines.append(f"| `{t['op']}` | {t['share'] * 100:.1f}% | {t['ms_per_step']:.1f} | {t['calls_per_step']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / ".cache" / "demo"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: robust to other load on the machine; all paths get the same)")
    ap.add_argument("--tokens", type=int, default=48, help="tokens generated per request in the throughput runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="auto", help="runtime dtype: auto (the default), float32, bfloat16")
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--full", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=3, help="throughput and prefill: rounds per configuration (medians reported)")
    ap.add_argument("--name", help="results file name (default: runtime, or runtime_partial with --skip)")
    ap.add_argument("--skip", action="append", default=[], choices=["memory", "cold", "throughput", "prefill", "profile"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child_memory(args)))
        return
    work = Path(args.workdir)
    src = work / "bundle"
    if not (src / "manifest.json").exists():
        sys.exit(f"no demo bundle at {src}: run `make demo` first")
    bench = work / "bench_runtime"
    bundles = {n: build_bundle(src, bench / f"bundle{n}", n) for n in (1, 4, 16)}
    full_dir = bench / "full_expert"
    if not (full_dir / "config.json").exists():
        from meswitch.cli import main as cli

        from meswitch.bundle.format import Bundle

        first = sorted(Bundle.open(src).experts)[0]
        assert cli(["materialize", str(src), first, "--out", str(full_dir)]) == 0
    from meswitch.hardware import resolve_dtype

    import torch

    from meswitch.runtime import cpu_kernel

    cpu_kernel.load()
    res = {"threads": args.threads, "tokens": args.tokens, "machine": f"{os.cpu_count()} CPUs",
           "kernel_isa": cpu_kernel.select_isa(""), "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "dtype_arg": args.dtype, "dtype": str(resolve_dtype(args.dtype)).replace("torch.", "")}
    t0 = time.time()
    if "memory" not in args.skip:
        print("resident memory", flush=True)
        res["memory"] = measure_memory(bundles, full_dir, args.threads, args.dtype)
    if "cold" not in args.skip:
        print("cold switch", flush=True)
        res["cold_switch"] = measure_cold_switch(bundles[4], full_dir, args.threads, args.dtype)
    if "throughput" not in args.skip:
        print("throughput", flush=True)
        res["throughput"] = measure_throughput(bundles[16], args.threads, args.tokens, args.dtype, args.repeats)
    if "prefill" not in args.skip:
        print("prefill", flush=True)
        res["prefill"] = measure_prefill(bundles[4], args.threads, args.dtype, args.repeats)
    if "profile" not in args.skip:
        print("profile", flush=True)
        res["profile"] = profile_decode(bundles[4], args.threads, args.dtype)
    res["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("runtime" if not args.skip else "runtime_partial")
    (out / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(res))
    print(markdown(res))
    print(f"wrote {out / (name + '.json')} ({res['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
