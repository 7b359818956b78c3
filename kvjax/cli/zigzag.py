"""`kvjax zigzag-profile`: per-layer LMBA/LMBO budgets for `ZigZagKVPress(profile=...)`.

    kvjax zigzag-profile --model smollm2 --out zigzag_smollm2.json
"""

import json
from pathlib import Path

from kvjax.cli.common import add_source_arg, load_model


def add_zigzag_parser(sub) -> None:
    p = sub.add_parser("zigzag-profile", help="per-layer LMBA/LMBO for ZigZagKVPress(profile=)")
    add_source_arg(p)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--attention-mass", type=float, default=0.9)
    p.set_defaults(func=_cmd_profile)


def _cmd_profile(args) -> int:
    from kvjax.tools.zigzag_profile import calibration_prompts, profile
    model, tok = load_model(args.model, args.dtype)
    result = profile(model, tok, calibration_prompts(tok, args.prompts, args.tokens),
                     window=args.window, tau=args.attention_mass)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}: LMBA per layer "
          + " ".join(f"{x:.0f}" for x in result["lmba"]))
    return 0
