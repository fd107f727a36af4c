"""Layer-by-layer compression of one expert: memory bounded by one decoder layer, whatever the depth.

As GPTQ, AWQ and llm-compressor process large models, the calibration hidden states go through
the model one decoder layer at a time, with only that layer's weights in memory, read lazily from
the checkpoints:

1. Teacher pass (the uncompressed expert). The embeddings of the calibration and held-out
   samples go through each expert layer in turn; hooks record the second moment of every linear
   layer's inputs (the statistics of calibration.collect_input_moments, on the same hidden
   states, so the same numbers). Each layer's calibration outputs are written to the work
   directory: they are the targets of block-wise tuning. Then the final norm gives the LM head's
   input moments and the final hidden states the quality is measured from.
2. Student pass (base + compressed delta). The embedding is compressed first (a tied embedding is
   also the LM head, so it is fitted with the LM head's moments from step 1). Then, per layer:
   its tensors are compressed chunk by chunk from lazy reads of base and expert; the student
   layer is built (base + dequantized delta, rounded to the expert's dtype as materialization
   rounds it); optionally its step sizes and offsets are tuned block-wise (OmniQuant / BRECQ
   style: mean squared error between this layer's output on the student's own inputs and the
   expert layer's output); the layer then runs on the student's hidden states, which become the
   next layer's inputs, so later layers see, and tuning corrects, the errors of earlier ones.
3. The final norm, the LM head and any other tensors are compressed; the quality on held-out
   samples is computed from the teacher's and the student's final hidden states, with the two LM
   heads read by chunks of rows and the softmax statistics accumulated chunk by chunk.

Every finished layer is a resume point: the work directory holds `state.json`, `teacher/`
(targets and statistics), `student.safetensors` (the student's hidden states after the last
finished layer) and `deltas/` (one file per finished part: embedding, each layer, final). A
run that is interrupted resumes from there and produces the same result.

Peak memory: one layer of the expert or of the student in the model dtype (plus, while
tuning, that layer's base weights and unpacked codes), the calibration hidden states (teacher
targets, student inputs, and the untuned student path while tuning), and the quantization working
set of one chunk of rows (methods.CHUNK_ELEMENTS). The compressed layers go to disk as they are
made, and the bundle file is written from there one tensor at a time.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from ..checkpoints import Checkpoint, is_vocab_tensor
from ..tensorfile import LazyTensors
from .delta import CompressedDelta, apply_delta, apply_delta_rows, delta_from_tensors
from .methods import CompressionSpec, DeltaRows, compress_matrix, dense_delta, dense_rows
from .quality import quality_summary
from .student import module_name, unwrap_quantized_linears, wrap_quantized_linears

# Tensor names shared by the supported families (checkpoints.SUPPORTED_MODEL_TYPES).
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"
LAYER_PREFIX = "model.layers.{}."
HEAD_CHUNK_ELEMENTS = 1 << 23  # LM head / embedding rows read at a time (32 MiB in float32)
TUNE_MODES = ("blockwise", "end-to-end", "both")


class ResumeError(ValueError):
    """--resume asked for, but the unfinished work was made with other inputs or settings."""


# ------------------------------------------------------------------------------------------ tensors
def _extra_rows(expert_rows: torch.Tensor | None, lossless: bool) -> torch.Tensor | None:
    """Rows an expert added to its vocabulary, stored whole in 16 bits (float32 only if the
    expert itself is float32 and the method is lossless)."""
    if expert_rows is None or expert_rows.shape[0] == 0:
        return None
    if expert_rows.dtype in (torch.float16, torch.bfloat16) or lossless:
        return expert_rows.contiguous()
    return expert_rows.to(torch.float16).contiguous()


def col_weight(name: str, moments: dict[str, torch.Tensor], tied: bool) -> torch.Tensor | None:
    """Calibration second moments of the inputs that multiply this weight's columns."""
    if name.endswith("embed_tokens.weight"):
        # As an LM head (tied), the embedding multiplies the final hidden states.
        return moments.get("lm_head") if tied else None
    return moments.get(module_name(name))


def compress_named(name: str, base: Checkpoint, expert: Checkpoint, spec: CompressionSpec,
                   moments: dict[str, torch.Tensor], device: str = "cpu") -> CompressedDelta:
    """Compress the delta of one tensor, reading base and expert rows lazily, chunk by chunk."""
    bname = base.resolve(name)
    shape = base.shape(bname)
    e_rows = expert.shape(name)[0]
    lossless = spec.method == "fp16"
    extra = _extra_rows(expert.get_rows(name, shape[0], e_rows) if e_rows > shape[0] else None, lossless)
    if len(shape) == 2:
        def read(a, b):
            return expert.get_rows(name, a, b).to(device).float() - base.get_rows(bname, a, b).to(device).float()

        pair = (lambda a, b: (base.get_rows(bname, a, b), expert.get_rows(name, a, b))) if lossless else None
        rows = DeltaRows(tuple(shape), read, pair=pair)
        if lossless or (is_vocab_tensor(name) and not spec.compress_embeddings):
            d = dense_rows(rows)
        else:
            d = compress_matrix(rows, spec, col_weight(name, moments, expert.tied))
    else:
        e, b = expert.get(name)[: shape[0]], base.get(bname)
        d = dense_delta(e.float() - b.float(), b, e) if lossless else dense_delta(e.float() - b.float())
    d.extra_rows = extra
    return d


class DeltaStore:
    """Compressed deltas on disk, one safetensors file per part (embedding, each layer, final),
    each written atomically with its layout records in the file's metadata."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.safetensors"))

    def write(self, part: str, deltas: dict[str, CompressedDelta]) -> None:
        tensors, layout = {}, {}
        for name, d in deltas.items():
            ts, meta = d.to_tensors(name)
            tensors.update({k: v.contiguous() for k, v in ts.items()})
            layout[name] = meta
        tmp = self.path / f".{part}.tmp"
        save_file(tensors, tmp, metadata={"layout": json.dumps(layout, separators=(",", ":"))})
        os.replace(tmp, self.path / f"{part}.safetensors")

    def layout(self) -> dict[str, dict]:
        from safetensors import safe_open

        out: dict[str, dict] = {}
        for f in self.files():
            with safe_open(f, framework="pt") as sf:
                out.update(json.loads(sf.metadata()["layout"]))
        return out

    def tensors(self) -> LazyTensors:
        return LazyTensors(self.files())

    def load(self, names: list[str] | None = None) -> dict[str, CompressedDelta]:
        """The deltas of `names` (default: every delta, for end-to-end tuning and tests) in memory."""
        lazy, layout = self.tensors(), self.layout()

        def get(key, default=...):
            if key not in lazy.where and default is not ...:
                return default
            return lazy.get(key)

        return {name: delta_from_tensors(name, layout[name], get) for name in (names or layout)}

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * torch.empty(0, dtype=dt).element_size() for _, dt, shape in self.tensors().specs())


# ---------------------------------------------------------------------------------------- layers
class DecoderStack:
    """One decoder layer at a time, called exactly as the model's own forward calls it.

    A skeleton of the model is built on the meta device (no memory). Its forward is run once
    per sequence length with every layer replaced by a recorder that passes the hidden states
    through: what the model hands each layer (attention mask, rotary position embeddings,
    position ids) is recorded and reused for the real layers, so a layer run here computes
    exactly what it computes inside the whole model."""

    def __init__(self, config, dtype: torch.dtype, device: str):
        from ..checkpoints import causal_lm_class

        self.dtype, self.device = dtype, device
        with torch.device("meta"):
            self.skeleton = causal_lm_class(config)(config)
        self.config = self.skeleton.config
        self.num_layers = self.config.num_hidden_layers
        self.hidden = self.config.hidden_size
        self._layers = list(self.skeleton.model.layers)
        self._norm = self.skeleton.model.norm
        rotary = self.skeleton.model.rotary_emb
        self.skeleton.model.rotary_emb = type(rotary)(config=self.config).to(device)
        self._kwargs: dict[int, list[dict]] = {}

    def layer_kwargs(self, length: int) -> list[dict]:
        if length not in self._kwargs:
            recorded: list[dict] = [None] * self.num_layers  # type: ignore[list-item]

            class Recorder(nn.Module):
                def __init__(self, i):
                    super().__init__()
                    self.i = i

                def forward(self, hidden_states, **kwargs):
                    recorded[self.i] = kwargs
                    return hidden_states

            model = self.skeleton.model
            layers, norm = model.layers, model.norm
            model.layers = nn.ModuleList([Recorder(i) for i in range(self.num_layers)])
            model.norm = nn.Identity()
            try:
                with torch.no_grad():
                    model(inputs_embeds=torch.zeros(1, length, self.hidden, dtype=self.dtype, device=self.device),
                          use_cache=False)
            finally:
                model.layers, model.norm = layers, norm
            self._kwargs[length] = recorded
        return self._kwargs[length]

    def _materialize(self, meta_module: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
        module = copy.deepcopy(meta_module)
        state = {k: v.to(device=self.device, dtype=self.dtype) for k, v in tensors.items()}
        module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    def layer(self, i: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
        """Decoder layer i with these tensors (names relative to the layer)."""
        return self._materialize(self._layers[i], tensors)

    def norm(self, weight: torch.Tensor) -> nn.Module:
        return self._materialize(self._norm, {"weight": weight})

    def run(self, layer: nn.Module, i: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return [layer(h, **self.layer_kwargs(h.shape[1])[i]) for h in hidden]


def layer_tensor_names(ckpt: Checkpoint, i: int) -> list[str]:
    prefix = LAYER_PREFIX.format(i)
    return [n for n in ckpt.weight_names() if n.startswith(prefix)]


def _relative(names: list[str], i: int) -> dict[str, str]:
    prefix = LAYER_PREFIX.format(i)
    return {n: n[len(prefix):] for n in names}


# ---------------------------------------------------------------------------- embeddings and heads
def _row_chunks(rows: int, cols: int):
    step = max(1, HEAD_CHUNK_ELEMENTS // max(cols, 1))
    for a in range(0, rows, step):
        yield a, min(rows, a + step)


def embed(seqs: list[torch.Tensor], rows_fn, vocab: int, cols: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """F.embedding of each sequence, the table read in chunks of rows: rows_fn(a, b) -> rows [a, b)."""
    out = [torch.empty(1, len(ids), cols, dtype=dtype, device=device) for ids in seqs]
    for a, b in _row_chunks(vocab, cols):
        w = rows_fn(a, b).to(device=device, dtype=dtype)
        for ids, o in zip(seqs, out):
            ids = ids.to(device)
            hit = (ids >= a) & (ids < b)
            if hit.any():
                o[0, hit] = w[ids[hit] - a]
    return out


@dataclass
class SoftmaxStats:
    """Per-position statistics of two next-token distributions (teacher t, student s),
    accumulated over chunks of the vocabulary with the online-softmax rescaling."""

    m_t: torch.Tensor
    z_t: torch.Tensor
    a: torch.Tensor  # sum over the vocabulary of exp(lt - m_t) * (lt - ls)
    m_s: torch.Tensor
    z_s: torch.Tensor
    best_t: torch.Tensor
    arg_t: torch.Tensor
    best_s: torch.Tensor
    arg_s: torch.Tensor
    tgt_t: torch.Tensor
    tgt_s: torch.Tensor

    @classmethod
    def new(cls, n: int, device) -> "SoftmaxStats":
        def full(v, dtype=torch.float32):
            return torch.full((n,), v, dtype=dtype, device=device)

        return cls(full(-math.inf), full(0.0), full(0.0), full(-math.inf), full(0.0), full(-math.inf),
                   full(0, torch.long), full(-math.inf), full(0, torch.long), full(0.0), full(0.0))

    def update(self, lt: torch.Tensor, ls: torch.Tensor, a: int, targets: torch.Tensor) -> None:
        for side, logits in (("t", lt), ("s", ls)):
            m_old = getattr(self, f"m_{side}")
            m_new = torch.maximum(m_old, logits.max(dim=-1).values)
            rescale = torch.exp(m_old - m_new)
            e = torch.exp(logits - m_new[:, None])
            setattr(self, f"z_{side}", getattr(self, f"z_{side}") * rescale + e.sum(-1))
            if side == "t":
                self.a = self.a * rescale + (e * (lt - ls)).sum(-1)
            setattr(self, f"m_{side}", m_new)
            best, arg = logits.max(dim=-1)
            better = best > getattr(self, f"best_{side}")
            setattr(self, f"best_{side}", torch.where(better, best, getattr(self, f"best_{side}")))
            setattr(self, f"arg_{side}", torch.where(better, arg + a, getattr(self, f"arg_{side}")))
            hit = (targets >= a) & (targets < a + logits.shape[1])
            if hit.any():
                rows = hit.nonzero().squeeze(1)
                tgt = getattr(self, f"tgt_{side}")
                tgt[rows] = logits[rows, targets[rows] - a]

    def kl(self) -> torch.Tensor:
        lse_t = self.m_t + torch.log(self.z_t)
        lse_s = self.m_s + torch.log(self.z_s)
        return self.a / self.z_t - lse_t + lse_s


def compare_heads(groups: list[tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]], head_t, head_s,
                  vocab: int, cols: int, dtype: torch.dtype, device: str) -> list[dict]:
    """quality.compare_to_expert from final hidden states, for each group of (token ids,
    teacher hidden states, student hidden states): KL(teacher || student), top-1 agreement and
    both perplexities. The two LM heads are read once, in chunks of rows (head_x(a, b))."""
    stats = [[SoftmaxStats.new(len(ids), device) for ids in seqs] for seqs, _, _ in groups]
    targets = [[torch.cat([ids[1:], ids[:1]]).to(device) for ids in seqs] for seqs, _, _ in groups]  # last: unused
    for a, b in _row_chunks(vocab, cols):
        wt = head_t(a, b).to(device=device, dtype=dtype)
        ws = head_s(a, b).to(device=device, dtype=dtype)
        with torch.no_grad():
            by_teacher: dict[int, list[int]] = {}  # groups on the same teacher states share its logits
            for g, (_, teacher, _) in enumerate(groups):
                by_teacher.setdefault(id(teacher), []).append(g)
            for members in by_teacher.values():
                for j, ht in enumerate(groups[members[0]][1]):
                    lt = F.linear(ht[0], wt).float()
                    for g in members:
                        stats[g][j].update(lt, F.linear(groups[g][2][j][0], ws).float(), a, targets[g][j])
    return [_quality(seqs, st_g) for (seqs, _, _), st_g in zip(groups, stats)]


def _quality(seqs: list[torch.Tensor], stats: list[SoftmaxStats]) -> dict:
    if not seqs:
        return {}
    kl_sum = agree = nll_e = nll_r = 0.0
    for st in stats:
        kl_sum += float(st.kl().sum())
        agree += float((st.arg_t == st.arg_s).sum())
        nll_e -= float((st.tgt_t - st.m_t - torch.log(st.z_t))[:-1].sum())
        nll_r -= float((st.tgt_s - st.m_s - torch.log(st.z_s))[:-1].sum())
    return quality_summary(kl_sum, agree, nll_e, nll_r, [len(ids) for ids in seqs])


def logprobs(hidden: list[torch.Tensor], head: torch.Tensor, out_dtype: torch.dtype) -> list[torch.Tensor]:
    """log softmax of the next-token logits of each sequence (the targets of end-to-end tuning)."""
    with torch.no_grad():
        return [torch.log_softmax(F.linear(h[0], head).float(), dim=-1).to(out_dtype).cpu() for h in hidden]


# ------------------------------------------------------------------------------------ saved state
def _save_list(path: Path, prefix: str, tensors: list[torch.Tensor], extra: dict[str, torch.Tensor] | None = None) -> None:
    d = {f"{prefix}.{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(tensors)}
    d.update({k: v.detach().to("cpu").contiguous() for k, v in (extra or {}).items()})
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(d, tmp)
    os.replace(tmp, path)


def _load_list(path: Path, prefix: str, device: str) -> list[torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        keys = [k for k in f.keys() if k.startswith(prefix + ".") and k[len(prefix) + 1:].isdigit()]
        return [f.get_tensor(k).to(device) for k in sorted(keys, key=lambda k: int(k.rsplit(".", 1)[1]))]


def _load_dict(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k).to(device) for k in f.keys()}


@dataclass
class WorkState:
    """What is finished, in the work directory's state.json (rewritten atomically after each step)."""

    path: Path
    key: dict
    teacher_layers: int = 0
    teacher_final: bool = False
    student_layers: int = 0
    student_final: bool = False
    end_to_end: bool = False
    result: dict = field(default_factory=dict)
    layer_mse: list = field(default_factory=list)

    @classmethod
    def open(cls, path: Path, key: dict, resume: bool, log) -> "WorkState":
        f = path / "state.json"
        if f.is_file():
            try:
                saved = json.loads(f.read_text())
            except ValueError:
                saved = None
            if resume and saved is not None and saved.get("key") == key:
                fields = {k: v for k, v in saved.items() if k in cls.__dataclass_fields__ and k not in ("path", "key")}
                state = cls(path=path, key=key, **fields)
                log(f"resuming: {state.describe()}")
                return state
            if resume and saved is not None:
                diff = sorted(k for k in set(key) | set(saved.get("key", {})) if key.get(k) != saved.get("key", {}).get(k))
                raise ResumeError(f"the unfinished compression in {path} was made with other inputs or settings "
                                  f"({', '.join(diff)} differ); run without --resume to start over")
            log(f"discarding an unfinished compression in {path} (pass --resume to continue it instead)")
        elif resume:
            log(f"nothing to resume in {path}: starting from the beginning")
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        state = cls(path=path, key=key)
        state.save()
        return state

    def describe(self) -> str:
        return (f"teacher {self.teacher_layers} layers{' + final' if self.teacher_final else ''}, "
                f"student {self.student_layers} layers{' + final' if self.student_final else ''}")

    def save(self) -> None:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "path"}
        tmp = self.path / ".state.json.tmp"
        tmp.write_text(json.dumps(d, indent=1))
        os.replace(tmp, self.path / "state.json")


def run_key(base_fp: str, expert: Checkpoint, spec: CompressionSpec, seqs: list[torch.Tensor], heldout: list[torch.Tensor],
            tune: str | None, tune_steps: int, lr: float, model_dtype: torch.dtype) -> dict:
    """Everything a resumed run must share with the interrupted one."""
    h = hashlib.sha256()
    for group in (seqs, heldout):
        for ids in group:
            h.update(ids.numpy().astype("int64").tobytes())
        h.update(b"|")
    files = [[str(f), os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in expert.weight_files()]
    return {"base": base_fp, "expert": expert.reference, "expert_files": files, "spec": spec.as_dict(),
            "samples": h.hexdigest(), "tune": tune, "tune_steps": tune_steps, "lr": lr, "model_dtype": str(model_dtype)}


# -------------------------------------------------------------------------------------- the passes
@dataclass
class LayerwiseRun:
    base: Checkpoint
    expert: Checkpoint
    spec: CompressionSpec
    calib: list[torch.Tensor]
    heldout: list[torch.Tensor]
    work: Path
    state: WorkState
    blockwise_steps: int = 0  # step-size tuning steps per layer (0: none)
    lr: float = 5e-3
    model_dtype: torch.dtype = torch.float32
    device: str = "cpu"
    progress: bool = True
    name: str = "expert"
    stop_after_layer: int | None = None  # tests: raise after this student layer (a simulated crash)

    def __post_init__(self):
        self.stack = DecoderStack(self.expert.model_config(), self.model_dtype, self.device)
        self.weight_dtype = self.expert.dtype()
        self.vocab = self.expert.shape(EMBED)[0]
        self.head_vocab = self.expert.shape(self.expert.resolve(HEAD))[0]
        self.store = DeltaStore(self.work / "deltas")
        (self.work / "teacher").mkdir(exist_ok=True)

    # ---- teacher ---------------------------------------------------------------------------
    def teacher_pass(self) -> None:
        st, L = self.state, self.stack.num_layers
        tdir = self.work / "teacher"
        if st.teacher_final:
            return
        if st.teacher_layers == 0:
            rows = lambda a, b: self.expert.get_rows(EMBED, a, b)  # noqa: E731
            h_cal = embed(self.calib, rows, self.vocab, self.stack.hidden, self.model_dtype, self.device)
            h_held = embed(self.heldout, rows, self.vocab, self.stack.hidden, self.model_dtype, self.device)
        else:
            h_cal = _load_list(tdir / f"h{st.teacher_layers}.safetensors", "h", self.device)
            h_held = _load_list(tdir / "heldout.safetensors", "h", self.device)
        bar = tqdm(range(st.teacher_layers, L), desc=f"[{self.name}] expert layers", initial=st.teacher_layers,
                   total=L, disable=not self.progress, unit="layer")
        for i in bar:
            names = layer_tensor_names(self.expert, i)
            rel = _relative(names, i)
            layer = self.stack.layer(i, {rel[n]: self.expert.get(n) for n in names})
            moments: dict[str, torch.Tensor] = {}
            hooks = [m.register_forward_hook(_moment_hook(moments, LAYER_PREFIX.format(i) + mname))
                     for mname, m in layer.named_modules() if isinstance(m, nn.Linear)]
            try:
                h_cal = self.stack.run(layer, i, h_cal)
            finally:
                for h in hooks:
                    h.remove()
            h_held = self.stack.run(layer, i, h_held)
            del layer
            _save_list(tdir / f"m{i}.safetensors", "m", [], moments)
            _save_list(tdir / f"h{i + 1}.safetensors", "h", h_cal)
            _save_list(tdir / "heldout.safetensors", "h", h_held)
            st.teacher_layers = i + 1
            st.save()
        norm = self.stack.norm(self.expert.get(NORM))
        with torch.no_grad():
            f_cal = [norm(h) for h in h_cal]
            f_held = [norm(h) for h in h_held]
        head_moments = None
        for f in f_cal:
            x = f.float().reshape(-1, f.shape[-1])
            s = (x * x).sum(dim=0).cpu()
            head_moments = s if head_moments is None else head_moments + s
        _save_list(tdir / "final.safetensors", "cal", f_cal, {"lm_head_moment": head_moments})
        _save_list(tdir / "final_heldout.safetensors", "h", f_held)
        st.teacher_final = True
        st.save()

    def moments(self) -> dict[str, torch.Tensor]:
        """Every recorded second moment (small: one float per input feature of each linear)."""
        tdir = self.work / "teacher"
        out = {}
        for i in range(self.stack.num_layers):
            f = tdir / f"m{i}.safetensors"
            if f.is_file():
                out.update(_load_dict(f))
        out["lm_head"] = _load_dict(tdir / "final.safetensors")["lm_head_moment"]
        return out

    def _layer_moments(self, i: int) -> dict[str, torch.Tensor]:
        f = self.work / "teacher" / f"m{i}.safetensors"
        return _load_dict(f) if f.is_file() else {}

    # ---- student ---------------------------------------------------------------------------
    def student_embedding_rows(self, d: CompressedDelta):
        bname = self.base.resolve(EMBED)
        rows = self.base.shape(bname)[0]
        return lambda a, b: apply_delta_rows(self.base.get_rows(bname, a, min(b, rows)), d, a, b, self.weight_dtype)

    def student_pass(self) -> None:
        st, L = self.state, self.stack.num_layers
        tdir = self.work / "teacher"
        if st.student_final:
            return
        head_moment = _load_dict(tdir / "final.safetensors")["lm_head_moment"]
        track_untuned = self.blockwise_steps > 0
        if st.student_layers == 0:
            d_embed = compress_named(EMBED, self.base, self.expert, self.spec, {"lm_head": head_moment}, self.device)
            self.store.write("0-embed", {EMBED: d_embed})
            rows = self.student_embedding_rows(d_embed)
            x_cal = embed(self.calib, rows, self.vocab, self.stack.hidden, self.model_dtype, self.device)
            x_held = embed(self.heldout, rows, self.vocab, self.stack.hidden, self.model_dtype, self.device)
            x_unt = x_cal
        else:
            f = self.work / "student.safetensors"
            x_cal, x_held = _load_list(f, "cal", self.device), _load_list(f, "held", self.device)
            x_unt = _load_list(f, "untuned", self.device) if track_untuned else x_cal
        bar = tqdm(range(st.student_layers, L), desc=f"[{self.name}] compress layers", initial=st.student_layers,
                   total=L, disable=not self.progress, unit="layer")
        for i in bar:
            names = layer_tensor_names(self.expert, i)
            rel = _relative(names, i)
            moments = self._layer_moments(i)
            deltas = {n: compress_named(n, self.base, self.expert, self.spec, moments, self.device) for n in names}
            layer = self.stack.layer(i, {rel[n]: apply_delta(self.base.get(n), deltas[n], self.weight_dtype) for n in names})
            if track_untuned:
                x_unt = self.stack.run(layer, i, x_unt)
                target = _load_list(tdir / f"h{i + 1}.safetensors", "h", self.device)
                before = _mse(self.stack.run(layer, i, x_cal), target)
                tuned = self.tune_layer(layer, i, deltas, x_cal, target)
                x_cal = self.stack.run(layer, i, x_cal)
                after = _mse(x_cal, target)
                st.layer_mse.append([before, after, tuned])
                bar.set_postfix(mse=f"{before:.3g}->{after:.3g}")
                del target
            else:
                x_cal = self.stack.run(layer, i, x_cal)
            x_held = self.stack.run(layer, i, x_held)
            del layer
            self.store.write(f"1-layer{i:05d}", deltas)
            del deltas
            _save_list(self.work / "student.safetensors", "cal", x_cal,
                       {**{f"held.{j}": t for j, t in enumerate(x_held)},
                        **({f"untuned.{j}": t for j, t in enumerate(x_unt)} if track_untuned else {})})
            st.student_layers = i + 1
            st.save()
            (tdir / f"h{i + 1}.safetensors").unlink(missing_ok=True)  # this layer's targets are used up
            if self.stop_after_layer is not None and i == self.stop_after_layer:
                raise KeyboardInterrupt(f"stopped after layer {i} (test)")
        self.final_step(x_cal, x_held, x_unt if track_untuned else None)

    def tune_layer(self, layer: nn.Module, i: int, deltas: dict[str, CompressedDelta], inputs: list[torch.Tensor],
                   targets: list[torch.Tensor]) -> int:
        """Block-wise tuning: the step sizes and offsets of the layer's quantized matrices are
        learned (Adam, `blockwise_steps` steps of one calibration sample each, cycling) to
        minimise the mean squared error between the layer's output on the student's inputs and
        the expert layer's output; the deltas get the learned values, the layer its rebuilt weights."""
        prefix = LAYER_PREFIX.format(i)
        wrapped = wrap_quantized_linears(layer, deltas, self.base.get, prefix)
        if not wrapped:
            return 0
        params = [p for w in wrapped.values() for p in w.trainable()]
        opt = torch.optim.Adam(params, lr=self.lr)
        for step in range(self.blockwise_steps):
            j = step % len(inputs)
            x = inputs[j]
            y = layer(x, **self.stack.layer_kwargs(x.shape[1])[i])
            loss = F.mse_loss(y.float(), targets[j].float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            del y, loss  # the graph holds the wrappers; none kept past its step
        tuned = len(wrapped)
        del opt, params
        unwrap_quantized_linears(layer, wrapped, deltas, self.base.get, self.weight_dtype, prefix)
        return tuned

    def final_step(self, x_cal, x_held, x_unt) -> None:
        """Norm, LM head and any other tensors; quality on the held-out samples."""
        st = self.state
        tdir = self.work / "teacher"
        head_moment = _load_dict(tdir / "final.safetensors")["lm_head_moment"]
        names = [n for n in self.expert.weight_names() if n != EMBED and not n.startswith("model.layers.")]
        deltas = {n: compress_named(n, self.base, self.expert, self.spec, {"lm_head": head_moment}, self.device)
                  for n in names}
        self.store.write("2-final", deltas)
        norm = self.stack.norm(apply_delta(self.base.get(NORM), deltas[NORM], self.weight_dtype))
        with torch.no_grad():
            f_held = [norm(h) for h in x_held]
        head_s = self.student_head(deltas)
        head_t = self.teacher_head()
        groups = [(self.heldout, _load_list(tdir / "final_heldout.safetensors", "h", self.device), f_held)]
        if x_unt is not None:  # calibration KL of the untuned and of the tuned student
            t_cal = _load_list(tdir / "final.safetensors", "cal", self.device)
            with torch.no_grad():
                groups += [(self.calib, t_cal, [norm(h) for h in x_unt]), (self.calib, t_cal, [norm(h) for h in x_cal])]
        measured = compare_heads(groups, head_t, head_s, self.head_vocab, self.stack.hidden, self.model_dtype, self.device)
        result = {"quality": measured[0]}
        if x_unt is not None:
            mse = st.layer_mse
            result["tuning"] = {
                "mode": "blockwise", "steps": self.blockwise_steps, "lr": self.lr,
                "tuned_matrices": sum(m[2] for m in mse),
                "kl_before": measured[1]["kl"], "kl_after": measured[2]["kl"],
                "layer_mse_before": [m[0] for m in mse], "layer_mse_after": [m[1] for m in mse],
            }
        st.result = result
        st.student_final = True
        st.save()
        for f in tdir.glob("h*.safetensors"):
            f.unlink()
        (self.work / "student.safetensors").unlink(missing_ok=True)

    def teacher_head(self):
        hname = self.expert.resolve(HEAD)
        return lambda a, b: self.expert.get_rows(hname, a, b)

    def student_head(self, final_deltas: dict[str, CompressedDelta]):
        if self.expert.tied:
            return self.student_embedding_rows(self.store.load([EMBED])[EMBED])
        bname = self.base.resolve(HEAD)
        rows = self.base.shape(bname)[0]
        d = final_deltas[HEAD]
        return lambda a, b: apply_delta_rows(self.base.get_rows(bname, a, min(b, rows)), d, a, b, self.weight_dtype)


def _moment_hook(moments: dict[str, torch.Tensor], name: str):
    """s_i = sum over tokens of x_i^2 of a linear layer's input (as calibration.collect_input_moments)."""
    def hook(module, inputs, output):
        x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
        s = (x * x).sum(dim=0).cpu()
        moments[name] = s if name not in moments else moments[name] + s

    return hook


def _mse(outputs: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    total = count = 0.0
    for y, t in zip(outputs, targets, strict=True):
        total += float(((y.float() - t.float()) ** 2).sum())
        count += y.numel()
    return total / max(count, 1)
