"""KVzap's allocation on SmolLM2: needle answers with a uniform, a uniform + sinks and a global
budget, question-agnostic.

    python benchmarks/kvzap_allocation.py [--samples 8] [--tokens 1000] [--ratios 0.5,0.75]

Needle samples from `kvjax.demo.needle_sample` (depths spread over 0..1, one seed each) are
compressed with KVzapPress and the shipped SmolLM2 weights in three forms: allocation
"uniform" with n_sink=0 (kvpress's KVzapPress), "uniform" with the first 4 positions kept, and
"global" (the default: KVzip's one top-k over every layer and kv head). Prints correct / samples.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import smollm2_needles  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--ratios", default="0.5,0.75")
    args = ap.parse_args(argv)
    import kvjax
    pipe, _, samples = smollm2_needles(args.tokens, args.samples)
    forms = {"uniform, no sinks (kvpress)": dict(allocation="uniform", n_sink=0),
             "uniform + 4 sinks": dict(allocation="uniform"),
             "global + 4 sinks (default)": dict(allocation="global")}
    for r in map(float, args.ratios.split(",")):
        for label, kw in forms.items():
            press = kvjax.KVzapPress(compression_ratio=r, weights="smollm2", **kw)
            ok = sum(s.answer in pipe.run(s.context, s.question, press=press, max_new_tokens=12,
                                          answer_prefix=s.answer_prefix).text for s in samples)
            print(f"r={r:.2f}  {label:<28} {ok}/{len(samples)}", flush=True)


if __name__ == "__main__":
    main()
