"""Reading base and expert checkpoints, one tensor at a time.

A checkpoint is either a Hugging Face model directory (config.json plus one or several
*.safetensors files, with or without model.safetensors.index.json) or a GGUF file. Safetensors
are read lazily, so compressing a large expert never holds a whole model of tensors in memory.
GGUF files are quantized: transformers (with the `gguf` package) dequantizes them as a whole,
so `meswitch convert` turns one into a safetensors directory once, which later reads lazily.

Pickled checkpoints (pytorch_model.bin) are refused: loading them can execute code.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

# Families whose decoder layers share q/k/v/o/gate/up/down_proj naming.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Files copied next to a materialized expert so that plain transformers can load it.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)
# Config fields that must agree between a base and its experts.
ARCH_FIELDS = (
    "model_type",
    "architectures",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)
VOCAB_TENSOR_MARKERS = ("embed_tokens", "lm_head")
from .hardware import DTYPES  # noqa: E402  (re-exported: the CLI and bundle code read it here)
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that does not match what it is used with."""


def is_vocab_tensor(name: str) -> bool:
    return any(m in name for m in VOCAB_TENSOR_MARKERS)


@dataclass
class Checkpoint:
    path: Path
    config: dict
    # name -> safetensors file holding it (HF directory), or in-memory tensors (GGUF).
    _files: dict[str, Path] = field(default_factory=dict)
    _tensors: dict[str, torch.Tensor] | None = None
    gguf_file: str | None = None

    # ----- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Checkpoint":
        p = Path(path).resolve()  # the reference recorded in a bundle must work from any directory
        if not p.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if p.is_file():
            if p.suffix != ".gguf":
                raise CheckpointError(f"{p}: a checkpoint is a Hugging Face model directory or a .gguf file")
            return cls._open_gguf(p)
        return cls._open_hf_dir(p)

    @classmethod
    def _open_hf_dir(cls, d: Path) -> "Checkpoint":
        cfg_path = d / "config.json"
        if not cfg_path.is_file():
            ggufs = sorted(d.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls._open_gguf(ggufs[0])
            raise CheckpointError(f"{d}: no config.json (is this a Hugging Face model directory?)")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from e
        files: dict[str, Path] = {}
        index = d / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            for name, fname in weight_map.items():
                files[name] = d / fname
            missing = sorted({str(f) for f in files.values() if not f.is_file()})
            if missing:
                raise CheckpointError(f"{d}: shards named in the index are missing: {', '.join(missing)}")
        else:
            shards = sorted(d.glob("*.safetensors"))
            if not shards:
                if any(d.glob("*.bin")) or any(d.glob("*.pt")):
                    raise CheckpointError(
                        f"{d}: only pickled weights (*.bin/*.pt) found; meswitch reads safetensors only "
                        "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
                    )
                raise CheckpointError(f"{d}: no *.safetensors weights")
            for shard in shards:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        files[name] = shard
        return cls(path=d, config=config, _files=files)

    @classmethod
    def _open_gguf(cls, f: Path) -> "Checkpoint":
        model = load_gguf_model(f)
        tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
        config = model.config.to_dict()
        if config.get("tie_word_embeddings") and "lm_head.weight" in tensors:
            del tensors["lm_head.weight"]
        return cls(path=f.parent, config=config, _tensors=tensors, gguf_file=f.name)

    # ----- tensors -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._tensors if self._tensors is not None else self._files)

    def __contains__(self, name: str) -> bool:
        return name in (self._tensors if self._tensors is not None else self._files)

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype."""
        if self._tensors is not None:
            if name not in self._tensors:
                raise KeyError(name)
            return self._tensors[name]
        if name not in self._files:
            raise KeyError(name)
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[name].shape)
        with safe_open(self._files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    @property
    def tied(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def weight_names(self) -> list[str]:
        """Tensors that define the model; a stored copy of a tied LM head is left out."""
        names = self.keys()
        if self.tied:
            names = [n for n in names if n != "lm_head.weight"]
        return names

    def get_for(self, name: str) -> torch.Tensor:
        """Like get, but a tied LM head resolves to the input embedding."""
        if name not in self and name == "lm_head.weight" and self.tied:
            return self.get("model.embed_tokens.weight")
        return self.get(name)

    def tensor_dtype(self, name: str) -> torch.dtype:
        if self._tensors is not None:
            return self._tensors[name].dtype
        with safe_open(self._files[name], framework="pt") as f:
            code = f.get_slice(name).get_dtype()  # read from the header, no data loaded
        return SAFETENSORS_DTYPES.get(code, torch.float32)

    def dtype(self) -> torch.dtype:
        """The dtype most floating-point parameters are stored in."""
        counts: Counter = Counter()
        for name in self.weight_names():
            dt = self.tensor_dtype(name)
            if dt.is_floating_point:
                counts[dt] += _numel(self.shape(name))
        return counts.most_common(1)[0][0] if counts else torch.float32

    def num_parameters(self) -> int:
        return sum(_numel(self.shape(n)) for n in self.weight_names())

    @property
    def reference(self) -> str:
        return str(self.path / self.gguf_file) if self.gguf_file else str(self.path)

    # ----- whole models (calibration, tuning, evaluation) ----------------------------------
    def load_model(self, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        if self.gguf_file:
            model = load_gguf_model(self.path / self.gguf_file)
            model = model.to(dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        return model.to(device).eval()

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        if self.gguf_file:
            return AutoTokenizer.from_pretrained(self.path, gguf_file=self.gguf_file)
        return AutoTokenizer.from_pretrained(self.path)

    def save_aux_files(self, dest: Path) -> list[str]:
        """Copy config, generation config, tokenizer and chat template into dest."""
        dest.mkdir(parents=True, exist_ok=True)
        if self.gguf_file:
            (dest / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True))
            self.load_tokenizer().save_pretrained(dest)
        else:
            for fname in AUX_FILES:
                if (self.path / fname).is_file():
                    shutil.copy2(self.path / fname, dest / fname)
        return sorted(p.name for p in dest.iterdir() if p.is_file())


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def load_gguf_model(f: Path):
    """Load a GGUF file with transformers; the weights come back dequantized to float32."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name)
    except Exception as e:  # transformers raises many types here; say what failed.
        raise CheckpointError(f"{f}: could not load GGUF file ({e})") from e
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model.eval()


def convert_gguf(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                 overwrite: bool = False) -> Path:
    """Write a GGUF model as a Hugging Face safetensors directory (config, tokenizer, chat template).
    An existing non-empty `out` is refused unless `overwrite`; it is replaced only once the new
    directory is complete."""
    from .files import check_output_dir, replace_dir, temp_path

    src = Path(src)
    out = Path(out)
    if src.is_dir():
        ggufs = sorted(src.glob("*.gguf"))
        if len(ggufs) != 1:
            raise CheckpointError(f"{src}: expected exactly one .gguf file, found {len(ggufs)}")
        src = ggufs[0]
    if src.suffix != ".gguf" or not src.is_file():
        raise CheckpointError(f"{src}: not a .gguf file")
    check_output_dir(out, overwrite, protect=(src,))
    from transformers import AutoTokenizer

    model = load_gguf_model(src).to(dtype)
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out.parent, out.name)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def compare_architectures(base: Checkpoint, expert: Checkpoint) -> list[str]:
    """Human-readable differences that make expert not a fine-tune of base (empty if none)."""
    diffs = []
    for key in ARCH_FIELDS:
        b, e = base.config.get(key), expert.config.get(key)
        if b != e:
            diffs.append(f"config.{key}: base {b!r} vs expert {e!r}")
    bv, ev = base.config.get("vocab_size"), expert.config.get("vocab_size")
    if bv is not None and ev is not None and ev < bv:
        diffs.append(f"config.vocab_size: expert has fewer tokens ({ev}) than base ({bv})")
    base_names = set(base.weight_names())
    exp_names = set(expert.weight_names())
    for name in sorted(exp_names - base_names):
        if not (name == "lm_head.weight" and base.tied):
            diffs.append(f"tensor {name}: only in the expert")
    for name in sorted(base_names - exp_names):
        if not (name == "lm_head.weight" and expert.tied):
            diffs.append(f"tensor {name}: missing from the expert")
    for name in sorted(base_names & exp_names):
        bs, es = base.shape(name), expert.shape(name)
        if bs == es:
            continue
        grew_vocab = is_vocab_tensor(name) and len(bs) == 2 and bs[1:] == es[1:] and es[0] > bs[0]
        if not grew_vocab:
            diffs.append(f"tensor {name}: shape {list(bs)} in base vs {list(es)} in expert")
    return diffs


def check_compatible(base: Checkpoint, expert: Checkpoint, expert_name: str = "expert") -> None:
    mt = base.config.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"base model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    diffs = compare_architectures(base, expert)
    if diffs:
        shown = "\n  ".join(diffs[:12])
        more = f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
        raise CheckpointError(
            f"expert {expert_name!r} ({expert.reference}) is not a fine-tune of base ({base.reference}):\n  {shown}{more}"
        )


def fingerprint(ckpt: Checkpoint, progress: bool = False) -> str:
    """A hash over the base's tensors: names, shapes and float32 values, in name order.

    Values are hashed as float32 so that the same weights stored in float32, or in a 16-bit
    type and widened losslessly, give the same fingerprint; any changed value changes it."""
    from tqdm.auto import tqdm

    h = hashlib.blake2b(digest_size=16)
    names = ckpt.weight_names()
    for name in tqdm(names, desc="fingerprint base", disable=not progress, leave=False):
        t = ckpt.get(name)
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return "blake2b-128:" + h.hexdigest()
