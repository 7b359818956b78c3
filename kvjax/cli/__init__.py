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


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))
