"""Attention over a ragged batch with a per-request KV cache.

The engine runs one forward pass over the new tokens of all running requests, flattened into a
single sequence. transformers computes q/k/v and rotary embeddings for them (from the position
ids we pass), then calls the attention function registered here under ATTN_IMPLEMENTATION. It:
  1. writes each token's key/value into its request's cache slot, at its position;
  2. attends every token to its own request's cached keys only: single-token (decode) requests
     together in one padded, masked call; multi-token (prefill) chunks one call each, causal.

The cache holds [slots, kv_heads, capacity, head_dim] per layer; a request owns one slot from
admission to completion. Capacity grows by doubling up to the context length, so memory follows
the longest running request rather than a preallocated maximum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATION = "meswitch_ragged"


class KVCache:
    def __init__(self, n_layers: int, n_slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 max_len: int, initial: int = 256, device: torch.device | str = "cpu", on_grow=None):
        """on_grow(extra_bytes): called before the cache grows (the expert store makes room)."""
        self.n_layers, self.n_slots, self.kv_heads, self.head_dim = n_layers, n_slots, kv_heads, head_dim
        self.dtype, self.max_len, self.device = dtype, max_len, torch.device(device)
        self.on_grow = on_grow
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._resize(min(initial, max_len))

    def _bytes_for(self, capacity: int) -> int:
        return 2 * self.n_layers * self.n_slots * self.kv_heads * capacity * self.head_dim * self.dtype.itemsize

    def _resize(self, capacity: int) -> None:
        """One layer at a time, each old tensor freed as soon as it is copied: the peak is the new
        cache plus one layer of the old, not both caches."""
        if self.on_grow is not None and capacity > self.capacity:
            self.on_grow(self._bytes_for(capacity) - self._bytes_for(self.capacity))
        shape = (self.n_slots, self.kv_heads, capacity, self.head_dim)
        keep = min(self.capacity, capacity)
        for cache in (self.k, self.v):
            for i in range(self.n_layers):
                new = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(cache):
                    new[:, :, :keep] = cache[i][:, :, :keep]
                    cache[i] = new
                else:
                    cache.append(new)
        self.capacity = capacity

    def ensure(self, length: int) -> None:
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the context length {self.max_len}")
        if length > self.capacity:
            cap = self.capacity
            while cap < length:
                cap *= 2
            self._resize(min(cap, self.max_len))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class RaggedBatch:
    """Where each flattened token goes. Built by the engine for one forward pass."""
    cache: KVCache
    slots: torch.Tensor  # [T] long: cache slot of each token
    positions: torch.Tensor  # [T] long: its position in its request
    decode_idx: torch.Tensor  # [n] token indices of single-token requests
    decode_slots: torch.Tensor  # [n]
    decode_lens: torch.Tensor  # [n] cached length including this token
    prefills: list[tuple[int, int, int, int]]  # (first token index, tokens, slot, tokens cached before)

    @classmethod
    def build(cls, cache: KVCache, seqs: list[tuple[int, int, int]]) -> "RaggedBatch":
        """seqs: (slot, tokens cached before, new tokens) per request, in flattened order."""
        slots, positions, dec_idx, dec_slots, dec_lens, prefills = [], [], [], [], [], []
        start = 0
        for slot, past, n in seqs:
            slots.extend([slot] * n)
            positions.extend(range(past, past + n))
            if n == 1:
                dec_idx.append(start)
                dec_slots.append(slot)
                dec_lens.append(past + 1)
            else:
                prefills.append((start, n, slot, past))
            start += n
        cache.ensure(max(p + n for _, p, n in seqs))
        t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
        return cls(cache, t(slots), t(positions), t(dec_idx), t(dec_slots), t(dec_lens), prefills)


def ragged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, heads, T, d], key/value [1, kv_heads, T, d]."""
    batch: RaggedBatch | None = kwargs.get("meswitch_batch")
    if batch is None:
        # A plain forward pass outside the engine (the router's features): ordinary causal
        # attention over the given tokens, as transformers' sdpa implementation computes it.
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling)
    layer = module.layer_idx
    k_cache, v_cache = batch.cache.k[layer], batch.cache.v[layer]
    k_cache[batch.slots, :, batch.positions] = key[0].transpose(0, 1)
    v_cache[batch.slots, :, batch.positions] = value[0].transpose(0, 1)
    heads, tokens, dim = query.shape[1], query.shape[2], query.shape[3]
    out = torch.empty(tokens, heads, dim, dtype=query.dtype)
    if batch.decode_idx.numel():
        n = batch.decode_idx.numel()
        length = int(batch.decode_lens.max())
        q = query[0].index_select(1, batch.decode_idx).transpose(0, 1).unsqueeze(2)  # [n, heads, 1, d]
        k = k_cache[:, :, :length].index_select(0, batch.decode_slots)
        v = v_cache[:, :, :length].index_select(0, batch.decode_slots)
        mask = (torch.arange(length).unsqueeze(0) < batch.decode_lens.unsqueeze(1)).view(n, 1, 1, length)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        out[batch.decode_idx] = o.squeeze(2)
    for start, n, slot, past in batch.prefills:
        q = query[:, :, start:start + n]
        k = k_cache[slot:slot + 1, :, :past + n]
        v = v_cache[slot:slot + 1, :, :past + n]
        if past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            mask = torch.arange(past + n).unsqueeze(0) <= (past + torch.arange(n)).unsqueeze(1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        out[start:start + n] = o[0].transpose(0, 1)
    return out.unsqueeze(0), None


def register_attention() -> str:
    """Make ATTN_IMPLEMENTATION known to transformers (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, ragged_attention)
    # The engine passes no attention mask (ragged_attention masks per request); plain forward
    # passes (with padding) get the masks sdpa would.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return ATTN_IMPLEMENTATION
