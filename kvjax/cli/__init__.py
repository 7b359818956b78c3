"""The `kvjax` command, one module per command group:

  generate.py      generate, demo, presses
  context.py       compress, ask (a document compressed once, asked later)
  serve.py         serve (the OpenAI-compatible server)
  eval.py          eval (the long-context suite)
  train_scorer.py  train-scorer (KVzap weights, `kvjax.tools.kvzap_train`)
  uncomp.py        uncomp-calibrate (`kvjax.tools.uncomp_calibrate`)
  zigzag.py        zigzag-profile (`kvjax.tools.zigzag_profile`)
  common.py        the shared model and press flags, loading, output checks

The CLI is the one place kvjax imports `models` (lazily, in `common.load_model`); the
handlers import the library on use. `python -m kvjax.cli` is the `kvjax` command.
"""

import argparse
import sys

from kvjax.cli.common import build_press, parse_press_args, run_command
from kvjax.cli.context import add_context_parsers
from kvjax.cli.eval import add_eval_parser
from kvjax.cli.generate import add_generate_parsers
from kvjax.cli.serve import add_serve_parser
from kvjax.cli.train_scorer import add_train_scorer_parser
from kvjax.cli.uncomp import add_uncomp_parser
from kvjax.cli.zigzag import add_zigzag_parser

__all__ = ["build_parser", "build_press", "main", "parse_press_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvjax", description="compressed KV caches in JAX: generate, evaluate, serve")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_generate_parsers, add_context_parsers, add_serve_parser, add_eval_parser,
                add_zigzag_parser, add_uncomp_parser, add_train_scorer_parser):
        add(sub)
    return parser


NUMBER_LISTS = ("--thresholds",)  # options whose comma lists may start with a minus sign


def attach_number_lists(argv: list[str]) -> list[str]:
    """argv with `--thresholds -6,-4` joined into `--thresholds=-6,-4` (argparse would read a
    value like -6,-4 as an unknown option)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in NUMBER_LISTS and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(build_parser().parse_args(attach_number_lists(argv)))
