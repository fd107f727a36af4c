"""Reading base and expert checkpoints, one tensor at a time.

A checkpoint is either a Hugging Face model directory (config.json plus one or several
*.safetensors files, with or without model.safetensors.index.json) or a GGUF file. Both are read
lazily, one tensor (or a range of rows of one) at a time, so compressing a large expert never
holds a whole model of tensors in memory: safetensors through `safe_open` slices, GGUF through
the memory-mapped `gguf` reader, dequantizing one tensor at a time. `meswitch convert` writes a
GGUF model as a safetensors directory the same way, one tensor at a time.

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
    # name -> safetensors file holding it (HF directory); a GGUF file reads through _gguf.
    _files: dict[str, Path] = field(default_factory=dict)
    _gguf: "GGUFTensors | None" = None
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
        g = GGUFTensors(f)
        return cls(path=f.parent, config=g.config.to_dict(), _gguf=g, gguf_file=f.name)

    # ----- tensors -------------------------------------------------------------------------
    def _names(self):
        return self._gguf.names if self._gguf is not None else self._files

    def keys(self) -> list[str]:
        return sorted(self._names())

    def __contains__(self, name: str) -> bool:
        return name in self._names()

    def get(self, name: str) -> torch.Tensor:
        """One tensor, in its stored dtype (a GGUF tensor dequantized to float32)."""
        if name not in self:
            raise KeyError(name)
        if self._gguf is not None:
            return self._gguf.get(name)
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of a tensor, reading only those rows (a lazy slice)."""
        if name not in self:
            raise KeyError(name)
        if self._gguf is not None:
            return self._gguf.get_rows(name, start, stop)
        with safe_open(self._files[name], framework="pt") as f:
            return f.get_slice(name)[start:stop]

    def shape(self, name: str) -> tuple[int, ...]:
        if self._gguf is not None:
            return self._gguf.shape(name)
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

    def resolve(self, name: str) -> str:
        """The stored tensor behind a name: a tied LM head is the input embedding."""
        if name not in self and name == "lm_head.weight" and self.tied:
            return "model.embed_tokens.weight"
        return name

    def get_for(self, name: str) -> torch.Tensor:
        """Like get, but a tied LM head resolves to the input embedding."""
        return self.get(self.resolve(name))

    def tensor_dtype(self, name: str) -> torch.dtype:
        if self._gguf is not None:
            return torch.float32
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

    def weight_files(self) -> list[Path]:
        """The files the tensors are read from."""
        if self._gguf is not None:
            return [self.path / self.gguf_file]
        return sorted(set(self._files.values()))

    # ----- whole models (end-to-end tuning, the runtime) -----------------------------------
    def load_model(self, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        if self.gguf_file:
            # Tensor by tensor into `dtype`: never the whole model in float32.
            state = {n: self.get(n).to(dtype) for n in self.weight_names()}
            model = causal_lm_class(self._gguf.config).from_pretrained(
                None, config=self._gguf.config, state_dict=state, dtype=dtype)
            del state
        else:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        return model.to(device).eval()

    def model_config(self):
        """The transformers config object (what from_pretrained would build the model from)."""
        from transformers import AutoConfig

        if self._gguf is not None:
            return self._gguf.config
        return AutoConfig.from_pretrained(self.path)

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


def causal_lm_class(config):
    """The transformers causal-LM class of a config object (what AutoModelForCausalLM builds)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


class GGUFTensors:
    """A GGUF file's tensors under their Hugging Face names, dequantized one at a time.

    gguf's reader memory-maps the file; transformers' GGUF name map and tensor processors (the
    ones its whole-model loader uses) undo llama.cpp's renaming and its q/k row permutation, so
    each tensor equals what `from_pretrained(gguf_file=...)` holds. Values are float32, like
    that loader's."""

    def __init__(self, f: Path):
        try:
            from gguf import GGUFReader, get_tensor_name_map
            from gguf.constants import MODEL_ARCH_NAMES
            from transformers import AutoConfig
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS,
                TensorProcessor,
                load_gguf_checkpoint,
                read_field,
            )

            self.reader = GGUFReader(f)
            self.parsed = load_gguf_checkpoint(str(f), return_tensors=False)  # metadata only
            self.config = AutoConfig.for_model(**self.parsed["config"])  # as from_pretrained(gguf_file=) builds it
            arch_name = read_field(self.reader, "general.architecture")[0]
            self.processor = TENSOR_PROCESSORS.get(arch_name, TensorProcessor)(config=self.parsed.get("config", {}))
            arch = next(k for k, v in MODEL_ARCH_NAMES.items() if v == arch_name)
            name_map = get_tensor_name_map(arch, self.config.num_hidden_layers)
            with torch.device("meta"):  # a skeleton, only for its parameter names
                skeleton = causal_lm_class(self.config)(self.config)
        except Exception as e:  # gguf / transformers raise many types here; say what failed.
            raise CheckpointError(f"{f}: could not read GGUF file ({e})") from e
        # GGUF name -> Hugging Face name, as transformers' get_gguf_hf_weights_map maps the
        # top-level names of a causal LM (without its slow walk over every submodule).
        self.to_hf = {}
        for hf_name in skeleton.state_dict():
            stem, _, suffix = hf_name.rpartition(".")
            gguf_name = name_map.get_name(stem)
            if gguf_name is not None:
                self.to_hf[f"{gguf_name}.{suffix}"] = hf_name
        self.tensors = {self.to_hf[t.name]: t for t in self.reader.tensors if t.name in self.to_hf}
        if self.config.tie_word_embeddings:
            self.tensors.pop("lm_head.weight", None)
        self.names = set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in reversed(self.tensors[name].shape))  # GGUF lists dims innermost first

    def _to_torch(self, name: str, weights, rows: int | None = None) -> torch.Tensor:
        import numpy as np

        shape = self.shape(name)
        if rows is not None:
            shape = (rows, *shape[1:])
        return torch.from_numpy(np.array(weights, dtype=np.float32)).reshape(shape)

    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        t = self.tensors[name]
        r = self.processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                   tensor_key_mapping=self.to_hf, parsed_parameters=self.parsed)
        return self._to_torch(name, r.weights)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        from gguf import dequantize

        t = self.tensors[name]
        if is_vocab_tensor(name) and len(self.shape(name)) == 2:
            # Embedding / LM head rows are stored whole and in order (nothing permutes them):
            # dequantize only the rows asked for.
            start, stop = max(0, start), min(stop, self.shape(name)[0])
            return self._to_torch(name, dequantize(t.data[start:stop], t.tensor_type), max(0, stop - start))
        return self.get(name)[start:stop]


def convert_gguf(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
                 overwrite: bool = False) -> Path:
    """Write a GGUF model as a Hugging Face safetensors directory (config, tokenizer, chat
    template), one tensor at a time: memory stays near the largest tensor, whatever the model size.
    An existing non-empty `out` is refused unless `overwrite`; it is replaced only once the new
    directory is complete."""
    from transformers import AutoTokenizer, GenerationConfig

    from .files import check_output_dir, replace_dir, temp_path
    from .tensorfile import write_safetensors

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
    ckpt = Checkpoint.open(src)

    class CastTensors:  # the checkpoint's tensors, cast to `dtype` as they are written
        def specs(self):
            return [(n, dtype, ckpt.shape(n)) for n in ckpt.weight_names()]

        def get(self, name):
            return ckpt.get(name).to(dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out.parent, out.name)
    tmp.mkdir()
    try:
        write_safetensors(tmp / "model.safetensors", CastTensors(), metadata={"format": "pt"})
        config = ckpt._gguf.config
        config.dtype = dtype
        config.architectures = [causal_lm_class(config).__name__]
        config.save_pretrained(tmp)
        generation = GenerationConfig.from_model_config(config)
        if generation.to_diff_dict():
            generation.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name).save_pretrained(tmp)
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


def _hash_tensors(ckpt: Checkpoint, progress: bool) -> str:
    from tqdm.auto import tqdm

    h = hashlib.blake2b(digest_size=16)
    names = ckpt.weight_names()
    for name in tqdm(names, desc="fingerprint base", disable=not progress, leave=False):
        t = ckpt.get(name)
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
    return "blake2b-128:" + h.hexdigest()


FINGERPRINT_CACHE_ENTRIES = 64


def fingerprint_cache_file() -> Path:
    """$MESWITCH_CACHE_DIR, else $XDG_CACHE_HOME/meswitch, else ~/.cache/meswitch; fingerprints.json."""
    root = os.environ.get("MESWITCH_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "meswitch")
    return Path(root) / "fingerprints.json"


def file_identity(ckpt: Checkpoint) -> list[list]:
    """What says a weight file is unchanged without reading it: path, size, modification time,
    inode, and the status-change time (which a write or `touch -d` cannot set back)."""
    out = []
    for f in ckpt.weight_files():
        st = os.stat(f)
        out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    return out


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def fingerprint(ckpt: Checkpoint, progress: bool = False, cache: bool = True) -> str:
    """A hash over the base's tensors: names, shapes and float32 values, in name order.

    Values are hashed as float32 so that the same weights stored in float32, or in a 16-bit
    type and widened losslessly, give the same fingerprint; any changed value changes it.

    Hashing reads the whole model (tens of seconds at 7B), so the result is cached per
    checkpoint with the identity of its weight files (`file_identity`); when any of them has
    changed, or the cache is missing or unreadable, the tensors are hashed again in full."""
    identity = file_identity(ckpt)
    key = ckpt.reference
    path = fingerprint_cache_file()
    if cache:
        entry = _read_cache(path).get(key)
        if isinstance(entry, dict) and entry.get("files") == identity and isinstance(entry.get("fingerprint"), str):
            return entry["fingerprint"]
    fp = _hash_tensors(ckpt, progress)
    if cache:
        try:
            data = _read_cache(path)
            data.pop(key, None)
            data[key] = {"files": identity, "fingerprint": fp}
            while len(data) > FINGERPRINT_CACHE_ENTRIES:  # oldest entries first (dicts keep insertion order)
                data.pop(next(iter(data)))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, path)
        except OSError:
            pass  # an unwritable cache only costs the next hash
    return fp
