"""The pure request/response layer of `kvjax serve` (kvjax/serve/protocol.py), without a
server: chat splitting equals `Pipeline.encode`, OpenAI parameters map to the samplers and
presses they name, bad bodies are refused by field, and streamed text never shows what the
final text cuts (a stop string) or a partial character."""

import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

import kvjax
import models
from kvjax.serve import protocol as P

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kvjax"))
from kvpress_kvzip_ref import CHATML_TEMPLATE, tiny_llama  # noqa: E402

DEFAULT = P.PressSpec("snapkv", 0.75, (("window_size", 8),))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    _, path = tiny_llama(tmp_path_factory.mktemp("proto"), chat_template=CHATML_TEMPLATE)
    model, tok = models.load(path, progress=False, dtype=jnp.float32)
    return kvjax.Pipeline(model, tok)


def _chat(content, **kw):
    return {"messages": [{"role": "user", "content": content}], **kw}


def test_chat_splits_as_pipeline_encode(pipe):
    doc, q = "The Albatross never came back. ", "Which ship?"
    aware = P.parse_chat(_chat(doc + q), pipe.tokenizer, DEFAULT)
    assert (list(aware.x), list(aware.question)) == tuple(map(list, pipe.encode(doc + q)))
    agnostic = P.parse_chat(_chat(q, kvjax={"question_aware": False}), pipe.tokenizer, DEFAULT)
    assert (list(agnostic.x), list(agnostic.question)) == tuple(map(list, pipe.encode("", q)))
    # text parts are joined; earlier turns go before the question, into the compressed part
    parts = _chat([{"type": "text", "text": doc}, {"type": "text", "text": q}])
    assert P.parse_chat(parts, pipe.tokenizer, DEFAULT).x == aware.x
    turns = {"messages": [{"role": "system", "content": doc}, {"role": "user", "content": q}],
             "kvjax": {"question_aware": False}}
    sub = P.parse_chat(turns, pipe.tokenizer, DEFAULT)
    text = pipe.tokenizer.decode(list(sub.x) + list(sub.question), skip_special_tokens=False)
    assert text == pipe.tokenizer.apply_chat_template(turns["messages"])
    assert doc in pipe.tokenizer.decode(sub.x, skip_special_tokens=False)
    assert sub.prompt_tokens == len(sub.x) + len(sub.question)


@pytest.mark.parametrize("body, sampler", [
    (dict(temperature=0), kvjax.Greedy()),
    (dict(), kvjax.Temperature(1.0)),  # OpenAI's default temperature is 1
    (dict(temperature=0.7), kvjax.Temperature(0.7)),
    (dict(temperature=0.7, top_p=0.9), kvjax.TopP(p=0.9, temperature=0.7)),
])
def test_sampling_parameters_name_their_sampler(pipe, body, sampler):
    sub = P.parse_chat(_chat("hi", seed=3, **body), pipe.tokenizer, DEFAULT)
    assert sub.sampler == sampler and sub.seed == 3


def test_press_options(pipe):
    t = pipe.tokenizer
    assert P.parse_chat(_chat("hi"), t, DEFAULT).press == DEFAULT  # the server's
    spec = P.parse_chat(_chat("hi", kvjax={"compression_ratio": 0.5}), t, DEFAULT).press
    assert spec == P.PressSpec("snapkv", 0.5, (("window_size", 8),))
    spec = P.parse_chat(_chat("hi", kvjax={"press": "knorm"}), t, DEFAULT).press
    assert spec == P.PressSpec("knorm", 0.75, ()) and spec.build() == kvjax.KnormPress(
        compression_ratio=0.75)
    assert P.parse_chat(_chat("hi", kvjax={"press": "full"}), t, DEFAULT).press.build() is None
    sub = P.parse_chat(_chat("q", kvjax={"context_id": "ctx-1"}), t, DEFAULT)
    assert sub.press is None and sub.context_id == "ctx-1" and sub.question == "q"


@pytest.mark.parametrize("body, says", [
    (dict(n=3), "n=3"),
    (dict(top_p=0), "top_p=0"),
    (dict(temperature="hot"), "temperature='hot'"),
    (dict(max_tokens=True), "max_tokens=True"),
    (dict(stop=["a", "b", "c", "d", "e"]), "up to 4"),
    (dict(stream="yes"), "stream='yes'"),
    (dict(kvjax={"press": 3}), "kvjax.press=3"),
    (dict(kvjax={"press": "full", "compression_ratio": 0.5}), "need a press"),
    (dict(kvjax={"compression_ratio": 1.0}), "compression_ratio=1.0"),
    (dict(kvjax={"context_id": "ctx-1", "press": "knorm"}), "compressed already"),
    (dict(kvjax="snapkv"), "kvjax='snapkv'"),
    (dict(frequency_penalty=0.5), "frequency_penalty=0.5 is not supported"),
    (dict(messages=[{"role": "user", "content": 3}]), "content must be a string"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "only text"),
    (dict(messages=[]), "non-empty list"),
])
def test_bad_chat_bodies_name_the_field(pipe, body, says):
    with pytest.raises(P.ApiError, match=says) as err:
        P.parse_chat({**_chat("hi"), **body}, pipe.tokenizer, DEFAULT)
    assert err.value.status == 400


@pytest.mark.parametrize("prompt, says", [
    ("", "prompt is empty"), (None, "must be a non-empty string"), ([1.5], "non-empty string"),
    (["a", "b"], "one prompt per request"),
])
def test_bad_completion_prompts(pipe, prompt, says):
    with pytest.raises(P.ApiError, match=says):
        P.parse_completion({"prompt": prompt}, pipe.tokenizer, DEFAULT)
    with pytest.raises(P.ApiError, match="chat options"):
        P.parse_completion({"prompt": "x", "kvjax": {"question_aware": False}}, pipe.tokenizer,
                           DEFAULT)


def test_completion_prompt_forms(pipe):
    t = pipe.tokenizer
    assert P.parse_completion({"prompt": "hello"}, t, DEFAULT).x == t.encode("hello")
    assert P.parse_completion({"prompt": ["hello"]}, t, DEFAULT).x == t.encode("hello")
    assert P.parse_completion({"prompt": [5, 6, 7]}, t, DEFAULT).x == [5, 6, 7]
    sub = P.parse_completion({"prompt": "hello"}, t, DEFAULT)
    assert sub.budget() == 16  # the default


class _Bytes:
    """decode: each id is one byte (the partial UTF-8 of a multi-byte character shows as the
    replacement character, as a byte-level tokenizer decodes it)."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_streamed_text_holds_back_stop_prefixes_and_partial_characters():
    final = "ab"  # the engine cut "abSTOPxy" at "STOP"
    ids = list("abSTOPxy".encode())
    ts = P.TextStream(_Bytes(), eos_ids=(), stop=("STOP",))
    shown = "".join(ts.delta(ids[:n], done=False) for n in range(1, 6))
    assert shown == "ab"  # "STO" never shown: it may begin the stop string
    assert ts.delta(ids[:6], done=True, final_text=final) == ""  # the step that found STOP
    ts = P.TextStream(_Bytes(), eos_ids=(), stop=())
    e_acute = list("é".encode())  # two bytes
    assert ts.delta(e_acute[:1], done=False) == ""
    assert ts.delta(e_acute, done=False) == "é"
    assert ts.delta(e_acute + [0x21], done=True) == "!"
