"""Pages or packed blocks for the engine's pool: what each wastes, and what each costs decode.

    python benchmarks/pool_layout.py --model smollm2 --prompts 6 --context-tokens 1000 \\
        --presses full,snapkv:0.75,adakv:0.75,zigzagkv:0.75,pyramidkv:0.75 \\
        --out docs/results/pool_layout.json

Every prompt (the needle haystack of `benchmarks/common.py`, lengths spread from a quarter of
`--context-tokens` to all of it) is compressed by every press on
the real model; its kept counts per (layer, kv head) are the sizes a pool must hold. Reported
from this one run:
  waste     slots held beyond the kept entries, per request and as a share of them: a packed
            block (kvjax's pool: the request's segments end to end, rounded up to 8 slots)
            against pages of 8/16/32/64 slots, one page table entry per segment (vLLM/RPA:
            every (layer, kv head) segment rounds up to whole pages);
  decode    the jnp block walk (`kvjax.store_attention`) over the longest layer of a compressed
            store, with blocks of a page's size against the default 128 (a paged walk
            cannot read a block across a page boundary), median of repeats, as a ratio;
  fragments a replayed workload on a pool that holds `--pool-requests` average requests:
            first fit without compaction vs with it (`BlockAllocator.compact`): steps a
            request waited at the head of the queue although the free slots in all would
            have held it, and slots moved by compaction per admitted request.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import device_name, prompt_ids, save_json

PAGES = (8, 16, 32, 64)


def kept_lengths(model, tok, presses, n_prompts: int, n_tokens: int) -> dict:
    """{press label: [n_prompts, L, K] kept counts} from real compressions."""
    from kvjax import loops
    from kvjax.presses import make_press
    fn, params = model.kvjax_split()
    out = {}
    for label in presses:
        name, _, ratio = label.partition(":")
        press = None if name == "full" else make_press(name, float(ratio or 0.5))
        rows = []
        for i in range(n_prompts):  # lengths spread over [n_tokens / 4, n_tokens]
            n = int(n_tokens * (0.25 + 0.75 * i / max(n_prompts - 1, 1)))
            ids = prompt_ids(tok, n, seed=i)
            toks, lens = loops.pad_prompts([ids])
            _, cache = loops.prefill(fn, params, jnp.asarray(toks), jnp.asarray(lens),
                                     tail_capacity=1, press=press)
            rows.append(np.asarray(cache.store.length[0]))  # [L, K]
        out[label] = np.stack(rows)
    return out


def waste(lengths: np.ndarray) -> dict:
    """Held - kept slots per request for a packed block and for each page size."""
    kept = lengths.reshape(len(lengths), -1).sum(1)
    packed = -(-kept // 8) * 8
    res = {"kept_mean": float(kept.mean()),
           "packed_waste_share": float(((packed - kept) / kept).mean())}
    for p in PAGES:
        held = (-(-lengths // p) * p).reshape(len(lengths), -1).sum(1)
        res[f"page{p}_waste_share"] = float(((held - kept) / kept).mean())
    return res


def walk_times(model, tok, n_tokens: int, press_label: str, repeats: int) -> dict:
    """Median seconds of the jnp block walk over the layer with the longest segment at block
    sizes PAGES + (128,)."""
    from kvjax import loops
    from kvjax.presses import make_press
    from kvjax.store_attention import store_attention
    fn, params = model.kvjax_split()
    name, _, ratio = press_label.partition(":")
    press = None if name == "full" else make_press(name, float(ratio or 0.5))
    ids = prompt_ids(tok, n_tokens, seed=0)
    toks, lens = loops.pad_prompts([ids])
    _, cache = loops.prefill(fn, params, jnp.asarray(toks), jnp.asarray(lens), tail_capacity=1,
                             press=press)
    layer = int(np.argmax(np.asarray(cache.store.length[0]).max(1)))  # the longest segments
    cfg = model.config
    q = jax.random.normal(jax.random.key(0), (1, 1, cfg.n_heads, cfg.head_dim), jnp.float32)
    q_pos = cache.next_pos[:, None]
    tail = cache.tail.layer(layer)
    calls = {b: jax.jit(lambda q, c, b=b: store_attention(q, q_pos, c.store, layer, tail,
                                                          block=b))
             for b in PAGES + (128,)}
    for f in calls.values():
        jax.block_until_ready(f(q, cache))
    times = {b: [] for b in calls}
    for _ in range(repeats):  # round robin: a busy machine slows every block size alike
        for b, f in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(q, cache))
            times[b].append(time.perf_counter() - t0)
    med = {b: statistics.median(v) for b, v in times.items()}
    return {f"block{b}_over_block128": med[b] / med[128] for b in PAGES} | {
        "block128_seconds": med[128]}


def replay(sizes: np.ndarray, pool: int, *, compact: bool, steps: int = 4000, seed: int = 0
           ) -> dict:
    """A Poisson-ish workload on a first-fit pool: each step one request may arrive (sizes
    drawn from `sizes`), each running request ends with probability 1/40."""
    from kvjax.engine.blocks import BlockAllocator
    rng = np.random.default_rng(seed)
    alloc = BlockAllocator(pool, align=8)
    running, queue = [], []
    stalled = moved = admitted = 0
    for _ in range(steps):
        if rng.random() < 0.3:
            queue.append(int(rng.choice(sizes)))
        ending = [b for b in running if rng.random() < 1 / 40]
        for b in ending:
            alloc.release(b)
        running = [b for b in running if b not in ending]
        while queue:
            block = alloc.allocate(queue[0])
            if block is None and compact and alloc.fits_compacted(queue[0]):
                moved += sum(b.size for b, _ in alloc.compact())
                block = alloc.allocate(queue[0])
            if block is None:
                stalled += alloc.fits_compacted(queue[0])
                break
            running.append(block)
            queue.pop(0)
            admitted += 1
    return {"admitted": admitted, "stalled_steps_with_room": stalled,
            "moved_slots_per_admission": moved / max(admitted, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--context-tokens", type=int, default=1000)
    p.add_argument("--presses", default="full,snapkv:0.75,adakv:0.75,zigzagkv:0.75,"
                   "pyramidkv:0.75")
    p.add_argument("--walk-press", default="zigzagkv:0.75")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--pool-requests", type=float, default=8.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import models
    model, tok = models.load(args.model, progress=False, dtype=jnp.float32)
    lengths = kept_lengths(model, tok, args.presses.split(","), args.prompts,
                           args.context_tokens)
    cmd = ["python benchmarks/pool_layout.py"] + (sys.argv[1:] if argv is None else argv)
    result = {"device": device_name(), "command": " ".join(cmd),
              "waste": {k: waste(v) for k, v in lengths.items()}}
    print(f"{'press':<16}{'kept':>8}{'packed':>9}" + "".join(f"{'page' + str(p):>9}"
                                                          for p in PAGES))
    for k, w in result["waste"].items():
        print(f"{k:<16}{w['kept_mean']:>8.0f}{w['packed_waste_share']:>9.1%}"
              + "".join(f"{w[f'page{p}_waste_share']:>9.1%}" for p in PAGES))
    result["walk"] = walk_times(model, tok, args.context_tokens, args.walk_press, args.repeats)
    print(f"block walk over one layer ({args.walk_press}), time vs 128-slot blocks: "
          + ", ".join(f"{p}: {result['walk'][f'block{p}_over_block128']:.2f}x" for p in PAGES))
    sizes = np.concatenate([-(-v.reshape(len(v), -1).sum(1) // 8) * 8
                            for k, v in lengths.items() if k != "full"])
    pool = int(args.pool_requests * sizes.mean()) // 8 * 8
    result["fragments"] = {"pool_slots": pool,
                           "first_fit": replay(sizes, pool, compact=False),
                           "first_fit_compacted": replay(sizes, pool, compact=True)}
    for k in ("first_fit", "first_fit_compacted"):
        print(f"{k:<20} {result['fragments'][k]}")
    if args.out:
        save_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
