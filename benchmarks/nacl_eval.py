"""NACL vs SnapKV vs Random at equal KV bytes, and the effect of NACL's random fraction.

Runs the kvjax evaluation suite (`kvjax.eval.tasks`) through `kvjax.Pipeline` on SmolLM2,
question-agnostic (the context is compressed before the question is seen) and question-aware
(context + question compressed together). Every press at a given compression ratio keeps
exactly ceil((1 - r) * n) tokens per kv head and layer, so the KV bytes are equal; the kept
prefix tokens are recorded per sample to show it. Results are saved after every cell (the
script resumes from the JSON file), then summarised as a markdown table.

    python benchmarks/nacl_eval.py --n 10 --out docs/results/nacl_smollm2.json
    python benchmarks/nacl_eval.py --table docs/results/nacl_smollm2*.json
"""

import argparse
import dataclasses
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
from kvjax.compress import obs_spec_for as compress_obs_spec
from kvjax.prefill import compress_cache, prefill_prompt
from kvjax.eval.scoring import score
from kvjax.eval.tasks import make_samples
from kvjax.observation import ObsSpec
from kvjax.sampling import Greedy


def press_configs(ratios, random_fractions):
    """(label, ratio, press) cells; label names the method and its random fraction."""
    cells = [("full", 0.0, None)]
    for r in ratios:
        for rf in random_fractions:
            # gqa="mean": the saved sweep predates the "first" default
            cells.append((f"nacl_rf{rf:g}", r, kvjax.NACLPress(
                compression_ratio=r, random_fraction=rf, seed=0, gqa="mean")))
        cells.append(("snapkv", r, kvjax.SnapKVPress(compression_ratio=r)))
        cells.append(("random", r, kvjax.RandomPress(compression_ratio=r, seed=0)))
    return cells


def kept_tokens(cache) -> float:
    """Mean kept prefix tokens per (layer, kv head): equal bytes <=> equal counts."""
    return float(np.asarray(cache.store.length).mean())


def answer_spans(tokenizer, ctx_ids, answers):
    """For each expected answer, the token spans [start, stop) where it occurs in the context."""
    spans = []
    for a in answers:
        ids = tokenizer.encode(a, add_bos=False)
        spans.append([(i, i + len(ids)) for i in range(len(ctx_ids) - len(ids) + 1)
                      if ctx_ids[i:i + len(ids)] == ids])
    return spans


def needle_kept(cache, spans, n_context: int):
    """Fraction of the answer tokens the compressed cache still holds (1.0 = all kept).

    Per layer and kv head: for each answer, the best-kept of its occurrences; averaged over
    answers, heads and layers. None when an answer is not found verbatim in the tokens.
    """
    if not spans or any(not s for s in spans):
        return None
    fracs = []
    for layer in range(cache.n_layers):
        heads = kvjax.kept_positions(cache, layer)[0]
        kept = np.zeros((len(heads), n_context + 1), bool)
        for h, pos in enumerate(heads):
            kept[h, pos[pos <= n_context]] = True
        per_answer = [np.max([kept[:, a:b].mean(1) for a, b in occ], axis=0) for occ in spans]
        fracs.append(np.mean(per_answer))
    return float(np.mean(fracs))


_prefill = prefill_prompt  # the library's prefill primitive


def _compress(press, prompt, tail_capacity):
    return compress_cache(press, prompt, tail_capacity=tail_capacity)


def answer_all(pipe, sample, cells, aware: bool):
    """Prefill once (observing what every press needs), then compress, extend, decode per press.

    Equivalent to `pipe.run(..., press=p)` for each press (same jitted pieces; only the shared
    observation is wider), at one prefill per sample instead of one per press.
    """
    fn, params, attn = pipe.fn, pipe.params, pipe.attn_impl
    ctx_ids, q_ids = pipe.encode(sample.context, sample.question,
                                 answer_prefix=sample.answer_prefix, question_aware=aware)
    tokens, lengths = loops.pad_prompts([ctx_ids])
    out_len = loops.bucket_length(sample.max_new_tokens + len(q_ids))
    spec = functools.reduce(ObsSpec.merge, (compress_obs_spec(p) for _, _, p in cells))
    spans = answer_spans(pipe.tokenizer, ctx_ids, sample.answers)
    t0 = time.perf_counter()
    logits, prompt = _prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                              obs_spec=spec, attn_impl=attn)
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - t0
    rows = []
    for label, ratio, press in cells:
        t1 = time.perf_counter()
        comp = _compress(press, prompt, out_len)  # new buffers: extend donates them
        state = loops.init_state(logits, comp, 1, out_len, None)
        padded = np.zeros((1, loops.bucket_length(len(q_ids), minimum=16)), np.int32)
        padded[0, :len(q_ids)] = q_ids
        last, comp = loops.extend(fn, params, jnp.asarray(padded),
                                  jnp.array([len(q_ids)], jnp.int32), state.cache, attn_impl=attn)
        kept, needle = kept_tokens(comp), needle_kept(comp, spans, len(ctx_ids))
        state = dataclasses.replace(state, logits=last, cache=comp)
        state = loops.decode(fn, params, state, jnp.int32(sample.max_new_tokens),
                             loops.eos_array(pipe.tokenizer.eos_ids), sampler=Greedy(),
                             attn_impl=attn)
        text = pipe.tokenizer.decode(np.asarray(state.tokens)[0, :int(state.lengths[0])].tolist())
        rows.append(dict(label=label, ratio=ratio, task=sample.task, index=sample.index,
                         depth=sample.depth, score=score(sample, text), answer=text,
                         n_context=len(ctx_ids), kept=kept, needle_kept=needle,
                         prefill_s=prefill_s,
                         compress_decode_s=time.perf_counter() - t1))
    return rows


def summarise(rows, metric="score"):
    """{(mode, label, ratio): (mean metric, n)}; duplicate samples counted once, None skipped."""
    out = {}
    for r in rows:
        if r.get(metric) is not None:
            out.setdefault((r["mode"], r["label"], r["ratio"]), {})[(r["task"], r["index"])] = r
    return {k: (float(np.mean([x[metric] for x in v.values()])), len(v))
            for k, v in out.items()}


def markdown_table(rows, tasks=None, metric="score") -> str:
    """One table per mode: rows = methods, columns = compression ratios (metric, %)."""
    summary = summarise([r for r in rows if tasks is None or r["task"] in tasks], metric)
    ratios = sorted({k[2] for k in summary if k[2] > 0})
    labels = sorted({k[1] for k in summary if k[1] != "full"}, key=lambda s: (s[:4] != "nacl", s))
    lines = []
    for mode in ("agnostic", "aware"):
        full = summary.get((mode, "full", 0.0))
        if full is None:
            continue
        title = f"**question-{mode}**, {metric} (full cache: {100 * full[0]:.1f}, n={full[1]})"
        lines += [title, "",
                  "| press | " + " | ".join(f"r={r:g}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for label in labels:
            cells = [summary.get((mode, label, r)) for r in ratios]
            lines.append(f"| {label} | " + " | ".join(
                "–" if c is None else f"{100 * c[0]:.1f}" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tasks", default="niah_single,niah_multikey")
    ap.add_argument("--length", type=int, default=1900, help="context tokens per sample")
    ap.add_argument("--n", type=int, default=10, help="samples per task")
    ap.add_argument("--ratios", default="0.5,0.75,0.9")
    ap.add_argument("--random-fractions", default="0,0.35,0.6")
    ap.add_argument("--modes", default="agnostic,aware")
    ap.add_argument("--seed", type=int, default=0, help="sample generator seed")
    ap.add_argument("--out", default="docs/results/nacl_smollm2.json")
    ap.add_argument("--table-tasks", default=None, help="with --table: only these tasks")
    ap.add_argument("--metric", default="score", help="with --table: score | needle_kept")
    ap.add_argument("--table", nargs="+", default=None,
                    help="print the table of saved JSON files (rows merged) and exit")
    args = ap.parse_args(argv)
    if args.table:
        rows = [r for f in args.table for r in json.loads(pathlib.Path(f).read_text())["rows"]]
        print(markdown_table(rows, args.table_tasks and args.table_tasks.split(","),
                             args.metric))
        return

    out = pathlib.Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    seen = {(r["mode"], r["task"], r["index"]) for r in rows}
    model, tok = models.load(args.model, progress=False)
    pipe = kvjax.Pipeline(model, tok)
    samples = [s for t in args.tasks.split(",")
               for s in make_samples(t, tok, args.length, args.n, seed=args.seed)]
    cells = press_configs([float(r) for r in args.ratios.split(",")],
                          [float(f) for f in args.random_fractions.split(",")])
    meta = dict(model=args.model, tasks=args.tasks, length=args.length, n_per_task=args.n,
                seed=args.seed, device=f"{jax.devices()[0].device_kind} ({platform.machine()})",
                dtype=str(model.embed_tokens.embedding[...].dtype),
                presses={f"{label}@{r:g}": repr(p) for label, r, p in cells})
    for mode in args.modes.split(","):
        for s in samples:
            if (mode, s.task, s.index) in seen:
                continue
            t0 = time.perf_counter()
            new = answer_all(pipe, s, cells, mode == "aware")
            for r in new:
                r["mode"] = mode
            rows += new
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
            print(f"{mode:8s} {s.task}[{s.index}] n={new[0]['n_context']} "
                  f"scores={''.join(str(round(r['score'])) for r in new)} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
