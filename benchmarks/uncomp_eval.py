"""UNComp vs SnapKV vs AdaKV on SmolLM2 at equal mean budget, with and without pruning.

One run: every sample is prefilled twice (plain, and with UNComp hidden-state token pruning
driven by the shipped calibration), each cache is compressed by every press, the question is
appended and the answer decoded greedily. Reports accuracy, KV bytes (valid entries and
held arrays) and prefill time (median over samples after the first, which compiles).

    python benchmarks/uncomp_eval.py --tasks niah_single --length 1024 --n 4
"""

import argparse
import functools
import json
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
import models
from kvjax import loops
from kvjax.prefill import compress_cache
from kvjax.eval.scoring import score
from kvjax.eval.tasks import make_samples
from kvjax.observation import ObsSpec
from kvjax.presses import make_press
from kvjax.presses.pruning import HiddenPruning
from kvjax.sampling import Greedy
from kvjax.uncomp.calibration import shipped_calibration

SPEC = ObsSpec(window=8)


def _prefill(fn, params, tokens, lengths, *, prefill_keep):
    between = None if prefill_keep is None else HiddenPruning(keep=prefill_keep, window=8)
    return loops.prefill_prompt(fn, params, tokens, lengths, obs_spec=SPEC,
                                attn_impl="reference", between=between)


def presses(ratios, cal):
    snap = dict(window_size=8, kernel_size=7, pooling="max")
    cells = [("full", 0.0, None)]
    for r in ratios:
        cells += [("snapkv", r, make_press("snapkv", r, **snap)),
                  ("adakv", r, make_press("adakv", r, **snap)),
                  ("uncomp", r, make_press("uncomp", r, calibration=cal)),
                  ("uncomp-ring", r, make_press("uncomp", r, calibration=cal, decode="ring"))]
    return cells


def run_sample(pipe, sample, cells, keep):
    fn, params = pipe.fn, pipe.params
    ctx_ids, q_ids = pipe.encode(sample.context, sample.question,
                                 answer_prefix=sample.answer_prefix, question_aware=False)
    tokens, lengths = loops.pad_prompts([ctx_ids])
    out_len = loops.bucket_length(sample.max_new_tokens + len(q_ids))
    rows = []
    for prune in (False, True):
        sched = keep(tokens.shape[1]) if prune else None
        t0 = time.perf_counter()
        logits, prompt = _prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                  prefill_keep=sched)
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - t0
        for label, ratio, press in cells:
            hook = None if press is None else press.decode_hook
            comp = compress_cache(press, prompt, tail_capacity=out_len, hook=hook)
            rep = kvjax.memory_report(comp)
            padded = np.zeros((1, loops.bucket_length(len(q_ids), minimum=16)), np.int32)
            padded[0, :len(q_ids)] = q_ids
            last, comp = loops.extend(fn, params, jnp.asarray(padded),
                                      jnp.array([len(q_ids)], jnp.int32), comp,
                                      attn_impl="reference")
            state = loops.init_state(last, comp, 1, out_len, None)
            state = loops.decode(fn, params, state, jnp.int32(sample.max_new_tokens),
                                 loops.eos_array(pipe.tokenizer.eos_ids), sampler=Greedy(),
                                 attn_impl="reference")
            text = pipe.tokenizer.decode(
                np.asarray(state.tokens)[0, :int(state.lengths[0])].tolist())
            rows.append(dict(label=label + ("+prune" if prune else ""), ratio=ratio,
                             task=sample.task, index=sample.index, score=score(sample, text),
                             prefill_s=prefill_s, n_context=len(ctx_ids),
                             prefix_tokens=sum(rep.prefix_tokens),
                             prefix_kv_bytes=rep.prefix_kv_bytes_held))
    return rows


def table(rows) -> str:
    keys = sorted({(r["label"], r["ratio"]) for r in rows}, key=lambda k: (k[1], k[0]))
    full = np.mean([r["prefix_tokens"] for r in rows if r["label"] == "full"])
    out = ["| method | ratio | score % | kept KV entries (% of full) | prefix KV bytes held "
           "(MiB) | prefill s (median) |", "|---|---|---|---|---|---|"]
    for label, ratio in keys:
        sel = [r for r in rows if r["label"] == label and r["ratio"] == ratio]
        pre = [r["prefill_s"] for r in sel if r["index"] > 0] or [r["prefill_s"] for r in sel]
        out.append(f"| {label} | {ratio} | {100 * np.mean([r['score'] for r in sel]):.0f} | "
                   f"{100 * np.mean([r['prefix_tokens'] for r in sel]) / full:.1f} | "
                   f"{np.mean([r['prefix_kv_bytes'] for r in sel]) / 2**20:.2f} | "
                   f"{np.median(pre):.3f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="niah_single")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--ratios", default="0.5,0.75,0.9")
    ap.add_argument("--min-keep-ratio", type=float, default=0.5)
    ap.add_argument("--out", default="docs/results/uncomp_smollm2")
    args = ap.parse_args(argv)
    model, tok = models.load("smollm2", progress=False)
    pipe = kvjax.Pipeline(model, tok)
    cal = shipped_calibration()
    cells = presses([float(r) for r in args.ratios.split(",")], cal)
    keep = functools.partial(cal.prefill_keep, min_keep_ratio=args.min_keep_ratio)
    rows = []
    for task in args.tasks.split(","):
        for s in make_samples(task, tok, args.length, args.n):
            rows += run_sample(pipe, s, cells, keep)
            print(task, s.index, [int(r["score"]) for r in rows[-2 * len(cells):]], flush=True)
    md = (f"# UNComp on SmolLM2-135M-Instruct ({platform.machine()} CPU, f32, "
          f"{jax.default_backend()})\n\ntasks {args.tasks}, context {args.length} tokens, "
          f"n={args.n} per task; pruning schedule {keep(loops.bucket_length(args.length))} "
          f"(stages {cal.stages}, min_keep_ratio {args.min_keep_ratio})\n\n{table(rows)}\n")
    pathlib.Path(args.out + ".md").write_text(md)
    pathlib.Path(args.out + ".json").write_text(json.dumps(rows, indent=1))
    print(md)


if __name__ == "__main__":
    main()
