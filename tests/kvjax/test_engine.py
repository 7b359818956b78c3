"""kvjax.Engine against the single-request paths it must reproduce.

References: `kvjax.generate` of each prompt alone (same press, kv_dtype, sampler and key),
`Pipeline.run` / `Pipeline.ask` for text and compressed-context requests, and the kept
counts of a plain `loops.prefill` of each prompt for the pool's bookkeeping."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.engine.blocks import BlockAllocator
from kvjax.engine.step import decode_slots
from kvjax.presses import PRESSES, make_press, press_names

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from eval_helpers import char_tokenizer  # noqa: E402

VOCAB = 101
SERVED = [n for n in press_names() if n != "think"]


@pytest.fixture(scope="module")
def model():
    cfg = models.ModelConfig.tiny(n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=VOCAB)
    return models.Decoder(cfg, rngs=nnx.Rngs(1))


def _prompts(n, seed=0, lo=30, hi=120):
    rng = np.random.RandomState(seed)
    return [list(rng.randint(1, VOCAB, int(m))) for m in rng.randint(lo, hi, n)]


def _press(name, ratio=0.5):
    return make_press(name, ratio, **PRESSES[name][1])


def _generate(model, ids, n, press=None, **kw):
    out = kvjax.generate(model, [ids], max_new_tokens=n, press=press, **kw)
    return out.tokens[0, :out.lengths[0]].tolist()


def _kept_slots(model, ids, press, quant=None):
    """Slots of the store row the prompt's kept entries span, from a plain prefill."""
    fn, params = model.kvjax_split()
    t, n = loops.pad_prompts([ids])
    _, cache = loops.prefill(fn, params, jnp.asarray(t), jnp.asarray(n), tail_capacity=0,
                             press=press, quant=quant)
    kept = [len(kvjax.kept_positions(cache, layer)[0][h]) for layer in range(cache.n_layers)
            for h in range(cache.store.n_kv_heads)]
    return sum(kept)


def test_every_press_mixed_staggered_and_reusing_freed_blocks(model):
    """All registered presses (but ThinK), one request each, 3 slots, arriving over time
    with mixed lengths and output budgets: every request's greedy tokens are those of
    `generate` alone, later requests land in blocks freed by earlier ones, and the pool is
    empty at the end."""
    eng = kvjax.Engine(model, kv_budget=2 * 2**20, max_running=3, max_tail=32)
    prompts = _prompts(len(SERVED) + 1)
    news = [3 + (i * 5) % 11 for i in range(len(prompts))]
    presses = [None] + [_press(n) for n in SERVED]
    reqs, first_blocks = [], {}
    for i, (ids, press, n) in enumerate(zip(prompts, presses, news)):
        reqs.append(eng.submit(ids, press=press, max_new_tokens=n))
        for _ in range(i % 3):  # staggered: a few steps between arrivals
            eng.step()
        for r in reqs:
            if r.block is not None:
                first_blocks.setdefault(r.id, r.block.start)
    eng.run()
    for req, ids, press, n in zip(reqs, prompts, presses, news):
        assert req.result().tokens == _generate(model, ids, n, press), (req.id, press)
        assert req.result().finish_reason == "length"
    starts = list(first_blocks.values())
    assert len(starts) > len(set(starts)), "no request reused a freed block"
    stats = eng.stats()
    assert (stats.running, stats.waiting, stats.slots_used) == (0, 0, 0)


def test_pool_holds_exactly_the_kept_entries(model):
    """While requests run, the pool's used slots are the sum over them of their kept
    entries (from `kept_positions` of a plain prefill), each rounded to the 8-slot unit."""
    eng = kvjax.Engine(model, kv_budget=2 * 2**20, max_running=4, max_tail=32)
    prompts = _prompts(4, seed=3)
    presses = [None, _press("snapkv", 0.75), _press("adakv", 0.5), _press("zigzagkv", 0.6)]
    reqs = [eng.submit(ids, press=p, max_new_tokens=20) for ids, p in zip(prompts, presses)]
    eng.step()
    assert all(r.slot is not None for r in reqs)
    unit = BlockAllocator(8).rounded
    expected = sum(unit(_kept_slots(model, ids, p)) for ids, p in zip(prompts, presses))
    assert eng.stats().slots_used == expected
    eng.cancel(reqs[1])
    assert eng.stats().slots_used == expected - unit(_kept_slots(model, prompts[1],
                                                                 presses[1]))
    eng.run()
    assert eng.stats().slots_used == 0


def test_int8_pool_and_seeded_sampling_equal_generate(model):
    eng = kvjax.Engine(model, kv_budget=2**20, max_running=2, kv_dtype="int8", max_tail=32)
    prompts = _prompts(3, seed=5)
    press = _press("snapkv")
    key = jax.random.key(7)
    greedy = [eng.submit(ids, press=press, max_new_tokens=6) for ids in prompts[:2]]
    sampled = eng.submit(prompts[2], press=press, max_new_tokens=8,
                         sampler=kvjax.TopK(k=20), rng=key)
    eng.run()
    for req, ids in zip(greedy, prompts):
        assert req.result().tokens == _generate(model, ids, 6, press, kv_dtype="int8")
    ref = _generate(model, prompts[2], 8, press, kv_dtype="int8", sampler=kvjax.TopK(k=20),
                    rng=key)
    assert sampled.result().tokens == ref


def test_one_decode_compilation_per_bucket_across_a_workload(model):
    """The running slots are padded to a power of two: with max_running=2, buckets 1 and 2,
    and a second workload of other lengths, presses and budgets compiles nothing new."""
    eng = kvjax.Engine(model, kv_budget=2**20, max_running=2, max_tail=32)
    before = decode_slots._cache_size()
    for i, ids in enumerate(_prompts(5, seed=9)):
        eng.submit(ids, press=None if i % 2 else _press("knorm"), max_new_tokens=2 + i)
    eng.run()
    assert decode_slots._cache_size() - before == 2
    for i, ids in enumerate(_prompts(4, seed=10)):
        eng.submit(ids, press=_press("snapkv") if i % 2 else None, max_new_tokens=5 - i)
    eng.run()
    assert decode_slots._cache_size() - before == 2


def test_eos_and_stop_end_a_request(model):
    ids = _prompts(1, seed=11)[0]
    ref = _generate(model, ids, 8)
    eng = kvjax.Engine(model, kv_budget=2**20, max_running=2, max_tail=32)
    req = eng.submit(ids, max_new_tokens=8, eos_id=ref[2])
    assert req.result().tokens == ref[:ref.index(ref[2]) + 1]
    assert req.result().finish_reason == "stop"


CONTEXT = "The code is 4711. " + "Grass is green and the sky is blue. " * 4


@pytest.fixture(scope="module")
def text():
    """(tokenizer, tiny model, its Pipeline, SnapKV 0.5 with an 8-token window)."""
    tok = char_tokenizer()
    model = models.Decoder(models.ModelConfig.tiny(), rngs=nnx.Rngs(0))
    return tok, model, kvjax.Pipeline(model, tok), kvjax.SnapKVPress(compression_ratio=0.5,
                                                                      window_size=8)


def test_text_and_compressed_context_requests_equal_pipeline(text):
    tok, model, pipe, press = text
    context = CONTEXT
    questions = ["What is the code?", "What colour is the sky?", "Say hi."]
    eng = kvjax.Engine(model, tok, kv_budget=2**20, max_running=3, max_tail=64, press=press)
    text = [eng.submit(context, q, max_new_tokens=8) for q in questions[:2]]
    aware = eng.submit(context, questions[0], question_aware=True, max_new_tokens=8)
    eng.run()
    for req, q in zip(text, questions):
        assert req.result().tokens == pipe.run(context, q, press=press, max_new_tokens=8).tokens
    assert aware.result().tokens == pipe.run(context, questions[0], press=press,
                                             question_aware=True, max_new_tokens=8).tokens
    # N questions on one compressed context hold its store once
    ctx = pipe.compress(context, press=press)
    asks = [eng.submit(ctx, q, max_new_tokens=8) for q in questions]
    eng.step()
    unit = BlockAllocator(8).rounded
    assert eng.stats().slots_used == unit(int(np.asarray(ctx.cache.store.length).sum()))
    eng.run()
    for req, q in zip(asks, questions):
        assert req.result().tokens == pipe.ask(ctx, q, max_new_tokens=8).tokens
        assert req.result().text == pipe.ask(ctx, q, max_new_tokens=8).text
    assert eng.stats().slots_used == 0


def test_stream_yields_the_result_tokens(model):
    eng = kvjax.Engine(model, kv_budget=2**20, max_running=2, max_tail=32)
    ids = _prompts(1, seed=13)[0]
    req = eng.submit(ids, max_new_tokens=6)
    assert list(eng.stream(req)) == req.result().tokens == _generate(model, ids, 6)


def test_a_prompt_too_big_for_the_pool_fails_alone(model):
    """A full-cache prompt that can never fit the pool is refused at submit; a compressed one
    whose kept entries exceed the whole pool fails with a reason at admission; the engine
    serves the next one."""
    eng = kvjax.Engine(model, kv_budget=100_000, max_running=2, max_tail=16)
    n = eng.allocator.n_slots
    ids = list(np.arange(1, n // 3 + 2) % (VOCAB - 1) + 1)  # 3 layers x 2 heads: ~2n slots
    with pytest.raises(ValueError, match=f"keeps {6 * len(ids)} slots per store row; the "
                                         f"pool has {n}"):
        eng.submit(ids, max_new_tokens=2)
    big = eng.submit(ids, max_new_tokens=2, press=kvjax.KnormPress(compression_ratio=0.1))
    small = eng.submit(_prompts(1, lo=10, hi=12)[0], max_new_tokens=3)
    eng.run()
    assert big.result().finish_reason == "error" and "raise kv_budget" in big.result().error
    assert small.result().finish_reason == "length"
    assert eng.stats().slots_used == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=[1, 2, 500], max_new_tokens=2), "token id 500"),
    (dict(x=[1.5, 2.0], max_new_tokens=2), "must be integers"),
    (dict(x=[1, 2], max_new_tokens=0), "max_new_tokens=0"),
    (dict(x=[1] * 600, max_new_tokens=2), "exceeds the model's context"),
    (dict(x=[1, 2], max_new_tokens=2, press="snapkv"), "make_press"),
    (dict(x=[1, 2], max_new_tokens=2, press=kvjax.ThinKPress(
        key_channel_compression_ratio=0.5)), "prunes key channels"),
    (dict(x=[1, 2], max_new_tokens=2, stop=["x"]), "needs a tokenizer"),
    (dict(x="text", max_new_tokens=2), "needs a tokenizer"),
])
def test_bad_requests_are_refused_at_submit(model, kwargs, match):
    eng = kvjax.Engine(model, kv_budget=2**20, max_running=2, max_tail=32)
    x = kwargs.pop("x")
    with pytest.raises((ValueError, TypeError), match=match):
        eng.submit(x, **kwargs)
    ok = eng.submit([1, 2, 3], max_new_tokens=2)  # the engine still serves
    assert ok.result().tokens == _generate(model, [1, 2, 3], 2)


def test_bad_engine_arguments_and_lifecycle(model):
    with pytest.raises(ValueError, match="kv_budget='2 parsecs'"):
        kvjax.Engine(model, kv_budget="2 parsecs")
    with pytest.raises(ValueError, match="raise kv_budget"):
        kvjax.Engine(model, kv_budget=1000, max_running=2, max_tail=32)
    with pytest.raises(ValueError, match="max_running=0"):
        kvjax.Engine(model, max_running=0)
    eng = kvjax.Engine(model, kv_budget=2**20, max_running=2, max_tail=32)
    req = eng.submit([1, 2, 3], max_new_tokens=2)
    req.result()
    with pytest.raises(ValueError, match="already finished"):
        eng.cancel(req)
    other = kvjax.Engine(model, kv_budget=2**20, max_running=2, max_tail=32)
    with pytest.raises(ValueError, match="not a request of this engine"):
        other.cancel(req)
    eng.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        eng.submit([1, 2], max_new_tokens=2)


def test_context_from_another_model_is_refused():
    tok = char_tokenizer()
    a = models.Decoder(models.ModelConfig.tiny(), rngs=nnx.Rngs(0))
    b = models.Decoder(models.ModelConfig.tiny(), rngs=nnx.Rngs(1))
    ctx = kvjax.Pipeline(a, tok).compress("Some context here. " * 3)
    eng = kvjax.Engine(b, tok, kv_budget=2**20, max_running=2, max_tail=32)
    with pytest.raises(ValueError, match="compressed by model"):
        eng.submit(ctx, "question?")
    with pytest.raises(ValueError, match="press= cannot be given"):
        kvjax.Engine(a, tok, kv_budget=2**20, max_tail=32).submit(
            ctx, "q?", press=kvjax.SnapKVPress(compression_ratio=0.5))


def test_warmup_compiles_every_bucket_and_changes_nothing(model):
    eng = kvjax.Engine(model, kv_budget=2**20, max_running=5, max_tail=32)
    before = decode_slots._cache_size()
    assert eng.warmup() == 4  # buckets 1, 2, 4 and 5
    assert decode_slots._cache_size() - before == 4
    prompts = _prompts(5, seed=31)
    reqs = [eng.submit(ids, max_new_tokens=2 + i) for i, ids in enumerate(prompts)]
    eng.run()
    assert decode_slots._cache_size() - before == 4  # the workload compiled no step
    for i, (req, ids) in enumerate(zip(reqs, prompts)):
        assert req.result().tokens == _generate(model, ids, 2 + i)


def test_temperatures_and_top_p_are_data_one_compilation(model):
    """Requests with other temperatures and top-p values reuse the compiled steps, and each
    draws what `kvjax.generate` draws with its sampler and key."""
    prompts = _prompts(4, seed=21)
    eng = kvjax.Engine(model, kv_budget=2**20, max_running=4, max_tail=32)

    def workload(samplers):
        reqs = [eng.submit(ids, max_new_tokens=6, sampler=s, rng=jax.random.key(i))
                for i, (ids, s) in enumerate(zip(prompts, samplers))]
        eng.run()
        for i, (req, ids, s) in enumerate(zip(reqs, prompts, samplers)):
            assert req.result().tokens == _generate(model, ids, 6, sampler=s,
                                                    rng=jax.random.key(i)), s

    workload([kvjax.Temperature(0.7), kvjax.TopP(0.8, 0.9), kvjax.Temperature(1.3),
              kvjax.TopP(0.95, 1.1)])
    before = decode_slots._cache_size()
    workload([kvjax.TopP(0.5, 0.6), kvjax.Temperature(2.0), kvjax.TopP(0.99, 1.5),
              kvjax.Temperature(0.4)])
    assert decode_slots._cache_size() == before


def test_token_id_question_and_held_context_equal_pipeline(text):
    tok, model, pipe, press = text
    context = CONTEXT
    eng = kvjax.Engine(model, tok, kv_budget=2**20, max_running=2, max_tail=64)
    ids, q_ids = pipe.encode(context, "What is the code?")
    req = eng.submit(ids, question=q_ids, press=press, max_new_tokens=8, eos_id=tok.eos_ids)
    assert req.result().tokens == pipe.run(context, "What is the code?", press=press,
                                           max_new_tokens=8).tokens
    # a held context stays in the pool between its requests, and leaves at release
    ctx = pipe.compress(context, press=press)
    unit = BlockAllocator(8).rounded
    held = unit(int(np.asarray(ctx.cache.store.length).sum()))
    assert eng.hold(ctx) == held and eng.stats().slots_used == held
    for q in ("What is the code?", "Say hi."):
        assert eng.submit(ctx, q, max_new_tokens=8).result().tokens == pipe.ask(
            ctx, q, max_new_tokens=8).tokens
        assert eng.stats().slots_used == held and eng.stats().contexts_held == 1
    with pytest.raises(ValueError, match="held already"):
        eng.hold(ctx)
    eng.release(ctx)
    assert eng.stats().slots_used == 0 and eng.stats().contexts_held == 0
    with pytest.raises(ValueError, match="not held"):
        eng.release(ctx)
    with pytest.raises(ValueError, match="question as a list of ids|token ids"):
        eng.submit(ids, question="text", max_new_tokens=2)


def test_allocator_compaction_hand_case():
    """Blocks at 0 (16), 16 (8), 24 (24) of 64; the middle one freed leaves runs of 8 and 16:
    24 slots fit only compacted, and compaction slides the last block down to 16."""
    alloc = BlockAllocator(64, align=8)
    a, b, c = alloc.allocate(16), alloc.allocate(8), alloc.allocate(24)
    assert (a.start, b.start, c.start) == (0, 16, 24)
    alloc.release(b)
    assert alloc.allocate(24) is None and alloc.largest_free == 16
    assert alloc.fits_compacted(24) and not alloc.fits_compacted(32)
    assert alloc.compact() == [(c, 24)] and (a.start, c.start) == (0, 16)
    assert alloc.largest_free == 24 and alloc.allocate(24).start == 40
    assert alloc.compact() == [] and alloc.free == 0


def _engine_of(model, n_slots: int, **kw):
    """An engine whose kv_budget leaves exactly `n_slots` pool slots after the tails (read off
    a probe engine's bytes per slot and tail bytes)."""
    probe = kvjax.Engine(model, kv_budget=2 * 2**20, **kw)
    held = probe.stats()
    tails = held.bytes_held - held.pool_slots * probe.slot_bytes
    return kvjax.Engine(model, kv_budget=tails + n_slots * probe.slot_bytes, **kw)


def test_a_fragmented_pool_is_compacted_and_answers_do_not_change(model):
    """Full-cache requests of 40, 40, 40 tokens (240 slots each: 3 layers x 2 kv heads) fill
    a pool of 864 slots up to a free run of 144; when the middle one finishes, a 64-token
    request (384 slots) fits only in the 240 + 144 free slots together: the pool is
    compacted once (the third request's block slides down while it is decoding) and every
    answer still equals `generate` alone."""
    eng = _engine_of(model, 864, max_running=4, max_tail=16)
    assert eng.stats().pool_slots == 864
    rng = np.random.RandomState(7)
    prompts = [list(rng.randint(1, VOCAB, n)) for n in (40, 40, 40, 64)]
    news = (12, 2, 12, 5)
    reqs = [eng.submit(ids, max_new_tokens=n) for ids, n in zip(prompts[:3], news)]
    eng.step()
    assert [r.block.start for r in reqs] == [0, 240, 480] and reqs[0].kept == 240
    while not reqs[1].done:
        eng.step()
    reqs.append(eng.submit(prompts[3], max_new_tokens=news[3]))
    eng.step()
    assert eng.stats().compactions == 1
    assert (reqs[2].block.start, reqs[3].block.start) == (240, 480)
    assert eng.stats().slots_used == 3 * 240 + 384 - 240
    eng.run()
    for req, ids, n in zip(reqs, prompts, news):
        assert req.result().tokens == _generate(model, ids, n), req.id
    assert eng.stats().slots_used == 0


def test_absorb_tail_equals_the_store_and_its_tail(model):
    """`pool.absorb_tail` moves a cache's tail into its store: the kept positions are the
    store's plus the tail's, and the next decode step's logits are the same."""
    from kvjax.engine.pool import absorb_tail
    fn, params = model.kvjax_split()
    ids = _prompts(1, seed=5)[0]
    t, n = loops.pad_prompts([ids])
    _, cache = loops.prefill(fn, params, jnp.asarray(t), jnp.asarray(n), tail_capacity=8,
                             press=_press("adakv", 0.5))
    new = jnp.asarray([[5, 7, 11, 13, 17, 0, 0, 0]], jnp.int32)
    _, cache = loops.extend(fn, params, new, jnp.array([5]), cache)
    moved = absorb_tail(cache, width=1024)
    assert int(moved.tail.count[0]) == 0
    for layer in range(cache.n_layers):
        for h in range(cache.store.n_kv_heads):
            want = sorted(kvjax.kept_positions(cache, layer)[0][h].tolist())
            assert sorted(kvjax.kept_positions(moved, layer)[0][h].tolist()) == want
    tok = jnp.asarray([[19]], jnp.int32)
    a, _ = fn.decode(params, tok, jnp.array([1]), cache, attn_impl="reference")
    b, _ = fn.decode(params, tok, jnp.array([1]), moved, attn_impl="reference")
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


def test_generation_longer_than_the_tail_moves_into_the_pool(model):
    """max_tail=8 and 30 new tokens: every full tail moves into a larger block of the pool,
    for the full cache and per-head budgets alike, and every answer equals `generate`."""
    eng = kvjax.Engine(model, kv_budget=2 * 2**20, max_running=3, max_tail=8)
    prompts = _prompts(4, seed=11)
    presses = [None, _press("snapkv", 0.75), _press("adakv", 0.5), _press("zigzagkv", 0.6)]
    reqs, first = [], None
    for i, (ids, press) in enumerate(zip(prompts, presses)):
        reqs.append(eng.submit(ids, press=press, max_new_tokens=30, question=[3, 4]))
        eng.step()
        first = first or reqs[0].kept
    for _ in range(12):
        eng.step()
    # 2 question + 16 generated tokens went through the first request's tail: two full
    # tails of 8 moved into the pool, 3 layers x 2 kv heads x 8 entries each
    assert reqs[0].kept == first + 2 * 3 * 2 * 8
    eng.run()
    for req, ids, press in zip(reqs, prompts, presses):
        want = _generate(model, ids + [3, 4], 30, press) if press is None else None
        if press is not None:  # the question is appended after compression, as the engine does
            want = _generate_then(model, ids, [3, 4], 30, press)
        assert req.result().tokens == want, (req.id, press)
    assert eng.stats().slots_used == 0 and eng.stats().preemptions == 0


def _generate_then(model, ids, question, n, press):
    """`Pipeline.ask`-style reference: compress the prompt, then feed the question, greedy."""
    fn, params = model.kvjax_split()
    t, m = loops.pad_prompts([ids])
    logits, cache = loops.prefill(fn, params, jnp.asarray(t), jnp.asarray(m),
                                  tail_capacity=len(question) + n + 8, press=press)
    q = jnp.asarray([question + [0] * (16 - len(question))], jnp.int32)
    logits, cache = loops.extend(fn, params, q, jnp.array([len(question)]), cache)
    out = []
    for _ in range(n):
        tok = int(jnp.argmax(logits[0]))
        out.append(tok)
        logits, cache = loops.extend(fn, params, jnp.asarray([[tok]]), jnp.array([1]), cache)
    return out


def test_preempted_requests_resume_with_the_same_tokens(model):
    """Two full-cache requests of 40 tokens (240 slots each) in a pool of 600 slots with
    8-slot tails: the first one's growth takes the pool, so the newest is preempted (slot
    and block freed), resumes by recompute with the tokens it had, and both answers equal
    `generate` alone; a request that cannot grow even alone ends with an error."""
    eng = _engine_of(model, 600, max_running=2, max_tail=8)
    assert eng.stats().pool_slots == 600
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(1, VOCAB, 40)) for _ in range(2)]
    reqs = [eng.submit(ids, max_new_tokens=30) for ids in prompts]
    eng.run()
    assert eng.stats().preemptions >= 1 and reqs[1].preemptions >= 1
    for req, ids in zip(reqs, prompts):
        assert req.result().tokens == _generate(model, ids, 30), req.id
    assert eng.stats().slots_used == 0
    small = _engine_of(model, 296, max_running=2, max_tail=8)
    with pytest.raises(ValueError, match="40-token prompt and at least 32 tokens beyond its "
                                         "tail keeps 432 slots"):  # the full cache: at submit
        small.submit(prompts[0], max_new_tokens=40)
    knorm = kvjax.KnormPress(compression_ratio=0.5)  # 120 slots, + 48 per full tail
    alone = small.submit(prompts[0], max_new_tokens=60, press=knorm)
    small.run()
    res = alone.result()  # 120 + 3 x 48 = 264 fit in 296; the fourth tail does not
    assert res.finish_reason == "error" and "need 312 pool slots" in res.error
    assert len(res.tokens) == 32 and small.stats().slots_used == 0
    assert res.tokens == _generate(model, prompts[0], 60, knorm)[:32]


def test_seeded_sampling_resumes_after_preemption(model):
    """The preemption setup above with sampled requests (TopK, Temperature, own keys): the
    preempted request resumes with the key its slot held, so both sequences equal
    `generate` alone with the same sampler and key."""
    eng = _engine_of(model, 600, max_running=2, max_tail=8)
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(1, VOCAB, 40)) for _ in range(2)]
    samplers = [kvjax.TopK(k=20), kvjax.Temperature(temperature=0.8)]
    keys = [jax.random.key(11), jax.random.key(12)]
    reqs = [eng.submit(ids, max_new_tokens=30, sampler=s, rng=k)
            for ids, s, k in zip(prompts, samplers, keys)]
    eng.run()
    assert reqs[1].preemptions >= 1
    for req, ids, s, k in zip(reqs, prompts, samplers, keys):
        assert req.result().tokens == _generate(model, ids, 30, sampler=s, rng=k), req.id
    assert eng.stats().slots_used == 0
