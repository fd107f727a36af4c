"""The router: train it into a bundle, load it, route queries and conversations.

Routing rule (documented in the README, "Routing"):
1. Probabilities over the experts for each of the conversation's last three user turns, mixed
   with weights 1, 1/2, 1/4 from the newest turn back (a plain string is one user turn).
2. The chosen expert is the most probable one. If the caller passes the conversation's
   `previous_expert` (one of the router's experts), the conversation stays with it unless the
   newest user turn *alone* gives another expert a probability of at least `switch_confidence`.
3. Otherwise, if the top probability is below `threshold`, the query goes to the `fallback`
   (the base model, "base", or a named general expert).
4. Otherwise (`hybrid` backend), if the query does not resemble the chosen expert's examples
   (its resemblance, mixed over turns with the same weights, is below that expert's
   out-of-domain threshold), it goes to the fallback too: a softmax over the experts always
   names one of them, so "none of them" needs this separate signal. Each expert's threshold is
   chosen at training on that expert's examples: the `ood_quantile` (default 3%) of their
   resemblance to the expert's other examples (leave-one-out), so that about that fraction of
   queries like the examples falls back, capped by how much the other experts' examples resemble
   it (calibrate_ood).
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bundle.format import EXAMPLES_FILE, ROUTER_DIR, Bundle, BundleError, sha256_file
from ..files import durable_replace, fsync_path, remove_path
from .backends import (
    BACKENDS,
    BaseEncoder,
    EmbedEncoder,
    ExampleIndex,
    HybridEncoder,
    LexicalEncoder,
    StaticEmbedder,
    ZeroShotScorer,
    static_table,
)
from .data import Query, load_queries, query_text, user_turns
from .errors import RouterError
from .head import Head, train_head

DEFAULT_BACKEND = "hybrid"  # chosen by benchmarks/router.py: README "Routing: the backends side by side"
FALLBACK_BASE = "base"
DEFAULT_THRESHOLD = 0.5
DEFAULT_SWITCH_CONFIDENCE = 0.9
TURN_WEIGHTS = (1.0, 0.5, 0.25)  # newest user turn first
DEFAULT_MAX_EXAMPLES = 2000
DEFAULT_MAX_TOKENS = {"embed": 128, "base": 128, "zeroshot": 256, "lexical": 0, "hybrid": 0}
DEFAULT_OOD_QUANTILE = 0.03  # fraction of an expert's held-out examples its out-of-domain threshold rejects
OOD_QUANTILES = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2)  # thresholds stored for each


@dataclass
class RouteDecision:
    expert: str                       # the chosen expert, or the fallback
    probabilities: dict[str, float]   # over the router's experts, summing to 1
    confidence: float                 # the top probability
    fallback: bool                    # True when the threshold sent the query to the fallback
    latency_ms: float
    top: str = ""                     # the most probable expert (even when not chosen)
    sticky: bool = False              # True when the conversation stayed with previous_expert
    backend: str = ""
    resemblance: float | None = None  # to the top expert's examples (hybrid backend), else None
    out_of_domain: bool = False       # True when the fallback was chosen because of low resemblance

    def as_dict(self) -> dict:
        return {"expert": self.expert, "fallback": self.fallback, "confidence": self.confidence,
                "probabilities": self.probabilities, "top": self.top, "sticky": self.sticky,
                "resemblance": self.resemblance, "out_of_domain": self.out_of_domain,
                "latency_ms": self.latency_ms, "backend": self.backend}


@functools.lru_cache(maxsize=2)
def embed_encoder(max_tokens: int = DEFAULT_MAX_TOKENS["embed"], device: str = "cpu") -> EmbedEncoder:
    """One loaded MiniLM per process (and settings)."""
    return EmbedEncoder(max_tokens=max_tokens, device=device)


def load_base(bundle: Bundle, model=None, tokenizer=None, device: str = "cpu"):
    """The resident base model and tokenizer, or the bundle's base loaded from its reference."""
    if model is not None and tokenizer is not None:
        return model, tokenizer
    from ..checkpoints import Checkpoint, CheckpointError

    ref = bundle.manifest["base"].get("reference")
    try:
        ckpt = Checkpoint.open(ref)
    except CheckpointError as e:
        raise RouterError(f"this router needs the base model, and the bundle's base reference cannot be opened ({e})") from e
    return (model if model is not None else ckpt.load_model(device=device)), (tokenizer or ckpt.load_tokenizer())


def _descriptions(bundle: Bundle) -> dict[str, str]:
    return {n: (e.get("description") or "") for n, e in bundle.experts.items()}


class Router:
    def __init__(self, bundle: Bundle, backend: str, labels: list[str], *, head: Head | None = None, encoder=None,
                 scorer: ZeroShotScorer | None = None, threshold: float = DEFAULT_THRESHOLD,
                 fallback: str = FALLBACK_BASE, switch_confidence: float = DEFAULT_SWITCH_CONFIDENCE,
                 entry: dict | None = None, index: ExampleIndex | None = None,
                 ood_thresholds: np.ndarray | None = None):
        self.bundle, self.backend, self.labels = bundle, backend, list(labels)
        self.head, self.encoder, self.scorer = head, encoder, scorer
        self.threshold = check_threshold(threshold)
        self.fallback = check_fallback(bundle, fallback)
        self.switch_confidence = switch_confidence
        self.entry = entry or {}
        self.index = index
        self.ood_thresholds = ood_thresholds  # [len(labels)], or None: no out-of-domain check

    # ----- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle: Bundle, model=None, tokenizer=None, *, threshold: float | None = None,
             fallback: str | None = None, ood_quantile: float | None = None, device: str = "cpu") -> Router:
        """The bundle's trained router; without one, a zero-shot router when the experts have
        descriptions. `model`/`tokenizer`: the resident base (transformers CausalLM), used by the
        `base` and `zeroshot` backends; loaded from the bundle's base reference when not given.
        `ood_quantile` (hybrid): one of the stored OOD_QUANTILES instead of the trained one; 0
        turns the out-of-domain check off."""
        entry = bundle.manifest.get("router")
        if not entry:
            desc = _descriptions(bundle)
            if not bundle.experts or not any(desc.values()):
                raise RouterError(
                    f"bundle {bundle.path} has no trained router and its experts have no descriptions for zero-shot "
                    f"routing: run `meswitch router train {bundle.path}` (or compress with --description NAME=TEXT)")
            entry = {"backend": "zeroshot", "labels": sorted(bundle.experts), "descriptions": desc,
                     "threshold": DEFAULT_THRESHOLD, "fallback": FALLBACK_BASE}
        backend = entry.get("backend")
        if backend not in BACKENDS:
            raise RouterError(f"bundle {bundle.path}: router backend {backend!r} is not one of {', '.join(BACKENDS)}")
        labels = list(entry["labels"])
        gone = [n for n in labels if n not in bundle.experts]
        if gone:
            raise RouterError(f"the bundle's router routes to expert(s) no longer in the bundle ({', '.join(gone)}): "
                              f"run `meswitch router train {bundle.path}` again")
        opts = {"threshold": entry.get("threshold", DEFAULT_THRESHOLD) if threshold is None else threshold,
                "fallback": entry.get("fallback", FALLBACK_BASE) if fallback is None else fallback,
                "switch_confidence": entry.get("switch_confidence", DEFAULT_SWITCH_CONFIDENCE), "entry": entry}
        enc_cfg = entry.get("encoder", {})
        if backend == "zeroshot":
            model, tokenizer = load_base(bundle, model, tokenizer, device)
            scorer = ZeroShotScorer(model, tokenizer, labels, entry.get("descriptions") or _descriptions(bundle),
                                    max_tokens=enc_cfg.get("max_tokens", DEFAULT_MAX_TOKENS["zeroshot"]))
            return cls(bundle, backend, labels, scorer=scorer, **opts)
        head, tensors = load_head(bundle, entry)
        if backend == "lexical":
            terms = json.loads(_verified(bundle, entry, entry.get("vocabulary")).read_text()).get("terms")
            if not isinstance(terms, list) or "idf" not in tensors:
                raise RouterError(f"bundle {bundle.path}: the lexical router's vocabulary or idf weights are missing")
            encoder = LexicalEncoder(terms, tensors["idf"])
        elif backend == "hybrid":
            encoder = load_hybrid(bundle, entry, tensors)
            thresholds = ood_thresholds(entry, labels, ood_quantile)
            index = None
            if thresholds is not None:
                index = ExampleIndex.from_tensors(tensors, encoder.char.dim, len(labels))
            if head.coef.shape != (len(labels), encoder.dim):
                raise RouterError(f"router head has shape {tuple(head.coef.shape)}, expected ({len(labels)}, "
                                  f"{encoder.dim}) for this hybrid backend: retrain the router")
            return cls(bundle, backend, labels, head=head, encoder=encoder, index=index, ood_thresholds=thresholds,
                       **opts)
        elif backend == "embed":
            encoder = embed_encoder(enc_cfg.get("max_tokens", DEFAULT_MAX_TOKENS["embed"]), device)
        else:
            model, tokenizer = load_base(bundle, model, tokenizer, device)
            encoder = BaseEncoder(model, tokenizer, layer=enc_cfg.get("layer"), max_tokens=enc_cfg.get("max_tokens", 128))
        if head.coef.shape != (len(labels), encoder.dim):
            raise RouterError(f"router head has shape {tuple(head.coef.shape)}, expected ({len(labels)}, "
                              f"{encoder.dim}) for this {backend} backend: retrain the router")
        return cls(bundle, backend, labels, head=head, encoder=encoder, **opts)

    @property
    def uncovered(self) -> list[str]:
        """Experts of the bundle this router never routes to (added after it was trained)."""
        return sorted(set(self.bundle.experts) - set(self.labels))

    # ----- routing -------------------------------------------------------------------------
    def probabilities(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """[len(texts), len(labels)] probabilities, one row per text (no conversation logic)."""
        return self.scores(texts, progress)[0]

    def scores(self, texts: list[str], progress: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities [len(texts), len(labels)], resemblance to each expert's examples of the
        same shape, or None without an out-of-domain index)."""
        if self.scorer is not None:
            return self.scorer.probabilities(texts, progress=progress), None
        if isinstance(self.encoder, HybridEncoder):
            x, static, char = self.encoder.encode_parts(texts)
            return self.head.predict_proba(x), None if self.index is None else self.index.similarity(static, char)
        return self.head.predict_proba(self.encoder.encode(texts, progress=progress)), None

    def route(self, query: Query, previous_expert: str | None = None) -> RouteDecision:
        t0 = time.perf_counter()
        if isinstance(query, str):
            turns = [query]
        elif isinstance(query, list):
            turns = user_turns(query)[-len(TURN_WEIGHTS):]
            if not turns:
                raise RouterError("the conversation has no user message to route on")
        else:
            raise RouterError(f"a query is a string or a list of chat messages, not {type(query).__name__}")
        probs, sim = self.scores(turns)
        return self.decide(probs, sim, previous_expert, t0)

    def route_batch(self, texts: list[str], progress: bool = False) -> list[RouteDecision]:
        """route() for many single-turn queries at once (features computed in batches; each
        decision's latency_ms is the batch's time divided by the number of queries)."""
        t0 = time.perf_counter()
        probs, sim = self.scores(texts, progress=progress)
        per = (time.perf_counter() - t0) * 1000 / max(1, len(texts))
        out = []
        for i in range(len(texts)):
            d = self.decide(probs[i:i + 1], None if sim is None else sim[i:i + 1], None, time.perf_counter())
            d.latency_ms = per
            out.append(d)
        return out

    def decide(self, probs: np.ndarray, sim: np.ndarray | None, previous_expert: str | None,
               t0: float) -> RouteDecision:
        """The routing rule (module docstring) on the scores of a conversation's last user turns,
        oldest first: probabilities [turns, experts] and resemblance (or None)."""
        w = np.array(TURN_WEIGHTS[: len(probs)][::-1])[:, None]
        p = (probs * w).sum(0) / w.sum()
        top = int(p.argmax())
        expert, fallback, sticky, ood = self.labels[top], False, False, False
        if previous_expert in self.labels and expert != previous_expert:
            if probs[-1, top] < self.switch_confidence:
                expert, sticky = previous_expert, True
        elif previous_expert in self.labels:
            sticky = True
        resemblance = None if sim is None else float((sim[:, top] * w[:, 0]).sum() / w.sum())
        if not sticky and p[top] < self.threshold:
            expert, fallback = self.fallback, True
        elif not sticky and self.ood_thresholds is not None and resemblance < self.ood_thresholds[top]:
            expert, fallback, ood = self.fallback, True, True
        return RouteDecision(expert=expert, probabilities={n: float(x) for n, x in zip(self.labels, p, strict=True)},
                             confidence=float(p[top]), fallback=fallback,
                             latency_ms=(time.perf_counter() - t0) * 1000, top=self.labels[top], sticky=sticky,
                             backend=self.backend, resemblance=resemblance, out_of_domain=ood)


def check_threshold(threshold: float) -> float:
    if not 0 <= threshold <= 1:
        raise RouterError(f"threshold must be a probability in [0, 1], got {threshold}")
    return float(threshold)


def check_fallback(bundle: Bundle, fallback: str) -> str:
    if fallback != FALLBACK_BASE and fallback not in bundle.experts:
        raise RouterError(f"fallback {fallback!r} is neither {FALLBACK_BASE!r} nor an expert of the bundle "
                          f"(experts: {', '.join(sorted(bundle.experts)) or 'none'})")
    return fallback


# ----- persistence -----------------------------------------------------------------------------
def _verified(bundle: Bundle, entry: dict, rel: str | None) -> Path:
    """A router file of the bundle, checked against the manifest's SHA-256."""
    if not rel:
        raise RouterError(f"bundle {bundle.path}: the router entry names no file for its weights/vocabulary")
    try:
        f = bundle.resolve(rel, ROUTER_DIR)
    except BundleError as e:
        raise RouterError(str(e)) from e
    if not f.is_file():
        raise RouterError(f"router file {rel} is missing from bundle {bundle.path}")
    digest = (entry.get("files") or {}).get(rel)
    if digest is None or sha256_file(f) != digest:
        raise RouterError(f"router file {rel} is corrupted (SHA-256 does not match the manifest)")
    return f


def load_hybrid(bundle: Bundle, entry: dict, tensors: dict[str, np.ndarray]) -> HybridEncoder:
    """The hybrid backend's encoder from its stored vocabularies, idf weights, static table and tokenizer."""
    vocab = json.loads(_verified(bundle, entry, entry.get("vocabulary")).read_text())
    tokenizer_json = _verified(bundle, entry, entry.get("tokenizer")).read_text(encoding="utf-8")
    need = ("word_idf", "char_idf", "static_table", "static_mean", "static_scale")
    missing = [k for k in need if k not in tensors]
    if missing or not isinstance(vocab.get("terms"), list) or not isinstance(vocab.get("char_terms"), list):
        raise RouterError(f"bundle {bundle.path}: the hybrid router's vocabulary or tensors are missing "
                          f"({', '.join(missing) or 'terms'}): retrain the router")
    return HybridEncoder(LexicalEncoder(vocab["terms"], tensors["word_idf"], analyzer="word"),
                         LexicalEncoder(vocab["char_terms"], tensors["char_idf"], analyzer="char_wb"),
                         StaticEmbedder(tensors["static_table"], tokenizer_json),
                         tensors["static_mean"], tensors["static_scale"])


def ood_thresholds(entry: dict, labels: list[str], quantile: float | None) -> np.ndarray | None:
    """Per-expert out-of-domain thresholds of a stored router (None: no check): the trained
    quantile's, another stored quantile's, or none for quantile 0."""
    ood = entry.get("ood")
    if quantile == 0 or not ood:
        return None
    q = ood.get("quantile") if quantile is None else quantile
    by_q = ood.get("thresholds_by_quantile") or {}
    key = f"{q:g}"
    if key not in by_q:
        raise RouterError(f"out-of-domain quantile {q:g} is not stored with this router (stored: "
                          f"{', '.join(by_q) or 'none'}; 0 turns the check off)")
    try:
        return np.array([float(by_q[key][n]) for n in labels])
    except (KeyError, TypeError, ValueError) as e:
        raise RouterError(f"the router's out-of-domain thresholds are damaged ({e}): retrain the router") from None


def load_head(bundle: Bundle, entry: dict) -> tuple[Head, dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    f = _verified(bundle, entry, entry.get("weights"))
    try:
        tensors = load_file(str(f))
    except Exception as e:  # a damaged safetensors file
        raise RouterError(f"{f}: cannot read the router head ({e})") from e
    return Head.from_tensors(tensors, entry.get("temperature", 1.0)), tensors


def _place(bundle: Bundle, tmp: Path, stem: str, suffix: str) -> tuple[str, str]:
    """Rename a written file to router/<stem>-<sha256 prefix><suffix> (bundle lock held);
    returns (path, sha256)."""
    digest = sha256_file(tmp)
    rel = f"{ROUTER_DIR}/{stem}-{digest[:16]}{suffix}"
    fsync_path(tmp)
    durable_replace(tmp, bundle.resolve(rel, ROUTER_DIR))
    return rel, digest


def save_router(bundle: Bundle, entry: dict, head: Head | None, extra: dict[str, np.ndarray] | None = None,
                vocabulary: dict | None = None, tokenizer_json: str | None = None) -> dict:
    """Write the head (+ `extra` tensors) as safetensors, a lexical vocabulary and a tokenizer as
    JSON, each named by its content hash so that the old manifest stays valid until the new one
    replaces it; then the manifest; then remove the old router files."""
    import torch

    from ..bundle.format import save_safetensors

    entry = dict(entry)
    written = []  # (temporary file, stem, suffix, manifest key)
    try:
        if head is not None:
            tmp = bundle.new_temp_path("head.safetensors", ROUTER_DIR)
            written.append((tmp, "head", ".safetensors", "weights"))
            tensors = {**head.tensors(), **(extra or {})}
            save_safetensors({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, tmp,
                             metadata={"format": "meswitch-router-head", "labels": ",".join(entry["labels"])})
            entry["temperature"] = head.temperature
        if vocabulary is not None:
            tmp = bundle.new_temp_path("vocab.json", ROUTER_DIR)
            written.append((tmp, "vocab", ".json", "vocabulary"))
            tmp.write_text(json.dumps(vocabulary, ensure_ascii=False))
        if tokenizer_json is not None:
            tmp = bundle.new_temp_path("tokenizer.json", ROUTER_DIR)
            written.append((tmp, "tokenizer", ".json", "tokenizer"))
            tmp.write_text(tokenizer_json, encoding="utf-8")
        # Under the bundle's lock: the files into place, then the manifest (re-read from disk, so an
        # expert added meanwhile by another process is kept); replaced router files are deleted.
        with bundle.transaction() as manifest:
            files = {}
            for tmp, stem, suffix, key in written:
                rel, files[rel] = _place(bundle, tmp, stem, suffix)
                entry[key] = rel
            entry["files"] = files
            entry["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            manifest["router"] = entry
    finally:
        for tmp, _, _, _ in written:
            remove_path(tmp)
    return entry


# ----- training --------------------------------------------------------------------------------
def stored_examples(bundle: Bundle, name: str) -> list[Query] | None:
    """The examples `compress` stored for an expert (its calibration prompts), checked against
    the manifest; None when it has none."""
    rel = f"{bundle.entry(name)['aux_dir']}/{EXAMPLES_FILE}"
    digest = bundle.entry(name).get("files", {}).get(rel)
    f = bundle.resolve(rel)
    if digest is None or not f.is_file():
        return None
    if sha256_file(f) != digest:
        raise RouterError(f"expert {name!r}: {rel} is corrupted (SHA-256 does not match the manifest)")
    return load_queries(f)


def gather_examples(bundle: Bundle, files: dict[str, str | Path] | None = None,
                    queries: dict[str, list[Query]] | None = None) -> tuple[dict[str, list[Query]], dict[str, str]]:
    """Examples per expert: `queries` given directly, else `files` (NAME -> FILE), else the ones
    stored at compression time. Returns (examples, source per expert)."""
    files, queries = dict(files or {}), dict(queries or {})
    unknown = sorted((set(files) | set(queries)) - set(bundle.experts))
    if unknown:
        raise RouterError(f"examples for unknown expert(s) {', '.join(map(repr, unknown))}: the bundle's experts are "
                          f"{', '.join(sorted(bundle.experts)) or 'none'}")
    examples, source = {}, {}
    for name in sorted(bundle.experts):
        if name in queries:
            examples[name], source[name] = [q for q in queries[name] if query_text(q).strip()], "given"
            if not examples[name]:
                raise RouterError(f"expert {name!r}: no example queries given")
        elif name in files:
            examples[name], source[name] = load_queries(files[name]), str(files[name])
        else:
            stored = stored_examples(bundle, name)
            if stored is None:
                raise RouterError(
                    f"expert {name!r} has no example queries: give --examples {name}=FILE (compress stores the "
                    f"calibration prompts of experts compressed with --calib as their default examples)")
            examples[name], source[name] = stored, "calibration prompts (stored at compression)"
    if len(examples) < 2:
        raise RouterError(f"a router needs at least two experts; bundle {bundle.path} has {len(examples)}")
    texts = {n: frozenset(query_text(q) for q in qs) for n, qs in examples.items()}
    names = sorted(texts)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if texts[a] == texts[b]:
                raise RouterError(f"experts {a!r} and {b!r} have the same examples (one calibration file for all?): "
                                  f"give --examples NAME=FILE for each")
    return examples, source


def _subsample(qs: list[Query], cap: int, seed: int) -> list[Query]:
    if len(qs) <= cap:
        return qs
    rng = np.random.default_rng(seed)
    return [qs[i] for i in sorted(rng.choice(len(qs), cap, replace=False))]


def train_router(bundle: Bundle, backend: str = DEFAULT_BACKEND, *, examples: dict[str, str | Path] | None = None,
                 queries: dict[str, list[Query]] | None = None, threshold: float = DEFAULT_THRESHOLD,
                 fallback: str = FALLBACK_BASE, switch_confidence: float = DEFAULT_SWITCH_CONFIDENCE,
                 model=None, tokenizer=None, layer: int | None = None, max_tokens: int | None = None,
                 max_examples: int = DEFAULT_MAX_EXAMPLES, c: float | None = None, device: str = "cpu",
                 ood_quantile: float = DEFAULT_OOD_QUANTILE, progress: bool = True, seed: int = 0) -> dict:
    """Train the bundle's router and store it in the bundle. Returns the manifest's router entry."""
    if backend not in BACKENDS:
        raise RouterError(f"unknown router backend {backend!r} (choose from {', '.join(BACKENDS)})")
    check_threshold(threshold)
    check_fallback(bundle, fallback)
    if not 0 < switch_confidence <= 1:
        raise RouterError(f"switch confidence must be in (0, 1], got {switch_confidence}")
    if ood_quantile != 0 and ood_quantile not in OOD_QUANTILES:
        raise RouterError(f"out-of-domain quantile must be one of {', '.join(map(str, OOD_QUANTILES))} "
                          f"(or 0: no check), got {ood_quantile}")
    max_tokens = max_tokens or DEFAULT_MAX_TOKENS[backend]
    entry = {"backend": backend, "threshold": threshold, "fallback": fallback, "switch_confidence": switch_confidence,
             "context": {"user_turns": len(TURN_WEIGHTS), "weights_newest_first": list(TURN_WEIGHTS)}}
    t0 = time.perf_counter()
    if backend == "zeroshot":
        if examples or queries:
            raise RouterError("the zeroshot backend uses the experts' descriptions, not examples")
        labels = sorted(bundle.experts)
        if len(labels) < 2:
            raise RouterError(f"a router needs at least two experts; bundle {bundle.path} has {len(labels)}")
        model, tokenizer = load_base(bundle, model, tokenizer, device)
        scorer = ZeroShotScorer(model, tokenizer, labels, _descriptions(bundle), max_tokens=max_tokens)
        entry.update({"labels": labels, "descriptions": scorer.descriptions, "encoder": {"max_tokens": max_tokens},
                      "metrics": {"train_seconds": round(time.perf_counter() - t0, 2)}})
        return save_router(bundle, entry, None)

    ex, source = gather_examples(bundle, examples, queries)
    labels = sorted(ex)
    ex = {n: _subsample(ex[n], max_examples, seed) for n in labels}
    texts = [query_text(q) for n in labels for q in ex[n]]
    y = np.array([i for i, n in enumerate(labels) for _ in ex[n]])
    extra, vocabulary, tokenizer_json = None, None, None
    if backend == "embed":
        encoder = embed_encoder(max_tokens, device)
    elif backend == "lexical":
        encoder = LexicalEncoder().fit(texts)
        extra, vocabulary = {"idf": encoder.idf}, {"terms": encoder.terms()}
    elif backend == "hybrid":
        table, tokenizer_json, version = static_table()
        encoder, static = HybridEncoder.fit(texts, table, tokenizer_json)
        extra = encoder.tensors()
        vocabulary = {"terms": encoder.word.terms(), "char_terms": encoder.char.terms()}
    else:
        model, tokenizer = load_base(bundle, model, tokenizer, device)
        encoder = BaseEncoder(model, tokenizer, layer=layer, max_tokens=max_tokens)
    x = encoder.encode(texts, progress=progress)
    head, metrics = train_head(x, y, len(labels), c=c, seed=seed)
    if backend == "hybrid":
        char = encoder.char.encode(texts)
        if ood_quantile:
            entry["ood"] = calibrate_ood(static, char, y, labels, ood_quantile)
        extra.update(ExampleIndex(static, char, y, len(labels)).tensors())
        entry["encoder_package_version"] = version
    metrics.update({"examples_per_expert": {n: len(ex[n]) for n in labels}, "example_source": source,
                    "train_seconds": round(time.perf_counter() - t0, 2)})
    entry.update({"labels": labels, "encoder": encoder.config(), "metrics": metrics,
                  "examples_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest()})
    return save_router(bundle, entry, head, extra, vocabulary, tokenizer_json)


CROSS_QUANTILE = 0.99  # cap on a threshold: this quantile of the other experts' examples' resemblance


def calibrate_ood(static: np.ndarray, char, y: np.ndarray, labels: list[str], quantile: float) -> dict:
    """Per-expert out-of-domain thresholds from the examples alone.

    Leave-one-out: each example's resemblance to the other examples of its own expert is scored
    as a query's would be (ExampleIndex.similarity); an expert's threshold for quantile q is the
    q-quantile of its examples' scores, so that about q of queries like its examples fall back.
    Capped: a threshold never exceeds the CROSS_QUANTILE of the *other* experts' examples'
    resemblance to the expert, i.e. a query that resembles the expert more than 99% of the other
    experts' examples do is taken as the expert's. The cap matters when the examples are narrower
    than the queries (templated examples, or examples that include answers): their
    leave-one-out scores are then higher than any real query's. Experts with fewer than
    MIN_PER_CLASS_FOR_SPLIT examples make no estimate: no check then."""
    from .head import MIN_PER_CLASS_FOR_SPLIT

    counts = np.bincount(y, minlength=len(labels))
    if counts.min() < MIN_PER_CLASS_FOR_SPLIT:
        return {}
    everyone = ExampleIndex(static, char, y, len(labels))
    own, cap = [], []
    for j in range(len(labels)):
        rows, others = np.flatnonzero(y == j), np.flatnonzero(y != j)
        index = ExampleIndex(static[rows], char[rows], np.zeros(len(rows), dtype=int), 1)
        own.append(index.similarity(static[rows], char[rows], exclude_self=True)[:, 0])
        cross = np.concatenate([everyone.similarity(static[c], char[c])[:, j]
                                for c in np.array_split(others, max(1, len(others) // 1000))])
        cap.append(float(np.quantile(cross, CROSS_QUANTILE)))
    grid = {f"{q:g}": {n: min(float(np.quantile(own[j], q)), cap[j]) for j, n in enumerate(labels)}
            for q in OOD_QUANTILES}
    return {"quantile": quantile, "score": f"mean of the top {ExampleIndex.K} similarities to the expert's examples "
                                           "(similarity: mean of static-vector and character tf-idf cosines)",
            "calibration": f"leave-one-out quantile of each expert's examples, capped at the {CROSS_QUANTILE} "
                           "quantile of the other experts' examples",
            "cap": dict(zip(labels, cap, strict=True)), "thresholds_by_quantile": grid}


@dataclass
class EvalResult:
    labels: list[str]
    columns: list[str]
    metrics: dict
    top1: dict
    latencies_ms: list[float] = field(default_factory=list)


def evaluate(router: Router, data: list[tuple[Query, str]], progress: bool = True) -> EvalResult:
    """Route every query one at a time (as a server would) and score the decisions: accuracy,
    macro-F1 and confusion over the final decisions (the fallback is a column of its own when
    used), top-1 accuracy ignoring the threshold, and per-query latency percentiles."""
    from tqdm.auto import tqdm

    from .head import classification_metrics

    labels = list(router.labels)
    bad = sorted({lab for _, lab in data if lab not in labels and lab != router.fallback})
    if bad:
        raise RouterError(f"evaluation labels {', '.join(map(repr, bad))} are not experts of the router "
                          f"({', '.join(labels)}) nor its fallback ({router.fallback!r})")
    columns = labels + ([router.fallback] if router.fallback not in labels else [])
    rows = labels + ([router.fallback] if any(lab == router.fallback for _, lab in data) and
                     router.fallback not in labels else [])
    y_true, y_pred, y_top, lat, fell_back, ood = [], [], [], [], 0, 0
    router.route(query_text(data[0][0]) or "warm-up")  # first call pays one-time costs
    for q, lab in tqdm(data, desc="route", disable=not progress, leave=False):
        d = router.route(q)
        y_true.append(rows.index(lab))
        y_pred.append(columns.index(d.expert))
        y_top.append(labels.index(d.top))
        lat.append(d.latency_ms)
        fell_back += d.fallback
        ood += d.out_of_domain
    k = len(rows)
    m = classification_metrics(y_true, y_pred, k)
    top = classification_metrics(y_true, y_top, k)
    m.update({"fallback_rate": fell_back / len(data), "out_of_domain_rate": ood / len(data),
              "top1_accuracy": top["accuracy"], "top1_macro_f1": top["macro_f1"],
              "latency_ms_p50": float(np.percentile(lat, 50)), "latency_ms_p99": float(np.percentile(lat, 99)),
              "latency_ms_mean": float(np.mean(lat))})
    return EvalResult(labels=rows, columns=columns, metrics=m, top1=top, latencies_ms=lat)
