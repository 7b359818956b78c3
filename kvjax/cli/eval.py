"""`kvjax eval`: run the long-context suite over presses and ratios, or plot a results folder.

  kvjax eval --model smollm2 --tasks niah_single,passkey --lengths 1024,2048 \\
      --presses full,snapkv,streaming_llm --ratios 0.5,0.75,0.9 --samples 20 --out results/
  kvjax eval --plot results/
"""

import argparse
import sys
from pathlib import Path

from kvjax.cli.common import load_model


def _csv(kind):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad list {text!r}: {e}") from e
    return parse


def add_eval_parser(subparsers) -> None:
    """Register the `eval` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser(
        "eval", help="long-context evaluation (RULER-style tasks, passkey, perplexity)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2', a .gguf file, a HF checkpoint dir or a `models.save` dir")
    p.add_argument("--tasks", type=_csv(str), default=("niah_single",),
                   help="comma-separated; see --list-tasks (and 'perplexity')")
    p.add_argument("--lengths", type=_csv(int), default=(2048,),
                   help="context lengths in tokens of the model's tokenizer")
    p.add_argument("--presses", type=_csv(str), default=("full",),
                   help="'full' and/or press registry names (class defaults)")
    p.add_argument("--ratios", type=_csv(float), default=(0.5, 0.75, 0.9))
    p.add_argument("--threshold-presses", type=_csv(str), default=(),
                   help="presses to run as kvjax.ThresholdPress(press, t) at each --thresholds "
                        "value (e.g. kvzap; plotted at the ratio each reached)")
    p.add_argument("--thresholds", type=_csv(float), default=(),
                   help="thresholds for --threshold-presses (kvzap: log scores, e.g. -6,-4,-2)")
    p.add_argument("--samples", type=int, default=20, help="samples per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    p.add_argument("--question-aware", action="store_true",
                   help="compress the context with the question in it (default: agnostic)")
    p.add_argument("--ppl-tokens", type=int, default=256,
                   help="tokens scored after the compressed context (task 'perplexity')")
    p.add_argument("--long-tokens", type=int, default=2048,
                   help="tokens scored while compressing (task 'long_generation')")
    p.add_argument("--interval", type=int, default=64,
                   help="tokens between decode-time merges (task 'long_generation')")
    p.add_argument("--window", type=int, default=0,
                   help="most recent tokens every merge keeps (task 'long_generation')")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="default: float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--plot", type=Path, metavar="DIR", default=None,
                   help="only write the summary and plots of an existing results folder")
    p.add_argument("--no-plot", action="store_true", help="skip the plots after a run")
    p.add_argument("--list-tasks", action="store_true", help="print the tasks and exit")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--kv-dtype", choices=("int8", "float8_e4m3fn"), default=None,
                   help="store the compressed cache quantized (default: the compute dtype)")
    p.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="shard weights and cache over a device mesh (default: one device)")
    p.set_defaults(func=run_eval_command)


def run_eval_command(args) -> int:
    """Handler of `kvjax eval`; returns the exit code."""
    from kvjax.eval import plots, results, tasks
    if args.list_tasks:
        for name, spec in tasks.TASKS.items():
            print(f"{name:20s} {spec}")
        print(f"{'perplexity':20s} perplexity of the shipped corpus after the compressed context")
        print(f"{'long_generation':20s} perplexity of --long-tokens corpus tokens while the "
              "press keeps compressing every --interval (a DecodingPress keeping 1 - ratio "
              "of the tokens seen)")
        return 0
    if args.plot is not None:
        print(results.write_summary(args.plot).read_text())
        for path in plots.plot_results(args.plot):
            print(f"wrote {path}")
        return 0
    try:
        summary = _run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary.read_text())
    if not args.no_plot:
        for path in plots.plot_results(args.out):
            print(f"wrote {path}")
    return 0


def _run(args) -> Path:
    import jax

    from kvjax.eval.runner import (Grid, check_decode_scorers, check_kvjax_presses, kvjax_rows,
                                   run_grid)
    from kvjax.pipeline import Pipeline

    grid = Grid(tasks=args.tasks, lengths=args.lengths, presses=args.presses,
                ratios=args.ratios, samples=args.samples, seed=args.seed,
                question_aware=args.question_aware, threshold_presses=args.threshold_presses,
                thresholds=args.thresholds)
    check_kvjax_presses(grid.presses, grid)
    check_decode_scorers(grid)
    if args.out.exists() and not args.out.is_dir():  # resumable folder, but not a file
        raise NotADirectoryError(f"--out {str(args.out)!r} is not a directory")
    model, tokenizer = load_model(args.model, args.dtype, args.mesh, progress=not args.no_progress)
    if tokenizer is None:
        raise ValueError(f"{args.model=} has no tokenizer")
    pipeline = Pipeline(model, tokenizer, kv_dtype=args.kv_dtype)
    meta = {"library": "kvjax", "model": str(args.model), "seed": args.seed,
            "dtype": str(model.embed_tokens.embedding[...].dtype),
            "backend": jax.default_backend()}
    if args.kv_dtype is not None:  # unquantized folders keep their earlier meta (resumable)
        meta["kv_dtype"] = args.kv_dtype
    if "long_generation" in grid.tasks:  # a resumed run must score the same tokens
        meta.update(long_tokens=args.long_tokens, interval=args.interval, window=args.window)
    rows = kvjax_rows(pipeline, tokenizer, args.seed, args.ppl_tokens, args.long_tokens,
                      args.interval, args.window)
    return run_grid(grid, rows, args.out, meta=meta, progress=not args.no_progress)



