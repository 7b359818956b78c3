"""Cost and benefit of every press on SmolLM2 at a long prompt, measured in one run.

    python benchmarks/press_speed_memory.py [--tokens 4096] [--ratios 0.5,0.75,0.9]
                                            [--presses snapkv,knorm,...] [--new-tokens 64]

For each press and ratio: compression time as a fraction of the full-cache prefill time
(prefill-with-press minus plain prefill, observation statistics included), decode tokens/s
relative to the full cache, KV bytes relative to the full cache, and the store's bytes held
over the bytes its kept entries need (tail excluded: 1.00 = no padding). Compilation is
excluded (ahead-of-time compile, then one timed call). Saves
docs/results/press_speed_memory.json.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, prompt_ids, save_json, timed  # noqa: E402

import kvjax  # noqa: E402
import models  # noqa: E402
from kvjax import loops  # noqa: E402
from kvjax.presses import PRESSES, make_press  # noqa: E402


def measure(fn, params, tokens, lengths, press, new_tokens, repeat=2):
    """(prefill seconds, best of `repeat`; decode tok/s; memory report) for one press."""
    tail = loops.bucket_length(new_tokens)
    compiled = loops.prefill.lower(fn, params, tokens, lengths, tail_capacity=tail,
                                   press=press).compile()
    t_prefill, (logits, cache) = timed(compiled, params, tokens, lengths, repeat=repeat)
    report = kvjax.memory_report(cache)
    eos = loops.eos_array(None)
    state = loops.init_state(logits, cache, 1, tail, None)
    dec = loops.decode.lower(fn, params, state, jnp.int32(new_tokens), eos,
                             sampler=kvjax.Greedy()).compile()
    t0 = time.perf_counter()
    jax.block_until_ready(dec(params, state, jnp.int32(new_tokens), eos))
    return t_prefill, new_tokens / (time.perf_counter() - t0), report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ratios", default="0.5,0.75,0.9")
    ap.add_argument("--presses", default=",".join(sorted(PRESSES)))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2, help="prefill timings, best of N")
    ap.add_argument("--out", default="docs/results/press_speed_memory.json")
    args = ap.parse_args(argv)
    model, tok = models.load("smollm2", progress=False)
    fn, params = model.kvjax_split()
    t, n = loops.pad_prompts([prompt_ids(tok, args.tokens)])
    tokens, lengths = jnp.asarray(t), jnp.asarray(n)
    base_prefill, base_decode, base = measure(fn, params, tokens, lengths, None, args.new_tokens,
                                              repeat=args.repeat + 1)
    rows = []
    print(f"device: {device_name()}; SmolLM2-135M-Instruct f32; prompt {args.tokens} tokens; "
          f"full cache: prefill {args.tokens / base_prefill:.0f} tok/s, decode "
          f"{base_decode:.1f} tok/s, KV {base.kv_bytes_held / 2**20:.1f} MiB")
    print(f"{'press':<20}{'ratio':>6}{'compress/prefill':>18}{'decode vs full':>16}"
          f"{'KV held vs full':>17}{'KV needed vs full':>19}{'store held/needed':>19}")
    for name in args.presses.split(","):
        for r in [float(x) for x in args.ratios.split(",")]:
            press = make_press(name, r, **_bench_kwargs(name)).with_tokenizer(tok)
            tp, dec, rep = measure(fn, params, tokens, lengths, press, args.new_tokens,
                                   args.repeat)
            row = dict(press=name, ratio=r, compress_frac=(tp - base_prefill) / base_prefill,
                       decode_speedup=dec / base_decode,
                       bytes_held_frac=rep.kv_bytes_held / base.kv_bytes_held,
                       bytes_needed_frac=rep.kv_bytes_needed / base.kv_bytes_needed,
                       store_held_over_needed=rep.prefix_overhead)
            rows.append(row)
            print(f"{name:<20}{r:>6.2f}{row['compress_frac']:>18.3f}"
                  f"{row['decode_speedup']:>16.2f}{row['bytes_held_frac']:>17.3f}"
                  f"{row['bytes_needed_frac']:>19.3f}{row['store_held_over_needed']:>19.3f}",
                  flush=True)
    save_json(dict(device=device_name(), tokens=args.tokens, new_tokens=args.new_tokens,
                   full=dict(prefill_tok_s=args.tokens / base_prefill, decode_tok_s=base_decode,
                             kv_bytes_held=base.kv_bytes_held), rows=rows), args.out)


def _bench_kwargs(name: str) -> dict:
    """The registry's example arguments without its tiny-test settings (windows, KVzip's
    chunk and token-id repeat prompt, KVzap's untrained weights): kvpress defaults, the
    tokenizer's repeat prompt and the shipped SmolLM2 KVzap weights."""
    test_only = ("window_size", "n_future_positions", "chunk_size", "repeat", "weights")
    return {k: v for k, v in PRESSES[name][1].items() if k not in test_only}


if __name__ == "__main__":
    main()
