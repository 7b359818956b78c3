"""The ZigZagKV analysis on our model: per-layer LMBA and LMBO of SmolLM2 on real prompts.

    python benchmarks/zigzag_profile.py [--prompts 4] [--tokens 1024]

LMBA: fewest tokens holding 90% of the window attention (mean over heads). LMBO: smallest
budget keeping the window's attention output at cosine >= 0.95 of the full cache. Writes
docs/results/zigzag_profile.{json,png}.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name  # noqa: E402

import models  # noqa: E402
from kvjax.tools.zigzag_profile import calibration_prompts, profile  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out", default="docs/results/zigzag_profile")
    args = ap.parse_args(argv)
    model, tok = models.load("smollm2", progress=False)
    res = profile(model, tok, calibration_prompts(tok, args.prompts, args.tokens))
    res["device"] = device_name()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 3.5))
    layers = range(len(res["lmba"]))
    ax.plot(layers, res["lmba"], "o-", label="LMBA (90% of window attention)")
    ax.plot(layers, res["lmbo"], "s-", label="LMBO (output cosine >= 0.95)")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"tokens (of {args.tokens})")
    ax.set_title("SmolLM2-135M-Instruct: minimum budget per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print("layer  LMBA  LMBO")
    for i in layers:
        print(f"{i:>5} {res['lmba'][i]:>5.0f} {res['lmbo'][i]:>5.0f}")


if __name__ == "__main__":
    main()
