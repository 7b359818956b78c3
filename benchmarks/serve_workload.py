"""The serving workload shared by serve_throughput.py (in process) and serve_http.py (over
HTTP): needle-in-a-haystack chats, arrivals, and the statistics both report.

A request is an OpenAI chat body: the haystack as a system message (compressed alone), the
question as the user message (appended after compression, `"question_aware": false`), greedy,
`max_tokens` cycling through `new_tokens`. `kvjax.serve.protocol.parse_chat` turns it into the
same engine submission in both scripts.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Job:
    """One request: its chat body, arrival time (s after start) and the needle it asks."""

    body: dict
    arrival: float
    answer: str


def make_jobs(tokenizer, *, n: int, context_tokens: int, new_tokens: tuple[int, ...],
              arrival: str = "burst", rate: float = 1.0, seed: int = 0) -> list[Job]:
    """`n` needle chats of ~`context_tokens` tokens (needle depths spread over 0..1)."""
    from kvjax.demo import needle_sample
    rng = np.random.default_rng(seed)
    if arrival == "burst":
        times = np.zeros(n)
    elif arrival == "poisson":
        times = np.cumsum(rng.exponential(1.0 / rate, n)) - 1.0 / rate
        times = np.maximum(times, 0.0)
    else:
        raise ValueError(f"{arrival=} must be 'burst' or 'poisson'")
    jobs = []
    for i, depth in enumerate(np.linspace(0, 1, n)):
        s = needle_sample(tokenizer, context_tokens, depth=float(depth), seed=i)
        body = {"messages": [{"role": "system", "content": s.context},
                             {"role": "user", "content": s.question}],
                "max_tokens": int(new_tokens[i % len(new_tokens)]), "temperature": 0}
        jobs.append(Job(body=body, arrival=float(times[i]), answer=s.answer))
    return jobs


def with_press(body: dict, press: str | None, ratio: float) -> dict:
    kv = {"question_aware": False, "press": press or "full"}
    if press:
        kv["compression_ratio"] = ratio
    return {**body, "kvjax": kv}


def full_cache_budget(config_shapes: dict, context_tokens: int, requests: int,
                      max_running: int, max_tail: int) -> int:
    """Bytes of `requests` full-cache prompts of `context_tokens` (+ a 128-token margin for
    the chat template) in the pool, plus the tails of `max_running` slots (kvjax.Engine's
    accounting)."""
    n_layers, n_kv, h, itemsize = (config_shapes[k] for k in ("n_layers", "n_kv", "head_dim",
                                                               "itemsize"))
    per_slot = 2 * h * itemsize + 4
    pool = requests * n_layers * n_kv * (context_tokens + 128) * per_slot
    tails = max_running * (2 * n_layers * n_kv * max_tail * h * itemsize + 4 * max_tail)
    return pool + tails


def summarize(name: str, records: list[dict], wall: float, extra: dict | None = None) -> dict:
    """Throughput and latency of one configuration from per-request records
    (arrival, first_token, token_times, tokens, text, answer)."""
    ttft = np.array([r["first_token"] - r["arrival"] for r in records])
    gaps = np.concatenate([np.diff(r["token_times"]) for r in records
                           if len(r["token_times"]) > 1] or [np.zeros(0)])
    n_tok = sum(r["tokens"] for r in records)
    q = lambda a, p: float(np.quantile(a, p)) if a.size else float("nan")  # noqa: E731
    return {"config": name, "requests": len(records), "wall_s": wall,
            "requests_per_s": len(records) / wall, "output_tokens": n_tok,
            "output_tokens_per_s": n_tok / wall,
            "ttft_p50_s": q(ttft, 0.5), "ttft_p99_s": q(ttft, 0.99),
            "itl_p50_s": q(gaps, 0.5), "itl_p99_s": q(gaps, 0.99),
            "accuracy": float(np.mean([r["answer"] in r["text"] for r in records])),
            **(extra or {})}


def print_table(rows: list[dict], base: str) -> None:
    ref = next(r for r in rows if r["config"] == base)
    head = (f"{'config':<16} {'req/s':>7} {'tok/s':>8} {'x ' + base:>10} {'ttft p50':>9} "
            f"{'ttft p99':>9} {'itl p50':>8} {'itl p99':>8} {'conc':>5} {'peak':>6} {'acc':>5}")
    print(head)
    for r in rows:
        print(f"{r['config']:<16} {r['requests_per_s']:7.3f} {r['output_tokens_per_s']:8.2f} "
              f"{r['output_tokens_per_s'] / ref['output_tokens_per_s']:10.2f} "
              f"{r['ttft_p50_s']:9.2f} {r['ttft_p99_s']:9.2f} {r['itl_p50_s'] * 1e3:7.1f}m "
              f"{r['itl_p99_s'] * 1e3:7.1f}m {r.get('mean_running', float('nan')):5.2f} "
              f"{r.get('peak_pool_fraction', float('nan')):6.2f} {r['accuracy']:5.2f}")
