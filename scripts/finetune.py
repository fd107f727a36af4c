"""Short full-parameter fine-tune of a causal LM on prompt/response pairs (CPU friendly).

Used by `make demo` to derive the "experts" from the base model. Every weight is trainable;
the loss covers only the assistant response tokens of the chat-formatted example.

  python scripts/finetune.py --base BASE_DIR --data math_train.jsonl --out experts/math

Assumptions:
  * BASE_DIR is a local HF checkpoint (config.json + safetensors + tokenizer with a chat template),
    stored in any float dtype; it is loaded in float32 (fp32 master weights) for training.
  * DATA is JSONL with one {"prompt": str, "response": str} object per line.
  * Training runs on CPU, with bf16 autocast where the CPU has native bf16 (--autocast auto;
    emulated bf16 is slower than fp32); the result is saved cast to --dtype.

The output is written to a temporary sibling directory and renamed into place at the end, so an
interrupted run leaves no half-written OUTDIR. A rerun whose OUTDIR already holds model.safetensors
and a finetune.json recorded with the same settings (and same data) does nothing.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # local checkpoints only; must be set before transformers is imported

import argparse
import glob
import hashlib
import json
import math
import shutil
import sys
import time

import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

IGNORE_INDEX = -100  # label value skipped by the HF causal-LM loss
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def fail(msg):
    sys.exit(f"finetune: error: {msg}")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_pairs(path):
    if not os.path.isfile(path):
        fail(f"data file not found: {path}")
    pairs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{lineno}: not valid JSON ({e})")
            if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)
                    and isinstance(row.get("response"), str) and row["response"]):
                fail(f"{path}:{lineno}: expected {{\"prompt\": str, \"response\": non-empty str}}")
            pairs.append((row["prompt"], row["response"]))
    if not pairs:
        fail(f"no examples in {path}")
    return pairs


def encode_example(tokenizer, prompt, response, seq_len):
    # Tokens of the full conversation; labels are -100 on everything up to and including the
    # assistant header (the generation prompt), so only the response and its end-of-turn are learned.
    user = [{"role": "user", "content": prompt}]
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}],
                                         tokenize=True, return_dict=False)
    head = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True, return_dict=False)
    n_head = 0  # length of the common prefix; equals len(head) for ordinary chat templates
    while n_head < min(len(head), len(full)) and head[n_head] == full[n_head]:
        n_head += 1
    ids = full[:seq_len]
    labels = [IGNORE_INDEX] * min(n_head, len(ids)) + ids[n_head:]
    return ids, labels, len(full) > seq_len


def encode_dataset(tokenizer, pairs, seq_len):
    # Returns the (ids, labels) examples that keep at least one response token, and how many were cut.
    encoded = [encode_example(tokenizer, p, r, seq_len) for p, r in pairs]
    kept = [(ids, labels) for ids, labels, _ in encoded if any(t != IGNORE_INDEX for t in labels)]
    if not kept:
        fail(f"every prompt is at least --seq-len={seq_len} tokens long; nothing left to learn")
    return kept, len(encoded) - len(kept), sum(cut for _, _, cut in encoded)


def collate(examples, pad_id):
    # Right-pad to the longest example in the batch (never longer than --seq-len).
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        attention_mask[i, :len(ids)] = 1
    return input_ids, attention_mask, labels


def batch_indices(n_examples, batch, steps, generator):
    # Epochs of seeded random permutations, cut into consecutive batches.
    order = []
    while len(order) < batch * steps:
        order += torch.randperm(n_examples, generator=generator).tolist()
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


def lr_at(step, steps, lr, warmup):
    # Linear warmup, then cosine decay to 10% of the peak.
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(params, lr, weight_decay):
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # fused kernel unavailable for this device/dtype
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def train(model, examples, pad_id, args):
    params = list(model.parameters())  # tied embedding/lm_head weight appears once
    for p in params:
        p.requires_grad_(True)
    optimizer = make_optimizer(params, args.lr, args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    warmup = max(1, args.steps // 10)
    losses = []
    model.train()
    bar = tqdm(batch_indices(len(examples), args.batch, args.steps, generator), desc="finetune", unit="step")
    for step, idx in enumerate(bar):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup)
        input_ids, attention_mask, labels = collate([examples[i] for i in idx], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bfloat16"):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    model.eval()
    return losses


def run_record(args, data_sha):
    # Everything that determines the result; compared on rerun to decide whether to skip.
    return {"base": os.path.abspath(args.base), "data": os.path.abspath(args.data), "data_sha256": data_sha,
            "steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
            "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "seed": args.seed, "dtype": args.dtype,
            "autocast": args.autocast}


def already_done(out_dir, record):
    meta = os.path.join(out_dir, "finetune.json")
    if not (os.path.isfile(os.path.join(out_dir, "model.safetensors")) and os.path.isfile(meta)):
        return False
    try:
        with open(meta) as f:
            return json.load(f).get("args") == record
    except (OSError, json.JSONDecodeError):
        return False


def check_out_dir(out_dir):
    # Only replace an OUTDIR that is empty or was written by this script; never clobber anything else.
    if os.path.exists(out_dir):
        if not os.path.isdir(out_dir):
            fail(f"--out {out_dir} exists and is not a directory")
        if os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, "finetune.json")):
            fail(f"--out {out_dir} exists, is not empty and is not a finetune output; refusing to overwrite")


def save_output(model, tokenizer, out_dir, dtype, meta):
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    tmp_prefix = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.tmp-")
    for stale in glob.glob(tmp_prefix + "*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp_dir = tmp_prefix + str(os.getpid())
    try:
        model.to(dtype)  # tie_word_embeddings comes from the loaded config and is saved unchanged
        model.save_pretrained(tmp_dir)  # transformers >= 5 always writes safetensors
        tokenizer.save_pretrained(tmp_dir)  # keeps the chat template with the expert
        with open(os.path.join(tmp_dir, "finetune.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if not os.path.isfile(os.path.join(tmp_dir, "model.safetensors")):
            fail(f"save_pretrained did not write a single model.safetensors in {tmp_dir}")
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)  # checked earlier to be empty or a previous finetune output
        os.rename(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="local HF checkpoint directory of the base model")
    ap.add_argument("--data", required=True, help="JSONL file of {prompt, response} pairs")
    ap.add_argument("--out", required=True, help="output checkpoint directory")
    # Defaults sized for `make demo` on 2 CPU cores: ~2.5 s/step for 135M params at batch 8 x 96 tokens
    # (~80 s total); the templated demo data drops from loss ~1.1-1.5 to < 0.1 and the bf16 delta
    # W_expert - W_base touches over half of all weights.
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=96, help="examples are truncated to this many tokens")
    ap.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the saved weights")
    ap.add_argument("--autocast", choices=("auto", "bfloat16", "off"), default="auto",
                    help="bf16 autocast: auto (where the CPU has native bf16), bfloat16 or off (float32)")
    args = ap.parse_args(argv)
    if args.autocast == "auto":
        from meswitch.hardware import cpu_has_native_bf16

        args.autocast = "bfloat16" if cpu_has_native_bf16() else "off"
    if args.steps < 1 or args.batch < 1 or args.seq_len < 2 or args.lr <= 0:
        ap.error("--steps, --batch must be >= 1, --seq-len >= 2 and --lr > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.base, "config.json")):
        fail(f"--base {args.base} is not a checkpoint directory (no config.json)")
    pairs = load_pairs(args.data)
    record = run_record(args, file_sha256(args.data))
    if already_done(args.out, record):
        print(f"finetune: {args.out} is up to date (same settings and data), skipping")
        return
    check_out_dir(args.out)

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    if tokenizer.chat_template is None:
        fail(f"tokenizer in {args.base} has no chat template")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        fail("tokenizer has neither a pad nor an eos token")
    examples, n_dropped, n_trunc = encode_dataset(tokenizer, pairs, args.seq_len)
    print(f"finetune: {len(examples)} examples from {args.data} ({n_trunc} truncated to {args.seq_len} tokens, "
          f"{n_dropped} dropped: prompt fills --seq-len)")

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"finetune: {n_params / 1e6:.1f}M trainable parameters, {args.steps} steps x batch {args.batch}, "
          f"lr {args.lr:g}, {torch.get_num_threads()} threads")

    t0 = time.perf_counter()
    losses = train(model, examples, pad_id, args)
    seconds = time.perf_counter() - t0

    meta = {"args": record, "examples": len(examples), "truncated": n_trunc, "dropped": n_dropped,
            "first_loss": losses[0], "last_loss": losses[-1], "losses": losses,
            "seconds": round(seconds, 2), "seconds_per_step": round(seconds / args.steps, 3),
            "torch": torch.__version__, "transformers": transformers.__version__}
    save_output(model, tokenizer, args.out, DTYPES[args.dtype], meta)
    print(f"finetune: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {seconds:.1f}s "
          f"({seconds / args.steps:.2f}s/step), saved {args.dtype} checkpoint to {args.out}")


if __name__ == "__main__":
    main()
