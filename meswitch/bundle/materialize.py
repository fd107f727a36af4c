"""Write a bundle's expert back out as a standard Hugging Face checkpoint.

W_expert = W_base + dequantized delta, cast to the expert's original dtype, written one shard at
a time (so memory stays near one shard), next to the expert's config, tokenizer and chat template.
Plain `transformers.AutoModelForCausalLM.from_pretrained(out)` loads the result.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoints import DTYPES, Checkpoint, fingerprint
from ..compression.delta import apply_delta_rows
from ..files import check_output_dir, replace_dir, temp_path
from .format import EXAMPLES_FILE, Bundle, BundleError, DeltaFile, save_safetensors

SHARD_BYTES = 2 << 30
REBUILD_CHUNK_ELEMENTS = 1 << 22


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rebuild(base: Checkpoint, tname: str, delta, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """apply_delta of one tensor, a chunk of rows at a time (the same arithmetic per element)."""
    bname = base.resolve(tname)
    rows = base.shape(bname)[0]
    out = torch.empty(shape, dtype=dtype)
    step = max(1, REBUILD_CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    for a in range(0, shape[0], step):
        b = min(shape[0], a + step)
        out[a:b] = apply_delta_rows(base.get_rows(bname, a, min(b, rows)), delta, a, b, dtype)
    return out


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
    deltas = bundle.open_deltas(name)
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


def _write_checkpoint(bundle: Bundle, name: str, base: Checkpoint, deltas: DeltaFile, dtype: torch.dtype, tmp: Path,
                      progress: bool) -> None:
    item = torch.empty(0, dtype=dtype).element_size()
    shapes = {t: (deltas.rows(t), *deltas.layout[t]["shape"][1:]) for t in sorted(deltas.layout)}
    shards: list[list[str]] = [[]]
    size = 0
    for tname, shape in shapes.items():
        nbytes = math.prod(shape) * item
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(tname)
        size += nbytes

    class Rebuilt:  # the shard's tensors, each rebuilt when the writer reaches it
        def __init__(self, names):
            self.names = names

        def specs(self):
            return [(t, dtype, shapes[t]) for t in self.names]

        def get(self, tname):
            return rebuild(base, tname, deltas.get(tname), shapes[tname], dtype)

    filenames: list[str] = []
    weight_map: dict[str, str] = {}
    bar = tqdm(total=len(shapes), desc=f"materialize {name}", disable=not progress, leave=False)
    for names in shards:
        fname = f"model-{len(filenames) + 1:05d}.safetensors"
        save_safetensors(Rebuilt(names), tmp / fname, metadata={"format": "pt"})
        filenames.append(fname)
        weight_map.update({t: fname for t in names})
        bar.update(len(names))
    bar.close()

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
