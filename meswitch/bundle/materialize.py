"""Write a bundle's expert back out as a standard Hugging Face checkpoint.

W_expert = W_base + dequantized delta, cast to the expert's original dtype, written one shard at
a time (so memory stays near one shard), next to the expert's config, tokenizer and chat template.
Plain `transformers.AutoModelForCausalLM.from_pretrained(out)` loads the result.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoints import DTYPES, Checkpoint, fingerprint
from ..compression.delta import apply_delta
from ..files import check_output_dir, replace_dir, temp_path
from .format import EXAMPLES_FILE, Bundle, BundleError, save_safetensors

SHARD_BYTES = 2 << 30


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def materialize(bundle: Bundle, name: str, base: Checkpoint, out: str | Path, progress: bool = True,
                base_fingerprint: str | None = None, dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write W_base + delta of every tensor as a Hugging Face checkpoint, in the expert's own dtype
    (recorded in the manifest) unless `dtype` asks for another (float32 keeps the sum unrounded).
    An existing non-empty `out` is refused unless `overwrite`; it is replaced only once the new
    checkpoint is complete."""
    out = Path(out)
    check_output_dir(out, overwrite, protect=(bundle.path, Path(base.reference)))
    entry = bundle.entry(name)
    fp = base_fingerprint or fingerprint(base, progress)
    bundle.check_base_fingerprint(fp, base.reference)
    deltas = bundle.load_deltas(name)
    dtype = dtype or DTYPES.get(entry.get("dtype", "bfloat16"))
    if dtype is None:
        raise BundleError(f"expert {name!r}: unknown dtype {entry.get('dtype')!r} in manifest")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out.parent, out.name)
    tmp.mkdir()
    try:
        _write_checkpoint(bundle, name, base, deltas, dtype, tmp, progress)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_checkpoint(bundle: Bundle, name: str, base: Checkpoint, deltas: dict, dtype: torch.dtype, tmp: Path,
                      progress: bool) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    weight_map: dict[str, str] = {}
    filenames: list[str] = []

    def flush():
        fname = f"model-{len(filenames) + 1:05d}.safetensors"
        save_safetensors(shards[-1], tmp / fname, metadata={"format": "pt"})
        filenames.append(fname)
        for k in shards[-1]:
            weight_map[k] = fname
        shards[-1] = {}

    for tname in tqdm(sorted(deltas), desc=f"materialize {name}", disable=not progress, leave=False):
        w = apply_delta(base.get_for(tname), deltas[tname], dtype).contiguous()
        nbytes = w.numel() * w.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            flush()
            size = 0
        shards[-1][tname] = w
        size += nbytes
    flush()

    if len(filenames) == 1:
        (tmp / filenames[0]).rename(tmp / "model.safetensors")
    else:
        # Rename to the usual model-0000i-of-0000n pattern and write the index.
        total = len(filenames)
        renames = {f: f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i, f in enumerate(filenames)}
        for old, new in renames.items():
            (tmp / old).rename(tmp / new)
        index = {"metadata": {}, "weight_map": {k: renames[v] for k, v in weight_map.items()}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    aux = bundle.verified_aux_dir(name)
    for f in aux.iterdir():
        if f.is_file() and f.name != EXAMPLES_FILE:  # router data, not part of a checkpoint
            shutil.copy2(f, tmp / f.name)
    try:
        config = json.loads((tmp / "config.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise BundleError(f"expert {name!r}: its config.json is missing or not JSON ({e})") from e
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype_name(dtype)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
