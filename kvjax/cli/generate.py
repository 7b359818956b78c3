"""`kvjax generate`, `kvjax demo` and `kvjax presses`."""

import time

from kvjax.cli.common import add_model_args, add_press_args, build_press, load_model

DEMO_PRESSES = ("kvzip", "snapkv")  # the best question-agnostic press here, and SnapKV
DEMO_RATIO = 0.75


def cmd_generate(args) -> int:
    from kvjax.memory import memory_report
    from kvjax.pipeline import Pipeline
    from kvjax.sampling import Greedy, Temperature, TopK, TopP
    press = build_press(args)
    model, tokenizer = load_model(args.model, args.dtype, args.mesh)
    sampler = (TopP(args.top_p, args.temperature) if args.top_p else
               TopK(args.top_k, args.temperature) if args.top_k else
               Temperature(args.temperature) if args.temperature else Greedy())
    pipe = Pipeline(model, tokenizer, kv_dtype=args.kv_dtype)
    import jax
    t0 = time.perf_counter()
    n_ctx = len(pipe.encode(args.prompt)[0])
    state, n_new, t1 = None, 0, None
    for piece, state in pipe.stream_with_state(
            args.prompt, "", max_new_tokens=args.max_new_tokens, press=press, sampler=sampler,
            rng=jax.random.key(args.sample_seed)):
        t1 = t1 or time.perf_counter()
        n_new += 1
        print(piece, end="", flush=True)
    t2 = time.perf_counter()
    print()
    if state is not None:
        print(f"[prompt {n_ctx} tokens | prefill+first token {t1 - t0:.2f}s "
              f"({n_ctx / (t1 - t0):.0f} tok/s, incl. compilation) | decode {n_new} tokens "
              f"{max(n_new - 1, 0) / max(t2 - t1, 1e-9):.1f} tok/s | "
              f"{memory_report(state.cache)}]")
    return 0


def cmd_demo(args) -> int:
    from kvjax.demo import run_demo
    from kvjax.presses import make_press
    press = build_press(args)  # refuses --press-arg / --seed without --press
    if args.press is None:  # the default comparison
        presses = [make_press(name, args.compression_ratio) for name in DEMO_PRESSES]
    else:
        presses = [] if press is None else [press]
    model, tokenizer = load_model(args.model, args.dtype, args.mesh)
    rows = run_demo(model, tokenizer, presses=presses, n_tokens=args.context_tokens,
                    question_aware=args.question_aware, kv_dtype=args.kv_dtype)
    return 0 if rows[0]["correct"] else 1


def cmd_presses(args) -> int:
    from kvjax.presses import PRESSES
    for name in sorted(PRESSES):
        factory, example, summary = PRESSES[name]
        print(f"{name:<20} {summary}  (e.g. {example or 'no extra arguments'})")
    return 0


def add_generate_parsers(sub) -> None:
    """Register `generate`, `demo` and `presses` on an argparse subparsers object."""
    g = sub.add_parser("generate", help="stream a chat answer, then speed and KV-cache bytes")
    add_model_args(g)
    add_press_args(g)
    g.add_argument("--prompt", required=True,
                   help="the whole prompt is prefilled and compressed (question included)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--sample-seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)
    d = sub.add_parser("demo", help="needle in a ~2k-token haystack: the full cache, KVzip and "
                       "SnapKV at 0.75 (or --press)")
    add_model_args(d)
    add_press_args(d, ratio=DEMO_RATIO)
    d.add_argument("--question-aware", action="store_true",
                   help="compress context and question together (default: question-agnostic)")
    d.add_argument("--context-tokens", type=int, default=2000)
    d.set_defaults(func=cmd_demo)
    p = sub.add_parser("presses", help="list the registered presses")
    p.set_defaults(func=cmd_presses)
