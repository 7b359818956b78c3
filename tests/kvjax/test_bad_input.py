"""Bad arguments get a ValueError that names the value before anything reaches jit: ill-typed
press fields (every int, float, bool and str field of every registered press), a press class
or name where an instance belongs, a wrapper given a ratio it would overwrite, a non-floating
parameter dtype, and a model without a tokenizer."""

import dataclasses
import typing

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import models
from kvjax.cli import main
from kvjax.presses import PRESSES, make_press, press_names


def _press(name, ratio=0.5):
    return make_press(name, ratio, **PRESSES[name][1])


def _plain_fields(press):
    """(field name, plain annotated type) of the int/float/bool/str fields of a press."""
    hints = typing.get_type_hints(type(press))
    for f in dataclasses.fields(press):
        kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
        kinds.discard(type(None))
        if len(kinds) == 1 and next(iter(kinds)) in (int, float, bool, str):
            yield f.name, next(iter(kinds))


WRONG = {int: (8.5, True, "8"), float: ("0.5", True, float("nan")), bool: (1, "yes"),
         str: (3,)}


@pytest.mark.parametrize("name", press_names())
def test_every_typed_field_refuses_a_wrong_type(name):
    press = _press(name)
    fields = list(_plain_fields(press))
    assert fields, name  # every registered press has at least compression_ratio
    for field, kind in fields:
        for bad in WRONG[kind]:
            with pytest.raises(ValueError, match=field):
                dataclasses.replace(press, **{field: bad})


def test_float_window_and_kernel_are_refused_before_jit():
    with pytest.raises(ValueError, match=r"window_size=8\.5\).*must be an int"):
        kvjax.SnapKVPress(window_size=8.5)
    with pytest.raises(ValueError, match=r"kernel_size=5\.0\).*must be an int"):
        kvjax.SnapKVPress(kernel_size=5.0)
    with pytest.raises(ValueError, match="n_sink=-1"):
        kvjax.StreamingLLMPress(n_sink=-1)
    with pytest.raises(ValueError, match="window_size=0"):
        kvjax.ZigZagKVPress(window_size=0)
    with pytest.raises(ValueError, match="kernel_size=4"):
        kvjax.UNCompPress(kernel_size=4)
    # --press-arg values reach the same checks
    with pytest.raises(ValueError, match="window_size"):
        make_press("snapkv", 0.5, window_size=8.5)


def test_wrapper_refuses_a_ratio_it_would_overwrite():
    inner = kvjax.SnapKVPress(compression_ratio=0.5)
    with pytest.raises(ValueError, match=r"AdaKVPress\(compression_ratio=0.9\)"):
        kvjax.AdaKVPress(press=inner, compression_ratio=0.9)
    with pytest.raises(ValueError, match=r"ThinKPress\(compression_ratio=0.3\)"):
        kvjax.ThinKPress(press=inner, compression_ratio=0.3)
    with pytest.raises(ValueError, match=r"ComposedPress\(compression_ratio=0.5\)"):
        kvjax.ComposedPress(presses=(inner, kvjax.KnormPress(compression_ratio=0.5)),
                            compression_ratio=0.5)
    # the derived value itself, or nothing, is accepted
    assert kvjax.AdaKVPress(press=inner, compression_ratio=0.5).compression_ratio == 0.5
    assert kvjax.AdaKVPress(press=inner).compression_ratio == 0.5


@pytest.fixture(scope="module")
def tiny():
    from flax import nnx
    return models.Decoder(models.ModelConfig.tiny(n_layers=2, n_heads=4, n_kv_heads=2,
                                                  vocab_size=97), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad, says", [
    (kvjax.SnapKVPress, "is a press class: pass an instance"),
    ("snapkv", r"make_press\('snapkv'"),
    (0.75, "is not a press"),
])
def test_press_class_or_name_is_refused(tiny, bad, says):
    prompt = [list(range(1, 30))]
    with pytest.raises(ValueError, match=says):
        kvjax.generate(tiny, prompt, max_new_tokens=2, press=bad)
    fn, params = tiny.kvjax_split()
    _, pre = tiny.prefill(jnp.asarray(prompt), jnp.asarray([29]))
    with pytest.raises(ValueError, match=says):
        kvjax.compress(bad, pre, tail_capacity=4)


def test_decoding_press_must_be_a_decode_hook(tiny):
    with pytest.raises(ValueError, match="is not a decode hook"):
        kvjax.generate(tiny, [list(range(1, 30))], max_new_tokens=2,
                       decoding_press=kvjax.KnormPress(compression_ratio=0.5))


@pytest.mark.parametrize("dtype, says", [(jnp.int8, "dtype=int8"), ("int32", "dtype=int32"),
                                         (bool, "dtype=bool"), ("float33", "float33")])
def test_models_load_refuses_a_non_floating_dtype(tiny_hf_dirs, dtype, says):
    _, path = tiny_hf_dirs["llama_gqa4_untied"]
    with pytest.raises(ValueError, match=says):
        models.load(path, dtype=dtype, progress=False)
    model, _ = models.load(path, dtype="bfloat16", progress=False)
    assert model.layers.self_attn.q_proj.kernel.value.dtype == jnp.bfloat16


def test_a_model_without_tokenizer_is_refused_at_pipeline_and_cli(tiny_hf_dirs, capsys):
    _, path = tiny_hf_dirs["llama_gqa4_untied"]
    assert not (path / "tokenizer.json").exists()
    model, tokenizer = models.load(path, progress=False)
    assert tokenizer is None
    with pytest.raises(ValueError, match="tokenizer=None: Pipeline needs a tokenizer"):
        kvjax.Pipeline(model, tokenizer)
    assert main(["generate", "--model", str(path), "--prompt", "hello"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    # token ids need no tokenizer
    out = kvjax.generate(model, [list(np.arange(1, 20))], max_new_tokens=2)
    assert out.tokens.shape == (1, 2)


class _IgnoresBetween(models.Decoder):
    """A user's decoder that accepts `between=` and ignores it (runs every layer densely)."""

    def prefill(self, tokens, lengths, *, between=None, **kw):
        return super().prefill(tokens, lengths, **kw)


def test_a_model_that_ignores_the_between_layers_hook_is_refused():
    from flax import nnx
    cfg = models.ModelConfig.tiny(n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97)
    press = kvjax.UNCompPress(compression_ratio=0.5, window_size=8, prefill_keep=(None, 24))
    prompt = [list(np.arange(1, 41) % 96 + 1)]
    ours = models.Decoder(cfg, rngs=nnx.Rngs(0))
    out = kvjax.generate(ours, prompt, max_new_tokens=2, press=press)  # the decoder prunes
    assert max(len(p) for p in kvjax.kept_positions(out.cache, 1)[0]) <= 24
    with pytest.raises(ValueError, match="returned 1 layer group.*prunes nothing"):
        kvjax.generate(_IgnoresBetween(cfg, rngs=nnx.Rngs(0)), prompt, max_new_tokens=2,
                       press=press)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from kvpress_kvzip_ref import CHATML_TEMPLATE, tiny_llama
    _, path = tiny_llama(tmp_path_factory.mktemp("pipe"), chat_template=CHATML_TEMPLATE)
    model, tok = models.load(path, progress=False, dtype=jnp.float32)
    return kvjax.Pipeline(model, tok)


@pytest.mark.parametrize("args, says", [
    ((123, "q"), "context=123 must be a str"),
    (("a context", None), "question=None must be a str"),
    ((["a", "list"],), r"context=\['a', 'list'\] must be a str"),
])
def test_pipeline_refuses_text_that_is_not_a_str(pipe, args, says):
    with pytest.raises(TypeError, match=says):
        pipe.run(*args, max_new_tokens=2)


def test_ask_refuses_what_is_not_a_compressed_context_and_one_string_of_questions(pipe):
    with pytest.raises(TypeError, match="str is not a CompressedContext"):
        pipe.ask("the document text", "q", max_new_tokens=2)
    ctx = pipe.compress("The ledger lists every ship in the harbour.")
    with pytest.raises(TypeError, match="is one string: pass a list"):
        pipe.ask_many(ctx, "which ship?", max_new_tokens=2)
    # the same questions as a list are answered, one result each, equal to ask()
    many = pipe.ask_many(ctx, ["which ship?", "where?"], max_new_tokens=3)
    assert [r.tokens for r in many] == [pipe.ask(ctx, q, max_new_tokens=3).tokens
                                        for q in ("which ship?", "where?")]


@pytest.mark.parametrize("bad", [None, "models/smollm2", object()])
def test_something_that_is_not_a_model_is_refused(pipe, bad):
    with pytest.raises(TypeError, match="has no kvjax_split"):
        kvjax.generate(bad, [[1, 2, 3]], max_new_tokens=2)
    with pytest.raises(TypeError, match="has no kvjax_split"):
        kvjax.Pipeline(bad, pipe.tokenizer)
    with pytest.raises(TypeError, match="has no kvjax_split"):
        kvjax.Engine(bad, pipe.tokenizer, kv_budget="1MiB")


@pytest.mark.parametrize("kwargs, says", [
    (dict(sampler=kvjax.Greedy), "must be a sampler instance"),
    (dict(sampler="greedy"), "must be a sampler instance"),
    (dict(eos_id=97), r"EOS ids must be ints in \[0, vocab_size=97\); 97 is not"),
    (dict(eos_id=-1), "-1 is not"),
    (dict(eos_id=[1, 2.0]), "2.0 is not"),
])
def test_generate_and_engine_refuse_bad_samplers_and_eos_ids(tiny, kwargs, says):
    with pytest.raises(ValueError, match=says):
        kvjax.generate(tiny, [[1, 2, 3]], max_new_tokens=2, **kwargs)
    eng = kvjax.Engine(tiny, kv_budget="1MiB", max_running=1, max_tail=16)
    with pytest.raises(ValueError, match=says):
        eng.submit([1, 2, 3], max_new_tokens=2, **kwargs)
    assert eng.stats().waiting == 0


@pytest.mark.parametrize("budget", [0, -5, "0GiB", "-1MiB", "lots"])
def test_engine_refuses_a_budget_that_is_not_positive_bytes(tiny, budget):
    with pytest.raises(ValueError, match="kv_budget="):
        kvjax.Engine(tiny, kv_budget=budget)


def test_a_model_that_does_not_declare_the_between_layers_hook_is_refused_first():
    """kvjax.model: without supports_between, UNComp's prefill_keep is refused before any
    prefill runs (the same model without pruning runs)."""
    from flax import nnx

    class Undeclared(models.Decoder):
        supports_between = False

    cfg = models.ModelConfig.tiny(n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97)
    model = Undeclared(cfg, rngs=nnx.Rngs(0))
    prompt = [list(np.arange(1, 41) % 96 + 1)]
    with pytest.raises(ValueError, match="does not declare that its prefill runs such a hook"):
        kvjax.generate(model, prompt, max_new_tokens=2, press=kvjax.UNCompPress(
            compression_ratio=0.5, window_size=8, prefill_keep=(None, 24)))
    out = kvjax.generate(model, prompt, max_new_tokens=2,
                         press=kvjax.UNCompPress(compression_ratio=0.5, window_size=8))
    assert out.tokens.shape == (1, 2)


class _NoDecode:
    """A model whose functional half lacks decode and max_seq_len."""

    def kvjax_split(self):
        class Fn:
            def prefill(self, *a, **k):
                raise AssertionError("never called")
        return Fn(), {}


def test_a_functional_model_missing_the_contract_is_a_type_error():
    with pytest.raises(TypeError, match=r"lacks decode, max_seq_len \(an int\)"):
        kvjax.generate(_NoDecode(), [[1, 2, 3]], max_new_tokens=2)
