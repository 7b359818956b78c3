"""KVzapPress against kvpress 0.5.5's KVzapPress on the same tiny random transformers Llama
(same model weights, same KVzap weights, same prompt): the scorer's outputs agree and the kept
positions per layer and kv head are identical, linear and MLP; the scorer applied to kvpress's
attention inputs equals kvpress's scores; weights round-trip through kvpress's state dict,
the .npz file and the orbax directory; clear errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import models
from kvjax import loops
from kvjax.kvzap import (KVzapWeights, LinearScorer, MLPScorer, UntrainedWeights, load_weights,
                         save_dir, scorer_named, shipped_weights)
from kvjax.presses import LayerContext
from kvpress_kvzip_ref import attention_inputs, kvzap_press, scorer_reference, tiny_llama

kvpress = pytest.importorskip("kvpress")

T = 100


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf, path = tiny_llama(tmp_path_factory.mktemp("kvzap"))
    model, _ = models.load(path, progress=False, dtype=jnp.float32)
    ids = np.random.RandomState(0).randint(0, 128, (1, T))
    return hf, model, ids


def _kept(model, ids, press):
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts([list(ids[0])])
    _, cache = loops.prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                             tail_capacity=8, press=press)
    return [[[kvjax.kept_positions(cache, layer)[0][h].tolist() for h in range(2)]]
            for layer in range(cache.n_layers)]


@pytest.mark.parametrize("ratio", [0.5, 0.75])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_kept_positions_match_kvpress(setup, kind, ratio):
    hf, model, ids = setup
    kp_press, layers = kvzap_press(hf, ratio, kind, hidden_dim=32, seed=1)
    ref = scorer_reference(hf, ids, kp_press)
    weights = KVzapWeights.from_kvpress_layers(scorer_named(kind, 32 if kind == "mlp" else None),
                                               layers)
    assert weights.signature == (3, 96, 2)
    press = kvjax.KVzapPress(compression_ratio=ratio, weights=weights, allocation="uniform",
                             n_sink=0)  # kvpress's KVzapPress
    assert _kept(model, ids, press) == ref["kept"]
    # the scorer itself on kvpress's attention inputs gives kvpress's scores
    x = attention_inputs(hf, ids)  # [L, 1, T, D]
    ours = np.stack([np.asarray(weights.apply(jnp.asarray(x[l]), jnp.int32(l))).transpose(0, 2, 1)
                     for l in range(3)])
    np.testing.assert_allclose(ours, ref["scores"], atol=1e-5)


def test_scores_inside_compression_equal_the_scorer_on_our_hidden_states(setup):
    """What the press ranks in `kvjax.compress` is the scorer on the prefill's own hidden
    states, gathered at the view's positions (traced layer index)."""
    _, model, ids = setup
    weights = KVzapWeights.init(MLPScorer(16), 3, 96, 2, seed=3)
    press = kvjax.KVzapPress(compression_ratio=0.5, weights=weights, n_sink=0)
    tokens, lengths = loops.pad_prompts([list(ids[0]), list(ids[0][:70])])
    _, prompt = model.prefill(jnp.asarray(tokens), jnp.asarray(lengths), obs_spec=press.obs_spec)
    group = prompt.groups[0]
    views, obs = group.views(), group.layers.obs
    for l in range(3):
        view = jax.tree.map(lambda a, l=l: a[l], views)
        o = jax.tree.map(lambda a, l=l: a[l], obs)
        ctx = LayerContext(prompt_len=lengths, layer_idx=jnp.int32(l), n_layers=3)
        got = np.asarray(jax.jit(press.score)(view, o, ctx))
        want = np.asarray(weights.apply(o.hidden, l)).transpose(0, 2, 1)
        np.testing.assert_allclose(got[:, :, :70], want[:, :, :70], atol=1e-6)


def test_weights_round_trip(tmp_path, setup):
    hf, _, _ = setup
    _, layers = kvzap_press(hf, 0.5, "mlp", hidden_dim=8, seed=2)
    w = KVzapWeights.from_kvpress_layers(MLPScorer(8), layers)
    import torch
    from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel
    m = KVzapModel(KVzapConfig(input_dim=96, output_dim=2, n_modules=3, hidden_dim=8))
    m.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in w.state_dict().items()})
    assert KVzapWeights.from_state_dict(m.state_dict()) == w
    assert load_weights(w.save_npz(tmp_path / "w.npz")) == w
    assert load_weights(save_dir(w, tmp_path / "run")) == w
    assert hash(w) == hash(load_weights(tmp_path / "run"))
    assert w != KVzapWeights.init(MLPScorer(8), 3, 96, 2)


def test_press_is_hashable_and_static(setup):
    a = kvjax.KVzapPress(compression_ratio=0.5, weights="smollm2")
    b = kvjax.make_press("kvzap", 0.5, weights="smollm2")
    assert a == b and hash(a) == hash(b)
    assert a.weights is not shipped_weights() and a.weights == shipped_weights()


def test_weights_for_another_model_is_a_clear_error(setup):
    _, model, ids = setup
    press = kvjax.KVzapPress(compression_ratio=0.5, weights="smollm2")
    with pytest.raises(ValueError, match=r"\(n_layers, d_model, n_kv_heads\) = \(30, 576, 3\).*"
                                         r"this model has \(3, 96, 2\)"):
        _kept(model, ids, press)
    wrong = KVzapWeights.init(LinearScorer(), 3, 64, 2)
    with pytest.raises(ValueError, match=r"\(3, 64, 2\).*\(3, 96, 2\)"):
        _kept(model, ids, kvjax.KVzapPress(compression_ratio=0.5, weights=wrong))


@pytest.mark.parametrize("allocation", ["global", "layer"])
def test_global_and_layer_allocation_equal_a_numpy_top_k(setup, allocation):
    """The default allocation keeps KVzip's global top-k of the predicted scores (first
    n_sink positions always): numpy top-k over the scorer applied to the prefill's hidden
    states, over all layers and kv heads ("global") or per layer ("layer")."""
    _, model, ids = setup
    weights = KVzapWeights.init(LinearScorer(), 3, 96, 2, seed=5)
    press = kvjax.KVzapPress(compression_ratio=0.6, weights=weights, allocation=allocation,
                             n_sink=3)
    tokens, lengths = loops.pad_prompts([list(ids[0])])
    _, prompt = model.prefill(jnp.asarray(tokens), jnp.asarray(lengths),
                              obs_spec=press.obs_spec)
    hidden = np.asarray(prompt.groups[0].layers.obs.hidden)[:, :, :T]  # [L, 1, T, D]
    w, b = (np.asarray(a, np.float64) for a in weights.arrays)
    scores = np.einsum("ltd,lkd->lkt", hidden[:, 0], w) + b[:, :, None]  # [L, K, T]
    scores[:, :, :3] = np.inf
    flat = scores.reshape(1 if allocation == "global" else 3, -1)
    keep = math.ceil(0.4 * flat.shape[1])
    mask = np.zeros_like(flat, bool)
    for row, m in zip(flat, mask):
        m[np.argsort(-row, kind="stable")[:keep]] = True
    mask = mask.reshape(3, 2, T)
    want = [[[np.flatnonzero(mask[l, h]).tolist() for h in range(2)]] for l in range(3)]
    got = _kept(model, ids, press)
    assert got == want
    sizes = [len(h) for layer in got for h in layer[0]]
    assert len(set(sizes)) > 1  # budgets really differ between heads / layers


@pytest.mark.parametrize("kwargs, match", [(dict(allocation="heads"), "allocation"),
                                           (dict(n_sink=-1), "n_sink")])
def test_bad_allocation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kvjax.KVzapPress(compression_ratio=0.5, weights="smollm2", **kwargs)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, "0.5"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="compression_ratio"):
        kvjax.KVzapPress(compression_ratio=ratio, weights="smollm2")


def test_default_weights_refuse_a_model_no_shipped_file_fits(setup):
    _, model, ids = setup
    with pytest.raises(ValueError, match=r"no shipped KVzap weights fit this model .*\(3, 96, "
                                         r"2\).*smollm2 \(30, 576, 3\).*train-scorer"):
        _kept(model, ids, kvjax.KVzapPress(compression_ratio=0.5))


def test_shipped_weights_by_target():
    """ShippedWeights() takes the SmolLM2 file trained on KVzip scores, kvzip_plus=True the one
    trained on KVzip+ scores (each file's own recipe says which)."""
    from kvjax.kvzap import ShippedWeights, shipped_weights
    kvzip = ShippedWeights().resolve(30, 576, 3)
    plus = ShippedWeights(kvzip_plus=True).resolve(30, 576, 3)
    assert kvzip == shipped_weights("smollm2") and plus == shipped_weights("smollm2_plus")
    assert kvzip != plus
    assert "KVzip+" in plus.metadata["target"] and "not KVzip+" in kvzip.metadata["target"]
    assert plus.metadata["command"] == "kvjax train-scorer --model smollm2 --out DIR --kvzip-plus"


def test_bad_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        kvjax.KVzapPress(compression_ratio=0.5, weights=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a KVzap weights directory"):
        kvjax.KVzapPress(compression_ratio=0.5, weights=tmp_path)
    with pytest.raises(ValueError, match="expected KVzapWeights"):
        kvjax.KVzapPress(compression_ratio=0.5, weights=3)
    with pytest.raises(ValueError, match="kind='mlp' must be kvjax.kvzap.LinearScorer"):
        UntrainedWeights(kind="mlp")  # a name, not a scorer
    with pytest.raises(ValueError, match="'conv' is not 'linear' or 'mlp'"):
        scorer_named("conv")
    with pytest.raises(ValueError, match="hidden_dim >= 1, got 0"):
        MLPScorer(0)
    with pytest.raises(ValueError, match="inconsistent LinearScorer"):
        KVzapWeights(LinearScorer(), (np.zeros((2, 3, 8)), np.zeros((2, 4))))
    with pytest.raises(ValueError, match="inconsistent MLPScorer"):  # F disagrees with the arrays
        KVzapWeights(MLPScorer(5), KVzapWeights.init(MLPScorer(4), 2, 8, 1).arrays)


def test_shipped_weights():
    w = shipped_weights("smollm2")
    assert w.kind == LinearScorer() and w.signature == (30, 576, 3)
    meta = w.metadata
    assert meta["model"] and meta["command"].startswith("kvjax train-scorer")
    assert len(meta["heldout_spearman"]) == 30
    with pytest.raises(ValueError, match="no shipped KVzap weights named 'llama'"):
        shipped_weights("llama")


def test_decoding_press_scores_from_the_hidden_state():
    """KVzap joins a DecodingPress as a hidden-state scorer (its per-token scores need no
    query); the hook's budget, not the scorer's compression_ratio, sets what a merge keeps."""
    dp = kvjax.DecodingPress(press=kvjax.KVzapPress(compression_ratio=0.5,
                                                    weights=UntrainedWeights()))
    assert dp.scores_hidden and dp.needs_extra and not dp.owns_attention
