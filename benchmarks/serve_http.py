"""The overhead of `kvjax serve` against the in-process engine, on serve_throughput.py's
workload: the same chats through `kvjax.Engine` in this process, then over HTTP (streamed SSE,
all clients concurrent) to a `kvjax serve` subprocess with the same settings.

    python benchmarks/serve_http.py --model smollm2 --requests 8 --context-tokens 1000 \\
        --new-tokens 24,64 --press snapkv:0.75 --out docs/results/serve_http.json

Reports throughput and time to first token (p50/p99) of both, and their ratios, from one run.
The server is warmed up (one request per prompt bucket) before the timed replay.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from common import device_name, save_json
from serve_throughput import load, parse_config, run_engine, shapes
from serve_workload import full_cache_budget, make_jobs, print_table, summarize

ROOT = Path(__file__).resolve().parents[1]


def start_server(args, press, ratio, kv, budget, port):
    cmd = [sys.executable, "-m", "kvjax.cli", "serve", "--model", args.model, "--dtype",
           args.dtype, "--port", str(port), "--kv-budget", str(budget), "--max-running",
           str(args.max_running), "--max-tail", str(args.max_tail)]
    if press:
        cmd += ["--press", press, "--ratio", str(ratio)]
    if kv:
        cmd += ["--kv-dtype", kv]
    log = tempfile.TemporaryFile("w+")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"kvjax serve exited:\n{log.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("kvjax serve did not start")


async def one(client, url, job, t0, record):
    await asyncio.sleep(max(0.0, job.arrival - (time.perf_counter() - t0)))
    body = {**job.body, "stream": True, "stream_options": {"include_usage": True},
            "kvjax": {"question_aware": False}}  # the press: the server's (--press)
    times, text = [], []
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            for c in obj.get("choices", []):
                if c["delta"].get("content"):
                    times.append(time.perf_counter() - t0)
                    text.append(c["delta"]["content"])
            if "usage" in obj and obj["usage"]:
                record["tokens"] = obj["usage"]["completion_tokens"]
    record.update(arrival=job.arrival, first_token=times[0], token_times=times,
                  text="".join(text), answer=job.answer)


async def replay(url, jobs):
    records = [dict() for _ in jobs]
    limits = httpx.Limits(max_connections=len(jobs) + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[one(client, url, j, t0, rec) for j, rec in zip(jobs, records)])
        return records, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--context-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", default="24,64")
    ap.add_argument("--arrival", choices=("burst", "poisson"), default="burst")
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--press", default="snapkv:0.75", help="PRESS[:RATIO][@int8] or full")
    ap.add_argument("--fit", type=int, default=2)
    ap.add_argument("--max-running", type=int, default=16)
    ap.add_argument("--max-tail", type=int, default=128)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.random_model = None
    model, tok = load(args)
    jobs = make_jobs(tok, n=args.requests, context_tokens=args.context_tokens,
                     new_tokens=tuple(int(x) for x in args.new_tokens.split(",")),
                     arrival=args.arrival, rate=args.rate)
    budget = full_cache_budget(shapes(model), args.context_tokens, args.fit, args.max_running,
                               args.max_tail)
    press, ratio, kv = parse_config(args.press)
    print(f"{device_name()}: {args.requests} requests, {args.press}, kv_budget "
          f"{budget / 2**20:.1f} MiB", flush=True)
    records, info = run_engine(model, tok, jobs, press, ratio, kv, budget, args)
    wall = info.pop("wall")
    rows = [summarize("in-process", records, wall, info)]
    del model  # the server loads its own copy
    proc, url = start_server(args, press, ratio, kv, budget, args.port)
    try:
        warm = [dict(j.body, max_tokens=2) for j in jobs[:1]]
        for body in warm:
            httpx.post(url + "/v1/chat/completions", timeout=3600,
                       json={**body, "kvjax": {"question_aware": False}}).raise_for_status()
        records, wall = asyncio.run(replay(url, jobs))
    finally:
        proc.terminate()
        proc.wait(60)
    rows.append(summarize("http", records, wall))
    print_table(rows, "in-process")
    ratio_tps = rows[1]["output_tokens_per_s"] / rows[0]["output_tokens_per_s"]
    print(f"\nHTTP / in-process: throughput {ratio_tps:.3f}x "
          f"(overhead {100 * (1 - ratio_tps):.1f}%), ttft p50 "
          f"{rows[1]['ttft_p50_s'] / rows[0]['ttft_p50_s']:.2f}x, p99 "
          f"{rows[1]['ttft_p99_s'] / rows[0]['ttft_p99_s']:.2f}x")
    if args.out:
        save_json({"device": device_name(), "args": vars(args), "rows": rows,
                   "throughput_ratio": ratio_tps}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
