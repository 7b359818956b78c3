"""Quantized store on SmolLM2 (issue 17): the schemes' error, bytes and decode speed.

    python benchmarks/quant_store.py [--tokens 2048] [--samples 5] [--ratio 0.5] \
        [--out docs/results/quant_store.json]

For each needle sample (`kvjax.demo.needle_sample`, depths spread over 0..1), the context is
prefilled and compressed once per store (question-agnostic, SnapKV at `--ratio`, and the full
cache), then the question is appended and the next-token distribution read. Stores: the compute
dtype (f32), int8 and float8_e4m3fn, each with the "token" scheme (per-entry absmax) and the
"kivi" scheme (keys per channel over 32 slots, values per token). Reported, against the same
press unquantized, in one run:

  * kl: KL(p_f32 || p_quant) of the next-token distribution after the question (nats, mean);
  * top1: share of samples whose argmax token is unchanged;
  * k_err, v_err: relative L2 error of the dequantized kept keys / values;
  * held: store bytes held (scales included) / the f32 full cache's store bytes;
  * answers: needles found (greedy, 12 tokens);
  * decode: seconds per generated token (64 tokens, compiled, best of 2) and its ratio to f32.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, save_json, smollm2_needles  # noqa: E402

STORES = {"f32": None, "int8/token": ("int8", "token"), "int8/kivi": ("int8", "kivi"),
          "fp8/token": ("float8_e4m3fn", "token"), "fp8/kivi": ("float8_e4m3fn", "kivi")}


def quant_of(spec):
    from kvjax.quant import KiviScales, KVQuant, TokenScales
    if spec is None:
        return None
    return KVQuant(spec[0], TokenScales() if spec[1] == "token" else KiviScales(group=32))


def next_token_logp(pipe, sample, press, quant):
    """(log-probabilities [V] after the question, the kept (k, v), store bytes held, the
    answer text). The store is read before the question is appended (extend donates it)."""
    from kvjax import loops
    from kvjax.memory import memory_report
    ctx_ids, q_ids = pipe.encode(sample.context, sample.question,
                                 answer_prefix=sample.answer_prefix)
    state, _ = loops.start(pipe.fn, pipe.params, [ctx_ids], max_new_tokens=12, press=press,
                           attn_impl=pipe.attn_impl, tail_extra=len(q_ids), kv_dtype=quant)
    kv, held = kept_kv(state.cache), memory_report(state.cache).prefix_kv_bytes_held
    state = pipe.append_tokens(state, q_ids)
    logp = np.asarray(jax.nn.log_softmax(state.logits[0].astype(jnp.float32)))
    state = loops.decode(pipe.fn, pipe.params, state, jnp.int32(12),
                         loops.eos_array(pipe.tokenizer.eos_ids), sampler=__import__(
                             "kvjax").Greedy(), attn_impl=pipe.attn_impl)
    text = pipe.tokenizer.decode(np.asarray(state.tokens)[0, :int(state.lengths[0])].tolist())
    return logp, kv, held, text


def kept_kv(cache):
    """Dequantized kept keys and values of every layer, concatenated (f32 numpy)."""
    from kvjax.cache import layer_view
    ks, vs = [], []
    for layer in range(cache.n_layers):
        view = layer_view(cache.store, layer)
        ok = np.arange(view.capacity) < np.asarray(view.length)[..., None]
        ks.append(np.asarray(view.k, np.float32)[ok])
        vs.append(np.asarray(view.v, np.float32)[ok])
    return np.concatenate(ks), np.concatenate(vs)


def decode_seconds(pipe, sample, press, quant, n_new=64) -> float:
    """Seconds per generated token (compiled; best of 2 runs of n_new tokens)."""
    from kvjax import loops
    ctx_ids, _ = pipe.encode(sample.context, "")
    best = float("inf")
    for _ in range(3):  # the first run compiles
        state, _ = loops.start(pipe.fn, pipe.params, [ctx_ids], max_new_tokens=n_new,
                               press=press, attn_impl=pipe.attn_impl, kv_dtype=quant)
        jax.block_until_ready(state.logits)
        t0 = time.perf_counter()
        state = loops.decode(pipe.fn, pipe.params, state, jnp.int32(n_new), loops.eos_array(None),
                             sampler=__import__("kvjax").Greedy(), attn_impl=pipe.attn_impl)
        jax.block_until_ready(state.tokens)
        best = min(best, (time.perf_counter() - t0) / n_new)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--presses", default="full,snapkv", help="full and/or snapkv")
    ap.add_argument("--out", default="docs/results/quant_store.json")
    args = ap.parse_args(argv)
    import kvjax
    pipe, _, samples = smollm2_needles(args.tokens, args.samples)
    every = {"full": ("full", None), "snapkv": (f"snapkv {args.ratio}", kvjax.SnapKVPress(
        compression_ratio=args.ratio))}
    presses = dict(every[name] for name in args.presses.split(","))
    full_bytes = None
    rows = []
    for pname, press in presses.items():
        base = [next_token_logp(pipe, s, press, None) for s in samples]
        base_decode = decode_seconds(pipe, samples[0], press, None)
        if full_bytes is None:  # the f32 full cache's store (measured when not asked for)
            full_bytes = base[0][2] if press is None else next_token_logp(
                pipe, samples[0], None, None)[2]
        for sname, spec in STORES.items():
            quant = quant_of(spec)
            runs = base if quant is None else [next_token_logp(pipe, s, press, quant)
                                               for s in samples]
            kl, top1, k_err, v_err, found = [], [], [], [], 0
            for (lp0, (k0, v0), _, _), (lp, (k, v), _, text), s in zip(base, runs, samples):
                p0 = np.exp(lp0)
                kl.append(float(np.sum(p0 * (lp0 - lp))))
                top1.append(int(np.argmax(lp0) == np.argmax(lp)))
                k_err.append(float(np.linalg.norm(k - k0) / np.linalg.norm(k0)))
                v_err.append(float(np.linalg.norm(v - v0) / np.linalg.norm(v0)))
                found += s.answer in text
            dec = base_decode if quant is None else decode_seconds(pipe, samples[0], press,
                                                                   quant)
            held = runs[0][2]
            row = dict(press=pname, store=sname, kl=float(np.mean(kl)), top1=float(np.mean(top1)),
                       k_err=float(np.mean(k_err)), v_err=float(np.mean(v_err)),
                       held_vs_full_f32=held / full_bytes, answers=found, samples=len(samples),
                       decode_s_per_token=dec, decode_vs_f32=dec / base_decode)
            rows.append(row)
            print(f"{pname:<12} {sname:<10} KL {row['kl']:.2e}  top1 {row['top1']:.2f}  "
                  f"k_err {row['k_err']:.4f}  v_err {row['v_err']:.4f}  held "
                  f"{row['held_vs_full_f32']:.4f}  answers {found}/{len(samples)}  decode "
                  f"{dec * 1e3:.1f} ms/token ({row['decode_vs_f32']:.2f}x f32)", flush=True)
    save_json(dict(device=device_name(), args=vars(args), rows=rows), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
