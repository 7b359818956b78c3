"""`kvjax uncomp-calibrate`: write a UNComp calibration file for a model.

    kvjax uncomp-calibrate --model smollm2 --out smollm2_135m.json
"""

import argparse

from kvjax.cli.common import add_source_arg, load_model
from kvjax.uncomp.calibration import DEFAULT_THRESHOLD

# What the shipped SmolLM2 file was made with (tests/uncomp reproduce it).
SHIPPED_RECIPE = dict(k=32, groups=2, threshold=DEFAULT_THRESHOLD, n_prompts=4, n_tokens=512)


def add_uncomp_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `uncomp-calibrate` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("uncomp-calibrate", help="calibrate UNComp head groups and "
                              "layer stages (matrix entropy, arXiv 2410.03090)")
    add_source_arg(p)
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--k", type=int, default=SHIPPED_RECIPE["k"], help="entropy truncation")
    p.add_argument("--groups", type=int, default=SHIPPED_RECIPE["groups"],
                   help="number of kv-head groups per layer")
    p.add_argument("--threshold", type=float, default=SHIPPED_RECIPE["threshold"],
                   help="hidden-state entropy drop that starts a new layer stage")
    p.add_argument("--n-prompts", type=int, default=SHIPPED_RECIPE["n_prompts"])
    p.add_argument("--n-tokens", type=int, default=SHIPPED_RECIPE["n_tokens"])
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.set_defaults(func=cmd_uncomp_calibrate)
    return p


def cmd_uncomp_calibrate(args) -> int:
    from kvjax.tools.uncomp_calibrate import calibrate
    model, tokenizer = load_model(args.model, args.dtype)
    cal = calibrate(model, tokenizer, k=args.k, groups=args.groups, threshold=args.threshold,
                    n_prompts=args.n_prompts, n_tokens=args.n_tokens)
    cal.save(args.out)
    print(f"wrote {args.out}: stages {cal.stages}, {cal.n_groups} head groups per layer")
    return 0

