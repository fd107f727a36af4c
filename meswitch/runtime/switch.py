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
import os
import shutil
import threading
from pathlib import Path

import torch

from ..bundle.format import Bundle, BundleError, check_expert_name
from ..checkpoints import Checkpoint, fingerprint
from ..hardware import resolve_dtype
from .attention import register_attention
from .backend import get_backend
from .engine import Completion, Engine, Request, RequestError, SamplingParams
from .layers import DeltaContext, install_delta_layers
from .store import ExpertStore, parse_memory

Prompt = str | list[dict]


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
        backend: "auto", "cpu" or "reference" (runtime/backend.py)."""
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
        model.set_attn_implementation(register_attention())
        tokenizer = ckpt.load_tokenizer()
        be = get_backend(backend)
        ctx = DeltaContext(be)
        wrapped = install_delta_layers(model, ctx)
        store = ExpertStore(b, wrapped, be, dtype, tied=bool(model.config.tie_word_embeddings),
                            max_memory=parse_memory(max_memory), verify=verify)
        engine = Engine(model, store, ctx, max_batch=max_batch, max_queue=max_queue,
                        max_step_tokens=max_step_tokens, max_model_len=max_model_len, dtype=dtype)
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

            entry = self.bundle.entry(expert)
            tok = AutoTokenizer.from_pretrained(self.bundle.path / entry["aux_dir"])
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
                ids.update([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
            self._eos[expert] = frozenset(ids)
        return self._eos[expert]

    def _expert_generation_eos(self, expert: str):
        import json

        f = self.bundle.path / self.bundle.entry(expert)["aux_dir"] / "generation_config.json"
        if f.is_file():
            return json.loads(f.read_text()).get("eos_token_id")
        return getattr(self.model.generation_config, "eos_token_id", None)

    def add_expert(self, name: str, source: str | os.PathLike, source_name: str | None = None,
                   overwrite: bool = False) -> None:
        """Copy expert `source_name` (default: `name`) of another bundle computed against the same
        base into this bundle, and serve it from now on. No restart needed."""
        check_expert_name(name)
        src = Bundle.open(source)
        src_name = source_name or name
        with self._admin_lock:
            entry = src.entry(src_name)
            src.check_base_fingerprint(self.bundle.base_fingerprint, f"bundle {self.bundle.path}")
            if name in self.bundle.experts and not overwrite:
                raise BundleError(f"expert {name!r} already exists in {self.bundle.path}")
            src.verify_files(src_name)
            src.load_deltas(src_name, verify=False)  # validates the file before anything is copied

            def save_aux(dest: Path) -> None:
                shutil.copytree(src.aux_dir(src_name), dest)

            import safetensors.torch as st

            deltas_file = src.path / entry["weights"]
            tensors = st.load_file(deltas_file)
            from safetensors import safe_open

            with safe_open(deltas_file, framework="pt") as f:
                meta = dict(f.metadata() or {})
            meta["expert"] = name
            staged = self.bundle.stage_raw(name, tensors, meta, save_aux)
            keep = {k: v for k, v in entry.items() if k not in ("name", "weights", "aux_dir", "files", "created")}
            try:
                self.bundle.commit([(staged, keep)])
            except BaseException:
                self.bundle.discard([staged])
                raise
            self.store.forget(name)
            self._tokenizers.pop(name, None)
            self._eos.pop(name, None)

    def remove_expert(self, name: str) -> None:
        """Stop serving an expert and delete it from the bundle. Requests already running finish."""
        with self._admin_lock:
            self.bundle.remove_expert(name)
            self.store.forget(name)
            self._tokenizers.pop(name, None)
            self._eos.pop(name, None)

    # ----- requests ------------------------------------------------------------------------------
    def encode(self, prompt: Prompt, expert: str | None) -> list[int]:
        if expert is not None and expert not in self.bundle.experts:
            raise RequestError(f"unknown expert {expert!r} (experts: {', '.join(self.experts) or 'none'})")
        tok = self.tokenizer(expert)
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("the prompt is empty")
            return list(tok(prompt, add_special_tokens=True)["input_ids"])
        if not isinstance(prompt, list) or not prompt or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt
        ):
            raise RequestError("messages must be a non-empty list of {'role': str, 'content': str}")
        if not getattr(tok, "chat_template", None):
            raise RequestError(f"{expert or 'the base'} has no chat template; send a plain prompt instead")
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def submit(self, prompt: Prompt, expert: str | None = None, on_update=None, **sampling) -> Request:
        """Queue one request; returns at once. `on_update(request, new_text, completion_or_None)`
        is called from the engine thread as text is produced, and once more when it finishes."""
        params = sampling.pop("params", None) or SamplingParams(**sampling)
        req = Request(self.encode(prompt, expert), expert, params, self.tokenizer(expert), self.eos_ids(expert),
                      on_update)
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
