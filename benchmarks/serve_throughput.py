"""Throughput of `kvjax.Engine` against static batches of `kvjax.generate`, per press, under a
`kv_budget` that holds `--fit` full-cache requests (so compression turns into concurrency).

    python benchmarks/serve_throughput.py --model smollm2 --requests 8 --context-tokens 1000 \\
        --new-tokens 24,64 --configs static,full,snapkv:0.75,knorm:0.75,full@int8 \\
        --out docs/results/serve_throughput.json

A configuration is `static` (batches of `--fit` requests through `kvjax.generate_stream`, each
batch padded to its longest answer), or `PRESS[:RATIO][@int8]` for the engine (`full` is the
full cache). Per configuration: requests/s, output tokens/s, time to first token and
inter-token latency (p50/p99), mean running requests per step, peak pool use, and needle
accuracy; ratios against the full-cache engine are printed from this one run. Compilation is
warmed up outside the timed part. `--random-model 8b` uses Llama-3-8B shapes with random bf16
weights (SmolLM2's tokenizer; for a GPU), where accuracy means nothing.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from common import device_name, save_json
from kvjax.serve.protocol import PressSpec, parse_chat
from serve_workload import full_cache_budget, make_jobs, print_table, summarize, with_press


def parse_config(text: str):
    """"snapkv:0.75@int8" -> (press or None, ratio, kv_dtype or None)."""
    spec, _, kv = text.partition("@")
    name, _, ratio = spec.partition(":")
    return (None if name == "full" else name, float(ratio or 0.5), kv or None)


def load(args):
    import models
    model, tok = models.load("smollm2", progress=False, dtype=args.dtype) \
        if args.random_model else models.load(args.model, progress=False, dtype=args.dtype)
    if args.random_model:
        from flax import nnx
        cfg = models.ModelConfig(vocab_size=tok.vocab_size, **RANDOM[args.random_model])
        dtype = jnp.bfloat16 if args.random_model == "8b" else jnp.float32
        model = models.Decoder(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    return model, tok


RANDOM = {  # Llama-3-8B's shapes, and a small one to try the path on a CPU
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
               mlp_dim=14336, rope_theta=500000.0, max_seq_len=8192),
    "small": dict(d_model=256, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=32, mlp_dim=512,
                  max_seq_len=4096),
}


def shapes(model) -> dict:
    c = model.config
    return dict(n_layers=c.n_layers, n_kv=c.n_kv_heads, head_dim=c.head_dim,
                itemsize=jnp.dtype(model.embed_tokens.embedding[...].dtype).itemsize)


def submission(job, tok, press, ratio):
    return parse_chat(with_press(job.body, press, ratio), tok, PressSpec(None))


def run_engine(model, tok, jobs, press, ratio, kv_dtype, budget, args) -> tuple[list, dict]:
    eng = kvjax.Engine(model, tok, kv_budget=budget, max_running=args.max_running,
                       max_tail=args.max_tail, kv_dtype=kv_dtype)
    subs = [submission(j, tok, press, ratio) for j in jobs]

    def submit(sub, n=None):
        return eng.submit(sub.x, question=sub.question, press=sub.press.build(),
                          max_new_tokens=n or sub.max_new_tokens, eos_id=tok.eos_ids)

    eng.warmup()  # every decode bucket
    for sub in subs:  # and every prefill bucket the run meets
        submit(sub, 2)
    eng.run()
    pending = sorted(range(len(jobs)), key=lambda i: jobs[i].arrival)
    records = {}
    running, peak = [], 0
    t0 = time.perf_counter()
    while pending or any(not r["req"].done for r in records.values()):
        now = time.perf_counter() - t0
        while pending and jobs[pending[0]].arrival <= now:
            i = pending.pop(0)
            records[i] = dict(req=submit(subs[i]), arrival=jobs[i].arrival, token_times=[],
                              answer=jobs[i].answer)
        if not eng.stats().running and not eng.stats().waiting:
            time.sleep(max(0.0, jobs[pending[0]].arrival - now))
            continue
        events = eng.step()
        now = time.perf_counter() - t0
        for req, _ in events:
            next(r for r in records.values() if r["req"] is req)["token_times"].append(now)
        st = eng.stats()
        running.append(st.running)
        peak = max(peak, st.slots_used)
    wall = time.perf_counter() - t0
    out = []
    for i in sorted(records):
        r = records[i]
        res = r["req"].result()
        out.append(dict(arrival=r["arrival"], first_token=r["token_times"][0],
                        token_times=r["token_times"], tokens=len(res.tokens), text=res.text,
                        answer=r["answer"]))
    extra = dict(mean_running=float(np.mean(running)), peak_pool_fraction=peak /
                 eng.allocator.n_slots, pool_slots=eng.allocator.n_slots)
    return out, dict(wall=wall, **extra)


def run_static(model, tok, jobs, args) -> tuple[list, dict]:
    subs = [submission(j, tok, None, 0.5) for j in jobs]
    prompts = [list(s.x) + list(s.question) for s in subs]
    eos = set(tok.eos_ids)
    longest = max(s.max_new_tokens for s in subs)
    order = sorted(range(len(jobs)), key=lambda i: jobs[i].arrival)
    for start in range(0, len(order), args.fit):  # compile every batch's shapes
        for _ in kvjax.generate_stream(model, [prompts[i] for i in order[start:start + args.fit]],
                                       max_new_tokens=longest, eos_id=tok.eos_ids):
            pass
    records, t0, clock = {}, time.perf_counter(), 0.0
    for start in range(0, len(order), args.fit):
        batch = order[start:start + args.fit]
        ready = max(jobs[i].arrival for i in batch)
        clock = time.perf_counter() - t0
        if ready > clock:
            time.sleep(ready - clock)
        budget = [subs[i].max_new_tokens for i in batch]
        toks = {i: [] for i in batch}
        times = {i: [] for i in batch}
        for step in kvjax.generate_stream(model, [prompts[i] for i in batch],
                                          max_new_tokens=max(budget), eos_id=tok.eos_ids):
            now = time.perf_counter() - t0
            for row, i in enumerate(batch):
                done = len(toks[i]) >= budget[row] or (toks[i] and toks[i][-1] in eos)
                if not done:
                    toks[i].append(int(step[row]))
                    times[i].append(now)
        for i in batch:
            records[i] = dict(arrival=jobs[i].arrival, first_token=times[i][0],
                              token_times=times[i], tokens=len(toks[i]),
                              text=tok.decode([t for t in toks[i] if t not in eos]),
                              answer=jobs[i].answer)
    wall = time.perf_counter() - t0
    return [records[i] for i in sorted(records)], dict(wall=wall, mean_running=float(args.fit))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--random-model", choices=tuple(RANDOM), default=None,
                    help="random weights of these shapes (SmolLM2's tokenizer)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--context-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", default="24,64")
    ap.add_argument("--arrival", choices=("burst", "poisson"), default="burst")
    ap.add_argument("--rate", type=float, default=1.0, help="poisson arrivals per second")
    ap.add_argument("--configs", default="static,full,snapkv:0.75,knorm:0.75,full@int8")
    ap.add_argument("--fit", type=int, default=2, help="full-cache requests the budget holds")
    ap.add_argument("--max-running", type=int, default=16)
    ap.add_argument("--max-tail", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model, tok = load(args)
    new_tokens = tuple(int(x) for x in args.new_tokens.split(","))
    jobs = make_jobs(tok, n=args.requests, context_tokens=args.context_tokens,
                     new_tokens=new_tokens, arrival=args.arrival, rate=args.rate)
    budget = full_cache_budget(shapes(model), args.context_tokens, args.fit, args.max_running,
                               args.max_tail)
    print(f"{device_name()}: {args.requests} requests of ~{args.context_tokens} tokens, "
          f"{args.arrival} arrivals, kv_budget {budget / 2**20:.1f} MiB "
          f"({args.fit} full-cache requests + {args.max_running} tails)", flush=True)
    rows = []
    for text in args.configs.split(","):
        if text == "static":
            records, info = run_static(model, tok, jobs, args)
        else:
            press, ratio, kv = parse_config(text)
            records, info = run_engine(model, tok, jobs, press, ratio, kv, budget, args)
        wall = info.pop("wall")
        rows.append(summarize(text, records, wall, info))
        print(f"  {text}: {rows[-1]['output_tokens_per_s']:.2f} tok/s, accuracy "
              f"{rows[-1]['accuracy']:.2f}", flush=True)
    print()
    print_table(rows, "full" if any(r["config"] == "full" for r in rows) else rows[0]["config"])
    if args.out:
        save_json({"device": device_name(), "args": vars(args), "kv_budget": budget,
                   "jax": jax.__version__, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
