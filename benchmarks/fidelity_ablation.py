"""Issue #19: why ZigZagKV and NACL lose to plain SnapKV at equal KV bytes (SmolLM2).

Question-aware `niah_single` (kvjax.eval's RULER-style needle, natural-text haystack; the question
is inside the compressed prompt), one prefill per sample observing what every variant needs,
then per variant: compress, record which original positions every layer keeps, append the
answer prefix, decode greedily and score. Variants that isolate one choice each are defined
here (subclasses of the library presses; the library is not modified):

  ZigZagKV   zz (library defaults: window 32, max-pool 7, floor 0.2), zz_snapsel (SnapKV's window
             64 / avg-pool 5), zz_uniform (allocator off, SnapKV's selection: must keep exactly
             SnapKV's indices, checked per sample), zz_uniform_w32 (allocator off, window 32 /
             max-pool 7 = "SnapKV with ZigZagKV's window"), budget floors 0 / 0.5 (/ 0.8).
  NACL       nacl (library defaults), nacl_rf0 (random share 0), nacl_qproxy (proxy rows = exactly
             the question's tokens), nacl_noncausal (the official call), nacl_mean (GQA group
             mean: the random softmax at one head's temperature), nacl_first (the official code's
             GQA indexing), nacl_protq (recent protection covers the question), combinations.
  baselines  full, snapkv, pyramidkv (registry defaults).

Every compressed variant keeps ceil((1 - r) * T) slots per layer and kv head on average (ZigZagKV
redistributes the same total over layers); each row records the valid context KV bytes and the
kept slots per layer to show it. Rows are appended to one JSON per context length and saved
after every cell; a rerun skips finished (variant, ratio, sample) cells (resumable).

    taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \\
        python benchmarks/fidelity_ablation.py --lengths 1000 --samples 10 --variants screen
    python benchmarks/fidelity_ablation.py --table docs/results/fidelity/niah_single_1000.json
    python benchmarks/fidelity_ablation.py --plot docs/results/fidelity/niah_single_1000.json \\
        --plot-ratio 0.5 --out-png docs/results/fidelity/per_layer_1000_r0.5.png
"""

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax import loops
from kvjax.compress import compress_cache, obs_spec_for
from kvjax.eval.engine import prefill_observe
from kvjax.eval.scoring import score
from kvjax.eval.tasks import make_sample
from kvjax.memory import memory_report
from kvjax.observation import ObsSpec
from kvjax.presses import select
from kvjax.presses.nacl import NACLPress, proxy_count
from kvjax.presses.proxy import proxy_scores_reference
from kvjax.presses.window import pool1d, window_attention
from kvjax.presses.zigzag import ZigZagKVPress
from kvjax.sampling import Greedy

TASK = "niah_single"
OUT_DIR = pathlib.Path("docs/results/fidelity")


# --------------------------------------------------------------------------- the one cache read

def kept_positions(cache, layer: int, n_context: int) -> list[np.ndarray]:
    """Original context positions (< n_context) that layer `layer` keeps, per kv head (row 0).

    The only place this script reads cache internals: `cache.dense_layer(i).prefix.pos/.length`
    (the pool segment gathered for ZigZagKV) in the cache layout this was run with; the newer
    `kvjax.kept_positions(cache, layer)` (prefix and tail, per sequence and kv head) is used
    when it exists.
    """
    new_api = getattr(kvjax, "kept_positions", None)
    if new_api is not None:
        return [np.asarray(p)[np.asarray(p) < n_context] for p in new_api(cache, layer)[0]]
    prefix = cache.dense_layer(layer).prefix
    pos, length = np.asarray(prefix.pos[0]), np.asarray(prefix.length[0])
    return [np.sort(pos[h, :n][pos[h, :n] < n_context]) for h, n in enumerate(length)]


# --------------------------------------------------------------------------- ZigZagKV variants

@dataclasses.dataclass(frozen=True, kw_only=True)
class UniformZigZagKVPress(ZigZagKVPress):
    """ZigZagKV with its allocator switched off: every layer gets B_avg = ceil((1 - r) * T).

    With SnapKV's window, kernel and pooling this must keep exactly SnapKV's indices (the same
    scores, the same count, the same stable top-k): checked per sample (`same_as_ref`).
    """

    def budgets(self, cache, observations):
        t = cache.next_pos
        b_avg = select.ceil_keep(t, self.compression_ratio)
        return jnp.broadcast_to(b_avg[:, None], (t.shape[0], len(cache.layers))).astype(jnp.int32)


# --------------------------------------------------------------------------- NACL variants

@dataclasses.dataclass(frozen=True, kw_only=True)
class NACLVariantPress(NACLPress):
    """NACLPress (kvpress-form budgets) with one choice changed at a time.

    Attributes:
      proxy_rows: > 0: the proxies are exactly the last `proxy_rows` prompt tokens (set to the
        question's token count: the question ends the question-aware prompt); 0: the library's
        round(proxy_tokens_ratio * T).
      protect_recent: the recent protected slots are at least this many (the question), taken
        out of the proxy/random budget so the kept total is unchanged.
      group: how the G query heads of a kv group combine: "sum" (library), "mean" (one head's
        scale, so the random softmax has the official per-head temperature), "first" (the
        official code: kv head j uses query head j's scores).
      pool_kernel: > 1: avg-pool the proxy scores along tokens (SnapKV's smoothing; not NACL).
    """

    proxy_rows: int = 0
    protect_recent: int = 0
    group: str = "sum"
    pool_kernel: int = 1

    @property
    def obs_spec(self):
        return ObsSpec(window=self.proxy_rows, proxy_ratio=self.proxy_tokens_ratio)

    def split(self, n, xp=jnp):
        if not self.protect_recent:
            return super().split(n, xp)
        n = jnp.asarray(n).astype(jnp.int32)
        keep = select.ceil_keep(n, self.compression_ratio)
        sinks = jnp.minimum(keep, self.n_sink)
        recent = jnp.round(jnp.float32(self.recent_ratio) * n.astype(jnp.float32)).astype(jnp.int32)
        recent = jnp.minimum(jnp.maximum(recent, self.protect_recent), keep - sinks)
        rest = keep - sinks - recent
        n_random = jnp.round(jnp.float32(self.random_fraction) * rest).astype(jnp.int32)
        n_proxy = rest - n_random
        whole = (n <= self.min_eviction_length) | (keep >= n)
        zero = jnp.zeros_like(n)
        return (jnp.where(whole, n, sinks), jnp.where(whole, zero, recent),
                jnp.where(whole, zero, n_proxy), jnp.where(whole, zero, n_random))

    def proxy_scores(self, prefix, obs, ctx):
        w = obs.q_window.shape[1]
        t = ctx.prompt_len
        q_pos = t[:, None] - w + jnp.arange(w)[None, :]
        if self.proxy_rows:
            if w < self.proxy_rows:
                raise ValueError(f"observation window {w} < {self.proxy_rows=}")
            n_rows = jnp.full_like(t, self.proxy_rows)
        else:
            n_rows = proxy_count(t, self.proxy_tokens_ratio)
        rows = obs.window_valid & (q_pos >= (t - n_rows)[:, None])
        s = proxy_scores_reference(obs.q_window, q_pos, rows, prefix.k, prefix.pos,
                                   prefix.length, causal=self.causal, chunk=self.chunk_size)
        b, n, c = s.shape
        k = prefix.k.shape[1]
        if self.group == "first":
            s = s[:, :k]
        else:
            s = s.reshape(b, k, n // k, c)
            s = s.sum(axis=2) if self.group == "sum" else s.mean(axis=2)
        if self.pool_kernel > 1:
            s = pool1d(s, self.pool_kernel, "avg")
        return s


# --------------------------------------------------------------------------- the variants

@dataclasses.dataclass(frozen=True)
class SampleInfo:
    n_context: int  # compressed prompt tokens (context + question)
    n_question: int  # question tokens at the end of the compressed prompt


SNAPSEL = dict(window_size=64, kernel_size=5, pooling="avg")  # SnapKVPress's defaults


def _zz(**kw):
    return lambda r, info: ZigZagKVPress(compression_ratio=r, **kw)


def _nacl(**kw):
    def make(r, info):
        extra = dict(kw)
        for key in ("proxy_rows", "protect_recent"):
            if extra.get(key) == "question":
                extra[key] = info.n_question
        return NACLVariantPress(compression_ratio=r, **extra)
    return make


VARIANTS = {
    "full": lambda r, info: None,
    "snapkv": lambda r, info: kvjax.SnapKVPress(compression_ratio=r),
    "pyramidkv": lambda r, info: kvjax.PyramidKVPress(compression_ratio=r),
    # ZigZagKV
    "zz": _zz(),
    "zz_snapsel": _zz(**SNAPSEL),
    "zz_uniform": lambda r, info: UniformZigZagKVPress(compression_ratio=r, **SNAPSEL),
    "zz_uniform_w32": lambda r, info: UniformZigZagKVPress(compression_ratio=r),
    "zz_floor0": _zz(budget_floor_ratio=0.0),
    "zz_floor0.5": _zz(budget_floor_ratio=0.5),
    "zz_snapsel_floor0": _zz(budget_floor_ratio=0.0, **SNAPSEL),
    "zz_snapsel_floor0.5": _zz(budget_floor_ratio=0.5, **SNAPSEL),
    "zz_snapsel_floor0.8": _zz(budget_floor_ratio=0.8, **SNAPSEL),
    # NACL
    "nacl": lambda r, info: NACLPress(compression_ratio=r),
    "nacl_rf0": _nacl(random_fraction=0.0),
    "nacl_qproxy": _nacl(proxy_rows="question"),
    "nacl_qproxy_rf0": _nacl(proxy_rows="question", random_fraction=0.0),
    "nacl_noncausal": _nacl(causal=False),
    "nacl_mean": _nacl(group="mean"),
    "nacl_first": _nacl(group="first"),
    "nacl_protq": _nacl(protect_recent="question"),
    "nacl_qproxy_protq": _nacl(proxy_rows="question", protect_recent="question"),
    "nacl_qproxy_protq_rf0": _nacl(proxy_rows="question", protect_recent="question",
                                   random_fraction=0.0),
    "nacl_qproxy_pool5": _nacl(proxy_rows="question", pool_kernel=5),
    "nacl_qproxy_rf0_pool5": _nacl(proxy_rows="question", random_fraction=0.0, pool_kernel=5),
    "nacl_qproxy_protq_rf0_pool5": _nacl(proxy_rows="question", protect_recent="question",
                                         random_fraction=0.0, pool_kernel=5),
    "nacl_qproxy_protq_pool5": _nacl(proxy_rows="question", protect_recent="question",
                                     pool_kernel=5),
}
# Variants whose kept indices must equal another variant's (checked on every sample).
SAME_AS = {"zz_uniform": "snapkv"}

GROUPS = {
    "screen": ["full", "snapkv", "pyramidkv", "zz", "zz_snapsel", "zz_uniform", "zz_uniform_w32",
               "zz_floor0", "zz_floor0.5", "zz_snapsel_floor0", "zz_snapsel_floor0.5",
               "zz_snapsel_floor0.8", "nacl", "nacl_rf0", "nacl_qproxy", "nacl_qproxy_rf0",
               "nacl_noncausal", "nacl_mean", "nacl_first", "nacl_protq", "nacl_qproxy_protq",
               "nacl_qproxy_protq_rf0", "nacl_qproxy_pool5", "nacl_qproxy_rf0_pool5",
               "nacl_qproxy_protq_rf0_pool5", "nacl_qproxy_protq_pool5"],
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

@functools.partial(jax.jit, static_argnames=("press",))
def _compress(press, cache, obs):
    return compress_cache(press, cache, obs)


@functools.partial(jax.jit, static_argnames=("window",))
def _needle_attention(layers_k, layers_pos, layers_len, q_windows, window_valid, prompt_len,
                      needle_mask, *, window):
    """[L] share of the last-`window` rows' attention (mean over query heads and rows) that
    falls on the needle's value tokens, full cache."""
    from kvjax.cache import Prefix
    from kvjax.observation import Observation
    out = []
    for k, pos, length, q in zip(layers_k, layers_pos, layers_len, q_windows):
        p = Prefix(k=k, v=k, pos=pos, length=length)
        probs = window_attention(p, Observation(q_window=q, window_valid=window_valid),
                                 prompt_len, window)  # [B, K, G, W, C]
        out.append(jnp.sum(probs[0] * needle_mask[None, None, None, :probs.shape[-1]], -1).mean())
    return jnp.stack(out)


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


def layer_stats(cache, n_layers, n_context, needle, question):
    """Per layer: kept slots (mean over kv heads), share of needle / question tokens kept."""
    kept, nk, qk = [], [], []
    for i in range(n_layers):
        heads = kept_positions(cache, i, n_context)
        kept.append(float(np.mean([len(h) for h in heads])))
        nk.append(float(np.mean([np.isin(np.arange(*needle), h).mean() for h in heads])))
        qk.append(float(np.mean([np.isin(np.arange(*question), h).mean() for h in heads])))
    return kept, nk, qk


def same_positions(cache_a, cache_b, n_layers, n_context) -> bool:
    return all(np.array_equal(a, b)
               for i in range(n_layers)
               for a, b in zip(kept_positions(cache_a, i, n_context),
                               kept_positions(cache_b, i, n_context)))


def answer_sample(pipe, sample, cells, *, save):
    """Answer `sample` under every (variant, ratio) of `cells`; `save(row)` after each."""
    fn, params, attn, tok = pipe.fn, pipe.params, pipe.attn_impl, pipe.tokenizer
    ctx_ids, q_ids, q_start = question_span(pipe, sample)
    n_ctx = len(ctx_ids)
    info = SampleInfo(n_context=n_ctx, n_question=n_ctx - q_start)
    needle = needle_span(tok, ctx_ids, sample.answers[0])
    question = (q_start, n_ctx)
    presses = [(name, r, VARIANTS[name](r, info)) for name, r in cells]
    refs = {(SAME_AS[name], r): VARIANTS[SAME_AS[name]](r, info)
            for name, r, _ in presses if name in SAME_AS}
    spec = ObsSpec(window=info.n_question)
    for p in [p for _, _, p in presses] + list(refs.values()):
        spec = spec.merge(obs_spec_for(p))
    tokens, lengths = loops.pad_prompts([ctx_ids])
    out_len = loops.bucket_length(sample.max_new_tokens + len(q_ids))
    t0 = time.perf_counter()
    logits, cache, obs = prefill_observe(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                         tail_capacity=out_len, obs_spec=spec, attn_impl=attn)
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - t0
    n_layers = len(cache.layers)
    base = dict(task=sample.task, index=sample.index, depth=sample.depth,
                answers=list(sample.answers), n_context=n_ctx, n_question=info.n_question,
                needle=list(needle), question=list(question), prefill_s=prefill_s)
    for name, ratio, press in presses:
        t1 = time.perf_counter()
        comp = jax.tree.map(jnp.copy, _compress(press, cache, obs))  # extend donates it
        jax.block_until_ready(comp)
        compress_s = time.perf_counter() - t1
        row = dict(base, variant=name, ratio=ratio, press=repr(press), compress_s=compress_s)
        row["context_kv_bytes"] = int(memory_report(comp).kv_bytes_needed)
        row["kept"], row["needle_kept"], row["question_kept"] = layer_stats(
            comp, n_layers, n_ctx, needle, question)
        if name in SAME_AS:
            ref = _compress(refs[(SAME_AS[name], ratio)], cache, obs)
            row["same_as_ref"] = same_positions(comp, ref, n_layers, n_ctx)
            row["ref"] = SAME_AS[name]
        if name == "full":
            mask = np.zeros(cache.layers[0].prefix.capacity, np.float32)
            mask[needle[0]:needle[1]] = 1.0
            w = info.n_question
            row["needle_attention"] = np.asarray(_needle_attention(
                [l.prefix.k for l in cache.layers], [l.prefix.pos for l in cache.layers],
                [l.prefix.length for l in cache.layers], [o.q_window[:, -w:] for o in obs],
                obs[0].window_valid[:, -w:], cache.next_pos, jnp.asarray(mask),
                window=w)).tolist()
            zz = ZigZagKVPress(compression_ratio=0.5)
            row["lmba_w32"] = np.asarray(zz.lmba(cache, obs))[0].tolist()
            row["lmba_w64"] = np.asarray(dataclasses.replace(zz, window_size=64).lmba(
                cache, obs))[0].tolist()
        t2 = time.perf_counter()
        state = loops.init_state(logits, comp, 1, out_len, None)
        padded = np.zeros((1, loops.bucket_length(len(q_ids), minimum=16)), np.int32)
        padded[0, :len(q_ids)] = q_ids
        last, comp = loops.extend(fn, params, jnp.asarray(padded),
                                  jnp.array([len(q_ids)], jnp.int32), state.cache,
                                  attn_impl=attn)
        state = dataclasses.replace(state, logits=last, cache=comp)
        state = loops.decode(fn, params, state, jnp.int32(sample.max_new_tokens),
                             loops.eos_array(tok.eos_ids), sampler=Greedy(), attn_impl=attn)
        text = tok.decode(np.asarray(state.tokens)[0, :int(state.lengths[0])].tolist())
        row.update(answer=text, score=score(sample, text), decode_s=time.perf_counter() - t2)
        save(row)


# --------------------------------------------------------------------------- results

def load_rows(path: pathlib.Path):
    if not path.exists():
        return None, []
    data = json.loads(path.read_text())
    return data["meta"], data["rows"]


def write_rows(path: pathlib.Path, meta, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=None, separators=(",", ":")))
    os.replace(tmp, path)


def cell_summary(rows, samples=None):
    """{(variant, ratio): dict(acc, n, kv_bytes, kept, needle_kept, same)} over index < samples."""
    groups = {}
    for r in rows:
        if samples is None or r["index"] < samples:
            groups.setdefault((r["variant"], r["ratio"]), {})[r["index"]] = r
    out = {}
    for key, by_index in groups.items():
        rs = list(by_index.values())
        out[key] = dict(
            acc=float(np.mean([r["score"] for r in rs])), n=len(rs),
            hits=int(sum(r["score"] for r in rs)),
            kv_bytes=float(np.mean([r["context_kv_bytes"] for r in rs])),
            kept=float(np.mean([np.mean(r["kept"]) for r in rs])),
            needle_kept=float(np.mean([np.mean(r["needle_kept"]) for r in rs])),
            question_kept=float(np.mean([np.mean(r["question_kept"]) for r in rs])),
            same=(all(r["same_as_ref"] for r in rs) if "same_as_ref" in rs[0] else None))
    return out


def markdown_table(rows, variants=None, samples=None, extra=True) -> str:
    """Accuracy % (hits/n) per variant x ratio, with KV MiB and mean kept slots per layer-head."""
    summary = cell_summary(rows, samples)
    ratios = sorted({r for _, r in summary if r > 0})
    names = variants or list(dict.fromkeys(v for v, _ in summary))
    head = "| variant | " + " | ".join(f"r={r:g}" for r in ratios) + " |"
    if extra:
        head += " KV MiB / kept per layer-head / needle kept % (" + ", ".join(
            f"{r:g}" for r in ratios) + ") |"
    lines = [head, "|---|" + "---|" * (len(ratios) + int(extra))]
    for name in names:
        if name == "full":
            c = summary.get(("full", 0.0))
            if c:
                lines.append(f"| full cache | {100 * c['acc']:.0f}% ({c['hits']}/{c['n']}) |"
                             + " |" * (len(ratios) - 1 + int(extra)))
            continue
        cells = [summary.get((name, r)) for r in ratios]
        if not any(cells):
            continue
        line = f"| {name} | " + " | ".join(
            "-" if c is None else f"{100 * c['acc']:.0f}% ({c['hits']}/{c['n']})"
            for c in cells) + " |"
        if extra:
            line += " " + "; ".join(
                "-" if c is None else f"{c['kv_bytes'] / 2**20:.2f} / {c['kept']:.1f} / "
                f"{100 * c['needle_kept']:.0f}" + ("" if c["same"] is None else
                                                   f" (same idx as ref: {c['same']})")
                for c in cells) + " |"
        lines.append(line)
    return "\n".join(lines)


def plot_layers(paths, ratio, out_png, variants):
    """Per layer: ZigZagKV's budgets next to the uniform one, the needle tokens each method
    keeps, and where the full-cache model looks for the needle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(paths), 3, figsize=(18, 4.2 * len(paths)), squeeze=False)
    for ax_row, path in zip(axes, paths):
        meta, rows = load_rows(pathlib.Path(path))
        length = meta["length"]
        by = lambda v: [r for r in rows if r["variant"] == v and (v == "full" or r["ratio"] == ratio)]
        n_layers = len(rows[0]["kept"])
        x = np.arange(n_layers)
        ax = ax_row[0]
        for v in variants:
            rs = by(v)
            if rs and v in ("snapkv", "pyramidkv") or (rs and v.startswith("zz")):
                ax.plot(x, np.mean([r["kept"] for r in rs], 0), marker=".",
                        label=f"{v} (n={len(rs)})")
        ax.set_title(f"{length} tokens, r={ratio:g}: kept slots per layer (mean over samples)")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
        ax = ax_row[1]
        for v in variants:
            rs = by(v)
            if rs and v != "full":
                acc = np.mean([r["score"] for r in rs])
                ax.plot(x, np.mean([r["needle_kept"] for r in rs], 0), marker=".",
                        label=f"{v}: acc {100 * acc:.0f}% (n={len(rs)})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("share of the needle's value tokens kept, per layer")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
        ax = ax_row[2]
        full = by("full")
        if full:
            att = np.mean([r["needle_attention"] for r in full], 0)
            ax.bar(x, att, color="tab:gray", label="question rows' attention on the needle value")
            ax.set_ylabel("attention share (full cache)")
            ax2 = ax.twinx()
            ax2.plot(x, np.mean([r["lmba_w32"] for r in full], 0), "r.-", label="LMBA (window 32)")
            ax2.plot(x, np.mean([r["lmba_w64"] for r in full], 0), "m.--",
                     label="LMBA (window 64)")
            ax2.set_ylabel("LMBA (tokens)")
            ax2.legend(fontsize=7, loc="upper right")
            ax.legend(fontsize=7, loc="upper center")
        ax.set_title(f"full cache: where the model looks for the needle (n={len(full)})")
        ax.set_xlabel("layer")
    fig.tight_layout()
    pathlib.Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")


# --------------------------------------------------------------------------- main

def git_commit() -> str:
    """The kvjax commit measured: a COMMIT file beside the package (a `git archive` snapshot
    run through PYTHONPATH while the working tree changes), else git's HEAD."""
    stamp = pathlib.Path(kvjax.__file__).parent.parent / "COMMIT"
    if stamp.is_file():
        return stamp.read_text().strip() + " (snapshot)"
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=pathlib.Path(kvjax.__file__).parent).stdout.strip() or "?"
    except OSError:
        return "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1000")
    ap.add_argument("--ratios", default="0.25,0.5,0.75")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--first-sample", type=int, default=0)
    ap.add_argument("--variants", default="screen")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(OUT_DIR))
    ap.add_argument("--table", nargs="+", default=None, help="print tables of JSON files, exit")
    ap.add_argument("--table-samples", type=int, default=None)
    ap.add_argument("--plot", nargs="+", default=None, help="per-layer plot of JSON files, exit")
    ap.add_argument("--plot-ratio", type=float, default=0.5)
    ap.add_argument("--out-png", default=None)
    args = ap.parse_args(argv)
    variants = variant_names(args.variants)
    if args.table:
        for path in args.table:
            meta, rows = load_rows(pathlib.Path(path))
            print(f"\n{path}: {meta['length']} tokens, n <= {args.table_samples or 'all'}\n")
            print(markdown_table(rows, variants if args.variants != "screen" else None,
                                 args.table_samples))
        return
    if args.plot:
        plot_layers(args.plot, args.plot_ratio, args.out_png or str(
            pathlib.Path(args.out_dir) / f"per_layer_r{args.plot_ratio:g}.png"), variants)
        return

    import models
    model, tok = models.load("smollm2", progress=False)
    pipe = kvjax.Pipeline(model, tok)
    ratios = [float(r) for r in args.ratios.split(",")]
    for length in [int(n) for n in args.lengths.split(",")]:
        path = pathlib.Path(args.out_dir) / f"{TASK}_{length}.json"
        meta = dict(task=TASK, length=length, seed=args.seed, question_aware=True,
                    model="smollm2 (SmolLM2-135M-Instruct GGUF, f32)",
                    dtype=str(model.embed_tokens.embedding[...].dtype),
                    device=f"{jax.devices()[0].device_kind} ({platform.machine()})",
                    xla_flags=os.environ.get("XLA_FLAGS", ""),
                    cpu_affinity=sorted(os.sched_getaffinity(0)))
        old_meta, rows = load_rows(path)
        if old_meta is not None:
            for key in ("task", "length", "seed", "question_aware", "model", "dtype"):
                if old_meta[key] != meta[key]:
                    raise ValueError(f"{path}: {key}={old_meta[key]!r}, now {meta[key]!r}")
            meta = old_meta
        commit = git_commit()
        meta.setdefault("kvjax_commits", [])
        if commit not in meta["kvjax_commits"]:
            meta["kvjax_commits"].append(commit)
        done = {(r["variant"], r["ratio"], r["index"]) for r in rows}
        for index in range(args.first_sample, args.samples):
            cells = [(v, 0.0 if v == "full" else r) for v in variants
                     for r in ([0.0] if v == "full" else ratios)]
            cells = [c for c in cells if (c[0], c[1], index) not in done]
            if not cells:
                continue
            sample = make_sample(TASK, tok, length, index, args.seed)
            t0 = time.perf_counter()
            new = []

            def save(row):
                row["kvjax_commit"] = commit
                rows.append(row)
                new.append(row)
                done.add((row["variant"], row["ratio"], row["index"]))
                write_rows(path, meta, rows)

            answer_sample(pipe, sample, cells, save=save)
            print(f"{length} #{index} depth {sample.depth:.3f}: "
                  + " ".join(f"{r['variant']}@{r['ratio']:g}={round(r['score'])}" for r in new)
                  + f" ({time.perf_counter() - t0:.0f}s)", flush=True)
        print(markdown_table(rows))


if __name__ == "__main__":
    main()
