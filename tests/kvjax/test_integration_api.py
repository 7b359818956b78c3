"""The integration API on a decoder we did not write for it: a GPT-J-style block (parallel
attention and MLP, LayerNorm, partial rotary) wired to kvjax with prefill_layer/decode_layer.
Full-cache logits equal a plain dense reference of the same decoder; every registered press
runs on it inside jit and keeps the
entries its budget gives (a hand count), in a store smaller than the full cache's."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.presses import PRESSES, make_press, press_names
from models.functional import split_model

V, D, N, K, H, L = 67, 48, 4, 2, 12, 2


INV_FREQ = 1.0 / 10000 ** (np.arange(0, H, 2) / H)


def rope(x, pos):  # rotary on all H channels, interleaved pairs (not Llama's rotate-half)
    inv = jnp.asarray(INV_FREQ)
    ang = pos[..., None, None] * inv  # [B, T, 1, H/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * jnp.cos(ang) - x2 * jnp.sin(ang),
                     x1 * jnp.sin(ang) + x2 * jnp.cos(ang)], -1)
    return out.reshape(x.shape)


class ParallelBlock(nnx.Module):
    def __init__(self, rngs):
        self.ln = nnx.LayerNorm(D, rngs=rngs)
        self.qkv = nnx.Linear(D, (N + 2 * K) * H, rngs=rngs)
        self.out = nnx.Linear(N * H, D, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(D, 2 * D, rngs=rngs), nnx.Linear(2 * D, D, rngs=rngs)

    def qkv_heads(self, x, pos):
        """Post-RoPE q [B, T, N, H], k, v [B, T, K, H] and pre-RoPE q."""
        b, t, _ = x.shape
        q, k, v = jnp.split(self.qkv(x), [N * H, (N + K) * H], axis=-1)
        q = q.reshape(b, t, N, H)
        return rope(q, pos), rope(k.reshape(b, t, K, H), pos), v.reshape(b, t, K, H), q


class ForeignDecoder(nnx.Module):
    max_seq_len = 256

    def __init__(self, rngs):
        self.emb = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([ParallelBlock(rngs) for _ in range(L)])
        self.ln_f = nnx.LayerNorm(D, rngs=rngs)

    def _run(self, tokens, pos, per_layer):
        h = self.emb(tokens)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk.ln(h)
            q, k, v, q_pre = blk.qkv_heads(x, pos)
            o, extra = per_layer(i, q, k, v, q_pre, x)
            outs.append(extra)
            h = h + blk.out(o.reshape(*o.shape[:2], -1)) + blk.fc2(jax.nn.gelu(blk.fc1(x)))
        return self.ln_f(h) @ self.emb.embedding[...].T, outs

    def prefill(self, tokens, lengths, *, obs_spec=kvjax.ObsSpec(), attn_impl="auto",
                between=None, all_logits=False):
        if between is not None:
            raise ValueError("this decoder does not support between-layers hooks")
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

        def attend(i, q, k, v, q_pre, x):
            return kvjax.prefill_layer(q, k, v, lengths, obs_spec=obs_spec,
                                       attn_impl=attn_impl, q_prerope=q_pre,
                                       rope_inv_freq=INV_FREQ, rope_interleaved=True,
                                       hidden=x)

        logits, layers = self._run(tokens, pos, attend)
        if not all_logits:
            logits = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], 1)[:, 0]
        return logits, kvjax.single_group(layers, lengths)

    def decode(self, tokens, n_new, cache, *, attn_impl="auto"):
        pos, cache = kvjax.begin_decode(cache, tokens.shape[1], n_new)
        box = [cache]  # a Python loop over layers (no scan) threads the cache by hand

        def attend(i, q, k, v, q_pre, x):
            o, box[0] = kvjax.decode_layer(q, k, v, pos, n_new, box[0], i, attn_impl=attn_impl,
                                           hidden=x, out_proj=self.blocks[i].out.kernel[...])
            return o, None

        logits, _ = self._run(tokens, pos, attend)
        return logits, box[0]

    def kvjax_split(self):
        return split_model(self, self.max_seq_len)


def plain_reference(model, tokens):
    """The same decoder with a dense causal softmax, no kvjax involved."""
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def attend(i, q, k, v, q_pre, x):
        g = N // K
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        s = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(H)
        t = tokens.shape[1]
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
        return jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(s, -1), v), None

    return model._run(tokens, pos, attend)[0]


@pytest.fixture(scope="module")
def foreign():
    return ForeignDecoder(nnx.Rngs(0))


def test_full_cache_logits_equal_plain_reference(foreign):
    ids = jnp.asarray(np.random.RandomState(0).randint(0, V, (2, 20)))
    logits, _ = foreign.prefill(ids, jnp.array([20, 20]), all_logits=True)
    ref = plain_reference(foreign, ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=1e-5)
    _, prompt = foreign.prefill(ids[:, :12], jnp.array([12, 12]))
    cache = kvjax.compress(None, prompt, tail_capacity=8)
    step, cache = foreign.decode(ids[:, 12:16], jnp.array([4, 4]), cache)
    np.testing.assert_allclose(np.asarray(step), np.asarray(ref[:, 12:16]), atol=1e-5)


@pytest.mark.parametrize("name", press_names())
def test_every_press_runs_in_jit_on_foreign_decoder(foreign, name):
    press = make_press(name, 0.5, **PRESSES[name][1])
    prompts = [list(np.random.RandomState(1).randint(0, V, 40)),
               list(np.random.RandomState(2).randint(0, V, 29))]
    out = kvjax.generate(foreign, prompts, max_new_tokens=4, press=press)
    assert out.lengths.tolist() == [4, 4]
    for row, prompt in enumerate(prompts):  # prompt entries kept, over every layer and head
        n = len(prompt)
        kept = sum(int((np.asarray(head) < n).sum()) for layer in range(L)
                   for head in kvjax.kept_positions(out.cache, layer)[row])
        lo, hi = expected_kept(press, n)
        assert lo <= kept <= hi, (name, row, kept, lo, hi)
    full = kvjax.generate(foreign, prompts, max_new_tokens=4)
    held, full_held = (kvjax.memory_report(c).prefix_kv_bytes_held for c in (out.cache,
                                                                           full.cache))
    # the store is sized by the press's bound on the 64-token bucket (rounded up per segment)
    assert held <= (1 - press.compression_ratio + 0.05) * full_held, (held, full_held)


def expected_kept(press, n):
    """(min, max) prompt entries one sequence keeps over L layers and K heads, by hand: a
    fixed per-head budget keeps ceil(n * (1 - r)) per head; a press that moves budget between
    heads or layers keeps the same total up to rounding, ceil(L * K * n * (1 - r)); a
    composed press applies each inner press to what the previous one kept."""
    if isinstance(press, kvjax.ComposedPress):
        m = n
        for inner in press.presses:
            m = math.ceil(m * (1 - inner.compression_ratio))
        return L * K * m, L * K * m
    keep = 1 - press.compression_ratio
    return math.ceil(L * K * n * keep), L * K * math.ceil(n * keep)


def test_averaged_rotation_matches_explicit_interleaved_rope():
    """ExpectedAttention's mean rotation, interleaved convention, against rotating a vector."""
    from kvjax.presses.expected_attention import averaged_rotation
    x = jnp.asarray(np.random.RandomState(0).randn(1, 1, 1, H).astype(np.float32))
    start, f = 5, 7
    explicit = np.mean([np.asarray(rope(x, jnp.array([[start + i]])))[0, 0, 0]
                        for i in range(f)], axis=0)
    rot = averaged_rotation(jnp.asarray(INV_FREQ, jnp.float32), jnp.array([start]), f,
                            interleaved=True)
    np.testing.assert_allclose(np.asarray(rot[0] @ x[0, 0, 0]), explicit, atol=1e-5)


def test_a_decoder_that_declares_no_between_layers_hook_refuses_hidden_state_pruning(foreign):
    """This decoder accepts `between=` and ignores it (as notebook 03's does): UNComp's
    prefill_keep is refused by name before anything runs (kvjax.model)."""
    press = kvjax.UNCompPress(compression_ratio=0.5, window_size=8, prefill_keep=(None, 20))
    with pytest.raises(ValueError, match="does not declare"):
        kvjax.generate(foreign, [list(range(1, 41))], max_new_tokens=2, press=press)
