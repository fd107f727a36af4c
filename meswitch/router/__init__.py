"""Routing: pick the expert for each query by domain classification (docs: README "Routing").

    from meswitch.router import Router, RouteDecision, RouterError
    router = Router.load(bundle, model=None, tokenizer=None)
    d = router.route("query text")   # or [{"role": "user", "content": ...}, ...]
    d.expert, d.probabilities, d.confidence, d.fallback, d.out_of_domain, d.latency_ms
"""
from .core import (
    DEFAULT_OOD_QUANTILE,
    DEFAULT_SWITCH_CONFIDENCE,
    DEFAULT_THRESHOLD,
    FALLBACK_BASE,
    RouteDecision,
    Router,
    evaluate,
    train_router,
)
from .errors import RouterError

__all__ = [
    "DEFAULT_OOD_QUANTILE",
    "DEFAULT_SWITCH_CONFIDENCE",
    "DEFAULT_THRESHOLD",
    "FALLBACK_BASE",
    "RouteDecision",
    "Router",
    "RouterError",
    "evaluate",
    "train_router",
]
