"""The engine: iteration-level (continuous) batching of requests for many experts on one base.

One background thread runs steps. A step:
  1. drops cancelled requests (their KV slot and expert pin are freed at once);
  2. admits waiting requests in arrival order while KV slots are free and their expert can be
     made hot within the memory budget (a request whose expert cannot fit yet does not block
     requests behind it for experts that can);
  3. builds one ragged batch: one token per decoding request, plus prompt chunks of prefilling
     requests up to `max_step_tokens` (long prompts are prefilled over several steps);
  4. runs one forward pass of the base model with delta layers, tokens grouped by expert;
  5. samples the next token of every request whose prompt is complete (per-request temperature,
     top_p, seed), applies stop conditions (EOS, stop strings, max_tokens, context length), and
     streams the new text to the request's callback.
Requests join and leave at these token boundaries; experts mix freely inside a batch.
"""
from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..bundle.format import BundleError
from .attention import KVCache, RaggedBatch
from .layers import DeltaContext, HotExpert
from .store import ExpertStore, MemoryBudgetError


class RequestError(ValueError):
    """A request that cannot be served as given (bad parameters, prompt too long, unknown expert)."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; try again later."""


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise RequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not (0 <= self.temperature <= 2) or math.isnan(self.temperature):
            raise RequestError(f"temperature must be between 0 and 2, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if len(self.stop) > 16 or not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError("stop must be up to 16 non-empty strings")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise RequestError(f"seed must be an integer, got {self.seed!r}")


@dataclass
class Completion:
    request_id: int
    expert: str | None  # None: the plain base
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)  # what failed, when finish_reason is "error"


_ids = itertools.count(1)


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    expert: str | None
    params: SamplingParams
    tokenizer: object
    eos_ids: frozenset[int]
    on_update: Callable[["Request", str, Completion | None], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    # engine-side state
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    cursor: int = 0  # prompt tokens already in the KV cache
    slot: int = -1
    hot: HotExpert | None = None
    generator: torch.Generator | None = None
    cancelled: bool = False
    result: Completion | None = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    _done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return self.result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cached(self) -> int:
        return self.cursor + max(0, len(self.output_ids) - 1)


class Engine:
    def __init__(self, model, store: ExpertStore, ctx: DeltaContext, *, max_batch: int = 8, max_queue: int = 256,
                 max_step_tokens: int = 512, max_model_len: int | None = None, dtype=torch.bfloat16):
        cfg = model.config
        self.model = model
        self.store = store
        self.ctx = ctx
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_step_tokens = max_step_tokens
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache = KVCache(cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads, head_dim, dtype,
                             self.max_model_len)
        self.base_vocab = model.get_input_embeddings().weight.shape[0]
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._free_slots = list(range(max_batch))
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"steps": 0, "forward_seconds": 0.0, "tokens_generated": 0, "prompt_tokens": 0,
                      "requests_finished": 0, "requests_cancelled": 0, "requests_failed": 0}

    # ----- client side ------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        req.params.validate()
        if not req.prompt_ids:
            raise RequestError("the prompt is empty")
        if len(req.prompt_ids) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(req.prompt_ids)} tokens; the context length is {self.max_model_len} "
                "(prompt plus at least one generated token must fit)"
            )
        if req.expert is not None and req.expert not in self.store.bundle.experts:
            raise RequestError(f"unknown expert {req.expert!r} (experts: {', '.join(self.store.names) or 'none'})")
        seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
        req.generator = torch.Generator().manual_seed(seed)
        with self._cond:
            if self._stop:
                raise RuntimeError("the engine is stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting)")
            self._waiting.append(req)
            self._cond.notify()
        if req.expert is not None:
            self.store.prefetch(req.expert)
        return req

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> "Engine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="meswitch-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for req in list(self._waiting) + list(self._running):
            self._finish(req, "cancelled")
        self._waiting.clear()
        self._running.clear()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    return
            try:
                self.step()
            except Exception as e:  # a bug or an OOM in a forward pass: fail the batch, keep serving
                for req in list(self._running):
                    self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    # ----- one step ---------------------------------------------------------------------------
    def step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if not self._running:
            if self._waiting:
                time.sleep(0.005)  # waiting on memory held by nobody running: prefetch in flight
            return
        # Decoding requests first (one token each), then prompt chunks in arrival order within
        # the step's token budget.
        decoding = [r for r in self._running if r.cursor == len(r.prompt_ids)]
        work = [(r, [r.output_ids[-1]], r.cached, True) for r in decoding]
        budget = self.max_step_tokens - len(work)
        for req in self._running:
            if req.cursor == len(req.prompt_ids) or budget <= 0:
                continue
            chunk = req.prompt_ids[req.cursor: req.cursor + budget]
            budget -= len(chunk)
            work.append((req, chunk, req.cursor, req.cursor + len(chunk) == len(req.prompt_ids)))
        # Tokens of one expert must be contiguous: order by expert (base first), then arrival.
        work.sort(key=lambda w: ("" if w[0].expert is None else "~" + w[0].expert, w[0].id))
        ids = []
        segments, head_segments, keep = [], [], []
        pos = 0
        for req, toks, past, sample in work:
            ids.extend(toks)
            if req.hot is not None:
                self._extend(segments, req.hot, pos, pos + len(toks))
            if sample:
                if req.hot is not None:
                    self._extend(head_segments, req.hot, len(keep), len(keep) + 1)
                keep.append(pos + len(toks) - 1)
            pos += len(toks)
        batch = RaggedBatch.build(self.cache, [(req.slot, past, len(toks)) for req, toks, past, _ in work])
        t0 = time.perf_counter()
        self.ctx.set(segments, len(ids), head_segments, max(1, len(keep)))
        try:
            with torch.inference_mode():
                logits = self.model(
                    input_ids=torch.tensor([ids], dtype=torch.long),
                    position_ids=batch.positions.unsqueeze(0),
                    use_cache=False,
                    logits_to_keep=torch.tensor(keep, dtype=torch.long) if keep else torch.tensor([pos - 1]),
                    meswitch_batch=batch,
                ).logits[0]
        finally:
            self.ctx.clear()
        self.stats["forward_seconds"] += time.perf_counter() - t0
        self.stats["steps"] += 1
        row = 0
        for req, toks, past, sample in work:
            if req.cursor < len(req.prompt_ids):
                req.cursor += len(toks)
                self.stats["prompt_tokens"] += len(toks)
            if sample:
                self._accept(req, self._sample(req, logits[row]))
                row += 1

    @staticmethod
    def _extend(segments: list, hot: HotExpert, a: int, b: int) -> None:
        if segments and segments[-1][0] is hot and segments[-1][2] == a:
            segments[-1] = (hot, segments[-1][1], b)
        else:
            segments.append((hot, a, b))

    def _drop_cancelled(self) -> None:
        with self._cond:
            cancelled = [r for r in self._waiting if r.cancelled]
            for r in cancelled:
                self._waiting.remove(r)
        for r in cancelled + [r for r in self._running if r.cancelled]:
            self._finish(r, "cancelled")

    def _admit(self) -> None:
        with self._cond:
            candidates = list(self._waiting)
        blocked: set[str | None] = set()
        for req in candidates:
            if not self._free_slots:
                break
            if req.expert in blocked:
                continue  # keep arrival order among requests for the same expert
            hot = None
            if req.expert is not None:
                try:
                    hot = self.store.try_acquire(req.expert)
                except (BundleError, MemoryBudgetError) as e:
                    with self._cond:
                        self._waiting.remove(req)
                    self._finish(req, "error", error=str(e))
                    continue
                if hot is None:
                    blocked.add(req.expert)
                    continue
            with self._cond:
                self._waiting.remove(req)
            req.hot = hot
            req.slot = self._free_slots.pop(0)
            self._running.append(req)

    # ----- sampling and stopping ----------------------------------------------------------------
    def _sample(self, req: Request, logits: torch.Tensor) -> int:
        vocab = req.hot.vocab_size if req.hot is not None and req.hot.vocab_size else self.base_vocab
        logits = logits[:vocab].float()
        p = req.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = (cum - sorted_p) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
            sorted_p[drop] = 0.0
            return int(order[torch.multinomial(sorted_p, 1, generator=req.generator)])
        return int(torch.multinomial(probs, 1, generator=req.generator))

    def _accept(self, req: Request, token: int) -> None:
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        self.stats["tokens_generated"] += 1
        if token in req.eos_ids and not req.params.ignore_eos:
            self._finish(req, "stop")
            return
        req.output_ids.append(token)
        text = req.tokenizer.decode(req.output_ids, skip_special_tokens=True)
        reason = None
        if req.params.stop:
            window = max(0, req.emitted - max(len(s) for s in req.params.stop))
            hits = [i for i in (text.find(s, window) for s in req.params.stop) if i >= 0]
            if hits:
                text = text[: min(hits)]
                reason = "stop"
        req.text = text
        if reason is None and len(req.output_ids) >= req.params.max_tokens:
            reason = "length"
        if reason is None and len(req.prompt_ids) + len(req.output_ids) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            self._finish(req, reason)
            return
        # Hold back an incomplete UTF-8 character and a possible beginning of a stop string.
        end = len(text)
        if text.endswith("\ufffd"):
            end = len(text.rstrip("\ufffd"))
        for s in req.params.stop:
            for k in range(min(len(s) - 1, end - req.emitted), 0, -1):
                if text[:end].endswith(s[:k]):
                    end -= k
                    break
        if end > req.emitted:
            delta = text[req.emitted:end]
            req.emitted = end
            if req.on_update is not None:
                req.on_update(req, delta, None)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.done:
            return
        if req in self._running:
            self._running.remove(req)
        if req.slot >= 0:
            self._free_slots.append(req.slot)
            self._free_slots.sort()
            req.slot = -1
        if req.hot is not None:
            self.store.release(req.expert)
            req.hot = None
        text = req.text if reason != "error" else ""
        req.result = Completion(req.id, req.expert, text, list(req.output_ids), reason, len(req.prompt_ids),
                                len(req.output_ids), error)
        key = {"cancelled": "requests_cancelled", "error": "requests_failed"}.get(reason, "requests_finished")
        self.stats[key] += 1
        req._done.set()
        if req.on_update is not None:
            delta = text[req.emitted:] if reason in ("stop", "length") else ""
            req.emitted = len(text)
            try:
                req.on_update(req, delta, req.result)
            except Exception:
                pass
