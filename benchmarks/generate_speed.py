"""Prefill and decode speed of kvjax vs transformers (eager PyTorch) on SmolLM2, same prompts.

    python benchmarks/generate_speed.py [--lengths 1024,4096] [--new-tokens 64]

Prints one table with tokens/s for both and the kvjax/transformers ratio, measured in one run,
and saves it to docs/results/generate_speed.json. Compilation is excluded (a warm-up call per
shape); timings are the best of --repeat calls.
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


def kvjax_speed(model, ids, new_tokens, repeat, press=None):
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts([ids])
    tail = loops.bucket_length(new_tokens)
    run_prefill = lambda: loops.prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                        tail_capacity=tail, press=press)
    run_prefill()
    t_prefill, _ = timed(run_prefill, repeat=repeat)
    eos = loops.eos_array(None)

    def run_decode():
        state = jax.block_until_ready(loops.init_state(*run_prefill(), 1, tail, None))
        t0 = time.perf_counter()
        jax.block_until_ready(loops.decode(fn, params, state, jnp.int32(new_tokens), eos,
                                           sampler=kvjax.Greedy()))
        return time.perf_counter() - t0

    run_decode()
    t_decode = min(run_decode() for _ in range(repeat))
    return len(ids) / t_prefill, new_tokens / t_decode


def torch_speed(ids, new_tokens, repeat):
    import torch
    from transformers import AutoModelForCausalLM

    from models.smollm2 import find_smollm2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = find_smollm2()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              torch_dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        hf(x)
        t_prefill = min(_t(lambda: hf(x)) for _ in range(repeat))
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=0)
        t_gen = min(_t(lambda: hf.generate(x, **kw)) for _ in range(repeat))
    return len(ids) / t_prefill, new_tokens / max(t_gen - t_prefill, 1e-9)


def _t(f):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default="docs/results/generate_speed.json")
    args = ap.parse_args(argv)
    model, tok = models.load("smollm2", progress=False)
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = prompt_ids(tok, n)
        jp, jd = kvjax_speed(model, ids, args.new_tokens, args.repeat)
        tp, td = torch_speed(ids, args.new_tokens, args.repeat)
        rows.append(dict(prompt_tokens=n, kvjax_prefill_tok_s=jp, torch_prefill_tok_s=tp,
                         prefill_ratio=jp / tp, kvjax_decode_tok_s=jd, torch_decode_tok_s=td,
                         decode_ratio=jd / td))
    print(f"device: {device_name()}; model SmolLM2-135M-Instruct f32; "
          f"{args.new_tokens} new tokens; best of {args.repeat}")
    print(f"{'prompt':>7} | {'prefill tok/s kvjax':>20} {'torch':>8} {'ratio':>6} | "
          f"{'decode tok/s kvjax':>19} {'torch':>7} {'ratio':>6}")
    for r in rows:
        print(f"{r['prompt_tokens']:>7} | {r['kvjax_prefill_tok_s']:>20.0f} "
              f"{r['torch_prefill_tok_s']:>8.0f} {r['prefill_ratio']:>6.2f} | "
              f"{r['kvjax_decode_tok_s']:>19.1f} {r['torch_decode_tok_s']:>7.1f} "
              f"{r['decode_ratio']:>6.2f}")
    save_json(dict(device=device_name(), rows=rows), args.out)


if __name__ == "__main__":
    main()
