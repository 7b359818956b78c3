"""`GET /metrics`: the engine's state in the Prometheus text format (version 0.0.4)."""

from __future__ import annotations

import time

import numpy as np


class Throughput:
    """Output tokens per second over the last `window_s` seconds (sampled at scrape)."""

    def __init__(self, window_s: float = 10.0):
        self.window_s = window_s
        self._samples: list[tuple[float, int]] = []

    def rate(self, tokens_total: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._samples.append((now, tokens_total))
        self._samples = [s for s in self._samples if now - s[0] <= self.window_s] or \
            self._samples[-1:]
        t0, n0 = self._samples[0]
        return 0.0 if now <= t0 else (tokens_total - n0) / (now - t0)


def _line(name: str, kind: str, help_: str, value, labels: str = "") -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{labels} {value}"]


def render(stats, ttft, completed, tokens_per_s: float) -> str:
    """Prometheus text of an `EngineStats`, recent times to first token (seconds), finished
    requests by reason and the output token rate."""
    out = []
    out += _line("kvjax_requests_running", "gauge", "requests decoding now", stats.running)
    out += _line("kvjax_requests_waiting", "gauge", "requests queued for a slot or block",
                 stats.waiting)
    out += _line("kvjax_pool_slots_used", "gauge", "pool slots held by kept entries",
                 stats.slots_used)
    out += _line("kvjax_pool_slots_free", "gauge", "pool slots free", stats.slots_free)
    out += _line("kvjax_kv_bytes_held", "gauge", "bytes of the pool and tails allocated",
                 stats.bytes_held)
    out += _line("kvjax_kv_bytes_needed", "gauge",
                 "bytes of the entries the running requests keep", stats.bytes_needed)
    out += _line("kvjax_contexts_held", "gauge", "compressed contexts held in the pool",
                 stats.contexts_held)
    out += _line("kvjax_output_tokens_total", "counter", "tokens generated",
                 stats.tokens_generated)
    out += _line("kvjax_output_tokens_per_second", "gauge",
                 "tokens generated per second over the last 10 s", f"{tokens_per_s:.3f}")
    out += ["# HELP kvjax_requests_finished_total requests finished, by reason",
            "# TYPE kvjax_requests_finished_total counter"]
    out += [f'kvjax_requests_finished_total{{reason="{r}"}} {n}'
            for r, n in sorted(completed.items())]
    t = np.asarray(list(ttft), float)
    out += ["# HELP kvjax_time_to_first_token_seconds time from submit to the first token "
            "(recent requests)", "# TYPE kvjax_time_to_first_token_seconds summary"]
    for q in (0.5, 0.9, 0.99):
        v = float(np.quantile(t, q)) if t.size else float("nan")
        out.append(f'kvjax_time_to_first_token_seconds{{quantile="{q}"}} {v:.6f}')
    out += [f"kvjax_time_to_first_token_seconds_sum {t.sum():.6f}",
            f"kvjax_time_to_first_token_seconds_count {t.size}"]
    return "\n".join(out) + "\n"
