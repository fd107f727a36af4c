"""Delta-kernel benchmark: time of `x @ delta^T` (the CPU kernel on the stored 2-bit codes) over the
time of the base layer's own product `x @ W^T` (PyTorch, same dtype, same tokens).

Shapes: SmolLM2-135M's linear layers and Llama-7B's (4096x4096, 11008x4096, 4096x11008); tokens
per expert: 1, 4, 8, 16, 64; deltas: 2 bits, 1% salient columns, one step size per row (the
default compression), random codes in the stored layout (timing does not depend on the values).

In a forward pass every layer's weights come from memory once per step (the model is much larger
than the caches), for the base as for the deltas. So both products are timed over a pool of
distinct matrices larger than the last-level cache (--pool-mib), cycled through, and the
`cache-hot` column repeats the same matrix (both then sit in cache) for comparison. Every
configuration alternates base and delta calls and keeps the fastest of --reps rounds (the
machine is shared: side-by-side minima, not means). The traffic limit is b/B: the delta's bytes
per weight over the base's (2.2 bits incl. scales and salient columns over 16 or 32 bits).
merged_gemm_ratio: the runtime's path for long segments (one GEMM with W + D, rebuilt by the
kernel into a reused buffer) over the kernel's path (base GEMM + delta kernel), both cache-hot:
below 1 the merged path is faster at that many tokens (the runtime switches at DENSE_MIN_TOKENS).

    .venv/bin/python benchmarks/kernels.py [--threads 1] [--dtypes float32 bfloat16] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from meswitch.compression.delta import QuantizedDelta
from meswitch.compression.packing import pack_codes
from meswitch.compression.quantizer import AffineParams
from meswitch.hardware import cpu_has_native_bf16
from meswitch.runtime import cpu_kernel

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {  # name: (out, in)
    "smollm2 q/o 576x576": (576, 576),
    "smollm2 k/v 192x576": (192, 576),
    "smollm2 gate/up 1536x576": (1536, 576),
    "smollm2 down 576x1536": (576, 1536),
    "llama7b 4096x4096": (4096, 4096),
    "llama7b up 11008x4096": (11008, 4096),
    "llama7b down 4096x11008": (4096, 11008),
}
TOKENS = (1, 4, 8, 16, 64)


def random_delta(out: int, cols: int, bits: int = 2, salient: float = 0.01, seed: int = 0) -> QuantizedDelta:
    g = torch.Generator().manual_seed(seed)
    k = max(1, round(salient * cols))
    sal = torch.randperm(cols, generator=g)[:k].sort().values.to(torch.int32)
    codes = torch.randint(0, 1 << bits, (out, cols - k), generator=g)
    scale = (torch.rand(out, 1, generator=g) * 1e-3 + 1e-4).to(torch.float16)
    return QuantizedDelta((out, cols), bits, pack_codes(codes, bits), AffineParams(scale, -2 * scale, 0), sal,
                          (torch.randn(out, k, generator=g) * 1e-2).to(torch.float16))


def fastest(fns, reps: int, isas: list[str] | None = None) -> list[float]:
    """Fastest time of each function over `reps` alternating rounds; isas[i] (if given): the kernel's
    instruction set while fns[i] runs (switched outside the timed part)."""
    isas = isas or [""] * len(fns)
    best = [float("inf")] * len(fns)
    for f, isa in zip(fns, isas):
        cpu_kernel.select_isa(isa)
        f()
    for _ in range(reps):
        for i, (f, isa) in enumerate(zip(fns, isas)):
            cpu_kernel.select_isa(isa)
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def bench_shape(out: int, cols: int, dtype: torch.dtype, pool_bytes: int, reps: int, isa: str) -> list[dict]:
    n_base = max(1, pool_bytes // (out * cols * dtype.itemsize))
    bases = [torch.randn(out, cols).to(dtype) for _ in range(n_base)]
    d0 = random_delta(out, cols)
    n_delta = max(1, pool_bytes // d0.nbytes)
    packed = [cpu_kernel.pack(d0)] + [cpu_kernel.pack(random_delta(out, cols, seed=i)) for i in range(1, n_delta)]
    tables = [torch.tensor([[p.desc.data_ptr()]], dtype=torch.int64) for p in packed]
    rows = []
    for t in TOKENS:
        x = torch.randn(t, cols).to(dtype)
        y = torch.zeros(t, out, dtype=dtype)
        bounds = torch.tensor([[0, t]], dtype=torch.int64)
        state = {"b": 0, "d": 0}

        def base_stream():
            state["b"] = (state["b"] + 1) % len(bases)
            F.linear(x, bases[state["b"]])

        def delta_stream():
            state["d"] = (state["d"] + 1) % len(tables)
            torch.ops.meswitch.segmented_delta_mm(x, y, tables[state["d"]], bounds, 0, 1 << 30)

        fns = [base_stream, delta_stream, lambda: F.linear(x, bases[0]),
               lambda: torch.ops.meswitch.segmented_delta_mm(x, y, tables[0], bounds, 0, 1 << 30)]
        isas = [isa] * 4
        # with AVX-512 BF16, bf16 activations take the dot-product kernel; the float path beside it
        if isa == "avx512_bf16" and dtype == torch.bfloat16:
            fns.append(delta_stream)
            isas.append("avx512")
        times = fastest(fns, reps, isas)
        cpu_kernel.select_isa(isa)
        base_s, delta_s, base_hot, delta_hot = times[:4]
        # the alternatives for many tokens: dequantize once, then a dense GEMM beside the base's;
        # or (what the runtime does from DENSE_MIN_TOKENS on) one GEMM with W + D, rebuilt into a
        # reused buffer, instead of the base's GEMM: merged_gemm_ratio is that over base + delta
        buf = torch.empty(out, cols, dtype=dtype)
        (dense_s, merged_s) = fastest([lambda: F.linear(x, cpu_kernel.dequantize(packed[0], dtype)),
                                       lambda: F.linear(x, cpu_kernel.dequantize(packed[0], dtype, base=bases[0], out=buf))],
                                      max(3, reps // 4))
        rows.append({"tokens": t, "base_us": base_s * 1e6, "delta_us": delta_s * 1e6, "ratio": delta_s / base_s,
                     "base_hot_us": base_hot * 1e6, "delta_hot_us": delta_hot * 1e6, "ratio_hot": delta_hot / base_hot,
                     "dequant_gemm_ratio": dense_s / base_s, "merged_gemm_ratio": merged_s / (base_hot + delta_hot)})
        if len(times) > 4:
            rows[-1]["float_path_ratio"] = times[4] / base_s
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--pool-mib", type=int, default=256, help="distinct matrices cycled through, per side")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="kernels", help="results file name (e.g. kernels_avx2 for a run under "
                    "ATEN_CPU_CAPABILITY=avx2 MESWITCH_CPU_ISA=avx2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu_kernel.load()
    isa = cpu_kernel.select_isa("")
    bits = random_delta(1536, 576).nbytes * 8 / (1536 * 576)
    res = {"threads": args.threads, "isa": isa, "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(), "machine": platform.processor(),
           "delta_bits_per_weight": bits, "pool_mib": args.pool_mib, "results": []}
    print(f"kernel ISA {isa}, native bf16 {res['native_bf16']}, {args.threads} thread(s), delta {bits:.2f} bits/weight")
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        limit = bits / (8 * dtype.itemsize)
        for name in args.shapes:
            out, cols = SHAPES[name]
            for r in bench_shape(out, cols, dtype, args.pool_mib << 20, args.reps, isa):
                r.update({"shape": name, "dtype": dname, "traffic_limit": limit})
                res["results"].append(r)
                print(f"  {dname:8s} {name:26s} t={r['tokens']:3d}: delta/base {r['ratio']:.3f} "
                      f"(limit {limit:.3f}; cache-hot {r['ratio_hot']:.2f}; dequant+GEMM {r['dequant_gemm_ratio']:.2f}; "
                      f"W+D GEMM / base+delta {r['merged_gemm_ratio']:.2f}"
                      + (f"; float path {r['float_path_ratio']:.3f}" if "float_path_ratio" in r else "") + ") "
                      f"base {r['base_us']:.0f} us", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out / (args.name + '.json')}")


if __name__ == "__main__":
    main()
