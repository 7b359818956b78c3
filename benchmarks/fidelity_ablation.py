"""Issue #19: why ZigZagKV and NACL lose to plain SnapKV at equal KV bytes (SmolLM2).

Question-aware `niah_single` (kvjax.eval's RULER-style needle, natural-text haystack; the question
ends the compressed prompt): one prefill per sample observing what every variant needs, then
per variant: compress (`kvjax.prefill.compress_cache`), record which original positions
every layer and kv head keeps, append the answer prefix, decode greedily, score. Every variant
is a library press with options (no subclass):

  ZigZagKV   zz (window 32, max-pool 7, floor 0.2: the earlier defaults; 0.8 is now), zz_snapsel (SnapKV's window 64 /
             avg-pool 5), zz_uniform (budget_floor_ratio=1: the uniform allocator; with SnapKV's
             selection it must keep exactly SnapKV's indices, checked on every sample),
             zz_uniform_w32 (uniform, window 32 / max-pool 7), budget floors 0 / 0.5 / 0.8.
  NACL       nacl (gqa="mean", the earlier default; "first" is now), nacl_sum / nacl_first (gqa), nacl_rf0 (random share
             0), nacl_qproxy (proxy_tokens = the question's token count), nacl_noncausal
             (the official call), nacl_pool5 (kernel_size=5: SnapKV's smoothing, not NACL),
             combinations.
  baselines  full, snapkv, pyramidkv (kvpress defaults).

Every compressed variant keeps ceil((1 - r) * T) entries per layer and kv head on average
(ZigZagKV moves the same total between layers); rows record the valid context KV bytes and the
kept entries per layer. Rows go to one JSON per length, saved after every answer; a rerun skips
finished (variant, ratio, sample) cells. Tables and plot: benchmarks/fidelity_report.py.

    nice -n 19 taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \\
        intra_op_parallelism_threads=1" PYTHONPATH=. python benchmarks/fidelity_ablation.py \\
        --lengths 1000 --samples 20 --variants final
"""

import argparse
import dataclasses
import gc
import os
import pathlib
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from fidelity_report import load_rows, markdown_table, write_rows

import kvjax
from kvjax import loops
from kvjax.compress import obs_spec_for
from kvjax.prefill import compress_cache, prefill_prompt
from kvjax.eval.scoring import score
from kvjax.eval.tasks import make_sample
from kvjax.memory import memory_report
from kvjax.observation import ObsSpec
from kvjax.presses.base import LayerContext
from kvjax.presses.nacl import NACLPress
from kvjax.presses.window import window_attention
from kvjax.presses.zigzag import ZigZagKVPress
from kvjax.sampling import Greedy

TASK = "niah_single"  # default --task
OUT_DIR = pathlib.Path("docs/results/fidelity")
SNAPSEL = dict(window_size=64, kernel_size=5, pooling="avg")  # SnapKVPress's defaults


@dataclasses.dataclass(frozen=True)
class SampleInfo:
    n_context: int  # compressed prompt tokens (context + question)
    n_question: int  # question tokens at the end of the compressed prompt


def _zz(**kw):
    # the rows were measured when floor 0.2 was the default: every variant states it
    kw = {"budget_floor_ratio": 0.2, **kw}
    return lambda r, info: ZigZagKVPress(compression_ratio=r, **kw)


def _nacl(**kw):
    kw = {"gqa": "mean", **kw}  # the rows were measured when the group mean was the default

    def make(r, info):
        extra = {k: (info.n_question if v == "question" else v) for k, v in kw.items()}
        return NACLPress(compression_ratio=r, **extra)
    return make


VARIANTS = {
    "full": lambda r, info: None,
    "snapkv": lambda r, info: kvjax.SnapKVPress(compression_ratio=r),
    "pyramidkv": lambda r, info: kvjax.PyramidKVPress(compression_ratio=r),
    "zz": _zz(),
    "zz_snapsel": _zz(**SNAPSEL),
    "zz_uniform": _zz(budget_floor_ratio=1.0, **SNAPSEL),
    "zz_uniform_w32": _zz(budget_floor_ratio=1.0),
    "zz_floor0": _zz(budget_floor_ratio=0.0),
    "zz_floor0.5": _zz(budget_floor_ratio=0.5),
    "zz_floor0.8": _zz(budget_floor_ratio=0.8),
    "nacl": _nacl(),
    "nacl_sum": _nacl(gqa="sum"),
    "nacl_first": _nacl(gqa="first"),
    "nacl_rf0": _nacl(random_fraction=0.0),
    "nacl_qproxy": _nacl(proxy_tokens="question"),
    "nacl_noncausal": _nacl(causal=False),
    "nacl_pool5": _nacl(kernel_size=5),
    "nacl_first_pool5": _nacl(gqa="first", kernel_size=5),
    "nacl_qproxy_rf0_pool5": _nacl(proxy_tokens="question", random_fraction=0.0,
                                   kernel_size=5),
}
# Variants whose kept indices must equal another variant's (checked on every sample).
SAME_AS = {"zz_uniform": "snapkv"}
GROUPS = {
    "final": ["full", "snapkv", "pyramidkv", "zz", "zz_uniform", "zz_uniform_w32", "zz_floor0",
              "zz_floor0.5", "zz_floor0.8", "nacl", "nacl_sum", "nacl_first", "nacl_rf0",
              "nacl_qproxy", "nacl_pool5", "nacl_first_pool5", "nacl_qproxy_rf0_pool5"],
    "core": ["full", "snapkv", "pyramidkv", "zz", "zz_uniform_w32", "zz_floor0.8", "nacl",
             "nacl_first", "nacl_pool5", "nacl_qproxy_rf0_pool5"],
}


def variant_names(spec: str) -> list[str]:
    names = []
    for part in spec.split(","):
        names += GROUPS.get(part, [part])
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- one sample

def question_span(pipe, sample) -> tuple[list[int], list[int], int]:
    """(compressed ids, appended ids, first question token): the question ends the prompt."""
    ctx, after = pipe.encode(sample.context, sample.question, answer_prefix=sample.answer_prefix,
                             question_aware=True)
    ctx0, _ = pipe.encode(sample.context, "", answer_prefix=sample.answer_prefix,
                          question_aware=True)
    start = next((i for i, (a, b) in enumerate(zip(ctx, ctx0)) if a != b), len(ctx0))
    return ctx, after, start


def needle_span(tokenizer, ids, answer) -> tuple[int, int]:
    """[start, stop) of the answer's tokens in ids (the needle's value)."""
    for text in (answer, " " + answer):
        pat = tokenizer.encode(text, add_bos=False)
        for drop in (0, 1):  # a leading space may be its own token or merged
            p = pat[drop:]
            hits = [i for i in range(len(ids) - len(p) + 1) if ids[i:i + len(p)] == p]
            if len(p) >= len(answer) // 2 and len(hits) == 1:
                return hits[0], hits[0] + len(p)
    raise ValueError(f"answer {answer!r} not found once in the prompt tokens")


def kept_by_layer(cache, n_context: int) -> list[list[np.ndarray]]:
    """Per layer, per kv head of sequence 0: the original context positions kept."""
    out = []
    for layer in range(cache.n_layers):
        heads = kvjax.kept_positions(cache, layer)[0]
        out.append([h[h < n_context] for h in heads])
    return out


def layer_stats(kept, needle, question):
    """Per layer: kept entries (mean over kv heads), share of needle / question tokens kept."""
    share = lambda span, heads: float(np.mean([np.isin(np.arange(*span), h).mean()
                                               for h in heads]))
    return ([float(np.mean([len(h) for h in heads])) for heads in kept],
            [share(needle, heads) for heads in kept], [share(question, heads) for heads in kept])


@jax.jit
def _full_cache_diagnosis(prompt, needle_mask, n_rows):
    """Per layer [L]: the share of the last `n_rows` prompt queries' attention (mean over
    query heads and rows) on the needle's value tokens, and ZigZagKV's LMBA with windows 32
    and 64 (the allocator's own statistic)."""
    group = prompt.groups[0]
    views, obs = group.views(), group.layers.obs
    t = prompt.next_pos
    w = obs.q_window.shape[2]

    def one(args):
        view, o, layer = args
        probs = window_attention(view, o, t, w)[0]  # [K, G, W, C]
        rows = jnp.arange(w) >= w - n_rows
        att = jnp.sum(probs * needle_mask, -1)  # [K, G, W]
        share = jnp.sum(jnp.where(rows, att, 0.0)) / (att.shape[0] * att.shape[1] * n_rows)
        ctx = LayerContext(prompt_len=t, layer_idx=layer, n_layers=group.n_layers)
        lmba = [ZigZagKVPress(compression_ratio=0.5, window_size=ws).allocator().layer_stat(
            view, o, None, ctx)[0] for ws in (32, 64)]
        return share, lmba[0], lmba[1]

    return jax.lax.map(one, (views, obs, jnp.arange(group.n_layers)))


@dataclasses.dataclass
class Prefilled:
    """One sample prefilled once (observing what every variant needs), shared by all cells."""

    sample: object
    info: SampleInfo
    q_ids: list
    needle: tuple
    question: tuple
    logits: object
    prompt: object
    out_len: int
    prefill_s: float


def prefill_sample(pipe, sample, variants, ratios) -> Prefilled:
    """Prefill `sample` with an observation spec covering every variant (more window rows
    change nothing: each press reads its own last rows)."""
    ctx_ids, q_ids, q_start = question_span(pipe, sample)
    n_ctx = len(ctx_ids)
    info = SampleInfo(n_context=n_ctx, n_question=n_ctx - q_start)
    spec = ObsSpec(window=max(info.n_question, 64))
    for name in set(variants) | {SAME_AS[v] for v in variants if v in SAME_AS}:
        for r in ratios:
            spec = spec.merge(obs_spec_for(VARIANTS[name](r, info)))
    tokens, lengths = loops.pad_prompts([ctx_ids])
    out_len = loops.bucket_length(sample.max_new_tokens + len(q_ids))
    t0 = time.perf_counter()
    logits, prompt = prefill_prompt(pipe.fn, pipe.params, jnp.asarray(tokens),
                                     jnp.asarray(lengths), obs_spec=spec,
                                     attn_impl=pipe.attn_impl)
    jax.block_until_ready(logits)
    return Prefilled(sample=sample, info=info, q_ids=q_ids,
                     needle=needle_span(pipe.tokenizer, ctx_ids, sample.answers[0]),
                     question=(q_start, n_ctx), logits=logits, prompt=prompt,
                     out_len=out_len, prefill_s=time.perf_counter() - t0)


def _compress(press, pre):
    cache = compress_cache(press, pre.prompt, tail_capacity=pre.out_len)
    jax.block_until_ready(cache)
    return cache


def answer_cell(pipe, pre: Prefilled, name: str, ratio: float) -> dict:
    """Compress the prefilled sample with variant `name` at `ratio`, record what every layer
    keeps, append the question's tail, decode greedily, score."""
    sample, info = pre.sample, pre.info
    press = VARIANTS[name](ratio, info)
    t1 = time.perf_counter()
    cache = _compress(press, pre)
    row = dict(task=sample.task, index=sample.index, depth=sample.depth,
               answers=list(sample.answers), n_context=info.n_context,
               n_question=info.n_question, needle=list(pre.needle), question=list(pre.question),
               prefill_s=pre.prefill_s, variant=name, ratio=ratio, press=repr(press),
               compress_s=time.perf_counter() - t1)
    row["context_kv_bytes"] = int(memory_report(cache).kv_bytes_needed)
    kept = kept_by_layer(cache, info.n_context)
    row["kept"], row["needle_kept"], row["question_kept"] = layer_stats(kept, pre.needle,
                                                                        pre.question)
    if name in SAME_AS:
        ref = kept_by_layer(_compress(VARIANTS[SAME_AS[name]](ratio, info), pre),
                            info.n_context)
        row["same_as_ref"] = all(np.array_equal(a, b) for la, lb in zip(kept, ref)
                                 for a, b in zip(la, lb))
        row["ref"] = SAME_AS[name]
    if name == "full":
        c = pre.prompt.groups[0].layers.k.shape[3]
        mask = np.zeros(c, np.float32)
        mask[pre.needle[0]:pre.needle[1]] = 1.0
        share, l32, l64 = _full_cache_diagnosis(pre.prompt, jnp.asarray(mask),
                                                jnp.int32(info.n_question))
        row.update(needle_attention=np.asarray(share).tolist(),
                   lmba_w32=np.asarray(l32).tolist(), lmba_w64=np.asarray(l64).tolist())
    t2 = time.perf_counter()
    state = loops.init_state(pre.logits, cache, 1, pre.out_len, None)
    state = pipe.append_tokens(state, pre.q_ids)
    state = loops.decode(pipe.fn, pipe.params, state, jnp.int32(sample.max_new_tokens),
                         loops.eos_array(pipe.tokenizer.eos_ids), sampler=Greedy(),
                         attn_impl=pipe.attn_impl)
    text = pipe.tokenizer.decode(np.asarray(state.tokens)[0, :int(state.lengths[0])].tolist())
    row.update(answer=text, score=score(sample, text), decode_s=time.perf_counter() - t2)
    return row


# --------------------------------------------------------------------------- main

def rss_gib() -> float:
    """Resident memory of this process (Linux), GiB."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def git_commit() -> str:
    """The kvjax commit measured (HEAD of the checkout kvjax is imported from; '+dirty' when
    its kvjax/ differs from HEAD)."""
    root = pathlib.Path(kvjax.__file__).parent.parent
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=root)
    head = run("rev-parse", "--short", "HEAD").stdout.strip() or "?"
    return head + ("+dirty" if run("diff", "--quiet", "HEAD", "--", "kvjax").returncode else "")


def run_length(pipe, length, ratios, variants, indices, args, meta, commit):
    """Every (variant, ratio) cell of one context length; resumable."""
    path = pathlib.Path(args.out_dir) / f"{args.task}_{length}.json"
    old_meta, rows = load_rows(path)
    if old_meta is not None:
        for key in ("task", "length", "seed", "question_aware", "model", "dtype"):
            if old_meta[key] != meta[key]:
                raise ValueError(f"{path}: {key}={old_meta[key]!r}, now {meta[key]!r}")
        meta = old_meta
    meta.setdefault("kvjax_commits", [])
    if commit not in meta["kvjax_commits"]:
        meta["kvjax_commits"].append(commit)
    done = {(r["variant"], r["ratio"], r["index"]) for r in rows}
    cells = [(v, 0.0 if v == "full" else r) for v in variants
             for r in ([0.0] if v == "full" else ratios)]
    todo = {i for c in cells for i in indices if (c[0], c[1], i) not in done}
    # One prefill per sample, kept (~0.1 GB at 2k); cells outermost so each compiled press
    # runs on every sample before the next one is compiled.
    prefilled = {}
    for i in sorted(todo):
        prefilled[i] = prefill_sample(pipe, make_sample(args.task, pipe.tokenizer, length, i,
                                                        args.seed), variants, ratios)
        print(f"{length} #{i}: prefilled {prefilled[i].info.n_context} tokens "
              f"({prefilled[i].prefill_s:.0f}s)", flush=True)
    for cell in cells:
        t0, scores = time.perf_counter(), []
        for i in indices:
            if (cell[0], cell[1], i) in done:
                continue
            row = answer_cell(pipe, prefilled[i], *cell)
            row["kvjax_commit"] = commit
            rows.append(row)
            done.add((cell[0], cell[1], i))
            scores.append(round(row["score"]))
            write_rows(path, meta, rows)
        if scores:
            print(f"{length} {cell[0]}@{cell[1]:g}: {''.join(map(str, scores))} "
                  f"({time.perf_counter() - t0:.0f}s, RSS {rss_gib():.1f} GiB)", flush=True)
        if rss_gib() > args.max_rss_gib:
            jax.clear_caches()
            gc.collect()
    print(markdown_table(rows))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default=TASK,
                    help="a needle task of kvjax.eval (e.g. niah_single_noise: the other haystack)")
    ap.add_argument("--lengths", default="1000")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--first-sample", type=int, default=0)
    ap.add_argument("--variants", default="final")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(OUT_DIR))
    ap.add_argument("--max-rss-gib", type=float, default=8.0,
                    help="clear JAX's in-memory compilation caches above this resident size")
    args = ap.parse_args(argv)
    variants = variant_names(args.variants)
    import models
    model, tok = models.load("smollm2", progress=False)
    pipe = kvjax.Pipeline(model, tok)
    ratios = [float(r) for r in args.ratios.split(",")]
    commit = git_commit()
    for length in [int(n) for n in args.lengths.split(",")]:
        meta = dict(task=args.task, length=length, seed=args.seed, question_aware=True,
                    model="smollm2 (SmolLM2-135M-Instruct GGUF, f32)",
                    dtype=str(model.embed_tokens.embedding[...].dtype),
                    device=f"{jax.devices()[0].device_kind} ({platform.machine()})",
                    xla_flags=os.environ.get("XLA_FLAGS", ""),
                    cpu_affinity=sorted(os.sched_getaffinity(0)))
        run_length(pipe, length, ratios, variants, range(args.first_sample, args.samples),
                   args, meta, commit)


if __name__ == "__main__":
    main()
