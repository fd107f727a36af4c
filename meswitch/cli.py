"""The `meswitch` command line: convert, compress, inspect, materialize, router, route."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .bundle.format import EXAMPLES_FILE, Bundle, BundleError, check_expert_name  # noqa: E402
from .checkpoints import DTYPES, Checkpoint, CheckpointError, check_compatible, fingerprint  # noqa: E402
from .compression.calibration import CalibrationError, load_samples  # noqa: E402
from .compression.layerwise import TUNE_MODES, ResumeError  # noqa: E402
from .compression.methods import METHODS, CompressionSpec, check_salient  # noqa: E402
from .compression.pipeline import DEFAULT_TUNE  # noqa: E402

USER_ERRORS = (BundleError, CheckpointError, CalibrationError, ResumeError, ValueError, FileNotFoundError, FileExistsError,
               RuntimeError)


class UsageError(ValueError):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pairs(values: list[str] | None, flag: str) -> list[tuple[str, str]]:
    out = []
    for v in values or []:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise UsageError(f"{flag} expects NAME=VALUE, got {v!r}")
        out.append((name, rest))
    return out


def _parse_salient(v: str) -> float:
    try:
        x = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--salient expects a count or a fraction, got {v!r}") from None
    try:
        return check_salient(x)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _int_at_least(minimum: int):
    def parse(v: str) -> int:
        try:
            x = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
        if x < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {v}")
        return x

    return parse


def _calib_paths(values: list[str] | None, expert_names: list[str]) -> dict[str, str | None]:
    """--calib FILE applies to every expert; --calib NAME=FILE to one (NAME must be an expert)."""
    per: dict[str, str | None] = {n: None for n in expert_names}
    default: str | None = None
    for v in values or []:
        name, sep, rest = v.partition("=")
        if sep and name in per:
            per[name] = rest
        elif sep and not Path(v).exists():
            raise UsageError(f"--calib {v}: {name!r} is not one of the experts being compressed ({', '.join(expert_names)})")
        else:
            if default is not None:
                raise UsageError("--calib FILE (for all experts) given twice")
            default = v
    for n in per:
        per[n] = per[n] or default
        if per[n] is not None and not Path(per[n]).is_file():
            raise UsageError(f"calibration file for expert {n!r} not found: {per[n]}")
    return per


def _aux_writer(ckpt: Checkpoint, calib_path: str | None):
    """Writes an expert's aux files; with a calibration file, also its prompts as the router's
    default examples (the built-in set is the same for every expert, so it is not stored)."""
    from .router.data import write_examples

    def save(dest: Path) -> None:
        ckpt.save_aux_files(dest)
        if calib_path is not None:
            write_examples(dest / EXAMPLES_FILE, load_samples(calib_path))

    return save


# ----- compress ------------------------------------------------------------------------------
def cmd_compress(args) -> int:
    from .bundle.materialize import dtype_name
    from .compression.pipeline import CalibrationConfig, compress_expert

    experts = _pairs(args.expert, "--expert")
    if not experts:
        raise UsageError("give at least one --expert NAME=PATH")
    names = [n for n, _ in experts]
    for n in names:
        check_expert_name(n)
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise UsageError(f"expert name given twice: {', '.join(sorted(dup))}")
    descriptions = dict(_pairs(args.description, "--description"))
    unknown = set(descriptions) - set(names)
    if unknown:
        raise UsageError(f"--description for unknown expert(s): {', '.join(sorted(unknown))}")
    calib = _calib_paths(args.calib, names)
    for path in set(calib.values()):  # a malformed file fails now, not after hours of work
        load_samples(path)
    spec = CompressionSpec(
        method=args.method,
        bits=args.bits,
        salient=args.salient,
        group_size=args.group_size,
        compress_embeddings=not args.keep_embeddings_16bit,
        rank_bits=args.rank_bits,
    ).validate()
    if args.method in ("fp16", "svd-mixed") and args.tune_steps:
        raise UsageError(f"--tune-steps has nothing to tune with --method {args.method}"
                         + (" (its quantized singular vectors are not tuned)" if args.method == "svd-mixed" else ""))
    if not 0 <= args.heldout < 1:
        raise UsageError("--heldout must be a fraction in [0, 1)")
    for n, p in experts:
        if not Path(p).exists():
            raise UsageError(f"expert {n!r}: checkpoint not found: {p}")

    out = Path(args.out)
    bundle_existed = out.exists()
    base = Checkpoint.open(args.base)
    base_params = base.num_parameters()
    log(f"base: {base.reference} ({base.config.get('model_type')}, {base_params:,} parameters)")
    base_fp = fingerprint(base, progress=True)
    bundle = Bundle.open_or_create(out, base.reference, base_fp, base.config, base_params)
    clash = [n for n in names if n in bundle.experts]
    if clash and not args.overwrite:
        raise UsageError(f"bundle {out} already has expert(s) {', '.join(clash)} (use --overwrite to replace)")

    ckpts = {}
    for n, p in experts:  # check every expert before compressing any
        ckpts[n] = Checkpoint.open(p)
        check_compatible(base, ckpts[n], n)

    # Finished layers are kept next to the bundle until the bundle is written, so that an
    # interrupted run can continue (--resume); the bundle itself only ever gets whole experts.
    partial = partial_dir(out)
    staged = []
    try:
        for n, _ in experts:
            log(f"compressing expert {n!r} ({spec.method}, {ckpts[n].reference})")
            result = compress_expert(
                base, ckpts[n], spec,
                CalibrationConfig(path=calib[n], max_len=args.calib_max_len, max_samples=args.calib_samples,
                                  heldout_fraction=args.heldout),
                tune_steps=args.tune_steps, tune=args.tune, device=args.device, model_dtype=DTYPES[args.model_dtype],
                name=n, workdir=partial / n, resume=args.resume, base_fingerprint=base_fp, log=log,
            )
            record = bundle.stage_raw(n, result.store.tensors(), bundle.delta_metadata(n, result.store.layout()),
                                      _aux_writer(ckpts[n], calib[n]))
            params = spec.as_dict()
            params.update({"tune_steps": args.tune_steps, "tune": args.tune if args.tune_steps else None,
                           "calibration": calib[n] or "builtin", "calibration_max_len": args.calib_max_len})
            nbytes = record["bytes"]
            entry = {
                "source": ckpts[n].reference,
                "description": descriptions.get(n, ""),
                "method": spec.method,
                "params": params,
                "dtype": dtype_name(result.dtype),
                "num_parameters": result.num_parameters,
                "payload_bytes": result.nbytes,
                "bytes": nbytes,
                "effective_bits": 8 * nbytes / result.num_parameters,
                "compression_ratio_vs_16bit": 2 * result.num_parameters / nbytes,
                "quality": result.quality,
                "tuning": result.tuning,
                "compress_seconds": round(result.seconds, 1),
            }
            staged.append((record, entry))
            q = result.quality
            log(f"[{n}] {entry['effective_bits']:.3f} bits/param, {nbytes / 2**20:.1f} MiB"
                + (f", held-out KL {q['kl']:.4f}, top-1 agreement {q['top1_agreement']:.3f}" if q else ""))
        bundle.commit(staged, replace=args.overwrite)
    except BaseException:
        bundle.discard([r for r, _ in staged])
        if not bundle_existed and not (out / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)
        if partial.exists():
            log(f"finished steps are kept in {partial}: run the same command with --resume to continue")
        raise
    shutil.rmtree(partial, ignore_errors=True)
    print_inspect(Bundle.open(out))
    return 0


def partial_dir(bundle: Path) -> Path:
    """Where `compress` keeps the finished layers of experts not yet in the bundle."""
    bundle = Path(bundle).resolve()
    return bundle.parent / f".{bundle.name}.partial"


# ----- inspect -------------------------------------------------------------------------------
def _fmt(v, spec: str, missing: str = "-") -> str:
    return missing if v is None else format(v, spec)


def print_inspect(bundle: Bundle, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(bundle.manifest, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    base = bundle.manifest["base"]
    table = Table(title=f"meswitch bundle {bundle.path}")
    for col in ("expert", "method", "bits", "eff. bits", "size", "vs 16-bit", "KL", "top-1", "ppl expert -> recon",
                "tuning KL", "description"):
        table.add_column(col, justify="left" if col in ("expert", "method", "description") else "right")
    for name, e in sorted(bundle.experts.items()):
        q = e.get("quality") or {}
        p = e.get("params", {})
        bits = str(p.get("bits", "16" if e["method"] == "fp16" else "-"))
        if e["method"] == "mixed":
            bits += f" +{p.get('salient')} sal."
        ppl = (f"{q['ppl_expert']:.2f} -> {q['ppl_reconstructed']:.2f}" if "ppl_expert" in q else "-")
        t = e.get("tuning") or {}
        tuned = f"{t['kl_before']:.4f} -> {t['kl_after']:.4f}" if "kl_before" in t else "-"
        table.add_row(
            name, e["method"], bits, f"{e['effective_bits']:.3f}", f"{e['bytes'] / 2**20:.1f} MiB",
            f"{e['compression_ratio_vs_16bit']:.2f}x", _fmt(q.get("kl"), ".4f"), _fmt(q.get("top1_agreement"), ".3f"),
            ppl, tuned, e.get("description", ""),
        )
    console = Console()
    if not console.is_terminal:  # piped or captured: do not wrap to a default 80 columns
        console = Console(width=200)
    console.print(f"base: {base.get('reference')}  fingerprint {base.get('fingerprint')}  "
                  f"({base.get('num_parameters', 0):,} parameters)")
    console.print(table)


def cmd_inspect(args) -> int:
    print_inspect(Bundle.open(args.bundle), args.json)
    return 0


# ----- materialize ---------------------------------------------------------------------------
def cmd_materialize(args) -> int:
    from .bundle.materialize import materialize

    bundle = Bundle.open(args.bundle)
    bundle.entry(args.name)
    base_path = args.base or bundle.manifest["base"]["reference"]
    base = Checkpoint.open(base_path)
    out = materialize(bundle, args.name, base, args.out, dtype=DTYPES[args.dtype] if args.dtype else None,
                      overwrite=args.overwrite)
    log(f"wrote {out}")
    return 0


# ----- convert -------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    from .checkpoints import convert_gguf

    out = convert_gguf(args.gguf, args.out, DTYPES[args.dtype], overwrite=args.overwrite)
    log(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meswitch", description="Compress experts into bundles, inspect and materialize them, and serve them.")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress experts as deltas over a base into a bundle")
    c.add_argument("--base", required=True, help="base model: Hugging Face directory or .gguf file")
    c.add_argument("--expert", action="append", metavar="NAME=PATH", help="an expert checkpoint (repeatable)")
    c.add_argument("--out", required=True, help="bundle directory (created, or extended if it exists)")
    c.add_argument("--method", choices=METHODS, default="mixed")
    c.add_argument("--bits", type=float, default=2, help="bits per quantized weight: 1, 2, 3, 4 or 8 (default 2); "
                        "--method svd-mixed: the target average bits per parameter in (0, 8], e.g. 2.25, every stored byte counted")
    c.add_argument("--salient", type=_parse_salient, default=0.01,
                   help="16-bit input channels per matrix: a count, or a fraction if < 1 (default 0.01)")
    c.add_argument("--group-size", type=_int_at_least(0), default=0, help="input columns per step size (0: per output channel)")
    c.add_argument("--rank-bits", type=float, default=0.2,
                   help="--method lowrank: bits per parameter for the float16 low-rank factors (default 0.2)")
    c.add_argument("--calib", action="append", metavar="[NAME=]FILE",
                   help="calibration samples (.txt/.jsonl/.json), for one expert or all (default: built-in set)")
    c.add_argument("--calib-samples", type=_int_at_least(2), default=64, help="at most this many samples per expert")
    c.add_argument("--calib-max-len", type=_int_at_least(2), default=128, help="tokens per sample")
    c.add_argument("--heldout", type=float, default=0.25, help="fraction of samples held out for the quality report")
    c.add_argument("--tune-steps", type=_int_at_least(0), default=0,
                   help="step-size tuning steps: per layer (blockwise) or in total (end-to-end) (default 0: off; "
                        "refused with fp16, which has nothing to tune, and with svd-mixed, whose deltas are not tuned)")
    c.add_argument("--tune", choices=TUNE_MODES, default=DEFAULT_TUNE,
                   help="blockwise: each layer's output to the expert layer's (bounded memory); end-to-end: KL of the "
                        "whole model's predictions (loads the whole base); both (default %(default)s)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted compression from its last finished layer")
    c.add_argument("--keep-embeddings-16bit", action="store_true", help="store embedding / LM head deltas in 16 bits")
    c.add_argument("--description", action="append", metavar="NAME=TEXT", help="one-line description of an expert's domain")
    c.add_argument("--overwrite", action="store_true", help="replace experts of the same name in the bundle")
    c.add_argument("--device", default="cpu", help="torch device for calibration, quantization, tuning and quality (default cpu)")
    c.add_argument("--model-dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype the expert and base models run in for calibration, tuning and quality "
                        "(bfloat16 halves their memory; default float32)")
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="show the experts of a bundle")
    i.add_argument("bundle")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.set_defaults(func=cmd_inspect)

    m = sub.add_parser("materialize", help="write an expert back as a standard Hugging Face checkpoint")
    m.add_argument("bundle")
    m.add_argument("name")
    m.add_argument("--out", required=True)
    m.add_argument("--base", help="base checkpoint (default: the reference recorded in the bundle)")
    m.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: the expert's own)")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    m.set_defaults(func=cmd_materialize)

    v = sub.add_parser("convert", help="convert a GGUF model to a Hugging Face safetensors directory")
    v.add_argument("gguf", help=".gguf file (or a directory holding one)")
    v.add_argument("--out", required=True)
    v.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    v.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    v.set_defaults(func=cmd_convert)

    from .runtime.cli import add_parser as add_generate_parser

    add_generate_parser(sub)

    from .server.cli import add_parser as add_serve_parser

    add_serve_parser(sub)

    from .router.cli import add_router_commands

    add_router_commands(sub)  # router train | router eval | route
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"meswitch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if args.debug:
            traceback.print_exc()
        print(f"meswitch {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
