"""Switch: the Python API of the runtime. One resident base, every expert of a bundle.

    from meswitch import Switch
    with Switch.load("bundle/") as sw:
        print(sw.generate("What is 12 * 7?", expert="math", temperature=0).text)
        outs = sw.generate(["2+2?", "Reverse a list in Python"], expert=["math", "code"])
        async for piece in sw.stream([{"role": "user", "content": "hi"}], expert="code"): ...

Prompts are plain text, or chat messages (a list of {"role", "content"}) formatted with the
chosen expert's own chat template. `expert=None` is the plain base model.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import torch

from ..bundle.format import Bundle, BundleError, ExpertExistsError, UnknownExpertError, check_expert_name
from ..checkpoints import Checkpoint, fingerprint
from ..hardware import resolve_dtype
from .attention import register_attention
from .backend import get_backend
from .engine import (Completion, ContextLengthError, Engine, Request, RequestError,  # noqa: F401 (re-exported)
                     SamplingParams)
from .layers import DeltaContext, install_delta_layers
from .store import DEFAULT_BUDGET_FRACTION, ExpertStore, default_budget, parse_memory

log = logging.getLogger("meswitch.runtime")
Prompt = str | list[dict]


class SourceError(BundleError):
    """The bundle an expert is to be added from is missing, invalid, or of another base."""


def check_text(text: str, what: str) -> str:
    """Refuse text that is not valid Unicode (a lone UTF-16 surrogate, as JSON's "\\ud800" gives):
    no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{what} is not valid Unicode (it holds a lone surrogate code point)") from None
    return text


class Switch:
    def __init__(self, bundle: Bundle, model, base_tokenizer, store: ExpertStore, engine: Engine, dtype):
        self.bundle = bundle
        self.model = model
        self.base_tokenizer = base_tokenizer
        self.store = store
        self.engine = engine
        self.dtype = dtype
        self._tokenizers: dict[str | None, object] = {None: base_tokenizer}
        self._eos: dict[str | None, frozenset[int]] = {}
        self._admin_lock = threading.Lock()
        # Experts changed in the bundle (by this Switch or another process): drop what was read.
        bundle.add_listener(self._forget)
    # ----- construction ------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle: str | os.PathLike | Bundle, base: str | os.PathLike | None = None, *,
             dtype: str | torch.dtype = "auto", max_memory: str | int | None = None, max_batch: int = 8,
             max_queue: int = 256, max_step_tokens: int = 512, max_model_len: int | None = None,
             backend: str = "auto", threads: int | None = None, verify: bool = True,
             base_fingerprint_check: bool = True, start: bool = True) -> "Switch":
        """Load the base once and open the bundle; experts are read when first needed.

        base: the base checkpoint (default: the path recorded in the bundle); it must be the
        base the deltas were computed against (checked by fingerprint).
        dtype: "auto" (bfloat16 where the CPU has native bf16, else float32; meswitch.hardware),
        "float32" (greedy output equals the materialized expert's), "bfloat16" or "float16".
        backend: "auto", "cpu" or "reference" (runtime/backend.py).
        max_memory: budget for expert deltas and the KV cache (e.g. "2GiB"); default: 80% of the
        memory available once the base is loaded (runtime/store.py)."""
        b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        dtype = resolve_dtype(dtype)
        if threads:
            torch.set_num_threads(threads)
        ref = base or b.manifest["base"].get("reference")
        if not ref:
            raise BundleError(f"bundle {b.path} records no base path; pass base=")
        ckpt = Checkpoint.open(ref)
        if base_fingerprint_check:
            b.check_base_fingerprint(fingerprint(ckpt), ckpt.reference)
        model = ckpt.load_model(dtype)
        # deltas that do not fit this base are refused when read, with the tensor named
        b.base_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        model.set_attn_implementation(register_attention())
        tokenizer = ckpt.load_tokenizer()
        be = get_backend(backend)
        ctx = DeltaContext(be)
        wrapped = install_delta_layers(model, ctx)
        budget = parse_memory(max_memory)
        if budget is None:  # experts are evicted before the process runs out of memory
            budget = default_budget()
            log.info("memory budget for experts and KV cache: %.0f MiB (%.0f%% of the memory available; "
                     "set max_memory to change it)", budget / 2**20, DEFAULT_BUDGET_FRACTION * 100)
        store = ExpertStore(b, wrapped, be, dtype, tied=bool(model.config.tie_word_embeddings),
                            max_memory=budget, verify=verify)
        engine = Engine(model, store, ctx, max_batch=max_batch, max_queue=max_queue,
                        max_step_tokens=max_step_tokens, max_model_len=max_model_len, dtype=dtype)
        # The KV cache counts in the budget; experts make room when it grows; loads wake the engine.
        store.other_bytes = lambda: engine.cache.nbytes
        store.on_change = engine.wake
        engine.cache.on_grow = store.make_room
        sw = cls(b, model, tokenizer, store, engine, dtype)
        if start:
            engine.start()
        return sw

    def close(self) -> None:
        self.engine.stop()
        self.store.close()

    def __enter__(self) -> "Switch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- experts ---------------------------------------------------------------------------
    @property
    def experts(self) -> list[str]:
        return self.store.names

    def description(self, name: str) -> str:
        return self.bundle.entry(name).get("description") or ""

    def tokenizer(self, expert: str | None):
        tok = self._tokenizers.get(expert)
        if tok is None:
            from transformers import AutoTokenizer

            # every file in the folder checked against the manifest before transformers reads it
            tok = AutoTokenizer.from_pretrained(self.bundle.verified_aux_dir(expert))
            self._tokenizers[expert] = tok
        return tok

    def eos_ids(self, expert: str | None) -> frozenset[int]:
        if expert not in self._eos:
            ids = set()
            tok = self.tokenizer(expert)
            if tok.eos_token_id is not None:
                ids.add(int(tok.eos_token_id))
            gen = getattr(self.model, "generation_config", None)
            eos = getattr(gen, "eos_token_id", None) if expert is None else self._expert_generation_eos(expert)
            if eos is not None:
                try:
                    ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
                except (TypeError, ValueError):
                    raise BundleError(f"expert {expert!r}: generation_config.json has an invalid eos_token_id") from None
            self._eos[expert] = frozenset(ids)
        return self._eos[expert]

    def _expert_generation_eos(self, expert: str):
        f = self.bundle.verified_aux_dir(expert) / "generation_config.json"
        if f.is_file():
            try:
                gen = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise BundleError(f"expert {expert!r}: generation_config.json is not JSON ({e})") from e
            if not isinstance(gen, dict):
                raise BundleError(f"expert {expert!r}: generation_config.json is not an object")
            return gen.get("eos_token_id")
        return getattr(self.model.generation_config, "eos_token_id", None)

    def _forget(self, names: set[str]) -> None:
        """Drop what was read of these experts (they were added, replaced or removed)."""
        for name in names:
            self.store.forget(name)
            self._tokenizers.pop(name, None)
            self._eos.pop(name, None)

    def sync_bundle(self) -> set[str]:
        """Take the bundle's manifest again if another process changed it (one stat when it did
        not); returns the experts added, replaced or removed."""
        return self.bundle.refresh()

    def add_expert(self, name: str, source: str | os.PathLike | Bundle, source_name: str | None = None,
                   overwrite: bool = False) -> None:
        """Copy expert `source_name` (default: `name`) of another bundle computed against the same
        base into this bundle, and serve it from now on. No restart needed.

        Only the files the source manifest lists for that expert are copied, each checked against
        its SHA-256 and confined to the source bundle; its delta file is checked against the
        format and this base's tensor shapes first. Problems with the source raise SourceError."""
        check_expert_name(name)
        src_name = source_name or name
        self.sync_bundle()
        with self._admin_lock:
            if name in self.bundle.experts and not overwrite:
                raise ExpertExistsError(f"expert {name!r} already exists in {self.bundle.path}")
            try:
                src = source if isinstance(source, Bundle) else Bundle.open(source)
                entry = src.entry(src_name)
                src.check_base_fingerprint(self.bundle.base_fingerprint, f"bundle {self.bundle.path}")
                src.base_shapes = self.bundle.base_shapes
                src.verify_files(src_name)
                src.load_deltas(src_name, verify=False)  # validates the file before anything is copied
                weights = src.resolve(entry["weights"])
                aux_files = [src.resolve(rel) for rel in entry["files"] if rel != entry["weights"]]
                import safetensors.torch as st
                from safetensors import safe_open

                tensors = st.load_file(weights)
                with safe_open(weights, framework="pt") as f:
                    meta = dict(f.metadata() or {})
            except BundleError as e:
                raise SourceError(f"cannot add expert {name!r} from {source}: {e}") from e
            except OSError as e:
                raise SourceError(f"cannot add expert {name!r} from {source}: {e.strerror or e}") from e

            def save_aux(dest: Path) -> None:
                dest.mkdir()
                for f in aux_files:
                    shutil.copyfile(f, dest / f.name)

            meta["expert"] = name
            staged = self.bundle.stage_raw(name, tensors, meta, save_aux)
            keep = {k: v for k, v in entry.items() if k not in ("name", "weights", "aux_dir", "files", "created")}
            try:
                self.bundle.commit([(staged, keep)], replace=overwrite)
            finally:
                self.bundle.discard([staged])  # whatever commit did not move into place

    def remove_expert(self, name: str) -> None:
        """Stop serving an expert and delete it from the bundle. Requests already running finish."""
        with self._admin_lock:
            self.bundle.remove_expert(name)

    # ----- requests ------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, expert: str | None) -> list[int]:
        if expert is not None and expert not in self.bundle.experts:
            raise RequestError(f"unknown expert {expert!r} (experts: {', '.join(self.experts) or 'none'})")
        tok = self.tokenizer(expert)
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty")
            return list(tok(check_text(prompt, "the prompt"), add_special_tokens=True)["input_ids"])
        if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        ):
            raise RequestError("messages must be a non-empty list of {'role': str, 'content': str}")
        for i, m in enumerate(prompt):
            check_text(m["role"], f"messages[{i}].role")
            check_text(m["content"], f"messages[{i}].content")
        if not getattr(tok, "chat_template", None):
            raise RequestError(f"{expert or 'the base'} has no chat template; send a plain prompt instead")
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def submit(self, prompt: Prompt, expert: str | None = None, on_update=None, **sampling) -> Request:
        """Queue one request; returns at once. `on_update(request, new_text, completion_or_None)`
        is called from the engine thread as text is produced, and once more when it finishes."""
        self.sync_bundle()
        params = sampling.pop("params", None) or SamplingParams(**sampling)
        ids = self.encode(prompt, expert)  # the engine checks the length and the parameters
        req = Request(ids, expert, params, self.tokenizer(expert), self.eos_ids(expert), on_update)
        return self.engine.submit(req)

    def generate(self, prompts: Prompt | list[Prompt], expert: str | None | list[str | None] = None,
                 timeout: float | None = None, **sampling) -> Completion | list[Completion]:
        """Generate for one prompt (returns a Completion) or a list of prompts (a list), all
        submitted at once so they share batches. `expert` may be one name or one per prompt."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict))
        plist = [prompts] if single else list(prompts)
        experts = expert if isinstance(expert, list) else [expert] * len(plist)
        if len(experts) != len(plist):
            raise RequestError(f"{len(plist)} prompts but {len(experts)} experts")
        reqs = []
        try:
            for p, e in zip(plist, experts):
                reqs.append(self.submit(p, e, **dict(sampling)))
        except BaseException:
            for r in reqs:
                r.cancel()
            raise
        outs = [r.wait(timeout) for r in reqs]
        return outs[0] if single else outs

    async def stream(self, prompt: Prompt, expert: str | None = None, **sampling):
        """Async iterator over text pieces as they are generated; the last item is the Completion.
        Leaving the loop early (or cancelling the task) cancels the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_update(req, delta, done):
            loop.call_soon_threadsafe(queue.put_nowait, (delta, done))

        req = self.submit(prompt, expert, on_update=on_update, **sampling)
        try:
            while True:
                delta, done = await queue.get()
                if delta:
                    yield delta
                if done is not None:
                    yield done
                    return
        finally:
            if not req.done:
                req.cancel()

    def stats(self) -> dict:
        s = dict(self.engine.stats)
        s.update({f"store_{k}": v for k, v in self.store.stats.items()})
        s["expert_memory_bytes"] = self.store.memory_bytes()
        s["kv_cache_bytes"] = self.engine.cache.nbytes
        s["queue_depth"] = self.engine.queue_depth
        s["running"] = self.engine.running
        s["residency"] = self.store.residency()
        return s
