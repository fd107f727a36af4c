"""`meswitch router train|eval` and `meswitch route`, registered by meswitch/cli.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .backends import BACKENDS
from .core import (
    DEFAULT_BACKEND,
    DEFAULT_MAX_EXAMPLES,
    DEFAULT_OOD_QUANTILE,
    DEFAULT_SWITCH_CONFIDENCE,
    OOD_QUANTILES,
    DEFAULT_THRESHOLD,
    FALLBACK_BASE,
)
from .errors import RouterError


def _usage_error(msg: str):
    from ..cli import UsageError

    return UsageError(msg)


def _probability(v: str) -> float:
    import argparse

    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a probability, got {v!r}") from None
    if not 0 <= x <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {v}")
    return x


def _ood_quantile(v: str) -> float:
    import argparse

    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {v!r}") from None
    if x != 0 and x not in OOD_QUANTILES:
        raise argparse.ArgumentTypeError(f"expected 0 or one of {', '.join(map(str, OOD_QUANTILES))}, got {v}")
    return x


def _name_files(values: list[str] | None, flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise _usage_error(f"{flag} expects NAME=FILE, got {v!r}")
        if name in out:
            raise _usage_error(f"{flag} given twice for {name!r}")
        out[name] = path
    return out


def _open(path: str):
    from ..bundle.format import Bundle

    return Bundle.open(path)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_router_train(args) -> int:
    from .core import train_router

    bundle = _open(args.bundle)
    files = _name_files(args.examples, "--examples")
    unknown = sorted(set(files) - set(bundle.experts))
    if unknown:
        raise _usage_error(f"--examples for unknown expert(s) {', '.join(map(repr, unknown))} (the bundle's experts: "
                           f"{', '.join(sorted(bundle.experts)) or 'none'})")
    for name, f in files.items():
        if not Path(f).is_file():
            raise _usage_error(f"--examples {name}={f}: file not found")
    entry = train_router(bundle, args.backend, examples=files, threshold=args.threshold, fallback=args.fallback,
                         switch_confidence=args.switch_confidence, layer=args.layer, max_tokens=args.max_tokens,
                         max_examples=args.max_examples, c=args.C, device=args.device, ood_quantile=args.ood_quantile)
    m = entry.get("metrics", {})
    _log(f"router ({entry['backend']}) trained for experts {', '.join(entry['labels'])} in {m.get('train_seconds')} s")
    if m.get("heldout_examples"):
        _log(f"held-out {m['heldout_examples']} examples: accuracy {m['heldout_accuracy']:.4f}, macro-F1 "
             f"{m['heldout_macro_f1']:.4f}, temperature {m['temperature']:.3f}, ECE {m['ece_before']:.4f} -> "
             f"{m['ece_after']:.4f}")
    print(json.dumps({k: entry[k] for k in ("backend", "labels", "threshold", "fallback", "metrics") if k in entry},
                     indent=2))
    return 0


def _query(args):
    if args.chat:
        p = Path(args.chat)
        if not p.is_file():
            raise _usage_error(f"--chat {p}: file not found")
        try:
            messages = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RouterError(f"{p}: invalid JSON ({e.msg})") from e
        if isinstance(messages, dict):
            messages = messages.get("messages")
        if not isinstance(messages, list):
            raise RouterError(f"{p}: expected a list of chat messages (or an object with 'messages')")
        return messages
    if not args.query:
        raise _usage_error("give a query, or --chat FILE")
    return args.query


def _load_router(args):
    from .core import Router

    return Router.load(_open(args.bundle), threshold=args.threshold, fallback=args.fallback,
                       ood_quantile=args.ood_quantile, device=args.device)


def cmd_route(args) -> int:
    router = _load_router(args)
    d = router.route(_query(args), previous_expert=args.previous)
    if args.json:
        print(json.dumps(d.as_dict(), indent=2))
        return 0
    why = ""
    if d.out_of_domain:
        why = f" (fallback: out of domain, resemblance {d.resemblance:.3f} to {d.top}'s examples is below its threshold)"
    elif d.fallback:
        why = f" (fallback: top probability below the threshold {router.threshold:.2f})"
    why += " (stays with the conversation's expert)" if d.sticky and d.expert != d.top else ""
    print(f"{d.expert}{why}")
    for name, p in sorted(d.probabilities.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<16} {p:.4f}")
    print(f"backend {router.backend}, {d.latency_ms:.1f} ms")
    if router.uncovered:
        _log(f"note: the router does not know expert(s) {', '.join(router.uncovered)} (retrain it to include them)")
    return 0


def print_eval(result, title: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    m = result.metrics
    if title:
        console.print(title)
    console.print(f"queries {m['n']}  accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
                  f"top-1 accuracy (no threshold) {m['top1_accuracy']:.4f}  fallback rate {m['fallback_rate']:.4f}")
    console.print(f"latency per query: p50 {m['latency_ms_p50']:.2f} ms  p99 {m['latency_ms_p99']:.2f} ms  "
                  f"mean {m['latency_ms_mean']:.2f} ms")
    t = Table(title="confusion matrix (rows: true expert, columns: routed to)")
    t.add_column("true \\ routed")
    for c in result.columns:
        t.add_column(c, justify="right")
    for name, row in zip(result.labels, m["confusion"], strict=True):
        t.add_row(name, *[str(v) for v in row])
    console.print(t)


def cmd_router_eval(args) -> int:
    from .core import evaluate
    from .data import load_labelled, load_queries

    if not args.data:
        raise _usage_error("give --data FILE (JSON lines with a 'label') or --data NAME=FILE (one query per line)")
    data = []
    for v in args.data:
        name, sep, path = v.partition("=")
        if sep and not Path(v).is_file():
            data += [(q, name) for q in load_queries(path)]
        else:
            data += load_labelled(v)
    router = _load_router(args)
    result = evaluate(router, data)
    if args.json:
        print(json.dumps({"backend": router.backend, "labels": result.labels, "columns": result.columns,
                          **result.metrics}, indent=2))
    else:
        print_eval(result, f"router {router.backend} on {len(data)} queries")
    return 0


def add_router_commands(sub) -> None:
    """Register `router train`, `router eval` and `route` on the main parser's subparsers."""
    r = sub.add_parser("router", help="train or evaluate a bundle's router")
    rsub = r.add_subparsers(dest="router_command", required=True)

    t = rsub.add_parser("train", help="train the router that picks an expert for each query; stored in the bundle")
    t.add_argument("bundle")
    t.add_argument("--examples", action="append", metavar="NAME=FILE",
                   help="example queries for an expert (.txt: one per line; .jsonl/.json: text/prompt/question/"
                        "instruction/messages); default: the calibration prompts stored at compression")
    t.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help="hybrid (default): word and character tf-idf + static token embeddings distilled from "
                        "MiniLM + logistic regression, with an out-of-domain check; lexical: word tf-idf + logistic "
                        "regression; embed: MiniLM sentence embeddings + logistic regression; base: the base LLM's "
                        "hidden states + logistic regression; zeroshot: a multiple-choice prompt to the base LLM")
    t.add_argument("--threshold", type=_probability, default=DEFAULT_THRESHOLD,
                   help=f"below this top probability a query goes to the fallback (default {DEFAULT_THRESHOLD})")
    t.add_argument("--fallback", default=FALLBACK_BASE, help="'base' (the base model, default) or an expert's name")
    t.add_argument("--switch-confidence", type=_probability, default=DEFAULT_SWITCH_CONFIDENCE,
                   help="a conversation leaves its expert only when its newest turn gives another expert at least "
                        f"this probability (default {DEFAULT_SWITCH_CONFIDENCE})")
    t.add_argument("--ood-quantile", type=_ood_quantile, default=DEFAULT_OOD_QUANTILE,
                   help="hybrid: each expert's out-of-domain threshold lets about this fraction of its held-out "
                        f"examples fall back (one of {', '.join(map(str, OOD_QUANTILES))}; 0: no check; default "
                        f"{DEFAULT_OOD_QUANTILE})")
    t.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES, help="examples per expert at most")
    t.add_argument("--layer", type=int, help="base backend: decoder layer whose hidden states are pooled (default: middle)")
    t.add_argument("--max-tokens", type=int, help="tokens of a query the backend reads (default 128; zeroshot 256)")
    t.add_argument("-C", dest="C", type=float, help="inverse L2 strength of the logistic regression (default: the "
                                                   "best of 0.01, 0.1, 1, 10 on held-out examples)")
    t.add_argument("--device", default="cpu")
    t.set_defaults(func=cmd_router_train)

    e = rsub.add_parser("eval", help="accuracy, macro-F1, confusion matrix and latency of the bundle's router")
    e.add_argument("bundle")
    e.add_argument("--data", action="append", metavar="FILE|NAME=FILE",
                   help="JSON lines {\"text\": ..., \"label\": EXPERT} (or messages/prompt/question), or NAME=FILE "
                        "with one query per line; repeatable")
    _route_options(e)
    e.set_defaults(func=cmd_router_eval)

    q = sub.add_parser("route", help="pick the expert for a query with the bundle's router")
    q.add_argument("bundle")
    q.add_argument("query", nargs="?", help="the query text")
    q.add_argument("--chat", metavar="FILE", help="route a conversation: a JSON list of {role, content} messages")
    q.add_argument("--previous", metavar="EXPERT", help="the conversation's current expert (it stays unless the new "
                                                        "turn is confidently another domain)")
    _route_options(q)
    q.set_defaults(func=cmd_route)


def _route_options(p) -> None:
    p.add_argument("--threshold", type=_probability, help="override the stored threshold")
    p.add_argument("--fallback", help="override the stored fallback ('base' or an expert)")
    p.add_argument("--ood-quantile", type=_ood_quantile, help="hybrid: use the out-of-domain thresholds stored for "
                                                             "this quantile (0: no check)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--device", default="cpu")
