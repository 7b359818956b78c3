"""ThinK's claim on our model: channel pruning alone (full token cache) and on top of SnapKV 0.5
(λ 0.4, 0.5, and with value-channel pruning), and SnapKV alone at the same bytes as each of the
latter, needle in a haystack on SmolLM2, accuracy and KV bytes in one run. ThinK alone isolates what the channel pruning costs; on top of SnapKV it
answers the paper's claim (less memory than the token press alone at equal accuracy).

    python benchmarks/think_niah.py [--tokens 2048] [--samples 10] [--question-aware]

The paper claims over 20% less KV memory than the token press alone at equal accuracy.
Saves docs/results/think_niah.json.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, save_json  # noqa: E402

import kvjax  # noqa: E402
import models  # noqa: E402
from kvjax.demo import needle_sample  # noqa: E402


def configs(window: int):
    snap_at = lambda r: kvjax.SnapKVPress(compression_ratio=r, window_size=window)  # noqa: E731
    snap = snap_at(0.5)

    def think(lk, lv=0.0, press=snap):
        return kvjax.ThinKPress(key_channel_compression_ratio=lk, window_size=window,
                                value_channel_compression_ratio=lv, press=press)

    return {"full cache": None, "ThinK 0.4 alone": think(0.4, press=None),
            "ThinK 0.5 alone": think(0.5, press=None),
            "ThinK 0.5 + values 0.25 alone": think(0.5, 0.25, press=None),
            "SnapKV 0.5": snap, "SnapKV 0.5 + ThinK 0.4": think(0.4),
            "SnapKV 0.5 + ThinK 0.5": think(0.5),
            "SnapKV 0.5 + ThinK 0.5 + values 0.25": think(0.5, 0.25),
            # SnapKV alone at the bytes of SnapKV 0.5 + ThinK: (1 - r) = 0.5 (2 - lk - lv) / 2
            "SnapKV 0.6 (bytes of + ThinK 0.4)": snap_at(0.6),
            "SnapKV 0.625 (bytes of + ThinK 0.5)": snap_at(0.625),
            "SnapKV 0.6875 (bytes of + ThinK 0.5 + values 0.25)": snap_at(0.6875)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--question-aware", action="store_true")
    ap.add_argument("--out", default="docs/results/think_niah.json")
    args = ap.parse_args(argv)
    model, tok = models.load("smollm2", progress=False)
    pipe = kvjax.Pipeline(model, tok)
    samples = [needle_sample(tok, args.tokens, depth=(i + 0.5) / args.samples, seed=i)
               for i in range(args.samples)]
    rows = []
    for name, press in configs(args.window).items():
        hits, kv = 0, 0
        for s in samples:
            r = pipe.run(s.context, s.question, press=press, max_new_tokens=10,
                         answer_prefix=s.answer_prefix, question_aware=args.question_aware)
            hits += s.answer in r.text
            kv += kvjax.memory_report(r.cache).kv_bytes_needed
        rows.append(dict(config=name, accuracy=hits / len(samples), kv_mib=kv / len(samples) / 2**20))
        print(f"{name:<38} accuracy {rows[-1]['accuracy']:5.0%}  KV {rows[-1]['kv_mib']:6.2f} MiB",
              flush=True)
    base = next(r for r in rows if r["config"] == "SnapKV 0.5")["kv_mib"]
    for r in rows:
        r["kv_vs_snapkv"] = r["kv_mib"] / base
    print(f"device: {device_name()}; {args.samples} samples at {args.tokens} tokens, "
          f"{'question-aware' if args.question_aware else 'question-agnostic'}")
    save_json(dict(device=device_name(), tokens=args.tokens, samples=args.samples,
                   question_aware=args.question_aware, rows=rows), args.out)


if __name__ == "__main__":
    main()
