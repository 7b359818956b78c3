"""KVzip's repeat pass (Kim et al. 2025, arXiv 2505.23416): after the prefill, the model is
prompted to repeat the context, chunk by chunk, attending to the full context cache; a context
token's score is the largest attention it receives from the repeat tokens.

This module runs the pass inside the jitted prefill, as kvpress 0.5.5 defines it
(docs/kvzip_reference.md): per chunk `i` the repeat input is the instruction (the first chunk
"Repeat the previous context exactly.", later chunks "Repeat the part of the previous context
exactly, starting with" + the previous chunk's last 8 ids), the chat template's suffix, then
the chunk; it runs at positions T.. over the uncompressed cache through the model's own decode
(a `DecodeHook` that owns attention: `RepeatScoring`), so the model needs nothing new. A
layer's score for a context slot is max over its query heads and the repeat queries of the
softmax over the subset {first `n_sink` keys, the chunk, the repeat tokens} (causal among the
repeat tokens); scores are kept as running maxima in the store's per-slot state and handed to
the press as `Observation.token_scores`. Axis letters as in `kvjax.attention`.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention import default_scale, group_heads
from kvjax.cache import KVCache, gather_rows, init_tail, layer_view, slot_index
from kvjax.hooks import DecodeHook
from kvjax.writer import full_store

FIRST = "\n\nRepeat the previous context exactly."
PART = "\n\nRepeat the part of the previous context exactly, starting with"
PREV_IDS = 8  # ids of the previous chunk that open the next chunk's instruction
_Q_BLOCK = 256  # repeat queries attended and scored at once


def _encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(int(i) for i in tokenizer.encode(text, add_bos=False))


@dataclasses.dataclass(frozen=True)
class RepeatPrompt:
    """Token ids of the repeat instructions for one tokenizer (hashable: part of the press).

    Attributes:
      first: the first chunk's instruction; part: later chunks' instruction (followed by the
        previous chunk's last 8 ids); suffix: what closes the user turn and opens the
        assistant's ("\\n" for a tokenizer without a chat template); prefix_length: P, the
        chat template's tokens before the context (never repeated, never scored: kvpress's
        choice, docs/kvzip_reference.md section 1.6).
    """

    first: tuple[int, ...]
    part: tuple[int, ...]
    suffix: tuple[int, ...]
    prefix_length: int = 0

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "RepeatPrompt":
        """kvpress's prompts through `tokenizer` (its chat template when it has one, plain
        text otherwise). Needs `encode(text, add_bos=False)`, `chat_template` and
        `apply_chat_template(messages, add_generation_prompt=True)`."""
        first, part = _encode(tokenizer, FIRST), _encode(tokenizer, PART)
        if getattr(tokenizer, "chat_template", None) is None:
            return cls(first=first, part=part, suffix=_encode(tokenizer, "\n"))
        dummy = "dummy context"
        sep = "\n" + "#" * len(dummy)
        text = tokenizer.apply_chat_template([{"role": "user", "content": dummy + sep}],
                                             add_generation_prompt=True, enable_thinking=False)
        if text.count(sep) != 1:
            raise ValueError("the chat template altered KVzip's context separator")
        context, suffix = text.split(sep)
        prefix = context.split(dummy)[0]
        return cls(first=first, part=part, suffix=_encode(tokenizer, suffix),
                   prefix_length=len(_encode(tokenizer, prefix)))



@dataclasses.dataclass(frozen=True)
class RepeatScoring(DecodeHook):
    """The repeat pass of chunk `chunk`: attention for the forward, KVzip scores on the side.

    The cache it runs over holds the uncompressed prompt (slot t of a segment = position t)
    and per-slot running-max scores in `store.extra` [B, R, P, 1].
    """

    chunk: int
    chunk_size: int
    prefix_length: int
    n_sink: int = 4
    plus: bool = False  # KVzip+: rows / ||h||, columns * ||W_O v|| (kvzip_plus_normalization)

    owns_attention = True

    @property
    def needs_out_proj(self):
        return self.plus

    def tail_slots(self, out_len, reserved):
        return 0

    def decode_layer(self, q, k, v, positions, n_new, cache, layer, *, sliding_window=None,
                     scale=None, hidden=None, out_proj=None):
        """q [B, Q, N, H] repeat queries at positions [B, Q] (starting at the prompt length)
        -> (out [B, Q, N, H] over context + repeat tokens, cache with the chunk's scores).
        With `plus`: hidden [B, Q, D] the repeat tokens' attention input and out_proj
        [N * H, D] the layer's W_O."""
        store = cache.store
        view = layer_view(store, layer)  # the whole uncompressed prompt: slot t = position t
        start = self.prefix_length + self.chunk * self.chunk_size
        stop = start + chunk_width(view.capacity, self.prefix_length, self.chunk,
                                   self.chunk_size)
        weights = None
        if self.plus:
            weights = plus_weights(hidden, out_proj, view.v[:, :, start:stop])
        out, scores = repeat_attention(
            q, k, v, positions, n_new, view, start=start, stop=stop,
            n_sink=min(self.n_sink, start), scale=scale, sliding_window=sliding_window,
            weights=weights)
        idx, ok = slot_index(store, layer, stop - start, start=start)
        b = idx.shape[0]
        flat = jnp.where(ok, idx, store.rows * store.slots).reshape(b, -1)
        extra = store.extra.reshape(b, -1)
        extra = jax.vmap(lambda e, i, s: e.at[i].max(s, mode="drop"))(
            extra, flat, scores.reshape(b, -1).astype(extra.dtype))
        store = dataclasses.replace(store, extra=extra.reshape(store.extra.shape))
        return out, dataclasses.replace(cache, store=store)


def plus_weights(hidden: jax.Array, out_proj: jax.Array,
                 v_chunk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """KVzip+'s normalisation (the KVzap paper; kvpress's `kvzip_plus_normalization`).

    Args:
      hidden: [B, Q, D] the repeat tokens' attention input; out_proj: [N * H, D] W_O;
      v_chunk: [B, K, C, H] the chunk's values.

    Returns:
      (1 / ||h_q|| [B, Q], ||W_O[head n] v_t|| [B, K, G, C]) in f32: a score is the repeat
      attention divided by its row's input norm, times what its entry writes to the
      residual stream through each query head.
    """
    b, n_kv, c, h = v_chunk.shape
    d = out_proj.shape[-1]
    inv_h = 1.0 / jnp.linalg.norm(hidden.astype(jnp.float32), axis=-1)
    wo = out_proj.astype(jnp.float32).reshape(n_kv, -1, h, d)  # [K, G, H, D]
    wov = jnp.einsum("bkch,kghd->bkgcd", v_chunk.astype(jnp.float32), wo)
    return inv_h, jnp.linalg.norm(wov, axis=-1)


def repeat_attention(q, k, v, positions, n_new, view, *, start: int, stop: int, n_sink: int,
                     scale=None, sliding_window=None, weights=None):
    """The repeat tokens' attention and their KVzip scores, from one set of logits.

    Args:
      q: [B, Q, N, H] post-RoPE repeat queries; k, v: [B, Q, K, H] their keys and values;
      positions: [B, Q]; n_new: [B] real repeat tokens; view: the layer's uncompressed prompt
      (k [B, K, T, H], pos, length); [start, stop): the chunk (static); n_sink: the first
      keys also in the score's softmax subset (static); weights: KVzip+'s
      (1 / ||h|| [B, Q], ||W_O v|| [B, K, G, stop - start]) from `plus_weights`, or None.

    Returns:
      out [B, Q, N, H] (softmax over every context key and the earlier repeat tokens, as the
      model's own forward) and scores [B, K, stop - start] f32: max over the kv group's query
      heads and the real repeat queries of the softmax over the subset {keys < n_sink, the
      chunk, the repeat tokens} (docs/kvzip_reference.md section 1.4).
    """
    b, t, n, h = q.shape
    n_kv, c = view.k.shape[1], view.capacity
    scale = default_scale(h) if scale is None else scale
    qg = group_heads(q, n_kv)  # [B, Q, K, G, H]
    kr, vr = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, Q, H]
    slot = jnp.arange(c)
    ctx_ok = slot[None, None, :] < view.length[..., None]  # [B, K, T]
    subset = (slot < n_sink) | ((slot >= start) & (slot < stop))  # [T] static pattern
    q_ok = jnp.arange(t)[None, :] < n_new[:, None]  # [B, Q]
    outs, best = [], jnp.zeros((b, n_kv, stop - start), jnp.float32)
    for lo in range(0, t, _Q_BLOCK):  # causal query blocks: keys of later repeat tokens skipped
        hi = min(t, lo + _Q_BLOCK)
        qb = qg[:, lo:hi]
        lc = jnp.einsum("bqkgh,bksh->bkgqs", qb, view.k.astype(qb.dtype),
                        preferred_element_type=jnp.float32) * scale  # [B, K, G, Qb, T]
        lr = jnp.einsum("bqkgh,bksh->bkgqs", qb, kr[:, :, :hi].astype(qb.dtype),
                        preferred_element_type=jnp.float32) * scale  # [B, K, G, Qb, hi]
        mc = ctx_ok[:, :, None, None, :]
        if sliding_window is not None:
            mc = mc & (positions[:, None, None, lo:hi, None] - view.pos[:, :, None, None, :]
                       < sliding_window)
        mr = (jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None])[None] & q_ok[:, None, :hi]
        mr = mr[:, None, None]  # [B, 1, 1, Qb, hi]
        lc, lr = jnp.where(mc, lc, -jnp.inf), jnp.where(mr, lr, -jnp.inf)
        m = jnp.maximum(lc.max(-1, keepdims=True), lr.max(-1, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        ec, er = jnp.exp(lc - m), jnp.exp(lr - m)
        denom = ec.sum(-1, keepdims=True) + er.sum(-1, keepdims=True)
        o = (jnp.einsum("bkgqs,bksh->bqkgh", ec, view.v.astype(jnp.float32))
             + jnp.einsum("bkgqs,bksh->bqkgh", er, vr[:, :, :hi].astype(jnp.float32)))
        outs.append(o / jnp.maximum(denom, 1e-30).transpose(0, 3, 1, 2, 4))
        sub = jnp.sum(jnp.where(subset, ec, 0.0), -1, keepdims=True) + er.sum(-1, keepdims=True)
        p = ec[..., start:stop] / jnp.maximum(sub, 1e-30)  # the chunk's columns
        if weights is not None:
            p = p * weights[0][:, None, None, lo:hi, None] * weights[1][:, :, :, None, :]
        p = jnp.where(q_ok[:, None, None, lo:hi, None], p, 0.0)
        best = jnp.maximum(best, p.max(axis=(2, 3)))
    out = jnp.concatenate(outs, axis=1).reshape(b, t, n, h).astype(q.dtype)
    return out, jnp.where(ctx_ok[:, :, start:stop], best, 0.0)


def chunk_width(prompt_slots: int, prefix_length: int, chunk: int, chunk_size: int) -> int:
    """Static number of context slots chunk `chunk` covers: `chunk_size`, less at the end of
    the padded prompt (a short context is not padded up to a whole chunk)."""
    return min(chunk_size, prompt_slots - prefix_length - chunk * chunk_size)


def n_chunks(prompt_slots: int, prefix_length: int, chunk_size: int) -> int:
    """Static number of repeat chunks for a prompt padded to `prompt_slots` tokens."""
    return max(1, -(-(prompt_slots - prefix_length) // chunk_size))


def repeat_ids(tokens: jax.Array, lengths: jax.Array, repeat: RepeatPrompt, chunk: int,
               chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """Repeat input of chunk `chunk` for every row -> (ids [B, Q] int32, n_new [B]).

    ids = instruction (+ the previous chunk's last 8 ids) + suffix + the chunk's tokens
    (right-padded); a row whose context ends before the chunk gets n_new = 0.
    """
    b = tokens.shape[0]
    start = repeat.prefix_length + chunk * chunk_size
    if chunk == 0:
        head = jnp.broadcast_to(jnp.asarray(repeat.first, jnp.int32), (b, len(repeat.first)))
    else:
        prev = jax.lax.dynamic_slice_in_dim(tokens, start - PREV_IDS, PREV_IDS, axis=1)
        head = jnp.concatenate([jnp.broadcast_to(jnp.asarray(repeat.part, jnp.int32),
                                                 (b, len(repeat.part))), prev], axis=1)
    suffix = jnp.broadcast_to(jnp.asarray(repeat.suffix, jnp.int32), (b, len(repeat.suffix)))
    width = chunk_width(tokens.shape[1], repeat.prefix_length, chunk, chunk_size)
    body = tokens[:, start:start + width]
    n_body = jnp.clip(lengths - start, 0, width)
    ids = jnp.concatenate([head, suffix, body], axis=1).astype(jnp.int32)
    n_new = jnp.where(n_body > 0, head.shape[1] + suffix.shape[1] + n_body, 0)
    return ids, n_new.astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class RepeatPass:
    """A prompt observer (static): runs the repeat pass and attaches `token_scores`.

    Attributes:
      repeat: the instruction ids; chunk_size: context tokens per pass; n_sink: keys always in
        the softmax subset; plus: KVzip+ scores (`plus_weights`; the model passes hidden= and
        out_proj= to `kvjax.decode_layer`).
    """

    repeat: RepeatPrompt
    chunk_size: int = 2048
    n_sink: int = 4
    plus: bool = False

    def __call__(self, fn, params, tokens, prompt, attn_impl):
        """-> the Prompt with every layer's `obs.token_scores` [B, K, T] set."""
        if len(prompt.groups) != 1:
            raise ValueError("KVzip's repeat pass needs every layer to see the whole prompt "
                             "(no hidden-state pruning)")
        group = prompt.groups[0]
        view = group.views()
        store = full_store(view)
        n_layers, b, n_kv, _, h = view.k.shape
        cache = KVCache(store=store, tail=init_tail(n_layers, b, n_kv, 0, h, view.k.dtype),
                        next_pos=prompt.next_pos)
        store = dataclasses.replace(store, extra=jnp.zeros(store.k.shape[:3] + (1,),
                                                           jnp.float32))
        t = group.positions.shape[1]
        for i in range(n_chunks(t, self.repeat.prefix_length, self.chunk_size)):
            ids, n_new = repeat_ids(tokens, group.lengths, self.repeat, i, self.chunk_size)
            hook = RepeatScoring(chunk=i, chunk_size=self.chunk_size,
                                 prefix_length=self.repeat.prefix_length,
                                 n_sink=self.n_sink, plus=self.plus)
            c = dataclasses.replace(cache, store=store, hook=hook)
            _, c = fn.decode(params, ids, n_new, c, attn_impl=attn_impl)
            store = c.store
        idx, _ = jax.vmap(lambda l: slot_index(store, l, t))(jnp.arange(store.n_layers))
        scores = jax.vmap(lambda i: gather_rows(store.extra, i)[..., 0])(idx)  # [L, B, K, T]
        obs = dataclasses.replace(group.layers.obs, token_scores=scores)
        layers = dataclasses.replace(group.layers, obs=obs)
        return dataclasses.replace(prompt, groups=(dataclasses.replace(group, layers=layers),))


def check_context(n_context: int, repeat: RepeatPrompt) -> None:
    """Raise ValueError when a context has nothing to repeat after the template prefix."""
    if n_context <= repeat.prefix_length:
        raise ValueError(f"context of {n_context} tokens has nothing after the chat template's "
                         f"{repeat.prefix_length}-token prefix for KVzip to repeat")
