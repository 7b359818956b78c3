"""KVzipPress against kvpress 0.5.5's KVzipPress on the same tiny random transformers Llama
(same weights, same prompt): the repeat-pass scores agree to 1e-5 and the kept positions per
layer and kv head are identical, without and with a chat template, chunked, layerwise; plus
the fallbacks and errors."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import models
from kvjax import loops
from kvjax.kvzip import RepeatPrompt
from kvpress_kvzip_ref import CHATML_TEMPLATE, kvzip_reference, template_ids, tiny_llama

pytest.importorskip("kvpress")

T = 100


@pytest.fixture(scope="module", params=[None, CHATML_TEMPLATE], ids=["plain", "chatml"])
def setup(request, tmp_path_factory):
    hf, path = tiny_llama(tmp_path_factory.mktemp("kvzip"), chat_template=request.param)
    model, tok = models.load(path, progress=False, dtype=jnp.float32)
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(path))
    prefix, _ = template_ids(hf_tok)
    rng = np.random.RandomState(0)
    ids = np.asarray([prefix + list(rng.randint(0, 128, T - len(prefix)))])
    return hf, model, tok, ids


def _ours(model, tok, ids, press):
    press = press.with_tokenizer(tok)
    fn, params = model.kvjax_split()
    tokens, lengths = loops.pad_prompts([list(ids[0])])
    _, prompt = loops.prefill_prompt(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                                     obs_spec=press.obs_spec, observer=press.prompt_observer)
    scores = np.asarray(prompt.groups[0].layers.obs.token_scores)[:, :, :, :T]  # [L, B, K, T]
    _, cache = loops.prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                             tail_capacity=8, press=press)
    kept = [[[kvjax.kept_positions(cache, layer)[0][h].tolist() for h in range(2)]]
            for layer in range(cache.n_layers)]
    return scores, kept, press


@pytest.mark.parametrize("ratio, kwargs", [(0.5, {}), (0.75, {}),
                                           (0.5, dict(chunk_size=32)),
                                           (0.6, dict(layerwise=True)),
                                           (0.5, dict(kvzip_plus_normalization=True)),
                                           (0.7, dict(kvzip_plus_normalization=True,
                                                      chunk_size=32))])
def test_scores_and_kept_positions_match_kvpress(setup, ratio, kwargs):
    hf, model, tok, ids = setup
    ref = kvzip_reference(hf, ids, ratio, **kwargs)
    scores, kept, press = _ours(model, tok, ids, kvjax.KVzipPress(compression_ratio=ratio,
                                                                  **kwargs))
    assert press.repeat.prefix_length == ref["prefix_length"]
    assert list(press.repeat.suffix) == ref["suffix_ids"]
    np.testing.assert_allclose(scores, ref["scores"], atol=1e-5)
    assert kept == ref["kept"]


def test_repeat_ids_match_kvpress(setup):
    hf, model, tok, ids = setup
    from kvjax.kvzip import repeat_ids
    ref = kvzip_reference(hf, ids, 0.5, chunk_size=32)
    repeat = RepeatPrompt.from_tokenizer(tok)
    for i, want in enumerate(ref["repeat_ids"]):
        got, n_new = repeat_ids(jnp.asarray(ids, jnp.int32), jnp.array([T]), repeat, i, 32)
        assert np.asarray(got)[0, :int(n_new[0])].tolist() == want


def test_fallbacks_and_errors(setup):
    _, model, tok, _ = setup
    with pytest.raises(ValueError, match="needs the repeat instruction"):
        kvjax.generate(model, [list(range(1, 60))], max_new_tokens=2,
                       press=kvjax.KVzipPress(compression_ratio=0.5))
    with pytest.raises(ValueError, match="compression_ratio=1.0"):
        kvjax.KVzipPress(compression_ratio=1.0)
    with pytest.raises(ValueError, match="chunk_size=0"):
        kvjax.KVzipPress(compression_ratio=0.5, chunk_size=0)
    press = kvjax.KVzipPress(compression_ratio=0.5).with_tokenizer(tok)
    p = press.repeat.prefix_length
    if p:  # a context that is only the template's prefix has nothing to repeat
        with pytest.raises(ValueError, match="nothing after the chat template"):
            kvjax.generate(model, [list(range(1, p + 1))], max_new_tokens=2, press=press)
    # a context shorter than one chunk is repeated whole (one pass); a batch of two lengths
    out = kvjax.generate(model, [list(range(1, p + 30)), list(range(3, p + 12))],
                         max_new_tokens=3, press=press)
    assert out.lengths.tolist() == [3, 3]
    for layer in range(out.cache.n_layers):
        n_kept = np.asarray(out.cache.store.length[:, layer]).sum(-1)
        assert n_kept.tolist() != [0, 0]
    total = np.asarray(out.cache.store.length).sum(axis=(1, 2))
    n_layers, n_kv = out.cache.n_layers, 2
    assert total.tolist() == [int(np.ceil(0.5 * n_layers * n_kv * (p + 29))),
                              int(np.ceil(0.5 * n_layers * n_kv * (p + 9)))]


def test_plain_prompt_without_chat_template():
    class Plain:
        chat_template = None

        def encode(self, text, add_bos=False):
            return list(text.encode())

    rp = RepeatPrompt.from_tokenizer(Plain())
    assert rp.prefix_length == 0 and rp.suffix == (10,)
    assert rp.first == tuple(b"\n\nRepeat the previous context exactly.")
