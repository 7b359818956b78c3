"""What `CompressedContext.load` refuses (kvjax/context.py, kvjax/fingerprint.py), on the tiny
random Llama of test_context.py: a fine-tune of one weight leaf, one changed element in a
middle layer, another dtype, a context.json that is not valid JSON or lacks a field, and
arrays whose shapes do not fit the model's config."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import fingerprint
from kvjax.context import model_fingerprint
from kvjax.presses import make_press
from kvpress_kvzip_ref import CHATML_TEMPLATE, tiny_llama

CONTEXT = "The harbour master kept a ledger of every ship; the Albatross never came back. "
Q_PROJ = "layers.self_attn.q_proj.kernel"  # [L, D, N * H], stacked over the 3 layers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model path, f32 model, tokenizer, a context it compressed, saved there)."""
    root = tmp_path_factory.mktemp("checks")
    _, path = tiny_llama(root, chat_template=CHATML_TEMPLATE)
    model, tok = models.load(path, progress=False, dtype=jnp.float32)
    compressed = kvjax.Pipeline(model, tok).compress(CONTEXT, press=make_press("knorm", 0.5))
    return path, model, tok, compressed, compressed.save(root / "doc")


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "doc")


def _edited(model, name: str, edit):
    """A copy of `model` whose parameter leaf `name` is edit(leaf); the others shared."""
    graphdef, state = nnx.split(model)
    state = jax.tree_util.tree_map_with_path(
        lambda p, x: edit(x) if fingerprint._path_name(p) == name else x, state)
    return nnx.merge(graphdef, state)


def _middle_layer_sample(shape) -> tuple[int, ...]:
    """The index of the first sampled element of the middle layer of a stacked leaf."""
    flat = fingerprint.sample_indices(shape)
    per_layer = int(np.prod(shape[1:]))
    layer = shape[0] // 2
    return np.unravel_index(flat[flat // per_layer == layer][0], shape)


@pytest.mark.parametrize("shape", [(3, 96, 96), (30, 576, 1536), (128, 4096), (7,), ()])
def test_samples_touch_every_layer_and_stay_few(shape):
    idx = fingerprint.sample_indices(shape)
    size = int(np.prod(shape))
    assert len(idx) == min(size, fingerprint.SAMPLES) and idx.max() < size
    if shape:
        assert set(idx // (size // shape[0])) == set(range(shape[0]))


def test_a_constant_added_to_q_proj_is_refused(tiny, tmp_path):
    _, model, tok, compressed, saved = tiny
    tuned = _edited(model, Q_PROJ, lambda x: x + 0.01)
    with pytest.raises(ValueError, match="compressed by model .* not this one"):
        kvjax.CompressedContext.load(_copy(saved, tmp_path), tuned)
    with pytest.raises(ValueError, match="compressed by model"):
        kvjax.Pipeline(tuned, tok).ask(compressed, "q")


def test_one_element_in_a_middle_layer_is_refused(tiny, tmp_path):
    _, model, _, _, saved = tiny
    leaf = nnx.split(model)[1]["layers"]["self_attn"]["q_proj"]["kernel"].value
    at = _middle_layer_sample(leaf.shape)
    assert at[0] == 1  # of 3 layers
    tuned = _edited(model, Q_PROJ, lambda x: x.at[at].add(1e-3))
    with pytest.raises(ValueError, match="compressed by model .* not this one"):
        kvjax.CompressedContext.load(_copy(saved, tmp_path), tuned)


def test_every_leaf_is_fingerprinted(tiny):
    """A change to any one leaf (a middle-layer element of a stacked one) changes the id."""
    _, model, _, compressed, _ = tiny
    _, params = nnx.split(model)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = fingerprint._path_name(path)
        at = _middle_layer_sample(leaf.shape) if name.startswith("layers.") else (0,) * leaf.ndim
        tuned = _edited(model, name, lambda x: x.at[at].add(1e-3))
        assert model_fingerprint(tuned) != compressed.model_id, name
    assert model_fingerprint(model) == compressed.model_id


def test_an_f32_context_into_a_bf16_model_says_dtype(tiny, tmp_path):
    path, _, _, _, saved = tiny
    bf16, _ = models.load(path, progress=False, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="dtype float32, this model's dtype is bfloat16"):
        kvjax.CompressedContext.load(_copy(saved, tmp_path), bf16)


def _rewrite_meta(out, edit):
    meta = json.loads((out / "context.json").read_text())
    (out / "context.json").write_text(json.dumps(edit(meta)))


def test_invalid_json_names_the_file(tiny, tmp_path):
    _, model, _, _, saved = tiny
    out = _copy(saved, tmp_path)
    (out / "context.json").write_text('{"format": "kvjax-compressed-context", ')
    with pytest.raises(ValueError, match=r"context\.json' is not valid JSON"):
        kvjax.CompressedContext.load(out, model)


@pytest.mark.parametrize("key", ["model_id", "max_segment", "context_ids", "empty"])
def test_a_missing_field_is_named(tiny, tmp_path, key):
    _, model, _, _, saved = tiny
    out = _copy(saved, tmp_path)
    _rewrite_meta(out, lambda m: {k: v for k, v in m.items() if k != key})
    with pytest.raises(ValueError, match=rf"context\.json' lacks the field\(s\) \['{key}'\]"):
        kvjax.CompressedContext.load(out, model)


def test_a_field_of_the_wrong_type_is_named(tiny, tmp_path):
    _, model, _, _, saved = tiny
    out = _copy(saved, tmp_path)
    _rewrite_meta(out, lambda m: dict(m, max_segment="8"))
    with pytest.raises(ValueError, match="field 'max_segment' is '8', not int"):
        kvjax.CompressedContext.load(out, model)


def test_an_array_that_does_not_fit_the_config_is_named(tiny, tmp_path):
    _, model, _, compressed, _ = tiny
    store = compressed.cache.store
    bad = dataclasses.replace(compressed.cache, store=dataclasses.replace(
        store, offset=store.offset[:, :2], length=store.length[:, :2]))  # 2 layers of 3
    out = dataclasses.replace(compressed, cache=bad).save(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"arrays': array 'offset' has shape \[1, 2, 2\], "
                                         r"not \[1, L, K\] with L=3, K=2"):
        kvjax.CompressedContext.load(out, model)
    with pytest.raises(ValueError, match="array 'logits' has shape"):
        kvjax.CompressedContext.load(dataclasses.replace(
            compressed, logits=compressed.logits[:, :100]).save(tmp_path / "v"), model)


def test_a_recorded_empty_shape_that_does_not_fit_is_named(tiny, tmp_path):
    _, model, _, _, saved = tiny
    out = _copy(saved, tmp_path)
    _rewrite_meta(out, lambda m: dict(m, empty=dict(m["empty"], tail_k=[[3, 1, 2, 0, 8],
                                                                        "float32"])))
    with pytest.raises(ValueError, match=r"context\.json': array 'tail_k' has shape "
                                         r"\[3, 1, 2, 0, 8\], not \[L, 1, K, S, H\]"):
        kvjax.CompressedContext.load(out, model)
