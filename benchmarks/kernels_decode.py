"""Decode attention over the compressed cache: achieved HBM bandwidth of the Pallas kernel.

One decode step of a Llama-3-8B-shaped layer (32 q heads, 8 kv heads, head dim 128, bf16) at
8k / 32k / 128k cached slots, with the full cache and with a 10% compressed prefix, for:

  * `pallas`: this backend's kernel (`pallas_kernels.gpu` on GPU, `pallas_kernels.tpu` on TPU);
  * `reference`: `kvjax.attention.cached_attention_reference` under jit (what CPU generate uses);
  * `dot_product_attention`: `jax.nn.dot_product_attention` under jit over a dense [B, S, K, H]
    cache holding the same valid slots (the uncompressed baseline's layout).

Bytes counted are the valid prefix + tail keys/values (+ positions, queries and outputs), the
minimum any implementation must read; bandwidth = bytes / median time per step (steps chained on device), shown against the
device's peak (a table of known parts, or --peak-gbps). Results are printed and saved as JSON.

    python benchmarks/kernels_decode.py --out results/kernels_decode.json

Needs a GPU (Hopper, for Mosaic GPU) or a TPU. On CPU the kernels could only run in interpret
mode, whose timings mean nothing, so the script refuses to report numbers there.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, save_json  # noqa: E402

# HBM bandwidth of known parts, GB/s (vendor figures); override with --peak-gbps
PEAK_GBPS = {"H100": 3350, "H200": 4800, "A100": 2039, "TPU v4": 1200, "TPU v5 lite": 819,
             "TPU v5e": 819, "TPU v5p": 2765, "TPU v6 lite": 1640, "TPU v6e": 1640}
N_HEADS, N_KV, HEAD_DIM = 32, 8, 128  # Llama-3-8B attention
TAIL, TAIL_COUNT = 256, 128


def refuse_on_cpu() -> str:
    """The backend ('gpu' or 'tpu'), or exit with a clear message."""
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        print(f"kernels_decode: the default JAX backend is {backend!r}. The Pallas kernels would "
              "run in interpret mode here, and interpret-mode timings are not performance "
              "numbers, so this benchmark reports nothing. Run it on a GPU (sm90) or a TPU.",
              file=sys.stderr)
        sys.exit(2)
    return backend


def peak_gbps(override: float | None) -> float | None:
    if override:
        return override
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_GBPS.items() if k.lower() in kind.lower()), None)


def make_cache(batch: int, capacity: int, length: int, dtype, seed: int = 0):
    """Kernel arguments for a prefix of `capacity` slots (`length` valid) plus the tail: a
    store of one row per kv head, each head's segment at slot 0 of its row."""
    ks = jax.random.split(jax.random.key(seed), 5)

    def rnd(k, s):
        return jax.random.normal(k, s, jnp.float32).astype(dtype)

    q = rnd(ks[0], (batch, N_HEADS, HEAD_DIM))
    pk = rnd(ks[1], (batch, N_KV, capacity, HEAD_DIM))
    pv = rnd(ks[2], (batch, N_KV, capacity, HEAD_DIM))
    plen = jnp.full((batch, N_KV), length, jnp.int32)
    ppos = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32), (batch, N_KV, capacity))
    tk = rnd(ks[3], (batch, N_KV, TAIL, HEAD_DIM))
    tv = rnd(ks[4], (batch, N_KV, TAIL, HEAD_DIM))
    tpos = capacity + jnp.broadcast_to(jnp.arange(TAIL, dtype=jnp.int32), (batch, TAIL))
    count = jnp.full((batch,), TAIL_COUNT, jnp.int32)
    q_pos = capacity + count - 1
    return q, pk, pv, plen, ppos, tk, tv, tpos, count, q_pos


def min_bytes(batch: int, length: int, dtype) -> int:
    """Valid K/V slots (prefix + tail), their positions, q and the output."""
    item = jnp.dtype(dtype).itemsize
    slots = batch * N_KV * (length + TAIL_COUNT)
    return slots * 2 * HEAD_DIM * item + slots * 4 + 2 * batch * N_HEADS * HEAD_DIM * item


def median_seconds(fn, *args, iters: int, repeats: int = 5) -> float:
    """Seconds per decode step: `iters` steps chained in one jitted `fori_loop` (each step's
    output is the next step's query, so no step can be skipped), median over `repeats` runs.
    One dispatch per run, as inside a jitted generate loop: timing single calls from Python
    measures the ~0.1 ms launch overhead, not the kernel."""

    @jax.jit
    def chained(q, *rest):
        return jax.lax.fori_loop(0, iters, lambda _, x: fn(x, *rest).astype(x.dtype), q)

    jax.block_until_ready(chained(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(chained(*args))
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def implementations(backend: str):
    """name -> jitted fn(q, pk, pv, plen, ppos, tk, tv, tpos, count, q_pos)."""
    import pallas_kernels
    from kvjax.attention import cached_attention_reference
    from kvjax.cache import LayerView, Tail

    kernel = pallas_kernels.gpu if backend == "gpu" else pallas_kernels.tpu

    @jax.jit
    def reference(q, pk, pv, plen, ppos, tk, tv, tpos, count, q_pos):
        prefix, tail = LayerView(pk, pv, ppos, plen), Tail(tk, tv, tpos, count)
        return cached_attention_reference(q[:, None], q_pos[:, None], prefix, tail)[:, 0]

    @jax.jit
    def pallas(q, pk, pv, plen, *rest):  # segments at offset 0 of each head's row
        return kernel.decode_attention(q, pk, pv, plen, *rest,
                                       prefix_offset=jnp.zeros_like(plen), interpret=False)

    return {"pallas": pallas, "reference": reference}


def dense_dot_product_attention(args):
    """jax.nn.dot_product_attention over a dense [B, S, K, H] cache of the same valid slots."""
    q, pk, pv, plen, _, tk, tv, _, count, _ = args
    length = int(plen[0, 0])
    k = jnp.concatenate([pk[:, :, :length], tk[:, :, :int(count[0])]], 2).transpose(0, 2, 1, 3)
    v = jnp.concatenate([pv[:, :, :length], tv[:, :, :int(count[0])]], 2).transpose(0, 2, 1, 3)
    fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v)[:, 0])
    return fn, (q, k, v)


def run(args) -> list[dict]:
    backend = refuse_on_cpu()
    impls = implementations(backend)
    dtype = jnp.dtype(args.dtype)
    peak = peak_gbps(args.peak_gbps)
    rows = []
    for slots in args.slots:
        for frac in args.fractions:
            capacity = max(64, int(slots * frac) // 64 * 64)
            cache = make_cache(args.batch, capacity, capacity, dtype)
            n_bytes = min_bytes(args.batch, capacity, dtype)
            cases = [(name, fn, cache) for name, fn in impls.items()]
            cases.append(("dot_product_attention", *dense_dot_product_attention(cache)))
            for name, fn, fn_args in cases:
                try:
                    sec = median_seconds(fn, *fn_args, iters=args.iters)
                except Exception as e:  # e.g. out of memory for the reference at 128k
                    rows.append(dict(slots=slots, fraction=frac, impl=name, error=repr(e)))
                    print(f"{slots:>7} {frac:>5.0%} {name:<22} failed: {e!r}"[:160])
                    continue
                gbps = n_bytes / sec / 1e9
                rows.append(dict(slots=slots, fraction=frac, capacity=capacity, impl=name,
                                 seconds=sec, bytes=n_bytes, gbps=gbps,
                                 peak_fraction=gbps / peak if peak else None))
                print(f"{slots:>7} {frac:>5.0%} {name:<22} {sec * 1e6:9.1f} us "
                      f"{gbps:8.1f} GB/s" + (f" ({gbps / peak:5.1%} of peak)" if peak else ""))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.1],
                   help="prefix capacity as a fraction of the slots (1.0 = full cache)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--peak-gbps", type=float, default=None)
    p.add_argument("--out", default="results/kernels_decode.json")
    args = p.parse_args()
    rows = run(args)
    save_json(dict(device=device_name(), args=vars(args), rows=rows), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
