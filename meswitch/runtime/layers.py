"""Delta layers: the modules of a resident base model that add each expert's delta for its own tokens.

The engine flattens all running requests into one token axis ([1, tokens, hidden]) with the
tokens of each expert contiguous, and before every forward pass it sets a DeltaContext that says
which token range belongs to which expert. Each wrapped module then computes

    y = base_module(x)                   once, for all tokens (the plain base)
    y[a:b] += expert's delta term        for every expert segment [a, b)

Tokens of the plain base are in no segment. Linear layers hand the whole product to the compute
backend (backend.py, `linear`: the base product plus x @ delta^T for all segments in one call,
long prefill segments there as one GEMM with the expert's weight W + delta); RMSNorms and
biases use the expert's exact weights; the embedding adds the expert's delta rows of the
looked-up tokens. All of this mirrors what
`materialize` computes, so a request gets what the materialized expert would give it (up to
float rounding).

Which rows a module sees is stated, not guessed: every module works on the token axis (its input
is [1, tokens, ...], e.g. [1, tokens, heads, head_dim] for Qwen3's q/k norms), except the LM
head, which sees only the positions whose logits are kept; the engine gives their segments
separately (`head_segments`, one row per sampled request), as vLLM passes sampler indices.

Assumptions: a Llama-family model from transformers (Llama, Mistral, Qwen2, Qwen3): linear
layers are nn.Linear, norms are *RMSNorm with `weight` and `variance_epsilon`, the input embedding
is nn.Embedding and the LM head an nn.Linear (tied to the embedding or not).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from ..compression.delta import CompressedDelta, DenseDelta, QuantizedDelta, apply_delta
from .backend import DeltaBackend, ReadyDelta


class DeltaLayerError(ValueError):
    """A delta that does not fit the base model's layers, or a forward pass the layers cannot map
    onto the engine's token segments."""


@dataclass
class HotExpert:
    """An expert in compute-ready form: everything the delta layers read for its tokens."""
    name: str
    linear: list[ReadyDelta | None]  # by linear layer index (DeltaLinear.index)
    table: object = None  # the backend's index of `linear` (backend.expert_table)
    bias_fix: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> expert bias - base bias
    norm: dict[str, torch.Tensor] = field(default_factory=dict)  # module path -> the expert's norm weight
    embed: object | None = None  # the embedding delta as the backend reads rows of it (prepare_rows)
    embed_extra: torch.Tensor | None = None  # embedding rows of tokens the expert added
    head_extra: torch.Tensor | None = None  # LM-head rows of tokens the expert added
    vocab_size: int = 0

    @property
    def nbytes(self) -> int:
        """Memory beyond the expert's packed deltas (which the store counts on their own)."""
        n = sum(r.nbytes for r in self.linear if r is not None)
        if self.embed is not None and not isinstance(self.embed, (QuantizedDelta, DenseDelta)):
            n += self.embed.nbytes  # a ready form made for the lookups (a stored delta read as is costs nothing)
        n += sum(t.numel() * t.element_size() for t in (*self.bias_fix.values(), *self.norm.values()))
        for t in {id(t): t for t in (self.embed_extra, self.head_extra) if t is not None}.values():  # tied: one
            n += t.numel() * t.element_size()
        return n


Segments = list[tuple[HotExpert, int, int]]


class DeltaContext(threading.local):
    """Token ranges of the current forward pass, per expert, and the backend's plan for them.
    Owned by one engine; set each step. Thread-local: a forward pass in another thread (the router
    reading base hidden states while the engine runs) sees no segments, i.e. runs the plain base."""

    def __init__(self, backend: DeltaBackend) -> None:
        self.backend = backend
        self.clear()

    def set(self, segments: Segments, n_tokens: int, head_segments: Segments, n_head_rows: int,
            added_tokens: bool | None = None) -> None:
        """segments: (expert, a, b) over the n_tokens of the pass; head_segments: over the
        n_head_rows positions whose logits are computed; added_tokens: whether some token id is
        beyond the base vocabulary (known on the host; None: the embedding checks on the device)."""
        self.added_tokens = added_tokens
        self._token_segments = None
        self.segments, self.n_tokens = segments, n_tokens
        self.head_segments, self.n_head_rows = head_segments, n_head_rows
        self.plan = self.backend.plan([(h.table, a, b) for h, a, b in segments]) if segments else None
        self.head_plan = self.backend.plan([(h.table, a, b) for h, a, b in head_segments]) if head_segments else None

    def token_segments(self, device: torch.device) -> torch.Tensor:
        """[n_tokens] long: 1 + the index of each token's segment, 0 for tokens of the plain base.
        Built on the device at the first use of a pass (one fill per segment, no host read)."""
        if self._token_segments is None:
            t = torch.zeros(self.n_tokens, dtype=torch.long, device=device)
            for i, (_, a, b) in enumerate(self.segments):
                t[a:b] = i + 1
            self._token_segments = t
        return self._token_segments

    def clear(self) -> None:
        self.added_tokens = None
        self._token_segments = None
        self.segments, self.n_tokens, self.plan = [], 0, None
        self.head_segments, self.n_head_rows, self.head_plan = [], 0, None


def _token_rows(x: torch.Tensor, n_tokens: int, what: str) -> torch.Tensor:
    """x viewed as [n_tokens, -1, features]: the engine's token axis first."""
    if x.numel() % (n_tokens * x.shape[-1]):
        raise DeltaLayerError(f"{what}: input of shape {tuple(x.shape)} does not have the pass's {n_tokens} tokens")
    return x.reshape(n_tokens, -1, x.shape[-1])


class DeltaLinear(nn.Module):
    def __init__(self, base: nn.Linear, path: str, index: int, ctx: DeltaContext, is_head: bool = False):
        super().__init__()
        self.base = base
        self.path = path
        self.index = index  # position in HotExpert.linear
        self.ctx = ctx
        self.is_head = is_head

    @property
    def weight(self):  # transformers reads lm_head.weight (tying, dtype checks)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        segs, plan, rows = ((ctx.head_segments, ctx.head_plan, ctx.n_head_rows) if self.is_head
                            else (ctx.segments, ctx.plan, ctx.n_tokens))
        if not segs:
            return self.base(x)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] != rows:
            raise DeltaLayerError(f"{self.path}: {x2.shape[0]} input rows, the pass has {rows}")
        # the base product and every segment's delta, as the backend computes them best
        y2 = ctx.backend.linear(x2.contiguous(), self.base.weight, self.base.bias, plan, self.index)
        y = y2.view(*x.shape[:-1], y2.shape[-1])
        extra = 0
        for exp, a, b in segs:
            fix = exp.bias_fix.get(self.path)
            if fix is not None:
                y2[a:b] += fix
            if self.is_head and exp.head_extra is not None:
                extra = max(extra, exp.head_extra.shape[0])
        if self.is_head and extra:
            # Experts that added tokens get logits for them; everyone else gets -inf there.
            wide = torch.full((y2.shape[0], y2.shape[1] + extra), float("-inf"), dtype=y2.dtype, device=y2.device)
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
        segs = self.ctx.segments
        if not any(self.path in exp.norm for exp, _, _ in segs):
            return self.base(x)
        # The Llama-family RMSNorm, written out so the normalized input is shared by all experts.
        h = x.to(torch.float32)
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.base.variance_epsilon)).to(x.dtype)
        h2 = _token_rows(h, self.ctx.n_tokens, self.path)
        # Each token's norm weight (the base's, or its expert's), gathered in one go: three
        # launches per norm whatever the number of experts in the batch.
        base_w = self.base.weight
        weights = torch.stack([base_w] + [exp.norm.get(self.path, base_w) for exp, _, _ in segs])
        y2 = weights.index_select(0, self.ctx.token_segments(h.device)).unsqueeze(1) * h2
        return y2.view(h.shape)


class DeltaEmbedding(nn.Module):
    def __init__(self, base: nn.Embedding, path: str, ctx: DeltaContext):
        super().__init__()
        self.base = base
        self.path = path
        self.ctx = ctx

    @property
    def weight(self):
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.base.weight.shape[0]
        segs = self.ctx.segments
        flat = ids.reshape(-1)
        if segs and flat.numel() != self.ctx.n_tokens:
            raise DeltaLayerError(f"{self.path}: {flat.numel()} token ids, the pass has {self.ctx.n_tokens}")
        added = flat >= vocab
        # a host sync only outside the engine (which says whether the pass has added tokens)
        any_added = bool(added.any()) if self.ctx.added_tokens is None else self.ctx.added_tokens
        y = self.base(flat.clamp(max=vocab - 1) if any_added else flat)
        backend = self.ctx.backend
        for exp, a, b in segs:
            seg_ids = flat[a:b]
            if exp.embed is not None:
                rows = (~added[a:b]).nonzero().squeeze(1) if any_added else None
                tok = seg_ids if rows is None else seg_ids.index_select(0, rows)
                # Exactly what materialize does for these rows: (W + delta) in fp32, then cast.
                new = (self.base.weight.index_select(0, tok).float() + backend.gather_rows(exp.embed, tok)).to(y.dtype)
                if rows is None:
                    y[a:b] = new
                else:
                    y[a + rows] = new
            if exp.embed_extra is not None and any_added and bool(added[a:b].any()):
                rows = added[a:b].nonzero().squeeze(1)
                y[a + rows] = exp.embed_extra.index_select(0, seg_ids.index_select(0, rows) - vocab)
        if any_added:
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


def install_delta_layers(model: nn.Module, ctx: DeltaContext) -> dict[str, nn.Module]:
    """Replace every Linear, RMSNorm and the input embedding of `model` by its delta layer, in place.
    Returns the wrapped modules by path (the paths the bundle's tensor names start with)."""
    wrapped: dict[str, nn.Module] = {}
    head_path = _head_path(model)
    embed = model.get_input_embeddings()
    n_linear = 0
    for path, module in list(model.named_modules()):
        if not path:
            continue
        if isinstance(module, nn.Linear):
            new = DeltaLinear(module, path, n_linear, ctx, is_head=(path == head_path))
            n_linear += 1
        elif _is_rmsnorm(module):
            new = DeltaRMSNorm(module, path, ctx)
        elif module is embed:
            new = DeltaEmbedding(module, path, ctx)
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
    raise DeltaLayerError("the model has no output embedding (LM head)")


def build_hot_expert(name: str, deltas: dict[str, CompressedDelta], wrapped: dict[str, nn.Module],
                     backend: DeltaBackend, dtype: torch.dtype, tied: bool) -> HotExpert:
    """Turn an expert's packed deltas into the compute-ready form the delta layers read."""
    linears = {p: m for p, m in wrapped.items() if isinstance(m, DeltaLinear)}
    hot = HotExpert(name, [None] * len(linears))
    head = next((m for m in linears.values() if m.is_head), None)
    embed_path = next((p for p, m in wrapped.items() if isinstance(m, DeltaEmbedding)), None)
    for tname, delta in deltas.items():
        path, _, pname = tname.rpartition(".")
        module = wrapped.get(path)
        if module is None:
            raise DeltaLayerError(f"expert {name!r}: tensor {tname} belongs to no layer of the base model")
        if isinstance(module, DeltaEmbedding):
            hot.embed = backend.prepare_rows(_without_extra(delta))
            if delta.extra_rows is not None:
                hot.embed_extra = delta.extra_rows.to(dtype)
            if tied and head is not None:
                hot.linear[head.index] = backend.prepare(_without_extra(delta), dtype)
                if delta.extra_rows is not None:
                    hot.head_extra = hot.embed_extra
        elif isinstance(module, DeltaLinear) and pname == "weight":
            hot.linear[module.index] = backend.prepare(_without_extra(delta), dtype)
            if module.is_head and delta.extra_rows is not None:
                hot.head_extra = delta.extra_rows.to(dtype)
        elif isinstance(module, DeltaLinear) and pname == "bias":
            base_b = module.base.bias
            hot.bias_fix[path] = (apply_delta(base_b.detach(), delta, torch.float32) - base_b.float()).to(dtype)
        elif isinstance(module, DeltaRMSNorm) and pname == "weight":
            hot.norm[path] = apply_delta(module.base.weight.detach(), delta, dtype)
        else:
            raise DeltaLayerError(f"expert {name!r}: cannot apply a delta to {tname}")
    hot.table = backend.expert_table(hot.linear)
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
