"""Why KeyDiff beats KVzip on passkey: how much of the needle each press keeps.

For the first `--n` passkey samples (question-agnostic, as `kvjax eval` runs them): compress the
context with each press at each ratio, and count the needle's tokens (the passkey's digits,
found by their characters in the context) that each layer and kv head keeps, against the
share of haystack tokens kept. The passkey haystack is one noise passage repeated, so its
keys repeat; a press that keeps the needle's tokens more often than the haystack's is the one
that answers.

    python benchmarks/passkey_kept.py --length 1024 --n 10 --ratios 0.75,0.9
"""

import argparse
import json

import numpy as np

import kvjax
import models
from kvjax.eval.tasks import make_sample


def needle_positions(tokenizer, ids, answer: str) -> list[int]:
    """Token indices of `ids` whose characters overlap the first occurrence of `answer`."""
    pieces = [tokenizer.decode([i]) for i in ids]
    ends = np.cumsum([len(p) for p in pieces])
    text = "".join(pieces)
    start = text.find(answer)
    if start < 0:
        raise ValueError(f"{answer=} not found in the decoded context")
    stop = start + len(answer)
    begins = ends - np.array([len(p) for p in pieces])
    return [i for i in range(len(ids)) if begins[i] < stop and ends[i] > start]


def kept_shares(cache, needle: list[int], n_context: int) -> tuple[float, float]:
    """(share of needle tokens kept, share of other context tokens kept) over every layer and
    kv head."""
    hit = total = other = 0
    needle_set = set(needle)
    for layer in range(cache.n_layers):
        for kept in kvjax.kept_positions(cache, layer)[0]:
            k = set(int(p) for p in kept if p < n_context)
            hit += len(k & needle_set)
            other += len(k - needle_set)
            total += 1
    return hit / (total * len(needle)), other / (total * (n_context - len(needle)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--ratios", default="0.75,0.9")
    ap.add_argument("--presses", default="kvzip,kvzap,keydiff,snapkv")
    ap.add_argument("--out", default=None, help="write the rows as JSON")
    args = ap.parse_args()
    model, tok = models.load("smollm2")
    pipe = kvjax.Pipeline(model, tok)
    rows = []
    for i in range(args.n):
        sample = make_sample("passkey", tok, args.length, i, 0)
        for name in args.presses.split(","):
            for r in (float(x) for x in args.ratios.split(",")):
                ctx = pipe.compress(sample.context, press=kvjax.make_press(name, r))
                needle = needle_positions(tok, ctx.context_ids, sample.answers[0])
                got, rest = kept_shares(ctx.cache, needle, ctx.n_context)
                rows.append(dict(sample=i, press=name, ratio=r, needle_kept=got,
                                 haystack_kept=rest))
    print("| press | ratio | needle tokens kept | other context tokens kept |")
    print("|---|---|---|---|")
    for name in args.presses.split(","):
        for r in (float(x) for x in args.ratios.split(",")):
            sel = [x for x in rows if x["press"] == name and x["ratio"] == r]
            print(f"| {name} | {r:g} | {np.mean([x['needle_kept'] for x in sel]):.0%} | "
                  f"{np.mean([x['haystack_kept'] for x in sel]):.0%} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
