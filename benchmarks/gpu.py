"""GPU benchmark: meswitch's runtime and Triton delta kernel on one CUDA device (issue 12).

Self-contained (nothing downloaded; the demo part needs `make demo` to have been run), at most
~8 minutes on one GPU; writes benchmarks/results/gpu.json.

1. Synthetic Llama-2-7B-shaped base (random bf16 weights, 32 layers, hidden 4096) with 16
   synthetic experts compressed as `meswitch compress` stores them by default (2-bit codes, 1%
   salient fp16 columns, per-row step size and offset; embedding and LM head included; fp16
   norms): random codes, exact sizes. The experts are made hot directly (build_hot_expert), not
   read from a bundle (a 7B bundle on disk would take most of the time budget to write).
   a. GPU memory: base + 16 deltas against their stored size (target: <= 1.1x, plus the KV cache).
   b. Throughput (prompt 32 tokens, 64 generated, ignore_eos): the base alone vs 32 and 64
      requests spread over the 16 experts (target >= 0.6x the base), in the same engine, and
      vs swapping merged weights (each expert's requests served alone, its full 16-bit weights
      copied in from pinned host memory before).
   c. Per layer: the Triton kernel vs the base GEMM, for the 7B shapes, 32 and 64 tokens over 16
      experts, and the dense route (dequantize + GEMM) used for long prompt segments.
2. The demo bundle (SmolLM2-135M, `make demo`) on the GPU: tokens/s of the base vs the experts.

    .venv/bin/python benchmarks/gpu.py                # on a machine with a CUDA GPU (CUDA torch, triton,
                                                      # transformers; or `PYTHONPATH=. python3 benchmarks/gpu.py`
                                                      # with a Python that has them: the repo needs no install)
    .venv/bin/python benchmarks/gpu.py --dry-run      # tiny shapes on the CPU (Triton interpreter):
                                                      # checks the code paths, measures nothing
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
BITS, SALIENT = 2, 0.01  # `meswitch compress` defaults (method mixed, group size 0)


class Timer:
    """Wall time of GPU work (synchronized before and after)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self.sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.sync()
        self.seconds = time.perf_counter() - self.t0


def bench_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn() (CUDA: triton's do_bench, which flushes the L2 cache)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


# ----- synthetic base and experts ---------------------------------------------------------------------
def build_base(cfg: dict, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from meswitch.runtime.attention import register_attention

    config = LlamaConfig(**cfg, bos_token_id=1, eos_token_id=2)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)  # random init on the device (values do not matter)
    finally:
        torch.set_default_dtype(default)
    model.set_attn_implementation(register_attention())
    return model.eval()


def synthetic_delta(out: int, cols: int, g: torch.Generator, device: torch.device):
    """A 2-bit salient-aware delta with the stored layout and sizes of a real one; random content."""
    from meswitch.compression.delta import QuantizedDelta
    from meswitch.compression.packing import packed_row_bytes
    from meswitch.compression.quantizer import AffineParams

    k = max(0, min(int(round(SALIENT * cols)), cols - 1))
    n = cols - k
    sal = torch.randperm(cols, generator=g, device=device)[:k].sort().values.to(torch.int32)
    codes = torch.randint(0, 256, (out, packed_row_bytes(n, BITS)), generator=g, dtype=torch.uint8, device=device)
    if (n * BITS) % 8:  # unused bits at the end of a row are 0 (docs/FORMAT.md)
        codes[:, -1] &= (1 << ((n * BITS) % 8)) - 1
    scale = (torch.rand(out, 1, generator=g, device=device) * 1e-3 + 1e-4).to(torch.float16)
    offset = (-1.5 * scale.float()).to(torch.float16)
    salient = (torch.randn(out, k, generator=g, device=device) * 1e-3).to(torch.float16)
    return QuantizedDelta((out, cols), BITS, codes, AffineParams(scale, offset, 0), sal, salient)


def synthetic_expert(shapes: dict, seed: int, device: torch.device) -> dict:
    """Deltas for every 2-D weight (quantized) and every norm (fp16), as `meswitch compress` writes."""
    from meswitch.compression.delta import DenseDelta

    g = torch.Generator(device=device).manual_seed(seed)  # made on the device: 16 x 7B codes in seconds
    deltas = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            deltas[name] = synthetic_delta(shape[0], shape[1], g, device)
        else:
            deltas[name] = DenseDelta((torch.randn(shape, generator=g, device=device) * 1e-3).to(torch.float16))
    return deltas


class ResidentExperts:
    """The engine's view of an expert store, for experts already hot in memory (the benchmark
    builds them directly instead of reading a bundle): acquire / release / prefetch."""

    def __init__(self, hot: dict):
        self.hot = hot
        self.bundle = type("Experts", (), {"experts": hot})()

    @property
    def names(self):
        return sorted(self.hot)

    def acquire(self, name, since=0.0, protect=()):
        return self.hot[name]

    def acquire_blocking(self, name, timeout=None):
        return self.hot[name]

    def release(self, hot) -> None:
        pass

    def prefetch(self, name) -> None:
        pass


class NullTokenizer:
    """Generated ids are not detokenized (random weights: the text means nothing)."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def run_requests(engine, experts: list, prompt_len: int, tokens: int, vocab: int, seed: int = 0) -> float:
    """Submit one request per entry of `experts` at once; tokens/s of generated tokens (prefill included)."""
    from meswitch.runtime.engine import Request, SamplingParams

    g = torch.Generator().manual_seed(seed)
    reqs = [Request(torch.randint(3, vocab, (prompt_len,), generator=g).tolist(), e,
                    SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), NullTokenizer(), frozenset())
            for e in experts]
    t0 = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    outs = [r.wait(3600) for r in reqs]
    dt = time.perf_counter() - t0
    bad = [o for o in outs if o.finish_reason != "length" or o.completion_tokens != tokens]
    if bad:
        raise RuntimeError(f"request failed: {bad[0].finish_reason} {bad[0].error}")
    return len(reqs) * tokens / dt


def synthetic_part(args, device: torch.device, dtype: torch.dtype, res: dict) -> None:
    """Fills `res` as it goes (what was measured before a failure is kept)."""
    from meswitch.runtime.backend import get_backend
    from meswitch.runtime.engine import Engine
    from meswitch.runtime.layers import DeltaContext, build_hot_expert, install_delta_layers

    cfg = TINY if args.dry_run else LLAMA2_7B
    res.update({"shape": "tiny" if args.dry_run else "Llama-2-7B", "config": cfg, "bits": BITS, "salient": SALIENT})
    cuda = device.type == "cuda"
    mem0 = torch.cuda.memory_allocated(device) if cuda else 0
    with Timer(device) as t:
        model = build_base(cfg, dtype, device)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    res["base_bytes"] = base_bytes
    res["base_build_s"] = t.seconds
    print(f"base: {base_bytes / 2**30:.2f} GiB in {t.seconds:.1f} s", flush=True)
    be = get_backend(args.backend, device)
    res["backend"] = be.name
    ctx = DeltaContext(be)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # the names a bundle uses
    wrapped = install_delta_layers(model, ctx)

    hot, stored = {}, 0
    mem_base = torch.cuda.memory_allocated(device) if cuda else 0
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_bytes = (2 * cfg["num_hidden_layers"] * max(args.requests) * cfg["num_key_value_heads"] * head_dim
                * (args.prompt + args.tokens + 1) * dtype.itemsize)
    with Timer(device) as t:
        for i in range(args.experts):
            if cuda and hot:  # a smaller GPU holds fewer experts: keep room for one more, the KV cache and 4 GiB
                one = stored / len(hot)
                if torch.cuda.mem_get_info(device)[0] < 2 * one + kv_bytes + (4 << 30):
                    res["experts_limited_by_memory"] = True
                    print(f"only {len(hot)} experts fit on this GPU", flush=True)
                    break
            deltas = synthetic_expert(shapes, 1000 + i, device)
            stored += sum(d.nbytes for d in deltas.values())
            hot[f"e{i}"] = build_hot_expert(f"e{i}", deltas, wrapped, be, dtype, tied=False)
            del deltas
    n_exp = len(hot)
    mem_experts = (torch.cuda.memory_allocated(device) if cuda else 0) - mem_base
    n_params = sum(p.numel() for p in model.parameters())
    res["experts"] = n_exp
    res["expert_stored_bytes"] = stored
    res["expert_effective_bits"] = 8 * stored / n_exp / n_params
    res["experts_build_s"] = t.seconds
    if cuda:
        res["experts_device_bytes"] = mem_experts
        res["experts_device_over_stored"] = mem_experts / stored
    print(f"{n_exp} experts: stored {stored / 2**30:.2f} GiB ({res['expert_effective_bits']:.2f} bits/param)"
          + (f", on the device {mem_experts / 2**30:.2f} GiB ({mem_experts / stored:.3f}x)" if cuda else ""), flush=True)

    store = ResidentExperts(hot)
    names = sorted(hot)
    max_batch = max(args.requests)
    engine = Engine(model, store, ctx, max_batch=max_batch, max_step_tokens=max_batch * args.prompt,
                    max_model_len=args.prompt + args.tokens + 1, dtype=dtype).start()
    try:
        run_requests(engine, [None] * 2, args.prompt, 4, cfg["vocab_size"])  # warm-up: compile the kernels
        run_requests(engine, [names[0], names[1 % n_exp]] * 2, args.prompt, 4, cfg["vocab_size"])
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        # a merged expert's weights in pinned host memory, copied in at every swap
        host = [p.detach().to("cpu").pin_memory() if cuda else p.detach().clone() for p in model.parameters()]
        rows = []
        for n in args.requests:
            spread = [names[i % n_exp] for i in range(n)]
            base_tps = run_requests(engine, [None] * n, args.prompt, args.tokens, cfg["vocab_size"])
            exp_tps = run_requests(engine, spread, args.prompt, args.tokens, cfg["vocab_size"])
            row = {"requests": n, "experts": len(set(spread)), "base_tok_s": base_tps, "experts_tok_s": exp_tps,
                   "ratio_to_base": exp_tps / base_tps}
            row.update(merged_swap(engine, model, host, spread, args, cfg["vocab_size"], device))
            row["ratio_to_merged_swap"] = exp_tps / row["merged_swap_tok_s"]
            rows.append(row)
            print(f"{n} requests over {row['experts']} experts: {exp_tps:.1f} tok/s = {row['ratio_to_base']:.2f}x "
                  f"the base ({base_tps:.1f}), {row['ratio_to_merged_swap']:.2f}x merged swap "
                  f"({row['merged_swap_tok_s']:.1f}, {row['merged_swap_copy_s']:.2f} s copying)", flush=True)
        res["throughput"] = rows
        res["prompt_tokens"], res["generated_tokens"] = args.prompt, args.tokens
        res["kv_cache_bytes"] = engine.cache.nbytes
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) - mem0
            res["peak_device_bytes"] = peak
            budget = 1.1 * (base_bytes + stored) + engine.cache.nbytes
            res["peak_over_target"] = peak / budget  # target: <= 1 (1.1 x stored + KV cache)
            print(f"peak device memory {peak / 2**30:.2f} GiB; target 1.1 x (base + stored deltas) + KV cache = "
                  f"{budget / 2**30:.2f} GiB", flush=True)
    finally:
        engine.stop()
    res["per_layer"] = []
    per_layer(be, hot, wrapped, device, dtype, args, res["per_layer"])


def merged_swap(engine, model, host: list, experts: list, args, vocab: int, device: torch.device) -> dict:
    """Serving by swapping merged weights: each expert's requests alone on the plain model, after
    copying a full 16-bit weight set in from pinned host memory (the fastest swap there is; the
    copied values are the base's own, which does not change the timing)."""
    params = list(model.parameters())
    groups: dict = {}
    for e in experts:
        groups[e] = groups.get(e, 0) + 1
    copy_s, total_s = 0.0, 0.0
    t_all = time.perf_counter()
    for e, count in groups.items():
        with Timer(device) as t:
            with torch.no_grad():
                for p, h in zip(params, host):
                    p.copy_(h, non_blocking=True)
        copy_s += t.seconds
        run_requests(engine, [None] * count, args.prompt, args.tokens, vocab)
    total_s = time.perf_counter() - t_all
    return {"merged_swap_tok_s": len(experts) * args.tokens / total_s, "merged_swap_copy_s": copy_s}


def per_layer(be, hot: dict, wrapped: dict, device: torch.device, dtype: torch.dtype, args, rows: list) -> None:
    """The kernel against the base GEMM, per 7B linear shape (q/k/v/o, gate/up, down); appends to `rows`."""
    from meswitch.runtime.layers import DeltaLinear

    linears = {m.path: m for m in wrapped.values() if isinstance(m, DeltaLinear)}
    picks = [p for p in linears if p.startswith("model.layers.0.") and p.endswith(("q_proj", "up_proj", "down_proj"))]
    names = sorted(hot)
    for path in picks:
        m = linears[path]
        out, cols = m.base.weight.shape
        for tokens in args.requests:
            per = max(1, tokens // len(names))
            segs = [(hot[names[i]].table, i * per, (i + 1) * per) for i in range(min(len(names), tokens))]
            n_tok = segs[-1][2]
            x = torch.randn(n_tok, cols, dtype=dtype, device=device)
            y = torch.zeros(n_tok, out, dtype=dtype, device=device)
            plan = be.plan(segs)
            gemm = bench_ms(lambda: torch.nn.functional.linear(x, m.base.weight), device, args.reps)
            kern = bench_ms(lambda: be.segmented_matmul(x, y, plan, m.index), device, args.reps)
            row = {"layer": path.rsplit(".", 1)[-1], "out": out, "in": cols, "tokens": n_tok, "segments": len(segs),
                   "base_gemm_ms": gemm, "delta_kernel_ms": kern, "kernel_over_gemm": kern / gemm}
            if hasattr(be, "dense_min_tokens"):  # the dense route: one expert's prompt chunk of n_tok tokens
                from meswitch.runtime import triton_kernel

                r = hot[names[0]].linear[m.index]
                if be.name == "triton":
                    dense = bench_ms(lambda: torch.nn.functional.linear(
                        x, triton_kernel.dequantize(r, dtype, desc=hot[names[0]].table.descs[m.index])), device, args.reps)
                    row["dense_route_ms"] = dense
            rows.append(row)
            print(f"{row['layer']} [{out}x{cols}] {n_tok} tokens / {len(segs)} experts: base GEMM {gemm:.3f} ms, "
                  f"delta kernel {kern:.3f} ms ({kern / gemm:.2f}x)"
                  + (f", dense route {row['dense_route_ms']:.3f} ms" if "dense_route_ms" in row else ""), flush=True)


# ----- the demo bundle ---------------------------------------------------------------------------------
def demo_part(args, device: torch.device) -> dict:
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        return {"skipped": f"no demo bundle at {bundle} (run `make demo` first)"}
    from meswitch.runtime import Switch

    prompts = ["Tom has 12 apples and gives 5 to Anna. How many apples are left?",
               "Write a Python function that reverses a string."]
    try:
        sw = Switch.load(bundle, dtype="bfloat16", device=device, backend=args.backend, max_batch=32)
    except Exception as e:  # the base recorded in the bundle is not on this machine, ...
        return {"skipped": f"cannot load {bundle}: {type(e).__name__}: {e}"}
    res = {"bundle": str(bundle), "experts": sw.experts, "backend": sw.store.backend.name}
    try:
        n = 32
        chats = [[{"role": "user", "content": prompts[i % 2]}] for i in range(n)]
        sw.generate(chats[:2], expert=None, temperature=0, max_tokens=4, ignore_eos=True)  # warm-up
        sw.generate(chats[:2], expert=sw.experts[:1] * 2, temperature=0, max_tokens=4, ignore_eos=True)
        for label, experts in (("base", [None] * n), ("experts", [sw.experts[i % len(sw.experts)] for i in range(n)])):
            t0 = time.perf_counter()
            outs = sw.generate(chats, expert=experts, temperature=0, max_tokens=args.tokens, ignore_eos=True)
            dt = time.perf_counter() - t0
            res[f"{label}_tok_s"] = sum(o.completion_tokens for o in outs) / dt
        res["requests"] = n
        res["ratio_to_base"] = res["experts_tok_s"] / res["base_tok_s"]
        print(f"demo bundle: {n} requests, experts {res['experts_tok_s']:.1f} tok/s vs base {res['base_tok_s']:.1f} "
              f"({res['ratio_to_base']:.2f}x)", flush=True)
    finally:
        sw.close()
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="tiny shapes on the CPU with the Triton interpreter: runs every code path, measures nothing")
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="auto", help="delta backend (auto: triton on a GPU)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--requests", type=int, nargs="+", default=[32, 64])
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--bundle", default=str(ROOT / ".cache" / "demo" / "bundle"))
    p.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/gpu.json; "
                                                "with --dry-run: not written unless given)")
    args = p.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend on the CPU: the interpreter
        args.device, args.experts, args.requests, args.prompt, args.tokens, args.reps = "cpu", 4, [4, 8], 6, 4, 1
        if args.backend == "auto":
            args.backend = "triton"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"benchmarks/gpu.py: no CUDA device (torch {torch.__version__}, "
              f"cuda {'built' if torch.version.cuda else 'not built'}). Run it on a machine with a GPU "
              "(a CUDA build of torch and `pip install 'meswitch[gpu]'`), or --dry-run to check the code paths "
              "on the CPU.", file=sys.stderr)
        return 2
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            print("benchmarks/gpu.py: triton is not installed (pip install 'meswitch[gpu]')", file=sys.stderr)
            return 2
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    t0 = time.perf_counter()
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "dtype": str(dtype).replace("torch.", ""), "dry_run": args.dry_run}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    print(json.dumps(env), flush=True)
    results: dict = {"environment": env, "synthetic": {}}
    out = args.out or (None if args.dry_run else str(ROOT / "benchmarks" / "results" / "gpu.json"))
    failed = False
    try:  # whatever happens, what was measured is written
        try:
            synthetic_part(args, device, dtype, results["synthetic"])
        except Exception as e:
            traceback.print_exc()
            results["synthetic"]["error"] = f"{type(e).__name__}: {e}"
            failed = True
        if device.type == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
        try:
            results["demo"] = {"skipped": "dry run"} if args.dry_run else demo_part(args, device)
        except Exception as e:
            traceback.print_exc()
            results["demo"] = {"error": f"{type(e).__name__}: {e}"}
            failed = True
    finally:
        results["seconds"] = time.perf_counter() - t0
        if out:
            Path(out).write_text(json.dumps(results, indent=1) + "\n")
            print(f"wrote {out} ({results['seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
