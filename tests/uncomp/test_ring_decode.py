"""Decode over the store's segments: UNComp's tail mode reads the packed one-row store like a
per-head layout; ring decode (`kvjax.presses.ring.RingDecode`) equals a numpy re-implementation over
any allocator's table (uniform SnapKV, AdaKV, ZigZagKV, PyramidKV, UNComp head groups) and
keeps every segment at exactly its length."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.cache import KVCache, KVStore, Tail
from kvjax.compress import static_prompt_size
from kvjax.presses.ring import RingDecode
from kvjax.presses.uncomp import UNCompPress
from kvjax.uncomp.calibration import UNCompCalibration
from kvjax.writer import aligned_slots

GROUPS = (((1, 2), (0,)), ((0, 2), (1,)), ((0, 1), (2,)))


@pytest.fixture(scope="module")
def tiny():
    cfg = models.ModelConfig.tiny(n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=101)
    return models.Decoder(cfg, rngs=nnx.Rngs(5))


def _press(tiny, **kw):
    cal = UNCompCalibration(version=1, model_signature=(3, 6, 3, tiny.config.head_dim),
                            head_groups=GROUPS, head_entropy=((0.0,) * 3,) * 3,
                            layer_entropy=(0.0,) * 3, stages=(0,))
    return UNCompPress(compression_ratio=0.6, calibration=cal, window_size=4, **kw)


def _prompts():
    rng = np.random.RandomState(0)
    toks, lens = loops.pad_prompts([list(rng.randint(1, 101, n)) for n in (60, 41)])
    return jnp.asarray(toks), jnp.asarray(lens)


def head_rows(n_kv, rows):
    return np.arange(n_kv) // (n_kv // rows)


def numpy_segments(store: KVStore, layer: int):
    """Independent gather of a layer's segments: dict of k, v [B, K, M, D], pos [B, K, M],
    length [B, K] and rows [B, K, G*W, M] (the ring's per-slot state), zero padded."""
    off, ln = np.asarray(store.offset[:, layer]), np.asarray(store.length[:, layer])
    b_, n_kv = ln.shape
    m, rows = store.max_segment, head_rows(n_kv, store.rows)
    arrays = {"k": store.k, "v": store.v, "pos": store.pos}
    if store.extra is not None:
        arrays["extra"] = store.extra
    out = {n: np.zeros((b_, n_kv, m) + x.shape[3:], np.asarray(x).dtype)
           for n, x in arrays.items()}
    for b, h in np.ndindex(b_, n_kv):
        for n, x in arrays.items():
            out[n][b, h, :ln[b, h]] = np.asarray(x)[b, rows[h], off[b, h]:off[b, h] + ln[b, h]]
    out["length"] = ln
    return out


def ring_rows(seg, g, w):
    """[B, K, M, G*W] per-slot state -> the ring's rows [B, K, G, W, M]."""
    b, k, m, _ = seg["extra"].shape
    return seg["extra"].reshape(b, k, m, g, w).transpose(0, 1, 3, 4, 2)


TIE = 1e-5  # relative: scores this close are a tie (max-pooling plateaus tie exactly)


def _keep_sets(s, n):
    """Every n-subset of slots that is a top-n of the scores s [count] up to ties."""
    order = np.argsort(-s, kind="stable")
    if n == 0:
        return [np.zeros(0, int)]
    if n >= len(s):
        return [np.arange(len(s))]
    edge = s[order[n - 1]]
    close = lambda x: np.isclose(x, edge, rtol=TIE, atol=1e-12) | (x == edge)
    above = [i for i in order[:n] if not close(s[i])]
    tied = [i for i in range(len(s)) if close(s[i])]
    return [np.sort(np.array(above + list(c), int))
            for c in itertools.combinations(tied, n - len(above))]


def numpy_ring_head(q, k, v, pos, n_new, seg, r, kernel, scale, window=None):
    """Independent re-implementation for one (sequence, kv head), with Python lists.

    q [T, G, H], k, v [T, H], pos [T]; seg: its entries (keys, vals, ps) and r [G, W, n] the
    ring of the last W queries' attention rows. Each new token joins the segment, attends over
    it in one softmax (a sliding `window` masks old positions), its attention row enters the
    ring, and the segment keeps its `n` best slots: the newest W always (the newest first when
    n < W), the rest by the ring's mean attention max-pooled over `kernel` slots and averaged
    over the G query heads.

    Returns every trajectory that ties allow: (outs [T', G, Dv], keys, vals, ps, rows).
    """
    n, w = len(seg[0]), r.shape[1]
    branches = [([], list(seg[0]), list(seg[1]), list(seg[2]), r)]
    for t in range(n_new):
        nxt = []
        for outs, keys, vals, ps, ring in branches:
            keys, vals, ps = keys + [k[t]], vals + [v[t]], ps + [pos[t]]
            logits = np.array(keys) @ q[t].T * scale  # [count, G]
            seen = np.ones(len(keys), bool) if window is None else (
                pos[t] - np.array(ps) < window)
            logits = np.where(seen[:, None], logits, -np.inf)
            p = np.exp(logits - logits.max(0))
            p = (p / p.sum(0)).T  # [G, count]
            out = p @ np.array(vals)
            r2 = np.concatenate([np.pad(ring[:, 1:], ((0, 0), (0, 0), (0, 1))), p[:, None]], 1)
            count = len(keys)
            recent = np.arange(count) >= count - w
            sc = np.where(recent, 0.0, r2.mean(1))  # [G, count]
            padded = np.pad(sc, ((0, 0), (kernel // 2,) * 2), constant_values=-np.inf)
            sc = np.stack([padded[:, i:i + count] for i in range(kernel)]).max(0).mean(0)
            # the newest W stay first, newer before older (a segment shorter than W keeps
            # its most recent entries)
            sc = np.where(recent, 2.0 + np.arange(count) / count, sc)
            for keep in _keep_sets(sc, n):  # exactly `n` stay
                nxt.append((outs + [out], [keys[i] for i in keep], [vals[i] for i in keep],
                            [ps[i] for i in keep], r2[:, :, keep]))
        branches = nxt
    return branches


def outside_layer(store: KVStore, layer: int) -> np.ndarray:
    """[B, R, P] True on the slots that are not in layer `layer`'s segments."""
    mask = np.ones(store.pos.shape, bool)
    off, ln = np.asarray(store.offset[:, layer]), np.asarray(store.length[:, layer])
    rows = head_rows(store.n_kv_heads, store.rows)
    for b, h in np.ndindex(ln.shape):
        mask[b, rows[h], off[b, h]:off[b, h] + ln[b, h]] = False
    return mask


def check_ring_layer(cache, layer, hook, q, k, v, positions, n_new, scale, window=None):
    """Run `hook.decode_layer` on one layer of `cache` (all tokens in one call) and compare
    every (sequence, kv head) with `numpy_ring_head` (one of its tie-allowed trajectories):
    outputs, kept entries in order, ring rows; each segment keeps its length, and the table
    and every slot outside the layer's segments stay as they were."""
    b, t, n, h = q.shape
    n_kv = cache.store.n_kv_heads
    g, w = n // n_kv, hook.window_size
    before = numpy_segments(cache.store, layer)
    rows = ring_rows(before, g, w)
    run = jax.jit(lambda q, k, v, p, nn, c: hook.decode_layer(
        q, k, v, p, nn, c, layer, scale=scale, sliding_window=window))
    out, new = run(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)),
                   jnp.asarray(positions, jnp.int32), jnp.asarray(n_new, jnp.int32), cache)
    out = np.asarray(out).reshape(b, t, n_kv, g, -1)
    after = numpy_segments(new.store, layer)
    new_rows = ring_rows(after, g, w)
    np.testing.assert_array_equal(np.asarray(new.store.offset), np.asarray(cache.store.offset))
    np.testing.assert_array_equal(np.asarray(new.store.length), np.asarray(cache.store.length))
    qg = q.reshape(b, t, n_kv, g, h)
    for bi, kh in np.ndindex(b, n_kv):
        m = before["length"][bi, kh]
        seg = (before["k"][bi, kh, :m], before["v"][bi, kh, :m], before["pos"][bi, kh, :m])
        branches = numpy_ring_head(qg[bi, :, kh], k[bi, :, kh], v[bi, :, kh], positions[bi],
                                   n_new[bi], seg, rows[bi, kh, :, :, :m], hook.kernel_size,
                                   scale, window)
        got_pos = after["pos"][bi, kh, :m]
        match = [br for br in branches if np.array_equal(np.array(br[3], int), got_pos)]
        assert match, (f"sequence {bi} kv head {kh}: kept {got_pos.tolist()}, numpy allows "
                       f"{[np.array(br[3]).tolist() for br in branches]}")
        # tied evictions in another order end with the same entries but different outputs on
        # the way: the trajectory is the one whose outputs match (else the first, to report)
        same = [br for br in match if not n_new[bi] or np.allclose(
            out[bi, :n_new[bi], kh], np.array(br[0]), atol=1e-5)]
        outs, keys, vals, _, r = (same or match)[0]
        msg = f"sequence {bi} kv head {kh}"
        if n_new[bi]:
            np.testing.assert_allclose(out[bi, :n_new[bi], kh], np.array(outs), atol=1e-5,
                                       err_msg=msg)
        if m:
            np.testing.assert_allclose(after["k"][bi, kh, :m], np.array(keys), atol=1e-6,
                                       err_msg=msg)
            np.testing.assert_allclose(after["v"][bi, kh, :m], np.array(vals), atol=1e-6,
                                       err_msg=msg)
        np.testing.assert_allclose(new_rows[bi, kh, :, :, :m], r, atol=1e-6, err_msg=msg)
    keep = outside_layer(cache.store, layer)
    for name in ("k", "v", "pos", "extra"):
        np.testing.assert_array_equal(np.asarray(getattr(new.store, name))[keep],
                                      np.asarray(getattr(cache.store, name))[keep],
                                      err_msg=f"{name} outside layer {layer}")
    return new


def synthetic_cache(rng, b, kg, g, h, lengths, w, rows=1):
    """A 3-layer store of `rows` rows with the given [B, L, K] lengths, segments in shuffled
    order with free slots between them, random ring rows (zero past each segment), and an
    empty tail: what RingDecode decodes over."""
    n_layers = lengths.shape[1]
    offset = np.zeros_like(lengths)
    end = 0
    for bi in range(b):
        for r in range(rows):
            cur = 0
            segs = [(l, hh) for l in range(n_layers) for hh in range(kg)
                    if head_rows(kg, rows)[hh] == r]
            for i in rng.permutation(len(segs)):
                l, hh = segs[i]
                cur += int(rng.integers(0, 3))
                offset[bi, l, hh] = cur
                cur += lengths[bi, l, hh]
            end = max(end, cur)
    p = end + 5
    extra = rng.dirichlet(np.ones(8), size=(b, rows, p, g * w))[..., 0]
    store = KVStore(k=jnp.asarray(rng.normal(size=(b, rows, p, h)), jnp.float32),
                    v=jnp.asarray(rng.normal(size=(b, rows, p, h)), jnp.float32),
                    pos=jnp.asarray(rng.integers(0, 30, (b, rows, p)), jnp.int32),
                    offset=jnp.asarray(offset, jnp.int32), length=jnp.asarray(lengths, jnp.int32),
                    extra=jnp.asarray(extra, jnp.float32), max_segment=int(lengths.max()))
    tail = Tail(k=jnp.zeros((n_layers, b, kg, 0, h)), v=jnp.zeros((n_layers, b, kg, 0, h)),
                pos=jnp.zeros((b, 0), jnp.int32), count=jnp.zeros(b, jnp.int32))
    return KVCache(store=store, tail=tail, next_pos=jnp.full((b,), 30, jnp.int32))


@pytest.mark.parametrize("window", [None, 33], ids=["full", "sliding33"])
@pytest.mark.parametrize("rows", [1, 2], ids=["rows1", "rowsK"])
def test_ring_decode_equals_numpy_reference(rows, window):
    """Ragged segments (10, 10 / 7, 9 in the decoded layer, down to 1 and 0 elsewhere) of a
    shuffled store: outputs, kept entries and ring rows equal numpy; the other layers'
    slots are untouched; every segment keeps exactly its length."""
    rng = np.random.default_rng(0)
    b, t, kg, g, h, w = 2, 6, 2, 3, 8, 4
    lengths = np.array([[[3, 1], [10, 10], [0, 5]], [[2, 6], [7, 9], [4, 4]]])  # [B, L, K]
    cache = synthetic_cache(rng, b, kg, g, h, lengths, w, rows)
    q, k, v = (rng.normal(size=s) for s in ((b, t, kg * g, h), (b, t, kg, h), (b, t, kg, h)))
    positions = 30 + np.tile(np.arange(t), (b, 1))
    hook = RingDecode(window_size=w, kernel_size=3, pooling="max")
    for layer in (1, 0):  # a layer with a one-slot segment and one of length 0's neighbour
        check_ring_layer(cache, layer, hook, q, k, v, positions, np.array([6, 4]), 0.4, window)


def test_ring_ignores_the_state_past_a_segment():
    """With W = 2 and a 7-wide pooling the last non-recent slots' pooled scores reach past the
    segment (every segment of layer 1 is shorter than the view); the slots there belong to
    other segments (here holding rows of 100) and must count as absent, as in numpy. Also, in
    any configuration, a new token's column of the older ring rows must start at zero: the
    jnp ring takes it from the slot after the segment (test_ring_over_every_allocator_table
    sees that garbage in the stored rows whenever fewer than W tokens are decoded)."""
    rng = np.random.default_rng(0)
    b, t, kg, g, h, w = 2, 6, 2, 3, 8, 2
    lengths = np.array([[[3, 10], [8, 5], [0, 5]], [[2, 6], [7, 6], [4, 4]]])  # padded segments
    cache = synthetic_cache(rng, b, kg, g, h, lengths, w)
    extra = np.asarray(cache.store.extra).copy()
    extra[outside_layer(cache.store, 1)] = 100.0
    cache = dataclasses.replace(cache, store=dataclasses.replace(cache.store,
                                                                 extra=jnp.asarray(extra)))
    q, k, v = (rng.normal(size=s) for s in ((b, t, kg * g, h), (b, t, kg, h), (b, t, kg, h)))
    positions = 30 + np.tile(np.arange(t), (b, 1))
    check_ring_layer(cache, 1, RingDecode(window_size=w, kernel_size=7), q, k, v, positions,
                     np.array([6, 1]), 0.4)


# the same ring over every allocator's table (window 4 of the prompt observation)
TABLE_PRESSES = {
    "uniform_snapkv": kvjax.SnapKVPress(compression_ratio=0.6, window_size=4),
    "adakv": kvjax.AdaKVPress(press=kvjax.SnapKVPress(compression_ratio=0.6, window_size=4)),
    "zigzagkv": kvjax.ZigZagKVPress(compression_ratio=0.6, window_size=4),
    "pyramidkv": kvjax.PyramidKVPress(compression_ratio=0.6, window_size=4),
    "uncomp": None,  # _press(tiny, decode="ring"): needs the model's calibration signature
}


def _table_press(tiny, name):
    press = TABLE_PRESSES[name]
    if press is None:
        press = _press(tiny, decode="ring")
        return press, press.decode_hook
    return press, RingDecode(window_size=4, kernel_size=5)


def numpy_initial_rows(prompt, hook, layer):
    """The ring's initial rows [B, K, G, W, T] from the prompt alone: softmax attention of the
    last W prompt queries over every earlier prompt token (float64)."""
    group = prompt.groups[0]
    keys = np.asarray(group.layers.k[layer], np.float64)  # [B, K, T, H]
    qw = np.asarray(group.layers.obs.q_window[layer], np.float64)[:, -hook.window_size:]
    lengths = np.asarray(group.lengths)
    b, n_kv, t, h = keys.shape
    g = qw.shape[2] // n_kv
    out = np.zeros((b, n_kv, g, hook.window_size, t))
    for bi in range(b):
        for wi in range(hook.window_size):
            qp = lengths[bi] - hook.window_size + wi
            for hd in range(n_kv * g):
                s = keys[bi, hd // g, :qp + 1] @ qw[bi, wi, hd] / np.sqrt(h)
                p = np.exp(s - s.max())
                out[bi, hd // g, hd % g, wi, :qp + 1] = p / p.sum()
    return out


@pytest.mark.parametrize("name", list(TABLE_PRESSES))
def test_ring_over_every_allocator_table(tiny, name):
    """Prefill + compress with a press and RingDecode: the initial ring rows equal a numpy
    window attention at the kept slots, and W tokens through each layer (none in the second
    sequence, which must stay as it was) equal `numpy_ring_head` on that press's table."""
    press, hook = _table_press(tiny, name)
    fn, params = tiny.kvjax_split()
    toks, lens = _prompts()
    _, cache = loops.prefill(fn, params, toks, lens, tail_capacity=0, press=press, hook=hook)
    assert cache.hook == hook and cache.tail.capacity == 0
    length = np.asarray(cache.store.length)  # [B, L, K]
    if name in ("adakv", "uncomp"):  # per-head budgets
        assert (length.min(-1) < length.max(-1)).any()
    _, prompt = loops.prefill_prompt(fn, params, toks, lens,
                                     obs_spec=kvjax.compress_obs_spec(press, hook))
    g, w = 2, hook.window_size
    for layer in range(3):
        seg = numpy_segments(cache.store, layer)
        want = numpy_initial_rows(prompt, hook, layer)
        want = np.take_along_axis(want, seg["pos"][:, :, None, None, :], axis=4)
        ok = np.arange(seg["pos"].shape[-1]) < seg["length"][..., None]
        np.testing.assert_allclose(ring_rows(seg, g, w), want * ok[:, :, None, None],
                                   atol=1e-5, err_msg=f"initial rows of layer {layer}")
    rng = np.random.default_rng(1)
    b, t, n, h = 2, hook.window_size, 6, tiny.config.head_dim
    q, k, v = (rng.normal(size=s) for s in ((b, t, n, h), (b, t, 3, h), (b, t, 3, h)))
    positions = np.asarray(lens)[:, None] + np.arange(t)
    for layer in range(3):
        check_ring_layer(cache, layer, hook, q, k, v, positions, np.array([t, 0]),
                         1 / np.sqrt(h))


@pytest.mark.parametrize("name", ["adakv", "zigzagkv"])
def test_generate_with_ring_decode_over_another_press(tiny, name):
    """kvjax.generate(press=..., decoding_press=RingDecode()): the table never changes, no
    tail is held, and every segment ends with the last fed-back token."""
    press, hook = _table_press(tiny, name)
    toks, lens = _prompts()
    prompts = [list(np.asarray(toks[i, :n])) for i, n in enumerate(np.asarray(lens))]
    fn, params = tiny.kvjax_split()
    _, start = loops.prefill(fn, params, toks, lens, tail_capacity=0, press=press, hook=hook)
    out = kvjax.generate(tiny, prompts, max_new_tokens=12, press=press, decoding_press=hook)
    cache = out.cache
    assert cache.tail.capacity == 0 and cache.hook == hook
    np.testing.assert_array_equal(np.asarray(cache.store.length), np.asarray(start.store.length))
    for layer in range(3):
        for bi, heads in enumerate(kvjax.kept_positions(cache, layer)):
            for hi, pos in enumerate(heads):
                assert len(pos) == int(start.store.length[bi, layer, hi])
                assert pos.max() == int(lens[bi]) + 11  # the 12th token is fed back too


def test_tail_mode_store_equals_per_head_layout(tiny):
    """UNComp in tail mode: decoding over the packed one-row store (segments end to end)
    gives the logits of the same entries re-laid one row per kv head, each layer's segment
    at a fixed stride (built here with numpy), through multi-token and ragged extends."""
    fn, params = tiny.kvjax_split()
    toks, lens = _prompts()
    _, cache = loops.prefill(fn, params, toks, lens, tail_capacity=8, press=_press(tiny))
    assert cache.store.rows == 1 and cache.hook is None
    store, m = cache.store, cache.store.max_segment
    n_layers = store.n_layers
    segs = [numpy_segments(store, l) for l in range(n_layers)]
    per_head = KVStore(
        k=jnp.asarray(np.concatenate([s["k"] for s in segs], axis=2)),
        v=jnp.asarray(np.concatenate([s["v"] for s in segs], axis=2)),
        pos=jnp.asarray(np.concatenate([s["pos"] for s in segs], axis=2)),
        offset=jnp.broadcast_to(jnp.arange(n_layers, dtype=jnp.int32)[None, :, None] * m,
                                store.length.shape),
        length=store.length, max_segment=m)  # k [B, K, L*M, H]: R = K rows
    dense = dataclasses.replace(cache, store=per_head)
    dense = jax.tree.map(jnp.copy, dense)  # extend donates its cache
    steps = [(jnp.array([[5, 6, 7], [8, 9, 0]]), jnp.array([3, 2])),
             (jnp.array([[11], [12]]), jnp.array([1, 1])),
             (jnp.array([[13], [14]]), jnp.array([1, 0]))]
    for tokens, n_new in steps:
        got, cache = loops.extend(fn, params, tokens, n_new, cache, attn_impl="reference")
        want, dense = loops.extend(fn, params, tokens, n_new, dense, attn_impl="reference")
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    assert int(cache.tail.count[0]) == 5 and int(cache.tail.count[1]) == 3
    for layer in range(n_layers):
        for a, b in zip(kvjax.kept_positions(cache, layer), kvjax.kept_positions(dense, layer)):
            for pa, pb in zip(a, b):
                np.testing.assert_array_equal(pa, pb)


def test_ring_segments_keep_their_length_with_one_compilation(tiny):
    press = _press(tiny, decode="ring")
    toks, lens = _prompts()
    prompts = [list(np.asarray(toks[i, :n])) for i, n in enumerate(np.asarray(lens))]
    fn, params = tiny.kvjax_split()
    _, start = loops.prefill(fn, params, toks[:1], lens[:1], tail_capacity=0, press=press,
                             hook=press.decode_hook)
    out = kvjax.generate(tiny, prompts[:1], max_new_tokens=100, press=press)
    before = loops.decode._cache_size()
    out = kvjax.generate(tiny, prompts[:1], max_new_tokens=100, press=press)
    again = kvjax.generate(tiny, prompts[:1], max_new_tokens=70, press=press)
    assert loops.decode._cache_size() == before  # same bucket, traced max_new_tokens: no recompile
    assert int(out.lengths[0]) == 100 and int(again.lengths[0]) == 70
    cache = out.cache
    assert cache.tail.capacity == 0 and isinstance(cache.hook, RingDecode)
    length = np.asarray(cache.store.length)
    np.testing.assert_array_equal(length, np.asarray(start.store.length))  # budgets kept
    for layer in range(3):
        for hi, pos in enumerate(kvjax.kept_positions(cache, layer)[0]):
            assert len(pos) == length[0, layer, hi]
            assert pos.max() == 60 + 99  # every sampled token is fed back
    rep = kvjax.memory_report(cache)
    entry = tiny.config.head_dim * 4 * 2
    assert rep.kv_bytes_needed == rep.prefix_kv_bytes_needed == int(length.sum()) * entry
    assert rep.kv_bytes_held == rep.prefix_kv_bytes_held  # no tail at all
    size = static_prompt_size(press, (toks.shape[1],) * 3, 3)
    assert rep.prefix_kv_bytes_held == aligned_slots(size.total) * entry  # the static budgets


def test_ring_first_step_matches_tail_mode(tiny):
    """Ring mode attends over the segment and the new token in one softmax before it
    re-selects, so the first token's logits equal tail mode's; afterwards every segment has
    kept its length and holds the new token, with one older entry evicted."""
    fn, params = tiny.kvjax_split()
    toks, lens = _prompts()
    ring_press = _press(tiny, decode="ring")
    _, ring = loops.prefill(fn, params, toks, lens, tail_capacity=0, press=ring_press,
                            hook=ring_press.decode_hook)
    _, tail = loops.prefill(fn, params, toks, lens, tail_capacity=4,
                            press=dataclasses.replace(ring_press, decode="tail"))
    np.testing.assert_array_equal(np.asarray(ring.store.length), np.asarray(tail.store.length))
    before = [kvjax.kept_positions(ring, layer) for layer in range(3)]
    tokens = jnp.array([[7], [7]])
    a, ring = loops.extend(fn, params, tokens, jnp.array([1, 1]), ring, attn_impl="reference")
    b, tail = loops.extend(fn, params, tokens, jnp.array([1, 1]), tail, attn_impl="reference")
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for layer in range(3):
        for bi, heads in enumerate(kvjax.kept_positions(ring, layer)):
            for hi, pos in enumerate(heads):
                old = before[layer][bi][hi]
                assert len(pos) == len(old) and int(lens[bi]) in pos
                assert len(set(old) - set(pos)) == 1  # exactly one entry evicted


def test_hook_combinations(tiny):
    """What combines and what is refused before tracing, with a message naming both."""
    with pytest.raises(ValueError, match="decode="):
        UNCompPress(compression_ratio=0.5, decode="rings")
    toks, lens = _prompts()
    prompt = [list(np.asarray(toks[0, :60]))]
    merge = kvjax.DecodingPress(press=kvjax.KnormPress(compression_ratio=0.5),
                                compression_interval=2)
    with pytest.raises(ValueError, match="UNCompPress brings its own decode hook.*DecodingPress"):
        kvjax.generate(tiny, prompt, max_new_tokens=4, press=_press(tiny, decode="ring"),
                       decoding_press=merge)
    with pytest.raises(ValueError, match="ThinKPress cannot wrap UNCompPress with RingDecode"):
        kvjax.ThinKPress(key_channel_compression_ratio=0.5, window_size=4,
                         press=_press(tiny, decode="ring"))
    thin = kvjax.ThinKPress(key_channel_compression_ratio=0.5, window_size=4,
                            press=kvjax.SnapKVPress(compression_ratio=0.5, window_size=4))
    with pytest.raises(ValueError, match="RingDecode cannot rewrite the thin keys of ThinKPress"):
        kvjax.generate(tiny, prompt, max_new_tokens=4, press=thin,
                       decoding_press=kvjax.RingDecode(window_size=4))
    with pytest.raises(ValueError, match="ThinKPress cannot wrap UNCompPress with hidden-state"):
        kvjax.ThinKPress(key_channel_compression_ratio=0.5,
                         press=UNCompPress(compression_ratio=0.5,
                                           prefill_keep=(None, 32, None)))
    with pytest.raises(ValueError, match="both bring a decode_hook"):
        kvjax.ComposedPress(presses=(_press(tiny, decode="ring"),
                                     UNCompPress(compression_ratio=0.5, decode="ring")))
    # UNComp's head-group table under a periodic merge (tail mode): segments keep their sizes
    out = kvjax.generate(tiny, prompt, max_new_tokens=6, press=_press(tiny), decoding_press=merge)
    fn, params = tiny.kvjax_split()
    _, start = loops.prefill(fn, params, toks[:1], lens[:1], tail_capacity=0,
                             press=_press(tiny))
    np.testing.assert_array_equal(np.asarray(out.cache.store.length),
                                  np.asarray(start.store.length))
    # UNComp then KNorm: KNorm's uniform stage shrinks each head-group segment
    composed = kvjax.ComposedPress(presses=(_press(tiny), kvjax.KnormPress(compression_ratio=0.5)))
    _, cache = loops.prefill(fn, params, toks, lens, tail_capacity=0, press=composed)
    _, first = loops.prefill(fn, params, toks, lens, tail_capacity=0, press=_press(tiny))
    np.testing.assert_array_equal(np.asarray(cache.store.length),
                                  np.ceil(np.asarray(first.store.length) / 2).astype(int))
