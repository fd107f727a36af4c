"""Delta layers: the modules of a resident base model that add each expert's delta for its own tokens.

The engine flattens all running requests into one token axis ([1, tokens, hidden]) with the
tokens of each expert contiguous, and before every forward pass it sets a DeltaContext that says
which token range belongs to which expert. Each wrapped module then computes

    y = base_module(x)                   once, for all tokens (the plain base)
    y[a:b] += expert's delta term        for every expert segment [a, b)

Tokens of the plain base are in no segment. Linear layers add x @ delta^T through a compute
backend (backend.py); RMSNorms and biases use the expert's exact weights; the embedding adds the
expert's delta rows of the looked-up tokens. All of this mirrors what `materialize` computes,
so a request gets what the materialized expert would give it (up to float rounding).

Assumptions: a Llama-family model from transformers (Llama, Mistral, Qwen2, Qwen3): linear
layers are nn.Linear, norms are *RMSNorm with `weight` and `variance_epsilon`, the input embedding
is nn.Embedding and the LM head an nn.Linear (tied to the embedding or not).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compression.delta import CompressedDelta, apply_delta
from .backend import ReadyDelta, TorchBackend


class RuntimeError_(RuntimeError):
    pass


@dataclass
class HotExpert:
    """An expert in compute-ready form: everything the delta layers read for its tokens."""
    name: str
    linear: dict[str, ReadyDelta] = field(default_factory=dict)  # module path -> x @ delta^T operand
    bias_fix: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> expert bias - base bias
    norm: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> the expert's norm weight
    embed: CompressedDelta | None = None  # the embedding's delta (rows dequantized on lookup)
    embed_extra: torch.Tensor | None = None  # embedding rows of tokens the expert added
    head_extra: torch.Tensor | None = None  # LM-head rows of tokens the expert added
    vocab_size: int = 0

    @property
    def nbytes(self) -> int:
        n = sum(r.nbytes for r in self.linear.values())
        n += sum(t.numel() * t.element_size() for t in (*self.bias_fix.values(), *self.norm.values()))
        for t in (self.embed_extra, self.head_extra):
            if t is not None:
                n += t.numel() * t.element_size()
        # The embedding's packed delta is shared with the packed tier when the LM head is tied
        # (it is the same object); counted there.
        return n


class DeltaContext(threading.local):
    """Token ranges of the current forward pass, per expert. Owned by one engine; set each step.
    Thread-local: a forward pass in another thread (the router reading base hidden states while
    the engine runs) sees no segments, i.e. runs the plain base model."""

    def __init__(self) -> None:
        self.segments: list[tuple[HotExpert, int, int]] = []
        self.n_tokens = 0
        self.head_segments: list[tuple[HotExpert, int, int]] = []

    def set(self, segments, n_tokens: int, head_segments) -> None:
        self.segments, self.n_tokens, self.head_segments = segments, n_tokens, head_segments

    def clear(self) -> None:
        self.set([], 0, [])

    def for_rows(self, n: int):
        """Segments for an input of n rows: all tokens, or (LM head) only the kept positions."""
        return self.segments if n == self.n_tokens else self.head_segments


class DeltaLinear(nn.Module):
    def __init__(self, base: nn.Linear, path: str, ctx: DeltaContext, backend: TorchBackend, is_head: bool = False):
        super().__init__()
        self.base = base
        self.path = path
        self.ctx = ctx
        self.backend = backend
        self.is_head = is_head

    @property
    def weight(self):  # transformers reads lm_head.weight (tying, dtype checks)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        segs = self.ctx.for_rows(x[..., 0].numel())
        if not segs:
            return y
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        extra = 0
        for exp, a, b in segs:
            ready = exp.linear.get(self.path)
            if ready is not None:
                y2[a:b] += self.backend.matmul(x2[a:b], ready)
            fix = exp.bias_fix.get(self.path)
            if fix is not None:
                y2[a:b] += fix
            if self.is_head and exp.head_extra is not None:
                extra = max(extra, exp.head_extra.shape[0])
        if self.is_head and extra:
            # Experts that added tokens get logits for them; everyone else gets -inf there.
            wide = torch.full((y2.shape[0], y2.shape[1] + extra), float("-inf"), dtype=y2.dtype)
            wide[:, : y2.shape[1]] = y2
            for exp, a, b in segs:
                if exp.head_extra is not None:
                    n = exp.head_extra.shape[0]
                    wide[a:b, y2.shape[1]: y2.shape[1] + n] = x2[a:b] @ exp.head_extra.t()
            return wide.view(*y.shape[:-1], -1)
        return y


class DeltaRMSNorm(nn.Module):
    def __init__(self, base: nn.Module, path: str, ctx: DeltaContext):
        super().__init__()
        self.base = base
        self.path = path
        self.ctx = ctx

    @property
    def weight(self):
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        segs = self.ctx.for_rows(x[..., 0].numel())
        if not any(self.path in exp.norm for exp, _, _ in segs):
            return self.base(x)
        # The Llama-family RMSNorm, written out so the normalized input is shared by all experts.
        h = x.to(torch.float32)
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.base.variance_epsilon)).to(x.dtype)
        y = self.base.weight * h
        h2, y2 = h.reshape(-1, h.shape[-1]), y.view(-1, y.shape[-1])
        for exp, a, b in segs:
            w = exp.norm.get(self.path)
            if w is not None:
                y2[a:b] = w * h2[a:b]
        return y


class DeltaEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, path: str, ctx: DeltaContext, backend: TorchBackend):
        super().__init__()
        self.base = base
        self.path = path
        self.ctx = ctx
        self.backend = backend

    @property
    def weight(self):
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.base.weight.shape[0]
        segs = self.ctx.for_rows(ids.numel())
        flat = ids.reshape(-1)
        added = flat >= vocab
        y = self.base(flat.clamp(max=vocab - 1) if bool(added.any()) else flat)
        for exp, a, b in segs:
            seg_ids = flat[a:b]
            in_base = ~added[a:b]
            if exp.embed is not None and bool(in_base.any()):
                rows = in_base.nonzero().squeeze(1)
                tok = seg_ids.index_select(0, rows)
                # Exactly what materialize does for these rows: (W + delta) in fp32, then cast.
                y[a + rows] = (self.base.weight.index_select(0, tok).float()
                               + self.backend.gather_rows(exp.embed, tok)).to(y.dtype)
            if exp.embed_extra is not None and bool(added[a:b].any()):
                rows = added[a:b].nonzero().squeeze(1)
                y[a + rows] = exp.embed_extra.index_select(0, seg_ids.index_select(0, rows) - vocab)
        if bool(added.any()):
            ok = torch.zeros_like(added)
            for exp, a, b in segs:
                if exp.embed_extra is not None:
                    ok[a:b] = flat[a:b] < vocab + exp.embed_extra.shape[0]
            bad = added & ~ok
            if bool(bad.any()):
                raise ValueError(f"token id {int(flat[bad][0])} is outside this expert's vocabulary")
        return y.view(*ids.shape, -1)


def _is_rmsnorm(m: nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight")


def install_delta_layers(model: nn.Module, ctx: DeltaContext, backend: TorchBackend) -> dict[str, nn.Module]:
    """Replace every Linear, RMSNorm and the input embedding of `model` by its delta layer, in place.
    Returns the wrapped modules by path (the paths the bundle's tensor names start with)."""
    wrapped: dict[str, nn.Module] = {}
    head_path = _head_path(model)
    embed = model.get_input_embeddings()
    for path, module in list(model.named_modules()):
        if not path:
            continue
        if isinstance(module, nn.Linear):
            new = DeltaLinear(module, path, ctx, backend, is_head=(path == head_path))
        elif _is_rmsnorm(module):
            new = DeltaRMSNorm(module, path, ctx)
        elif module is embed:
            new = DeltaEmbedding(module, path, ctx, backend)
        else:
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, new)
        wrapped[path] = new
    return wrapped


def _head_path(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    for path, module in model.named_modules():
        if module is head:
            return path
    raise RuntimeError_("the model has no output embedding (LM head)")


def build_hot_expert(name: str, deltas: dict[str, CompressedDelta], wrapped: dict[str, nn.Module],
                     backend: TorchBackend, dtype: torch.dtype, tied: bool) -> HotExpert:
    """Turn an expert's packed deltas into the compute-ready form the delta layers read."""
    hot = HotExpert(name)
    head_path = next((p for p, m in wrapped.items() if isinstance(m, DeltaLinear) and m.is_head), None)
    embed_path = next((p for p, m in wrapped.items() if isinstance(m, DeltaEmbedding)), None)
    for tname, delta in deltas.items():
        path, _, pname = tname.rpartition(".")
        module = wrapped.get(path)
        if module is None:
            raise RuntimeError_(f"expert {name!r}: tensor {tname} belongs to no layer of the base model")
        if isinstance(module, DeltaEmbedding):
            hot.embed = delta
            if delta.extra_rows is not None:
                hot.embed_extra = delta.extra_rows.to(dtype)
            if tied and head_path is not None:
                hot.linear[head_path] = backend.prepare(_without_extra(delta), dtype)
                if delta.extra_rows is not None:
                    hot.head_extra = hot.embed_extra
        elif isinstance(module, DeltaLinear) and pname == "weight":
            hot.linear[path] = backend.prepare(_without_extra(delta), dtype)
            if module.is_head and delta.extra_rows is not None:
                hot.head_extra = delta.extra_rows.to(dtype)
        elif isinstance(module, DeltaLinear) and pname == "bias":
            base_b = module.base.bias
            hot.bias_fix[path] = (apply_delta(base_b.detach(), delta, torch.float32) - base_b.float()).to(dtype)
        elif isinstance(module, DeltaRMSNorm) and pname == "weight":
            hot.norm[path] = apply_delta(module.base.weight.detach(), delta, dtype)
        else:
            raise RuntimeError_(f"expert {name!r}: cannot apply a delta to {tname}")
    vocab = wrapped[embed_path].base.weight.shape[0] if embed_path else 0
    hot.vocab_size = vocab + (hot.embed_extra.shape[0] if hot.embed_extra is not None else 0)
    return hot


def _without_extra(delta: CompressedDelta) -> CompressedDelta:
    # Extra vocabulary rows are handled by the layers themselves, not by the backend.
    if delta.extra_rows is None:
        return delta
    import copy

    d = copy.copy(delta)
    d.extra_rows = None
    return d
