"""The classifier on top of the features: standardisation + multinomial logistic regression
(scikit-learn's LogisticRegression, lbfgs), then one temperature fitted on held-out examples.

Training: a stratified split holds out `calib_fraction` of the examples; the head is fitted on
the rest (for each C of C_GRID unless one is given; the C with the lowest held-out log-loss after
temperature scaling is kept), the temperature T (in [0.5, 20]) minimises the held-out negative
log-likelihood of softmax(z / T) (temperature scaling, Guo et al. 2017), and the held-out
accuracy, macro-F1 and expected calibration error (before and after) become the router's
metrics. The head is then refitted on all examples and keeps T.
At run time only numpy is used: p = softmax((((x - mean) / scale) W^T + b) / T).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from .errors import RouterError

MIN_PER_CLASS_FOR_SPLIT = 5
CALIB_FRACTION = 0.2  # of the examples held out to pick C and fit the temperature
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.5, 20.0
C_GRID = (0.01, 0.1, 1.0, 10.0)  # inverse L2 strengths tried when none is given


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


@dataclass
class Head:
    coef: np.ndarray       # [K, D]
    intercept: np.ndarray  # [K]
    mean: np.ndarray       # [D]
    scale: np.ndarray      # [D]
    temperature: float = 1.0

    def logits(self, x) -> np.ndarray:
        if isinstance(x, list):  # column blocks side by side (hybrid features), not concatenated
            widths = tuple(block.shape[1] for block in x)
            if sum(widths) != self.coef.shape[1]:
                raise RouterError(f"router head expects {self.coef.shape[1]} features, the blocks have {sum(widths)}")
            if getattr(self, "_block_widths", None) != widths:  # each block's coefficients, contiguous, once
                edges = np.cumsum((0,) + widths)
                self._blocks = [np.ascontiguousarray(self.coef[:, a:b].T) for a, b in itertools.pairwise(edges)]
                self._block_widths = widths
            out = self.intercept.astype(np.float64)
            for block, w in zip(x, self._blocks, strict=True):
                out = out + np.asarray(block @ w)
            return out
        if sparse.issparse(x):  # tf-idf rows: not standardised (mean 0, scale 1)
            return np.asarray(x @ self.coef.T) + self.intercept
        return ((np.asarray(x, dtype=np.float32) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict_proba(self, x) -> np.ndarray:
        return softmax(self.logits(x).astype(np.float64) / self.temperature)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef.astype(np.float32), "intercept": self.intercept.astype(np.float32),
                "mean": self.mean.astype(np.float32), "scale": self.scale.astype(np.float32)}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], temperature: float) -> Head:
        try:
            return cls(t["coef"], t["intercept"], t["mean"], t["scale"], float(temperature))
        except KeyError as e:
            raise RouterError(f"router head is missing tensor {e}") from None


def _fit(x: np.ndarray, y: np.ndarray, k: int, c: float, seed: int) -> Head:
    from sklearn.linear_model import LogisticRegression

    if sparse.issparse(x):
        mean, scale = np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32)
        z = x
    else:
        mean = x.mean(axis=0)
        scale = x.std(axis=0)
        scale = np.where(scale > 1e-6, scale, 1.0)
        z = (x - mean) / scale
    lr = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    lr.fit(z, y)
    coef, intercept = lr.coef_, lr.intercept_
    if k == 2 and coef.shape[0] == 1:  # scikit-learn's binary form: one row for class 1
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return Head(coef.astype(np.float32), intercept.astype(np.float32), mean.astype(np.float32),
                scale.astype(np.float32))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """T > 0 minimising the mean negative log-likelihood of softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    def nll(log_t):
        p = softmax(logits / np.exp(log_t))
        return -np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)))

    # T >= 0.5: when every held-out example is right, the likelihood keeps rising as T -> 0,
    # which would make every later query look certain; sharpening is capped at 2x.
    res = minimize_scalar(nll, bounds=(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)), method="bounded")
    return float(np.exp(res.x))


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: confidence vs accuracy in equal-width confidence bins, weighted by count."""
    conf, pred = p.max(axis=1), p.argmax(axis=1)
    correct = (pred == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def classification_metrics(y_true: list[int], y_pred: list[int], k: int) -> dict:
    """Accuracy, macro-F1 and the confusion matrix (rows: true label, columns: predicted; k+1
    columns when predictions may be the fallback, coded k)."""
    cols = max([k - 1, *y_pred]) + 1
    cm = np.zeros((k, cols), dtype=int)
    for t, p in zip(y_true, y_pred, strict=True):
        cm[t, p] += 1
    f1s = []
    for c in range(k):
        tp = cm[c, c]
        fp = cm[:, c].sum() - tp
        fn = cm[c].sum() - tp
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    n = max(1, len(y_true))
    return {"accuracy": float(np.trace(cm[:, :k]) / n), "macro_f1": float(np.mean(f1s)), "confusion": cm.tolist(),
            "n": len(y_true)}


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))))


def train_head(x, y: np.ndarray, k: int, c: float | None = None, calib_fraction: float = CALIB_FRACTION,
               seed: int = 0) -> tuple[Head, dict]:
    """Fit the head; c=None picks the regularisation from C_GRID by held-out log-loss."""
    counts = np.bincount(y, minlength=k)
    metrics: dict = {"examples": len(y)}
    if counts.min() >= MIN_PER_CLASS_FOR_SPLIT and calib_fraction > 0:
        from sklearn.model_selection import train_test_split

        idx_fit, idx_cal = train_test_split(np.arange(len(y)), test_size=calib_fraction, stratify=y, random_state=seed)
        best = None
        for cc in ([c] if c is not None else C_GRID):
            head = _fit(x[idx_fit], y[idx_fit], k, cc, seed)
            z = head.logits(x[idx_cal]).astype(np.float64)
            t = fit_temperature(z, y[idx_cal])
            loss = _nll(softmax(z / t), y[idx_cal])
            if best is None or loss < best[0]:
                best = (loss, cc, z, t)
        _, c, z, t = best
        p_before, p_after = softmax(z), softmax(z / t)
        m = classification_metrics(list(y[idx_cal]), list(p_after.argmax(1)), k)
        metrics.update({"heldout_examples": len(idx_cal), "heldout_accuracy": m["accuracy"],
                        "heldout_macro_f1": m["macro_f1"], "heldout_nll": _nll(p_after, y[idx_cal]), "temperature": t,
                        "ece_before": expected_calibration_error(p_before, y[idx_cal]),
                        "ece_after": expected_calibration_error(p_after, y[idx_cal])})
    else:
        t, c = 1.0, (c if c is not None else 1.0)
        metrics.update({"heldout_examples": 0, "temperature": t,
                        "note": f"fewer than {MIN_PER_CLASS_FOR_SPLIT} examples for some expert: no held-out split, "
                                "no temperature fit"})
    metrics["C"] = c
    head = _fit(x, y, k, c, seed)
    head.temperature = t
    metrics["train_accuracy"] = float((head.predict_proba(x).argmax(1) == y).mean())
    return head, metrics
