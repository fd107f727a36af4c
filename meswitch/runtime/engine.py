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
import logging
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..bundle.format import UnknownExpertError
from .attention import KVCache, RaggedBatch
from .layers import DeltaContext, HotExpert
from .store import ExpertStore


log = logging.getLogger("meswitch.engine")


MIN_TEMPERATURE = 1e-5  # smaller temperatures sample greedily (_sample)


class RequestError(ValueError):
    """A request that cannot be served as given (bad parameters, prompt too long, unknown expert)."""


class ContextLengthError(RequestError):
    """The prompt leaves no room in the context for a generated token."""


class QueueFullError(RuntimeError):
    """The engine's waiting queue is full; try again later."""


class EngineStoppedError(RuntimeError):
    """The engine is stopped (the Switch was closed)."""


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
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not -2**63 <= self.seed < 2**63):
            raise RequestError(f"seed must be a 64-bit integer, got {self.seed!r}")


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
        # Everything a step creates (token ids, KV cache, index tensors, sampling) lives on the model's device.
        self.device = next(model.parameters()).device
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.cache = KVCache(cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads, head_dim, dtype,
                             self.max_model_len, device=self.device)
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
            raise ContextLengthError(
                f"the prompt has {len(req.prompt_ids)} tokens; the context length is {self.max_model_len} "
                "(prompt plus at least one generated token must fit)"
            )
        if req.expert is not None and req.expert not in self.store.bundle.experts:
            raise UnknownExpertError(f"unknown expert {req.expert!r} (experts: {', '.join(self.store.names) or 'none'})")
        seed = req.params.seed if req.params.seed is not None else random.getrandbits(63)
        req.generator = torch.Generator(device=self.device).manual_seed(seed)
        if req.expert is not None:  # before the engine sees the request: the load starts here, not at its next step
            self.store.prefetch(req.expert)
        with self._cond:
            if self._stop:
                raise EngineStoppedError("the engine is stopped")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting)")
            self._waiting.append(req)
            self._cond.notify()
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

    def stop(self, timeout: float = 30.0) -> None:
        """Stop stepping and cancel every request. The engine thread owns the request lists while
        it runs: they are changed here only once it has ended (it ends at the next step boundary)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # a step still running (a long prefill): it cancels on exit
                log.warning("engine step still running after %.0f s; its requests are cancelled when it ends", timeout)
                return
        self._cancel_all()

    def _cancel_all(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for req in waiting + list(self._running):
            self._finish(req, "cancelled")

    def wake(self) -> None:
        """Step again now (an expert finished loading)."""
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stop:
                    break
            try:
                worked = self.step()
            except Exception as e:  # a bug or an OOM in a forward pass: fail the batch, keep serving
                log.exception("engine step failed; failing its %d running requests", len(self._running))
                for req in list(self._running):
                    self._finish(req, "error", error=e)
                worked = True
            if not worked:  # every waiting request waits for an expert to load, or for room
                with self._cond:
                    if not self._stop:
                        self._cond.wait(0.05)  # wake() ends it early when a load finishes
        self._cancel_all()

    # ----- one step ---------------------------------------------------------------------------
    def step(self) -> bool:
        """One iteration; False when there was nothing to compute (all requests wait)."""
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return False
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
        logits = self.forward(work)
        sampled = [req for req, _, _, sample in work if sample]
        greedy = self._greedy_tokens(sampled, logits)
        for req, toks, past, sample in work:
            if req.cursor < len(req.prompt_ids):
                req.cursor += len(toks)
                self.stats["prompt_tokens"] += len(toks)
        for row, req in enumerate(sampled):
            self._accept(req, greedy[row] if row in greedy else self._sample(req, logits[row]))
        return True

    def _vocab(self, req: Request) -> int:
        return req.hot.vocab_size if req.hot is not None and req.hot.vocab_size else self.base_vocab

    def _greedy_tokens(self, reqs: list[Request], logits: torch.Tensor) -> dict[int, int]:
        """The argmax of every greedy request's logits row, one device read per vocabulary size
        (normally one per step) rather than one per request."""
        by_vocab: dict[int, list[int]] = {}
        for row, req in enumerate(reqs):
            if req.params.temperature < MIN_TEMPERATURE:
                by_vocab.setdefault(self._vocab(req), []).append(row)
        out: dict[int, int] = {}
        for vocab, rows in by_vocab.items():
            idx = torch.tensor(rows, dtype=torch.long, device=logits.device)
            out.update(zip(rows, logits.index_select(0, idx)[:, :vocab].float().argmax(-1).tolist()))
        return out

    def forward(self, work: list[tuple[Request, list[int], int, bool]], all_positions: bool = False) -> torch.Tensor:
        """One forward pass of the base with delta layers over a ragged batch.

        work: (request, new token ids, tokens already cached, sample?) per running request; it is
        sorted in place so that each expert's tokens are contiguous (base first, then by expert,
        then arrival). Returns the logits of the last token of every `sample` entry, in that
        order, or with all_positions those of every token (tests compare them with reference
        models). Each request's keys and values go to its KV-cache slot."""
        work.sort(key=lambda w: ("" if w[0].expert is None else "~" + w[0].expert, w[0].id))
        ids = []
        segments, head_segments, keep = [], [], []
        pos = 0
        for req, toks, past, sample in work:
            ids.extend(toks)
            if req.hot is not None:
                self._extend(segments, req.hot, pos, pos + len(toks))
            if all_positions:
                if req.hot is not None:
                    self._extend(head_segments, req.hot, pos, pos + len(toks))
                keep.extend(range(pos, pos + len(toks)))
            elif sample:
                if req.hot is not None:
                    self._extend(head_segments, req.hot, len(keep), len(keep) + 1)
                keep.append(pos + len(toks) - 1)
            pos += len(toks)
        batch = RaggedBatch.build(self.cache, [(req.slot, past, len(toks)) for req, toks, past, _ in work])
        t0 = time.perf_counter()
        self.ctx.set(segments, len(ids), head_segments, max(1, len(keep)), added_tokens=max(ids) >= self.base_vocab)
        keep = keep or [pos - 1]
        ids_keep = torch.tensor(ids + keep, dtype=torch.long, device=self.device)  # one copy to the device
        try:
            with torch.inference_mode():
                logits = self.model(
                    input_ids=ids_keep[:len(ids)].unsqueeze(0),
                    position_ids=batch.positions.unsqueeze(0),
                    use_cache=False,
                    logits_to_keep=ids_keep[len(ids):],
                    meswitch_batch=batch,
                ).logits[0]
        finally:
            self.ctx.clear()
        self.stats["forward_seconds"] += time.perf_counter() - t0
        self.stats["steps"] += 1
        return logits

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
        """Admit waiting requests in arrival order while slots are free. A request whose expert
        is loading (or waits for room) waits without blocking requests for other experts; one
        whose expert cannot be loaded fails alone, with the error of its load."""
        with self._cond:
            candidates = list(self._waiting)
        wanted = {r.expert for r in candidates if r.expert is not None}
        blocked: set[str | None] = set()
        for req in candidates:
            if not self._free_slots:
                break
            if req.expert in blocked:
                continue  # keep arrival order among requests for the same expert
            hot = None
            if req.expert is not None:
                try:
                    hot = self.store.acquire(req.expert, since=req.arrived, protect=wanted)
                except Exception as e:  # unknown, too large for the budget, unreadable: this request only
                    with self._cond:
                        self._waiting.remove(req)
                    self._finish(req, "error", error=e)
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
        """A sampled token; greedy requests (temperature below MIN_TEMPERATURE, where the float32
        distribution is one-hot anyway and 1/T may overflow: T = 5e-324 is 0 in float32) are
        answered by _greedy_tokens instead."""
        logits = logits[:self._vocab(req)].float()
        p = req.params
        probs = torch.softmax((logits - logits.max()) / p.temperature, dim=-1)
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

    def _finish(self, req: Request, reason: str, error: BaseException | str | None = None) -> None:
        if req.done:
            return
        if req in self._running:
            self._running.remove(req)
        if req.slot >= 0:
            self._free_slots.append(req.slot)
            self._free_slots.sort()
            req.slot = -1
        if req.hot is not None:
            self.store.release(req.hot)
            req.hot = None
        text = req.text if reason != "error" else ""
        exc = error if isinstance(error, BaseException) else None
        message = None if error is None else str(error) if exc is None or str(exc) else type(exc).__name__
        req.result = Completion(req.id, req.expert, text, list(req.output_ids), reason, len(req.prompt_ids),
                                len(req.output_ids), message, exception=exc)
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
