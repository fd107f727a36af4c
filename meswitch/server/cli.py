"""`meswitch serve BUNDLE`: the HTTP server for every expert of a bundle, in one process, or with
--ray on a Ray Serve cluster (meswitch.server.ray_serve; Ray is imported only then)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..hardware import DTYPE_CHOICES
from ..runtime.backend import BACKENDS


def add_parser(sub) -> None:
    s = sub.add_parser("serve", help="serve a bundle over an OpenAI-compatible HTTP API")
    s.add_argument("bundle")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get("MESWITCH_API_KEY"),
                   help="require this bearer token for /v1 (default: $MESWITCH_API_KEY; none: open). "
                        "Prefer the variable or --api-key-file: a command line is visible to other users")
    s.add_argument("--api-key-file", default=None,
                   help="file of accepted inference keys, one per line (# comments); adds to --api-key")
    s.add_argument("--admin-key", default=os.environ.get("MESWITCH_ADMIN_KEY"),
                   help="bearer token for /admin (default: $MESWITCH_ADMIN_KEY; none: admin endpoints disabled)")
    s.add_argument("--source-dir", action="append", default=None,
                   help="folder whose bundles the admin may add experts from (repeatable; default: the folder "
                        "holding BUNDLE)")
    s.add_argument("--max-memory", default=None, help="memory budget for expert deltas, e.g. 2GiB (default: no limit)")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV-cache slots)")
    s.add_argument("--max-queue", type=int, default=256, help="waiting requests before answering 429")
    s.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    s.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype: auto (default: bfloat16 where the CPU has native bf16, else float32), "
                        "float32 (exact), bfloat16 or float16")
    s.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="delta compute backend: cpu (meswitch's kernel on the stored codes), reference "
                        "(dense deltas), auto (cpu when its kernel builds)")
    s.add_argument("--base", default=None, help="base checkpoint (default: the path recorded in the bundle)")
    s.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    s.add_argument("--no-router", action="store_true", help="do not load the bundle's router (model 'auto' is refused)")
    r = s.add_argument_group("Ray Serve (pip install 'meswitch[ray]'; cluster: $RAY_ADDRESS, else a local one)")
    r.add_argument("--ray", action="store_true", help="serve from Switch replicas on Ray Serve behind one endpoint")
    n = r.add_mutually_exclusive_group()
    n.add_argument("--replicas", type=int, default=1, help="replicas, one Switch each (default 1)")
    n.add_argument("--autoscale", metavar="MIN:MAX", default=None, help="scale replicas on ongoing requests")
    r.add_argument("--experts-per-replica", type=int, default=4,
                   help="experts a replica holds for routing (match what --max-memory keeps hot; default 4)")
    r.add_argument("--cache-dir", default=None, help="where a bundle/base URI is copied on each node")
    s.set_defaults(func=cmd_serve)


def load_bundle_router(bundle, model=None, tokenizer=None):
    """The bundle's router, or None (with the reason logged) when it has none. Routers that read
    the base model use `model` (else they load the bundle's base themselves)."""
    try:
        from ..router import Router
    except ImportError:
        return None
    try:
        return Router.load(bundle, model=model, tokenizer=tokenizer)
    except Exception as e:  # no router trained, no descriptions: serve without `auto`
        logging.getLogger("meswitch.server").warning("model 'auto' unavailable: %s", e)
        return None


def load_router(switch):
    """The router of a loaded Switch's bundle, sharing its resident base."""
    return load_bundle_router(switch.bundle, model=switch.model, tokenizer=switch.base_tokenizer)


def read_keys(path: str) -> list[str]:
    """Keys from a file: one per line; blank lines and lines starting with # are skipped."""
    lines = Path(path).read_text().splitlines()
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    if not keys:
        raise ValueError(f"{path}: no API keys in the file")
    return keys


def cmd_serve(args) -> int:
    if args.ray:
        return cmd_serve_ray(args)
    import uvicorn

    from ..runtime import Switch
    from .app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keys = ([args.api_key] if args.api_key else []) + (read_keys(args.api_key_file) if args.api_key_file else [])
    sw = Switch.load(args.bundle, args.base, dtype=args.dtype, max_memory=args.max_memory, max_batch=args.max_batch,
                     max_queue=args.max_queue, max_model_len=args.max_model_len, threads=args.threads,
                     backend=args.backend)
    router = None if args.no_router else load_router(sw)
    app = create_app(sw, router=router, api_key=keys or None, admin_key=args.admin_key or None,
                     source_dirs=args.source_dir)
    # (the keys themselves are never printed or logged)
    print(f"meswitch: serving {len(sw.experts)} experts ({', '.join(sw.experts)}) + base"
          f"{' + auto routing' if router else ''} on http://{args.host}:{args.port}/v1 "
          f"({f'{len(keys)} API key(s)' if keys else 'no API key'}, admin {'on' if args.admin_key else 'off'})",
          file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        sw.close()
    return 0


def cmd_serve_ray(args) -> int:
    try:
        from .ray_serve import ServeArgs, run
    except ImportError as e:
        print(f"meswitch serve --ray needs Ray Serve: pip install 'meswitch[ray]' ({e})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ServeArgs(bundle=args.bundle, base=args.base, replicas=args.replicas, autoscale=args.autoscale,
                    experts_per_replica=args.experts_per_replica, max_memory=args.max_memory, max_batch=args.max_batch,
                    max_queue=args.max_queue, max_model_len=args.max_model_len, dtype=args.dtype,
                    backend=args.backend, threads=args.threads or 1, router=not args.no_router, cache_dir=args.cache_dir,
                    admin_key=args.admin_key or None, api_key=([args.api_key] if args.api_key else [])
                    + (read_keys(args.api_key_file) if args.api_key_file else []) or None)
    scale = f"autoscaled {cfg.autoscale}" if cfg.autoscale else f"{cfg.replicas} replica(s)"
    print(f"meswitch: deploying {args.bundle} on Ray Serve ({scale}, {cfg.threads} thread(s) each); "
          f"serving on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    run(cfg, host=args.host, port=args.port)
    return 0
