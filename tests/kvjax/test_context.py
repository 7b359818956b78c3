"""Compress once, answer many (kvjax/context.py) on a tiny random Llama with a chat template:
`ask` gives the tokens of `run` for every registered press, batched questions the tokens of
separate asks, a saved context the same answers in a fresh process, and bad checkpoints clear
errors."""

import json
import os
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
import models
from kvjax import cli
from kvjax.presses import PRESSES, make_press
from kvpress_kvzip_ref import CHATML_TEMPLATE, tiny_llama

CONTEXT = ("The harbour master kept a ledger of every ship. On the third page, written in "
           "green ink, was the name of the only vessel that never came back: the Albatross. ")
QUESTIONS = ["Which ship never came back?", "What colour was the ink?", "Page?"]
N_NEW = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, path = tiny_llama(tmp_path_factory.mktemp("ctx"), chat_template=CHATML_TEMPLATE)
    model, tok = models.load(path, progress=False, dtype=jnp.float32)
    return path, model, tok, kvjax.Pipeline(model, tok)


def _press(name):
    return None if name == "full" else make_press(name, 0.5, **PRESSES[name][1])


@pytest.mark.parametrize("name", ["full"] + sorted(PRESSES))
def test_ask_equals_run_for_every_press(tiny, name):
    _, _, _, pipe = tiny
    press = _press(name)
    compressed = pipe.compress(CONTEXT, press=press)
    before = [np.asarray(x).copy() for x in (compressed.cache.store.k, compressed.cache.tail.k)]
    for q in QUESTIONS[:2]:
        want = pipe.run(CONTEXT, q, press=press, max_new_tokens=N_NEW)
        got = pipe.ask(compressed, q, max_new_tokens=N_NEW)
        assert got.tokens == want.tokens and got.text == want.text, (name, q)
        assert got.n_context == want.n_context and got.n_question == want.n_question
    after = (compressed.cache.store.k, compressed.cache.tail.k)
    for a, b in zip(before, after):  # asking leaves the compressed context untouched
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("name", ["full", "snapkv", "adakv", "think", "zigzagkv", "uncomp",
                                  "kvzip"])
def test_batched_questions_equal_separate_asks(tiny, name):
    _, _, _, pipe = tiny
    compressed = pipe.compress(CONTEXT, press=_press(name))
    separate = [pipe.ask(compressed, q, max_new_tokens=N_NEW).tokens for q in QUESTIONS]
    batched = pipe.ask_many(compressed, QUESTIONS, max_new_tokens=N_NEW)
    assert [r.tokens for r in batched] == separate
    via_run = pipe.run(CONTEXT, questions=QUESTIONS, press=_press(name), max_new_tokens=N_NEW)
    assert [r.tokens for r in via_run] == separate
    store = batched[0].cache.store
    shared = compressed.cache.hook is None  # UNComp's ring decode rewrites the store: copies
    assert store.k.shape[0] == (1 if shared else len(QUESTIONS))
    assert store.k.shape[1:] == compressed.cache.store.k.shape[1:]


def test_ring_decode_batched_and_saved(tiny, tmp_path):
    """UNComp's ring decode rewrites the store while decoding: `ask_many` gives each question
    its own copy and the tokens of `run`; a saved context keeps the hook and its answers."""
    _, model, _, pipe = tiny
    press = kvjax.UNCompPress(compression_ratio=0.5, window_size=8, decode="ring")
    compressed = pipe.compress(CONTEXT, press=press)
    assert isinstance(compressed.cache.hook, kvjax.RingDecode)
    want = [pipe.run(CONTEXT, q, press=press, max_new_tokens=N_NEW).tokens for q in QUESTIONS]
    batched = pipe.ask_many(compressed, QUESTIONS, max_new_tokens=N_NEW)
    assert [r.tokens for r in batched] == want
    assert batched[0].cache.store.k.shape[0] == len(QUESTIONS)  # one store copy each
    assert batched[0].cache.tail.k.shape[-2] == 0  # the ring keeps no tail
    loaded = kvjax.CompressedContext.load(compressed.save(tmp_path / "ring"), model)
    assert loaded.cache.hook == compressed.cache.hook
    assert [r.tokens for r in pipe.ask_many(loaded, QUESTIONS, max_new_tokens=N_NEW)] == want


def test_save_then_load_in_a_fresh_process(tiny, tmp_path):
    path, model, _, pipe = tiny
    press = make_press("snapkv", 0.5, **PRESSES["snapkv"][1])
    compressed = pipe.compress(CONTEXT, press=press)
    want = [pipe.ask(compressed, q, max_new_tokens=N_NEW).tokens for q in QUESTIONS]
    out = compressed.save(tmp_path / "doc.kvjax")
    script = textwrap.dedent(f"""
        import json, jax.numpy as jnp, kvjax, models
        model, tok = models.load({str(path)!r}, progress=False, dtype=jnp.float32)
        ctx = kvjax.CompressedContext.load({str(out)!r}, model)
        pipe = kvjax.Pipeline(model, tok)
        print(json.dumps([pipe.ask(ctx, q, max_new_tokens={N_NEW}).tokens
                          for q in {QUESTIONS!r}]))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == want
    loaded = kvjax.CompressedContext.load(out, model)
    assert loaded.context_ids == compressed.context_ids and loaded.press == repr(press)
    np.testing.assert_array_equal(np.asarray(loaded.cache.store.k),
                                  np.asarray(compressed.cache.store.k))


def test_bad_checkpoints_are_clear_errors(tiny, tmp_path, tmp_path_factory):
    _, model, _, pipe = tiny
    compressed = pipe.compress(CONTEXT, press=make_press("knorm", 0.5))
    out = compressed.save(tmp_path / "doc")
    with pytest.raises(FileExistsError, match="not empty"):
        compressed.save(out)
    _, other_path = tiny_llama(tmp_path_factory.mktemp("other"), seed=1,
                               chat_template=CHATML_TEMPLATE)
    other, other_tok = models.load(other_path, progress=False, dtype=jnp.float32)
    with pytest.raises(ValueError, match="compressed by model .* not this one"):
        kvjax.CompressedContext.load(out, other)
    with pytest.raises(ValueError, match="compressed by model"):
        kvjax.Pipeline(other, other_tok).ask(compressed, "q")
    with pytest.raises(FileNotFoundError, match="not a kvjax compressed context"):
        kvjax.CompressedContext.load(tmp_path / "nothing", model)
    meta = json.loads((out / "context.json").read_text())
    (out / "context.json").write_text(json.dumps(dict(meta, version=99)))
    with pytest.raises(ValueError, match="version 99"):
        kvjax.CompressedContext.load(out, model)
    (out / "context.json").write_text(json.dumps(meta))
    victims = [f for f in (out / "arrays").rglob("*") if f.is_file() and f.stat().st_size > 0]
    for f in victims:  # truncate the array data
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with pytest.raises(ValueError, match="truncated"):
        kvjax.CompressedContext.load(out, model)


def test_questions_argument_errors(tiny):
    _, _, _, pipe = tiny
    with pytest.raises(ValueError, match="questions"):
        pipe.run(CONTEXT, "q", questions=QUESTIONS)
    with pytest.raises(ValueError, match="questions is empty"):
        pipe.ask_many(pipe.compress(CONTEXT), [])


def test_cli_compress_then_ask(tiny, tmp_path, capsys):
    path, _, _, pipe = tiny
    doc = tmp_path / "doc.txt"
    doc.write_text(CONTEXT)
    out = tmp_path / "doc.kvjax"
    assert cli.main(["compress", "--model", str(path), "--dtype", "float32", "--press",
                     "snapkv", "--ratio", "0.5", "--press-arg", "window_size=8", "--input",
                     str(doc), "--out", str(out)]) == 0
    assert "compressed" in capsys.readouterr().out
    assert cli.main(["ask", str(out), QUESTIONS[0], "--max-new-tokens", str(N_NEW)]) == 0
    press = kvjax.SnapKVPress(compression_ratio=0.5, window_size=8)
    want = pipe.run(CONTEXT, QUESTIONS[0], press=press, max_new_tokens=N_NEW).text
    assert capsys.readouterr().out.rstrip("\n") == want
