"""Offline ZigZagKV statistics: per-layer LMBA (and LMBO) on calibration prompts.

`kvjax zigzag-profile --model smollm2 --out profile.json` writes the mean LMBA of every
layer; `ZigZagKVPress(profile=tuple(json["lmba"]))` then uses those static shares.
"""


import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from kvjax import loops
from kvjax.observation import ObsSpec
from kvjax.presses.base import LayerContext
from kvjax.presses.window import window_attention
from kvjax.presses.zigzag import ZigZagKVPress


def layer_statistics(model, ids: list[int], *, window: int = 32, tau: float = 0.9,
                     cos_threshold: float = 0.95, grid: int = 32) -> dict:
    """LMBA and LMBO of every layer for one prompt.

    LMBO_l: the smallest budget B (on a grid of `grid` sizes) such that the window queries'
    attention output over their top-B tokens (per query head, by attention) keeps mean cosine
    similarity >= cos_threshold with the full-cache output.
    """
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts([ids])
    _, prompt = loops.prefill_prompt(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                     obs_spec=ObsSpec(window=window))
    group = prompt.groups[0]
    views, obs = group.views(), group.layers.obs
    layer = lambda x, i: jax.tree.map(lambda a: a[i], x)
    alloc = ZigZagKVPress(compression_ratio=0.5, window_size=window,
                          attention_mass=tau).allocator()
    ctx = lambda i: LayerContext(prompt_len=prompt.next_pos, layer_idx=i,
                                 n_layers=group.n_layers)
    lmba = [float(alloc.layer_stat(layer(views, i), layer(obs, i), None, ctx(i))[0])
            for i in range(group.n_layers)]
    t = len(ids)
    sizes = np.unique(np.linspace(1, t, grid).round().astype(int))
    lmbo = [_lmbo(layer(views, i), layer(obs, i), prompt.next_pos, window, sizes, cos_threshold)
            for i in range(group.n_layers)]
    return dict(lmba=lmba, lmbo=lmbo, prompt_tokens=t)


def _lmbo(prefix, obs, prompt_len, window, sizes, threshold) -> int:
    probs = window_attention(prefix, obs, prompt_len, window)  # [B, K, G, W, C]
    v = prefix.v.astype(jnp.float32)
    full = jnp.einsum("bkgwc,bkch->bkgwh", probs, v)
    order = jnp.argsort(-probs, axis=-1)
    rank = jnp.argsort(order, axis=-1)
    for b in sizes:
        p = jnp.where(rank < b, probs, 0.0)
        p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
        out = jnp.einsum("bkgwc,bkch->bkgwh", p, v)
        cos = jnp.sum(out * full, -1) / (jnp.linalg.norm(out, axis=-1)
                                         * jnp.linalg.norm(full, axis=-1) + 1e-30)
        if float(cos.mean()) >= threshold:
            return int(b)
    return int(sizes[-1])


def profile(model, tokenizer, prompts: list[str], **kwargs) -> dict:
    """Mean per-layer LMBA/LMBO over calibration prompts (progress bar)."""
    rows = [layer_statistics(model, tokenizer.encode(p, add_bos=False), **kwargs)
            for p in tqdm(prompts, desc="zigzag profile")]
    mean = lambda key: np.mean([r[key] for r in rows], axis=0).tolist()
    return dict(version=1, lmba=mean("lmba"), lmbo=mean("lmbo"), prompts=len(rows),
                n_layers=len(rows[0]["lmba"]), settings=kwargs)


def calibration_prompts(tokenizer, n: int, tokens: int) -> list[str]:
    """Deterministic offline prompts (the demo's haystack text)."""
    from kvjax.demo import needle_sample
    return [needle_sample(tokenizer, tokens, depth=(i + 0.5) / n, seed=100 + i).context
            for i in range(n)]
