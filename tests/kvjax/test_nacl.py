"""NACL (arXiv 2408.03675): proxy scores against a brute-force softmax, the hybrid selector's
budgets and sampling statistics, both budget forms, ragged batches and bad input."""

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import kept_all
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.cache import LayerView
from kvjax.observation import Observation, ObsSpec, observe
from kvjax.presses import make_press
from kvjax.presses.base import LayerContext
from kvjax.presses.nacl import NACLPress, gumbel_noise, hybrid_select, layer_key, proxy_count
from kvjax.presses.parts import StaticSize
from kvjax.presses.proxy import proxy_scores_reference
from kvjax.presses.window import pool1d

LENGTHS = (57, 40)


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=101)
    return models.Decoder(cfg, rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.RandomState(0)
    return [list(rng.randint(0, 101, n)) for n in LENGTHS]


def _prefill(model, prompts, press):
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts(prompts)
    return loops.prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                         tail_capacity=8, press=press)[1]


def _kept(cache, layer, b, h):
    return kvjax.kept_positions(cache, layer)[b][h]


# ---------------------------------------------------------------- proxy scores

def _brute_scores(q, k, lengths, n_proxy, causal):
    """Full T x T softmax per query head (numpy f64), summed over each row set's last P rows."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, n, t))
    for bi, hi in itertools.product(range(b), range(n)):
        length, p = lengths[bi], n_proxy[bi]
        logits = q[bi, :, hi] @ k[bi, :, hi // g].T / math.sqrt(h)  # [T, T]
        ok = np.arange(t)[None, :] < length
        if causal:
            ok = ok & (np.arange(t)[None, :] <= np.arange(t)[:, None])
        e = np.where(ok, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
        probs = e / e.sum(-1, keepdims=True)
        out[bi, hi] = probs[length - p:length].sum(0)
    return out


def _group_reference(s, n_kv, mode):
    """numpy: per-query-head scores [B, N, T] -> per kv head [B, K, T]."""
    b, n, t = s.shape
    if mode == "first":  # the official code: kv head j reads query head j
        return s[:, :n_kv]
    g = s.reshape(b, n_kv, n // n_kv, t)
    return g.mean(2) if mode == "mean" else g.sum(2)


def _avg_pool_reference(s, kernel):
    """numpy: 'same' avg pooling along the last axis, zero padded, divided by the kernel."""
    pad = kernel // 2
    xp = np.pad(s, [(0, 0)] * (s.ndim - 1) + [(pad, pad)])
    return np.mean([xp[..., i:i + s.shape[-1]] for i in range(kernel)], axis=0)


def _proxy_inputs(press, b=2, t=37, n=6, n_kv=2, h=8):
    kq, kk = jax.random.split(jax.random.key(0))
    q = np.asarray(jax.random.normal(kq, (b, t, n, h)), np.float64)
    k = np.asarray(jax.random.normal(kk, (b, t, n_kv, h)), np.float64)
    lengths = np.array([37, 23])
    obs = observe(jnp.asarray(q, jnp.float32), jnp.asarray(lengths), press.obs_spec)
    k32 = jnp.asarray(k, jnp.float32).transpose(0, 2, 1, 3)
    prefix = LayerView(k=k32, v=k32, pos=jnp.broadcast_to(jnp.arange(t), (b, n_kv, t)),
                       length=jnp.asarray(np.repeat(lengths[:, None], n_kv, 1)))
    got = press.proxy_scores(prefix, obs, LayerContext(jnp.asarray(lengths)))
    return q, k, lengths, obs, np.asarray(got)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("gqa", ["mean", "sum", "first"])
def test_proxy_scores_match_full_softmax(causal, gqa):
    """Through `observe` and the press: ragged lengths, T (37) not a multiple of the chunk,
    G = 3 query heads per kv head combined as `gqa` says."""
    press = NACLPress(compression_ratio=0.5, proxy_tokens_ratio=0.2, causal=causal,
                      chunk_size=8, gqa=gqa)
    q, k, lengths, obs, got = _proxy_inputs(press)
    assert obs.q_window.shape[1] == math.ceil(0.2 * 37)
    n_proxy = [max(1, round(0.2 * x)) for x in lengths]  # 7 and 5
    per_head = _brute_scores(q, k, lengths, n_proxy, causal)  # [B, N, T]
    want = _group_reference(per_head, 2, gqa)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # every proxy row sums to 1: each kv head's total is P (one head's scale) or P * G
    scale = 3 if gqa == "sum" else 1
    np.testing.assert_allclose(got.sum(-1), np.outer(n_proxy, [scale, scale]), rtol=1e-5)


def test_proxy_tokens_and_pooling_match_numpy():
    """proxy_tokens=4: exactly the last 4 prompt rows of each sequence; kernel_size=5:
    avg-pooled along tokens (zero padding, divided by 5) after the group mean."""
    press = NACLPress(compression_ratio=0.5, proxy_tokens=4, kernel_size=5, chunk_size=8,
                      gqa="mean")
    assert press.obs_spec == ObsSpec(window=4)
    q, k, lengths, _, got = _proxy_inputs(press)
    want = _group_reference(_brute_scores(q, k, lengths, [4, 4], True), 2, "mean")
    np.testing.assert_allclose(got, _avg_pool_reference(want, 5), rtol=1e-5, atol=1e-5)
    # hand case of the press's pooling: a spike of 5 spreads 1 over its 5-token
    # neighbourhood; at the edge the zero padding takes 2 of the 5 (count_include_pad)
    spike = np.zeros((2, 1, 9), np.float32)
    spike[0, 0, 4] = spike[1, 0, 0] = 5.0
    pooled = np.asarray(pool1d(jnp.asarray(spike), 5, "avg"))
    np.testing.assert_allclose(pooled[:, 0], [[0, 0, 1, 1, 1, 1, 1, 0, 0],
                                              [1, 1, 1, 0, 0, 0, 0, 0, 0]], rtol=1e-6)


def test_proxy_reference_masks_rows_and_slots():
    b, p, n, c, h = 1, 3, 2, 10, 4
    kq, kk = jax.random.split(jax.random.key(1))
    q = jax.random.normal(kq, (b, p, n, h))
    k = jax.random.normal(kk, (b, 1, c, h))
    args = (q, jnp.array([[7, 8, 9]]), jnp.array([[False, True, True]]), k,
            jnp.arange(c)[None, None], jnp.array([[9]]))
    s = proxy_scores_reference(*args, causal=True, chunk=3)
    np.testing.assert_allclose(np.asarray(s.sum(-1)), [[2.0, 2.0]], rtol=1e-6)  # 2 valid rows
    assert float(jnp.abs(s[..., 9]).max()) == 0.0  # padding slot
    one = proxy_scores_reference(*args, causal=True, chunk=100)
    np.testing.assert_allclose(np.asarray(s), np.asarray(one), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the selector

def _select_many(scores, split, n_keys, capacity, layer=0):
    """Keep masks [n_keys, C] of one head for n_keys independent seeds."""
    c = scores.shape[-1]
    pos = jnp.arange(c)[None, None]
    length = jnp.array([[c]])
    split = tuple(jnp.array([[x]]) for x in split)

    @jax.jit
    def one(seed):
        noise = gumbel_noise(layer_key(seed, layer), pos)
        return hybrid_select(scores[None, None], length, split, noise, capacity)[0, 0]

    return np.asarray(jax.vmap(one)(jnp.arange(n_keys)))


def _inclusion_exact(p, k):
    """Inclusion probability of each item in a k-draw sample without replacement (∝ p)."""
    p = np.asarray(p, np.float64) / np.sum(p)
    out = np.zeros_like(p)
    for order in itertools.permutations(range(len(p)), k):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i] / left
            left -= p[i]
        out[list(order)] += prob
    return out


@pytest.mark.parametrize("n_random", [1, 2])
def test_random_inclusion_follows_softmax(n_random):
    """8 slots: sink 0, recent 7, proxy keeps the best candidate (slot 3); the random draw
    over slots {1, 2, 4, 5, 6} must follow softmax(score). Tolerance: 5 binomial standard
    deviations per slot with 4000 keys (about 0.04 at p = 0.5)."""
    scores = jnp.array([9.0, 0.0, 1.0, 5.0, 2.0, 0.5, 1.5, 9.0])
    n_keys = 4000
    masks = _select_many(scores, (1, 1, 1, n_random), n_keys, capacity=8)
    assert (masks.sum(1) == 3 + n_random).all() and masks[:, [0, 3, 7]].all()
    rest = [1, 2, 4, 5, 6]
    want = _inclusion_exact(np.exp(np.asarray(scores)[rest]), n_random)
    freq = masks[:, rest].mean(0)
    tol = 5 * np.sqrt(want * (1 - want) / n_keys)
    assert (np.abs(freq - want) <= tol).all(), (freq, want)


def test_layers_and_heads_draw_independently():
    """Uniform scores, 3 random picks out of 12 candidates: two independent streams agree on
    3 * 3 / 12 = 0.75 slots on average; identical streams would agree on 3."""
    c, n_random, n_keys = 12, 3, 2000
    scores = jnp.zeros((1, 2, c))
    pos = jnp.broadcast_to(jnp.arange(c), (1, 2, c))
    split = tuple(jnp.full((1, 2), x) for x in (0, 0, 0, n_random))

    def masks(seed, layer):
        noise = gumbel_noise(layer_key(seed, layer), pos)
        return hybrid_select(scores, jnp.full((1, 2), c), split, noise, c)[0]  # [K, C]

    m = np.asarray(jax.jit(jax.vmap(lambda s: jnp.stack([masks(s, 0), masks(s, 1)])))(
        jnp.arange(n_keys)))  # [keys, layer, head, C]
    expected = n_random * n_random / c
    for a, b in [((0, 0), (0, 1)), ((0, 0), (1, 0)), ((0, 1), (1, 1))]:
        overlap = (m[:, a[0], a[1]] & m[:, b[0], b[1]]).sum(1).mean()
        assert abs(overlap - expected) < 0.1, (a, b, overlap)
    # each slot is picked 3/12 of the time in every stream
    np.testing.assert_allclose(m.mean(0), n_random / c, atol=0.05)


def test_selection_deterministic_given_seed(model, prompts):
    a = _prefill(model, prompts, NACLPress(compression_ratio=0.6, random_fraction=0.6, seed=3))
    b = _prefill(model, prompts, NACLPress(compression_ratio=0.6, random_fraction=0.6, seed=3))
    c = _prefill(model, prompts, NACLPress(compression_ratio=0.6, random_fraction=0.6, seed=4))
    np.testing.assert_array_equal(np.asarray(a.store.pos), np.asarray(b.store.pos))
    assert any(_kept(a, i, 0, h).tolist() != _kept(c, i, 0, h).tolist()
               for i in range(2) for h in range(2))


def _views_and_obs(model, prompts, press):
    """Per layer: the uncompressed LayerView and its Observation; and the prompt lengths."""
    tokens, lengths = loops.pad_prompts(prompts)
    _, prompt = model.prefill(jnp.asarray(tokens), jnp.asarray(lengths), obs_spec=press.obs_spec)
    group = prompt.groups[0]
    at = lambda x, i: jax.tree.map(lambda a: a[i], x)
    return [(at(group.views(), i), at(group.layers.obs, i)) for i in range(group.n_layers)], \
        prompt.next_pos


def test_random_fraction_zero_is_proxy_topk(model, prompts):
    press = NACLPress(compression_ratio=0.6, random_fraction=0.0, n_sink=3, recent_ratio=0.1,
                      proxy_tokens_ratio=0.1)
    layers, next_pos = _views_and_obs(model, prompts, press)
    cache = _prefill(model, prompts, press)
    for li, (view, o) in enumerate(layers):
        ctx = LayerContext(next_pos, li, 2)
        scores = np.asarray(press.proxy_scores(view, o, ctx))
        for b, n in enumerate(LENGTHS):
            keep = math.ceil(0.4 * n)
            recent = round(0.1 * n)
            for h in range(2):
                cand = np.arange(3, n - recent)
                best = cand[np.argsort(-scores[b, h, cand], kind="stable")[:keep - 3 - recent]]
                want = sorted({0, 1, 2} | set(range(n - recent, n)) | set(best.tolist()))
                assert _kept(cache, li, b, h).tolist() == want


# ---------------------------------------------------------------- budgets and batches

def test_kvpress_form_counts_sinks_recent_ragged(model, prompts):
    press = NACLPress(compression_ratio=0.7, random_fraction=0.35, n_sink=4, recent_ratio=0.1,
                      proxy_tokens_ratio=0.1, seed=1)
    cache = _prefill(model, prompts, press)
    assert cache.store.max_segment == math.ceil(0.3 * 64)  # padded capacity 64
    for layer in range(cache.n_layers):
        for b, n in enumerate(LENGTHS):
            keep, recent = math.ceil(round(0.3 * n, 6)), round(0.1 * n)
            for h in range(2):
                kept = _kept(cache, layer, b, h)
                assert len(kept) == keep and (np.diff(kept) > 0).all() and kept.max() < n
                assert set(range(4)) | set(range(n - recent, n)) <= set(kept.tolist())
    split = [np.asarray(x).tolist() for x in press.split(jnp.array(LENGTHS))]
    assert split == [[4, 4], [6, 4], [5, 3], [3, 1]]  # 57 -> 18 = 4+6+5+3; 40 -> 12 = 4+4+3+1


def test_batch_row_equals_alone_and_padding_never_kept(model, prompts):
    press = NACLPress(compression_ratio=0.5, random_fraction=0.5, proxy_tokens_ratio=0.1)
    batch = _prefill(model, prompts, press)
    for b, p in enumerate(prompts):
        alone = _prefill(model, [p], press)
        for layer in range(batch.n_layers):
            for h in range(2):
                assert _kept(batch, layer, b, h).tolist() == _kept(alone, layer, 0, h).tolist()
                assert _kept(batch, layer, b, h).max() < LENGTHS[b]


def test_official_preset_and_counts(model):
    press = NACLPress.official(seed=5)
    assert (press.proxy_tokens_ratio, press.n_sink, press.token_protect_ratio,
            press.proxy_keep_ratio, press.random_keep_ratio, press.min_eviction_length,
            press.causal, press.seed, press.gqa) == (0.01, 256, 0.01, 0.12, 0.07, 2048, False, 5,
                                                      "first")
    # host arithmetic of the official code: 256 sinks, int(.01n)-256 recent (>= 0), floors
    for n in (2049, 3000, 30000, 131072):
        want = (256, max(0, int(0.01 * n) - 256), int(0.12 * n), int(0.07 * n))
        assert [int(x) for x in press.split(n, np)] == list(want)
    assert [int(x) for x in press.split(2048, np)] == [2048, 0, 0, 0]  # no-op at <= 2048
    bound = press.capacity(StaticSize.prompt((4096,), 1), 1).segments[0]
    assert bound == max(2048, 256 + 491 + 286)
    prompt = list(np.random.RandomState(1).randint(0, 101, 300))
    full = _prefill(model, [prompt], None)
    same = _prefill(model, [prompt], press)  # 300 <= 2048: kept whole
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(same)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    small = NACLPress.official(n_sink=8, min_eviction_length=100)
    cache = _prefill(model, [prompt, prompt[:90]], small)
    for layer in range(cache.n_layers):  # 300 -> 8 + 0 + 36 + 21; 90 <= 100 kept whole
        assert np.asarray(cache.store.length[:, layer]).tolist() == [[65, 65], [90, 90]]
        for h in range(2):
            assert set(range(8)) <= set(_kept(cache, layer, 0, h).tolist())


def test_prompt_shorter_than_protected_is_kept_whole():
    """Documented no-op: sinks + recent + budgets >= n keeps the row whole."""
    press = NACLPress.official(n_sink=50, min_eviction_length=0)
    assert [int(x) for x in press.split(40, np)] == [40, 0, 0, 0]
    assert [int(x) for x in press.split(100, np)] == [50, 0, 12, 7]


def test_registry_seed_obs_spec_and_adakv(model, prompts):
    p = make_press("nacl", 0.5, seed=3)
    assert isinstance(p, NACLPress) and p.seed == 3
    assert hash(p) == hash(make_press("nacl", 0.5, seed=3))
    assert p.obs_spec == ObsSpec(proxy_ratio=0.01)
    merged = ObsSpec(window=8).merge(p.obs_spec)
    assert merged.window_for(64) == 8 and merged.window_for(2000) == 20
    assert ObsSpec(window=8).window_for(2000) == 8  # unchanged without proxy_ratio
    # round half to even, at least 1
    assert proxy_count(np.array([1, 5, 7]), 0.5, np).tolist() == [1, 2, 4]
    assert int(proxy_count(np.array(40), 0.01, np)) == 1
    ada = kvjax.AdaKVPress(press=NACLPress(compression_ratio=0.5, proxy_tokens_ratio=0.1))
    cache = _prefill(model, prompts, ada)
    assert np.asarray(cache.store.length[:, 0]).sum(1).tolist() == [58, 40]


@pytest.mark.parametrize("kwargs, match", [
    (dict(token_protect_ratio=0.5, proxy_keep_ratio=0.4, random_keep_ratio=0.2), "sum above 1"),
    (dict(compression_ratio=0.5, recent_ratio=0.6), "sum above 1"),
    (dict(n_sink=-1), "n_sink"),
    (dict(min_eviction_length=-5), "min_eviction_length"),
    (dict(proxy_keep_ratio=0.1), "official form"),
    (dict(compression_ratio=0.5, token_protect_ratio=0.01, proxy_keep_ratio=0.1,
          random_keep_ratio=0.1), "not both"),
    (dict(random_fraction=1.5), "random_fraction"),
    (dict(proxy_tokens_ratio=0.0), "proxy_tokens_ratio"),
    (dict(compression_ratio=1.0), "compression_ratio"),
    (dict(seed=1.5), "seed"),
    (dict(gqa="max"), "gqa='max'"),
    (dict(proxy_tokens=-1), "proxy_tokens=-1"),
    (dict(proxy_tokens=2.5), "proxy_tokens=2.5"),
    (dict(kernel_size=4), "kernel_size=4"),
    (dict(kernel_size=0), "kernel_size=0"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NACLPress(**kwargs)


def test_missing_observation_is_a_clear_error(model, prompts):
    press = NACLPress(compression_ratio=0.5)
    layers, next_pos = _views_and_obs(model, prompts, kvjax.KnormPress())
    with pytest.raises(ValueError, match="obs_spec"):
        press.proxy_scores(layers[0][0], Observation(), LayerContext(next_pos))
    with pytest.raises(dataclasses.FrozenInstanceError):
        press.seed = 2


_kept_all = kept_all


def test_question_proxies_are_the_question_tokens(model, prompts):
    """With the question's span known (question_len, ragged: 9 and 3 tokens), NACL's
    `question_proxies` keeps exactly what `proxy_tokens=n` keeps for each prompt alone."""
    fn, params = model.kvjax_split()
    press = NACLPress(compression_ratio=0.6, random_fraction=0.0, question_proxies=True)
    state, _ = loops.start(fn, params, prompts, max_new_tokens=1, press=press,
                           question_len=[9, 3])
    got = _kept_all(state.cache)
    for b, (ids, n) in enumerate(zip(prompts, (9, 3))):
        alone = dataclasses.replace(press, question_proxies=False, proxy_tokens=n)
        ref, _ = loops.start(fn, params, [ids], max_new_tokens=1, press=alone)
        want = _kept_all(ref.cache)
        assert [got[2 * layer + b] for layer in range(2)] == want, (b, n)
    # the eval's two primitives (one prefill, then compress_prompt per press) agree
    from kvjax.plan import plan_request
    plan = plan_request(fn, prompts, max_new_tokens=1, press=press, question_len=[9, 3])
    _, prompt = loops.prefill_prompt(fn, params, jnp.asarray(plan.tokens),
                                     jnp.asarray(plan.lengths), **plan.prefill_parts())
    assert _kept_all(loops.compress_prompt(press, prompt, plan)) == got
    # without a span it is the ratio form
    plain, _ = loops.start(fn, params, prompts, max_new_tokens=1, press=press)
    ratio, _ = loops.start(fn, params, prompts, max_new_tokens=1,
                           press=dataclasses.replace(press, question_proxies=False))
    assert _kept_all(plain.cache) == _kept_all(ratio.cache)


@pytest.mark.parametrize("span, says", [([58, 3], "outside the prompt"), ([-1, 3], "outside"),
                                        ([3], "an int per prompt"), ([1.5, 2], "int per")])
def test_a_question_span_outside_the_prompt_is_refused(model, prompts, span, says):
    fn, params = model.kvjax_split()
    with pytest.raises(ValueError, match=says):
        loops.start(fn, params, prompts, max_new_tokens=1, press=NACLPress(
            compression_ratio=0.5, question_proxies=True), question_len=span)
