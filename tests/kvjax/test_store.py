"""The one cache store: every press's table packs its segments exactly, the block-walking jnp
decode path equals the dense spec, allocators never exceed the valid counts, kept_positions,
column sums that honour a sliding window, and clear errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.attention import cached_attention_reference
from kvjax.cache import KVStore, Tail, layer_view
from kvjax.presses import PRESSES, make_press
from kvjax.presses.parts import StaticSize
from kvjax.store_attention import store_attention
from kvjax.writer import aligned_slots

LENGTHS = (57, 40)


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=101)
    return models.Decoder(cfg, rngs=nnx.Rngs(4))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(0)
    return [list(rng.randint(0, 101, n)) for n in LENGTHS]


def _prefill(model, prompts, press):
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts(prompts)
    return loops.prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                         tail_capacity=8, press=press)[1]


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_segments_are_packed_and_sized_by_the_static_bound(model, prompts, name):
    press = make_press(name, 0.6, **PRESSES[name][1])
    cache = _prefill(model, prompts, press)
    st = cache.store
    off, length = np.asarray(st.offset), np.asarray(st.length)  # [B, L, K]
    b, n_layers, n_kv = length.shape
    flat_len = length.reshape(b, -1)  # (layer, head) order, one row
    bound = press.capacity(StaticSize.prompt((64,) * n_layers, n_kv), n_kv)
    for r in range(b):  # segments never overlap and stay inside the row
        ends = sorted(zip(off[r].ravel(), off[r].ravel() + length[r].ravel()))
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(ends, ends[1:]))
        assert ends[-1][1] <= st.slots
    if n_layers * n_kv * st.max_segment > st.slots:  # uneven budgets: packed end to end
        np.testing.assert_array_equal(off.reshape(b, -1), np.cumsum(flat_len, 1) - flat_len)
    assert st.slots == aligned_slots(bound.total) and st.rows == 1
    assert flat_len.sum(1).max() <= bound.total and length.max() <= st.max_segment
    # the longest prompt fills the store up to the bucket's rounding (64 vs 57 tokens); ThinK
    # moves the recent window (8 per segment) to the tail, below the token press's bound
    moved = n_layers * n_kv * 8 if name == "think" else 0
    fill = (flat_len.sum(1)[0] + moved) / st.slots
    assert fill >= 0.8 * 57 / 64, fill
    # every valid slot holds the entry kept_positions reports, in ascending position order
    for layer in range(n_layers):
        kept = kvjax.kept_positions(cache, layer)
        for r in range(b):
            for h in range(n_kv):
                seg = np.asarray(st.pos[r, 0, off[r, layer, h]:off[r, layer, h]
                                        + length[r, layer, h]])
                assert (np.diff(seg) > 0).all()
                assert set(seg.tolist()) <= set(kept[r][h].tolist())


def test_memory_report_counts_store_and_tail(model, prompts):
    cache = kvjax.generate(model, prompts, max_new_tokens=5,
                           press=kvjax.SnapKVPress(compression_ratio=0.5, window_size=8)).cache
    rep = kvjax.memory_report(cache)
    h = cache.store.k.shape[-1]
    kept = sum(math.ceil(n / 2) for n in LENGTHS) * 3 * 3  # rows x layers x kv heads
    assert rep.prefix_tokens == tuple(sum(math.ceil(n / 2) for n in LENGTHS) * 3
                                      for _ in range(3))
    assert rep.prefix_kv_bytes_needed == kept * h * 4 * 2
    assert rep.kv_bytes_needed == rep.prefix_kv_bytes_needed + 5 * 2 * 3 * 3 * h * 4 * 2
    assert rep.prefix_kv_bytes_held == cache.store.k.nbytes + cache.store.v.nbytes
    assert rep.prefix_overhead == rep.prefix_kv_bytes_held / rep.prefix_kv_bytes_needed


def test_kept_positions_of_the_full_cache_after_decoding(model, prompts):
    out = kvjax.generate(model, prompts, max_new_tokens=6)
    for layer in range(3):
        for r, n in enumerate(LENGTHS):
            for kept in kvjax.kept_positions(out.cache, layer)[r]:
                assert kept.tolist() == list(range(n + 6))  # every sampled token is fed back


def _random_store(rng, b, n_kv, lengths, d=16, dv=16, rows=1, thin=False):
    """A store with segment sizes `lengths` [B, L, K] and random contents, packed per row."""
    length = np.asarray(lengths, np.int32)
    n_layers = length.shape[1]
    per_row = n_kv // rows
    x = length.reshape(b, n_layers, rows, per_row).transpose(0, 2, 1, 3).reshape(b, rows, -1)
    off = (np.cumsum(x, -1) - x).reshape(b, rows, n_layers, per_row).transpose(0, 2, 1, 3)
    slots = aligned_slots(int(x.sum(-1).max()) + 5)
    k = rng.randn(b, rows, slots, d).astype(np.float32)
    v = rng.randn(b, rows, slots, dv).astype(np.float32)
    pos = rng.randint(0, 300, (b, rows, slots)).astype(np.int32)
    ch = None
    if thin:
        ch = np.stack([np.sort(rng.choice(16, d, replace=False)) for _ in
                       range(b * n_layers * n_kv)]).reshape(b, n_layers, n_kv, d)
    return KVStore(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos),
                   offset=jnp.asarray(off.reshape(b, n_layers, n_kv), jnp.int32),
                   length=jnp.asarray(length), max_segment=int(length.max()) or 1,
                   channels=None if ch is None else jnp.asarray(ch, jnp.int32))


@pytest.mark.parametrize("window", [None, 40])
@pytest.mark.parametrize("rows, thin, t", [(1, False, 1), (3, False, 1), (1, True, 1),
                                           (1, False, 5)])
def test_block_walk_equals_dense_spec(window, rows, thin, t):
    rng = np.random.RandomState(7)
    b, n_kv, g = 2, 3, 2
    lengths = rng.randint(0, 300, (b, 2, n_kv))
    lengths[0, 1, 2] = 0  # an empty segment
    store = _random_store(rng, b, n_kv, lengths, d=8 if thin else 16, rows=rows, thin=thin)
    s = 6
    tail = Tail(k=jnp.asarray(rng.randn(b, n_kv, s, 16), jnp.float32),
                v=jnp.asarray(rng.randn(b, n_kv, s, 16), jnp.float32),
                pos=jnp.asarray(300 + np.arange(s)[None].repeat(b, 0), jnp.int32),
                count=jnp.array([4, 6], jnp.int32))
    q = jnp.asarray(rng.randn(b, t, n_kv * g, 16), jnp.float32)
    q_pos = jnp.asarray(300 + 6 - t + np.arange(t)[None].repeat(b, 0), jnp.int32)
    for layer in range(2):
        want = cached_attention_reference(q, q_pos, layer_view(store, layer), tail,
                                          sliding_window=window)
        got = store_attention(q, q_pos, store, layer, tail, sliding_window=window, block=32)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
        traced = jax.jit(lambda l: store_attention(q, q_pos, store, l, tail,
                                                   sliding_window=window, block=32))
        np.testing.assert_allclose(np.asarray(traced(layer)), np.asarray(want), atol=2e-5)


ALLOCATORS = {
    "uniform": lambda: kvjax.SnapKVPress(compression_ratio=0.7).allocator(),
    "pyramid": lambda: kvjax.PyramidKVPress(compression_ratio=0.7, window_size=4).allocator(),
    "zigzag": lambda: kvjax.ZigZagKVPress(compression_ratio=0.7, window_size=4,
                                          profile=(1.0, 5.0, 1.0)).allocator(),
    "uncomp": lambda: kvjax.UNCompPress(compression_ratio=0.7, groups=3).allocator(),
}


@pytest.mark.parametrize("name", list(ALLOCATORS))
def test_budgets_never_exceed_valid_counts_or_static_bounds(name):
    alloc = ALLOCATORS[name]()
    rng = np.random.RandomState(0)
    for _ in range(5):
        n = rng.randint(1, 200, size=2)
        n_valid = jnp.asarray(np.broadcast_to(n[:, None, None], (2, 3, 3)), jnp.int32)
        budgets = np.asarray(alloc.budgets(n_valid, None, jnp.asarray(n, jnp.int32)))
        assert (budgets >= 0).all() and (budgets <= np.asarray(n_valid)).all()
        bound = alloc.capacity(StaticSize.prompt((200,) * 3, 3), 3)
        assert budgets.sum(axis=(1, 2)).max() <= bound.total
        assert (budgets.max(axis=(0, 2)) <= np.asarray(bound.segments)).all()


def test_column_sums_honour_the_sliding_window():
    """H2O scores of a Mistral-style layer whose window is shorter than the prompt equal a
    dense numpy softmax that applies the window (the first version dropped it)."""
    rng = np.random.RandomState(3)
    b, t, n, n_kv, h, window = 2, 40, 4, 2, 16, 8
    q = rng.randn(b, t, n, h).astype(np.float32)
    k = rng.randn(b, t, n_kv, h).astype(np.float32)
    v = rng.randn(b, t, n_kv, h).astype(np.float32)
    lengths = np.array([40, 29])
    want = np.zeros((b, n, t))
    for bi in range(b):
        for hi in range(n):
            s = q[bi, :, hi] @ k[bi, :, hi // (n // n_kv)].T / np.sqrt(h)
            i, j = np.arange(t)[:, None], np.arange(t)[None]
            ok = (j <= i) & (i - j < window) & (j < lengths[bi]) & (i < lengths[bi])
            p = np.where(ok, np.exp(s - np.where(ok, s, -np.inf).max(1, keepdims=True)), 0)
            want[bi, hi] = (p / np.maximum(p.sum(1, keepdims=True), 1e-30)).sum(0)
    spec = kvjax.ObsSpec(column_sums=True)
    for impl in ("reference", "pallas_tpu"):
        _, layer = kvjax.prefill_layer(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                       jnp.asarray(lengths), sliding_window=window,
                                       obs_spec=spec, attn_impl=impl)
        np.testing.assert_allclose(np.asarray(layer.obs.column_sums), want, atol=2e-5)


@pytest.mark.parametrize("make, match", [
    (lambda: kvjax.ZigZagKVPress(compression_ratio=0.5, scorer=kvjax.SnapKVPress), "scorer="),
    (lambda: kvjax.UNCompPress(compression_ratio=0.5, scorer="snapkv"), "scorer='snapkv'"),
    (lambda: kvjax.AdaKVPress(press=kvjax.ZigZagKVPress(compression_ratio=0.5)),
     "needs a ScorerPress"),
    (lambda: kvjax.ThinKPress(press=kvjax.ThinKPress()), "already prunes channels"),
    (lambda: kvjax.ThinKPress(press=kvjax.UNCompPress(compression_ratio=0.5,
                                                      prefill_keep=(None, 32, 32))),
     "hidden-state pruning"),
    (lambda: kvjax.ComposedPress(presses=(kvjax.UNCompPress(decode="ring"),
                                          kvjax.UNCompPress(decode="ring"))),
     "both bring a decode_hook"),
    (lambda: kvjax.UNCompPress(compression_ratio=0.5, prefill_keep=(None, 32),
                               scorer=kvjax.SnapKVPress(window_size=64)), "prune_window"),
    (lambda: kvjax.UNCompPress(compression_ratio=0.5, prefill_keep=(16, 32)),
     r"prefill_keep\[0\]"),
    (lambda: kvjax.make_press("zigzagkv", 1.0), "compression_ratio=1.0"),
])
def test_bad_combinations_are_refused_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("inner", ["snapkv", "pyramidkv"])
def test_think_store_holds_no_room_for_the_window_it_moves(model, inner):
    """ThinK moves the recent window (which SnapKV always keeps) to the tail, so the store is
    sized without it: held / needed stays at the alignment, and the kept positions (store +
    tail) are exactly those of the token press run alone."""
    prompt = [list(np.random.RandomState(1).randint(0, 101, 64))]
    token = make_press(inner, 0.5, window_size=8)
    think = kvjax.ThinKPress(key_channel_compression_ratio=0.5, window_size=8, press=token)
    alone, thin = _prefill(model, prompt, token), _prefill(model, prompt, think)
    rep = kvjax.memory_report(thin)
    assert rep.prefix_overhead <= 1.0 + 8 / max(1, rep.store_slots), rep
    for layer in range(thin.n_layers):
        for h in range(thin.store.n_kv_heads):
            want = kvjax.kept_positions(alone, layer)[0][h]
            np.testing.assert_array_equal(kvjax.kept_positions(thin, layer)[0][h], want)


def test_full_store_holds_every_prompt_entry(model, prompts):
    """`writer.full_store` (KVzip's repeat pass builds its cache with it) equals the store the
    full-cache compression writes, and every segment holds the prompt's own keys and values."""
    from kvjax.compress import compress
    from kvjax.observation import ObsSpec
    from kvjax.prefill import prefill_prompt
    from kvjax.writer import full_store
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts(prompts)
    _, prompt = prefill_prompt(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                               obs_spec=ObsSpec())
    view = prompt.groups[0].views()
    st, ref = full_store(view), compress(None, prompt, tail_capacity=0).store
    for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert st.max_segment == ref.max_segment and st.slots == ref.slots
    k, off = np.asarray(view.k), np.asarray(st.offset)
    for r, n in enumerate(LENGTHS):
        for layer in range(k.shape[0]):
            for h in range(k.shape[2]):
                seg = np.asarray(st.k[r, 0, off[r, layer, h]:off[r, layer, h] + n])
                np.testing.assert_array_equal(seg, k[layer, r, h, :n])
