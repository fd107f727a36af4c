"""`meswitch generate`: one-off generation from a bundle's expert (or the base) on the command line."""
from __future__ import annotations

import sys

from ..hardware import DTYPE_CHOICES
from .backend import BACKENDS


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text with one expert of a bundle (or the base)")
    g.add_argument("bundle")
    g.add_argument("--expert", default=None, help="expert name (default: the plain base model)")
    g.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeatable; all prompts run together in one batch)")
    g.add_argument("--chat", action="store_true", help="send each prompt as a user message through the chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="compute dtype: auto (default: bfloat16 where the CPU has native bf16, else float32), "
                        "float32 (exact), bfloat16 or float16")
    g.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="delta compute backend: cpu, reference or auto (cpu when its kernel builds)")
    g.add_argument("--base", default=None, help="base checkpoint (default: the path recorded in the bundle)")
    g.add_argument("--max-memory", default=None, help="memory budget for expert deltas, e.g. 2GiB")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    g.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from .engine import RequestError
    from .switch import Switch

    prompts = [[{"role": "user", "content": p}] if args.chat else p for p in args.prompt]
    if args.stream and len(prompts) != 1:
        raise RequestError("--stream takes exactly one --prompt")
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                    stop=tuple(args.stop or ()), seed=args.seed)
    with Switch.load(args.bundle, args.base, dtype=args.dtype, max_memory=args.max_memory,
                     threads=args.threads, backend=args.backend) as sw:
        if args.stream:
            def show(req, delta, done):
                sys.stdout.write(delta)
                sys.stdout.flush()

            out = sw.submit(prompts[0], args.expert, on_update=show, **sampling).wait()
            print()
            outs = [out]
        else:
            outs = sw.generate(prompts, expert=args.expert, **sampling)
            for out in outs:
                print(out.text)
        for out in outs:
            if out.finish_reason == "error":
                print(f"meswitch generate: error: {out.error}", file=sys.stderr)
                return 1
        for out in outs:
            print(f"[{args.expert or 'base'}: {out.prompt_tokens} prompt + {out.completion_tokens} generated tokens, "
                  f"finish: {out.finish_reason}]", file=sys.stderr)
    return 0
