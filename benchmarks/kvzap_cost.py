"""What KVzap's scoring costs next to a prefill (wall time, jitted, median of repeats).

    python benchmarks/kvzap_cost.py --model smollm2 --tokens 2048

Times, for one prompt of `--tokens` tokens:
  prefill        `fn.prefill` alone (no observation, no compression);
  scorer         the KVzap scorer on every layer's hidden states [L, 1, T, D] (what the press
                 adds over a press that needs no scores: L * T * D * K multiply-adds, linear);
  prefill+kvzap  `kvjax.loops.prefill` with KVzapPress (hidden states observed, scored,
                 top-k per head, compaction into the store);
  prefill+knorm  the same with KnormPress (the cheapest scorer: the selection's share).
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _interleaved_medians(calls: dict, repeats: int) -> dict:
    """Median seconds per call, the calls run round-robin (compiled first) so that a busy
    machine slows them alike."""
    for f, args in calls.values():
        jax.block_until_ready(f(*args))
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (f, args) in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def measure(model, weights, n_tokens: int = 2048, repeats: int = 5, ratio: float = 0.5) -> dict:
    """Median seconds of the four timings above and the ratios to the plain prefill."""
    import kvjax
    from kvjax import loops
    from kvjax.observation import ObsSpec
    fn, params = model.kvjax_split()
    tokens = jnp.asarray(np.random.default_rng(0).integers(100, 10000, (1, n_tokens)), jnp.int32)
    lengths = jnp.array([n_tokens], jnp.int32)
    prefill = jax.jit(lambda p, t, l: fn.prefill(p, t, l, obs_spec=ObsSpec())[0])
    n_layers = weights.signature[0]
    hidden = jnp.asarray(np.random.default_rng(1).normal(
        size=(n_layers, 1, n_tokens, weights.signature[1])), jnp.float32)
    scorer = jax.jit(lambda h: jax.lax.map(
        lambda a: weights.apply(a[0], a[1]), (h, jnp.arange(n_layers, dtype=jnp.int32))))
    kvzap = kvjax.KVzapPress(compression_ratio=ratio, weights=weights)
    knorm = kvjax.KnormPress(compression_ratio=ratio)
    full = lambda press: (lambda p, t, l: loops.prefill(fn, p, t, l, tail_capacity=8,
                                                        press=press)[1].store.k)
    out = {"tokens": n_tokens, "device": jax.devices()[0].device_kind}
    out.update(_interleaved_medians({
        "prefill": (prefill, (params, tokens, lengths)),
        "scorer": (scorer, (hidden,)),
        "prefill+kvzap": (jax.jit(full(kvzap)), (params, tokens, lengths)),
        "prefill+knorm": (jax.jit(full(knorm)), (params, tokens, lengths))}, repeats))
    out["scorer/prefill"] = out["scorer"] / out["prefill"]
    out["(prefill+kvzap)/prefill"] = out["prefill+kvzap"] / out["prefill"]
    out["(prefill+kvzap)/(prefill+knorm)"] = out["prefill+kvzap"] / out["prefill+knorm"]
    d, k = weights.signature[1:]
    out["scorer_flops"] = 2 * n_layers * n_tokens * d * k if weights.hidden_dim is None else \
        2 * n_layers * n_tokens * weights.hidden_dim * (d + k)
    out["hidden_bytes"] = int(hidden.size * 4)  # Observation.hidden held until compression
    return out


def main(argv=None) -> int:
    import models
    from kvjax.kvzap.weights import load_weights
    p = argparse.ArgumentParser(prog="python benchmarks/kvzap_cost.py")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--weights", default="smollm2")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    model, _ = models.load(args.model, dtype="float32", progress=False)
    res = measure(model, load_weights(args.weights), args.tokens, args.repeats)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
