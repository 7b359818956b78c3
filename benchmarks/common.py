"""Shared helpers for the benchmark scripts (timing, prompts, output)."""

import json
import platform
import time
from pathlib import Path

import jax


def device_name() -> str:
    d = jax.devices()[0]
    kind = getattr(d, "device_kind", d.platform)
    return f"{d.platform}:{kind} ({platform.processor() or platform.machine()}, " \
           f"{jax.device_count()} device(s))"


def timed(fn, *args, repeat: int = 1, **kwargs):
    """Best wall time of `repeat` calls (results blocked on); returns (seconds, last result)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        best = min(best, time.perf_counter() - t0)
    return best, out


def prompt_ids(tokenizer, n_tokens: int, seed: int = 0) -> list[int]:
    """A deterministic natural-ish prompt of exactly n_tokens tokens."""
    from kvjax.demo import needle_sample
    ids = tokenizer.encode(needle_sample(tokenizer, n_tokens + 64, seed=seed).context,
                           add_bos=False)
    return ids[:n_tokens]


def save_json(obj, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def smollm2_needles(n_tokens: int, n_samples: int):
    """(SmolLM2 f32 Pipeline, its tokenizer, `n_samples` needle samples of ~n_tokens tokens
    with depths spread over 0..1, one seed each)."""
    import jax.numpy as jnp
    import numpy as np

    import kvjax
    import models
    from kvjax.demo import needle_sample
    model, tok = models.load("smollm2", progress=False, dtype=jnp.float32)
    samples = [needle_sample(tok, n_tokens, depth=float(d), seed=i)
               for i, d in enumerate(np.linspace(0, 1, n_samples))]
    return kvjax.Pipeline(model, tok), tok, samples
