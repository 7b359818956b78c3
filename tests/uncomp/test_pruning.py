"""Hidden-state token pruning (UNComp) as a between-layers hook (its logits equal transformers
run over the gathered hidden states):
`models.Decoder.prefill(between=HiddenPruning(keep=...))`, one PromptGroup per stage."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.observation import ObsSpec
from kvjax.presses.pruning import HiddenPruning

LENGTHS = (57, 40)


@pytest.fixture(scope="module")
def setup():
    cfg = models.ModelConfig.tiny(n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=101)
    model = models.Decoder(cfg, rngs=nnx.Rngs(1))
    rng = np.random.RandomState(0)
    toks, lens = loops.pad_prompts([list(rng.randint(0, 101, n)) for n in LENGTHS])
    return model, jnp.asarray(toks), jnp.asarray(lens)


def test_keep_all_equals_plain_forward_exactly(setup):
    model, toks, lens = setup
    t = toks.shape[1]
    plain = model.prefill(toks, lens, obs_spec=ObsSpec(window=8))
    same = model.prefill(toks, lens, obs_spec=ObsSpec(window=8),
                         between=HiddenPruning(keep=(None, t, t, None)))
    assert len(same[1].groups) == 1  # nothing pruned: one group of 4 layers
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(same)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_pruning_keeps_original_positions_and_last_window(setup):
    model, toks, lens = setup
    logits, prompt = model.prefill(toks, lens, obs_spec=ObsSpec(window=8),
                                   between=HiddenPruning(keep=(None, None, 32, 16)))
    groups = prompt.groups
    assert [g.n_layers for g in groups] == [2, 1, 1]
    assert [g.positions.shape[1] for g in groups] == [64, 32, 16]
    assert [g.layers.k.shape[3] for g in groups] == [64, 32, 16]  # k [L_g, B, K, T_g, H]
    assert np.asarray(prompt.next_pos).tolist() == list(LENGTHS)
    prev = None
    for group in groups[1:]:
        for b, n in enumerate(LENGTHS):
            m = int(group.lengths[b])
            pos = np.asarray(group.positions[b, :m])
            assert m == min(group.positions.shape[1], n)
            assert (np.diff(pos) > 0).all() and pos.max() == n - 1
            assert set(range(n - 8, n)) <= set(pos.tolist())
            if prev is not None:  # later stages keep a subset of earlier ones
                assert set(pos.tolist()) <= set(prev[b])
        prev = {b: np.asarray(group.positions[b, :int(group.lengths[b])]).tolist()
                for b in range(2)}
    assert groups[1].layers.obs.q_window.shape[2] == 8  # [L_g, B, W, N, H]
    assert np.isfinite(np.asarray(logits)).all()
    # the uncompressed cache holds each layer's surviving tokens at their original positions
    cache = kvjax.compress(None, prompt, tail_capacity=4)
    np.testing.assert_array_equal(np.asarray(cache.store.length)[:, :, 0],
                                  [[57, 57, 32, 16], [40, 40, 32, 16]])
    for layer, group in zip((0, 2, 3), groups):
        for b in range(2):
            m = int(group.lengths[b])
            for pos in kvjax.kept_positions(cache, layer)[b]:
                np.testing.assert_array_equal(pos, np.asarray(group.positions[b, :m]))
    # decode continues from the original positions over the smaller caches
    step, cache = model.decode(jnp.array([[5], [6]]), jnp.array([1, 1]), cache)
    assert np.isfinite(np.asarray(step)).all()
    assert np.asarray(cache.tail.pos[:, 0]).tolist() == list(LENGTHS)
    assert kvjax.kept_positions(cache, 3)[0][0].max() == LENGTHS[0]


def numpy_prune(h, positions, lengths, probs_sum, keep, window):
    """Reference of one pruning step: keep the last `window` valid tokens and the best
    others by summed window attention, in original order."""
    out_pos = []
    for b in range(h.shape[0]):
        n = int(lengths[b])
        s = np.where(np.arange(n) >= n - window, np.inf, probs_sum[b, :n])
        idx = np.sort(np.argsort(-s, kind="stable")[:min(keep, n)])
        out_pos.append(positions[b, idx])
    return out_pos


def test_pruning_chooses_by_window_attention(setup):
    """The tokens entering layer 2 are, besides the last 8, those the last 8 queries of
    layer 1 attended to most (summed over heads and rows), computed here in numpy from the
    first group's layer-1 keys and window queries."""
    model, toks, lens = setup
    _, prompt = model.prefill(toks, lens, obs_spec=ObsSpec(window=8),
                              between=HiddenPruning(keep=(None, None, 32, None)))
    first = prompt.groups[0]
    k = np.asarray(first.layers.k[1], np.float64)  # [B, K, T, H]
    qw = np.asarray(first.layers.obs.q_window[1], np.float64)  # [B, W, N, H]
    b_, n_kv, t, h = k.shape
    g = qw.shape[2] // n_kv
    sums = np.zeros((b_, t))
    for b, n in enumerate(LENGTHS):
        for w in range(8):
            qp = n - 8 + w
            for hd in range(qw.shape[2]):
                s = k[b, hd // g, :qp + 1] @ qw[b, w, hd] / np.sqrt(h)
                p = np.exp(s - s.max())
                sums[b, :qp + 1] += p / p.sum()
    want = numpy_prune(np.zeros((b_, t, 1)), np.asarray(first.positions), LENGTHS, sums, 32, 8)
    for b in range(b_):
        m = int(prompt.groups[1].lengths[b])
        np.testing.assert_array_equal(np.asarray(prompt.groups[1].positions[b, :m]), want[b])


def test_pruned_prefill_then_press(setup):
    model, toks, lens = setup
    press = kvjax.UNCompPress(compression_ratio=0.5, prefill_keep=(None, None, 32, 32))
    _, prompt = model.prefill(toks, lens, obs_spec=press.obs_spec, between=press.between_layers)
    cache = kvjax.compress(press, prompt, tail_capacity=4)
    length = np.asarray(cache.store.length)  # [B, L, K]
    for li in range(4):
        n_in = 64 if li < 2 else 32
        for b, n in enumerate(LENGTHS):
            assert length[b, li].sum() == 2 * int(np.ceil(0.5 * min(n, n_in)))
    # the same press through kvjax.generate prunes, compresses and decodes
    prompts = [list(np.asarray(toks[b, :n])) for b, n in enumerate(LENGTHS)]
    out = kvjax.generate(model, prompts, max_new_tokens=3, press=press)
    np.testing.assert_array_equal(np.asarray(out.cache.store.length), length)
    assert np.asarray(out.cache.tail.count).tolist() == [3, 3]


def test_bad_schedules(setup):
    model, toks, lens = setup
    with pytest.raises(ValueError, match="4 layers"):
        model.prefill(toks, lens, between=HiddenPruning(keep=(None, 32)))
    with pytest.raises(ValueError, match="prune_window"):
        HiddenPruning(keep=(None, None, 4, None))
    with pytest.raises(ValueError, match=r"prefill_keep\[0\] must be None"):
        HiddenPruning(keep=(32, None, None, None))
    with pytest.raises(ValueError, match="at most the last"):  # a press observing 32 queries
        kvjax.UNCompPress(compression_ratio=0.5, prefill_keep=(None, None, 32, None),
                          scorer=kvjax.SnapKVPress(compression_ratio=0.5, window_size=32))
    with pytest.raises(ValueError, match="at most the last"):
        HiddenPruning(keep=(None, None, 32, None)).check_obs(ObsSpec(window=32))
    with pytest.raises(ValueError, match="at most the last"):  # composed with a wider press
        kvjax.ComposedPress(presses=(
            kvjax.UNCompPress(compression_ratio=0.5, prefill_keep=(None, None, 32, None)),
            kvjax.SnapKVPress(compression_ratio=0.5, window_size=32)))
    mistral = models.Decoder(models.ModelConfig.tiny(n_layers=4, sliding_window=16),
                             rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="full attention"):
        mistral.prefill(toks, lens, between=HiddenPruning(keep=(None, None, 32, None)))


def test_prefill_refuses_observations_pruning_may_have_removed(setup):
    model, toks, lens = setup
    with pytest.raises(ValueError, match="at most the last"):
        model.prefill(toks, lens, obs_spec=ObsSpec(window=32),
                      between=HiddenPruning(keep=(None, None, 32, None)))


def test_pruned_logits_equal_transformers_over_the_gathered_hidden_states(tiny_hf_dirs):
    """Pruning before layer 1 of a 2-layer model equals, in transformers: layer 0 over the
    whole prompt, then the kept tokens' layer-0 hidden states (at their original positions)
    through a one-layer model holding layer 1's weights, the final norm and the head."""
    import torch
    from transformers import LlamaForCausalLM

    hf, path = tiny_hf_dirs["llama_gqa4_untied"]
    model, _ = models.load(path, progress=False, dtype=jnp.float32)
    n, keep = 40, 16
    ids = np.random.RandomState(3).randint(0, 128, (1, n))
    logits, prompt = model.prefill(jnp.asarray(ids), jnp.asarray([n]), all_logits=True,
                                   between=HiddenPruning(keep=(None, keep)))
    kept = np.array(prompt.groups[1].positions[0, :keep])
    assert len(set(kept.tolist())) == keep and kept.max() == n - 1

    with torch.no_grad():
        h0 = hf(torch.tensor(ids), output_hidden_states=True).hidden_states[1]  # after layer 0
        cfg = hf.config.to_dict() | dict(num_hidden_layers=1)
        second = LlamaForCausalLM(type(hf.config)(**cfg)).eval()
        state = {k.replace("layers.1.", "layers.0."): v for k, v in hf.state_dict().items()
                 if "layers.0." not in k}
        second.load_state_dict(state)
        want = second(inputs_embeds=h0[:, kept],
                      position_ids=torch.tensor(kept)[None]).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(logits)[0, :keep], want, atol=1e-4, rtol=1e-4)
