"""Prefill attention with score statistics: overhead over plain attention.

A Llama-3-8B-shaped layer (32 q heads, 8 kv heads, head dim 128, bf16) at 8k and 32k prompt
tokens. For this backend's Pallas kernel (`pallas_kernels.gpu` on GPU, `.tpu` on TPU) it times
attention alone (`score_rows=None`) and attention plus column sums over all rows (H2O), the
last 64 rows (SnapKV) and 1% proxy rows (NACL), against `jax.nn.dot_product_attention(...,
is_causal=True)` under jit. The overhead column is time / time(dot_product_attention); the
T x T matrix is never materialised by the kernel. Optionally (--reference) the jnp reference
with scores is timed too (slow: it is the specification, not an implementation).

    python benchmarks/kernels_prefill.py --out results/kernels_prefill.json

Needs a GPU (Hopper, for Mosaic GPU) or a TPU; on CPU it refuses to report numbers, since the
kernels would only run in interpret mode there.
"""

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from pallas_kernels import AllRows, LastRows, ProxyRows

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, save_json  # noqa: E402

N_HEADS, N_KV, HEAD_DIM = 32, 8, 128  # Llama-3-8B attention


def refuse_on_cpu() -> str:
    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        print(f"kernels_prefill: the default JAX backend is {backend!r}. The Pallas kernels would "
              "run in interpret mode here, and interpret-mode timings are not performance "
              "numbers, so this benchmark reports nothing. Run it on a GPU (sm90) or a TPU.",
              file=sys.stderr)
        sys.exit(2)
    return backend


def median_seconds(fn, *args, iters: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def score_settings(batch: int, t: int) -> dict:
    """name -> score_rows for the kernel (None: attention only)."""
    n_proxy = max(1, t // 100)
    proxy = jnp.broadcast_to(jnp.linspace(0, t - 1, n_proxy).astype(jnp.int32), (batch, n_proxy))
    return {"attention_only": None, "all_rows": AllRows(), "window_64": LastRows(64),
            "proxy_1pct": ProxyRows(proxy)}


def baseline(backend: str, t: int):
    """(name, jitted causal `jax.nn.dot_product_attention`). On GPU the cuDNN flash kernel:
    XLA's own lowering materialises the [B, N, T, T] scores (128 GiB at 32k tokens)."""
    impl = "cudnn" if backend == "gpu" else None
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                   implementation=impl))
    return f"dot_product_attention/{impl or 'xla'}", fn


def causal_flops(batch: int, t: int) -> float:
    """QK^T and PV over the causal half: 2 matmuls x 2 flops x T^2/2 x N x H."""
    return 2 * 2 * batch * N_HEADS * HEAD_DIM * t * t / 2


def run(args) -> list[dict]:
    backend = refuse_on_cpu()
    import pallas_kernels
    from kvjax.attention_scores import prefill_attention_with_scores_reference

    kernel = pallas_kernels.gpu if backend == "gpu" else pallas_kernels.tpu
    dtype = jnp.dtype(args.dtype)
    rows = []
    for t in args.tokens:
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (args.batch, t, N_HEADS, HEAD_DIM)).astype(dtype)
        k = jax.random.normal(ks[1], (args.batch, t, N_KV, HEAD_DIM)).astype(dtype)
        v = jax.random.normal(ks[2], (args.batch, t, N_KV, HEAD_DIM)).astype(dtype)
        lengths = jnp.full((args.batch,), t, jnp.int32)
        base_name, dpa = baseline(backend, t)
        base = median_seconds(dpa, q, k, v, iters=args.iters)
        cases = [(base_name, dpa, (q, k, v))]
        for name, score_rows in score_settings(args.batch, t).items():
            fn = jax.jit(lambda q, k, v, l, r: kernel.prefill_attention_with_scores(
                q, k, v, l, score_rows=r, interpret=False))
            cases.append((f"pallas/{name}", fn, (q, k, v, lengths, score_rows)))
        if args.reference:
            ref = jax.jit(functools.partial(prefill_attention_with_scores_reference,
                                            score_rows=AllRows()))
            cases.append(("reference/all_rows", ref, (q, k, v, lengths)))
        for name, fn, fn_args in cases:
            sec = base if name == base_name else median_seconds(
                fn, *fn_args, iters=args.iters)
            tflops = causal_flops(args.batch, t) / sec / 1e12
            rows.append(dict(tokens=t, impl=name, seconds=sec, overhead=sec / base,
                             attention_tflops=tflops))
            print(f"{t:>6} {name:<28} {sec * 1e3:9.2f} ms  x{sec / base:5.2f} of base  "
                  f"{tflops:6.1f} TFLOP/s (attention flops only)")
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--reference", action="store_true", help="also time the jnp reference")
    p.add_argument("--out", default="results/kernels_prefill.json")
    args = p.parse_args()
    rows = run(args)
    save_json(dict(device=device_name(), args=vars(args), rows=rows), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
