"""`kvjax serve` as a client sees it: the real server in a subprocess on 127.0.0.1 (a free
port), talked to with the official `openai` client and `httpx`. Every answer is compared with
`kvjax.Engine.submit` run offline in this process on the same weights and request; the pool
is read back from `/metrics`. Load and fault tests are bounded in count and time."""

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

import kvjax
import models
from server_helpers import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kvjax"))
from kvpress_kvzip_ref import CHATML_TEMPLATE, tiny_llama  # noqa: E402

CONTEXT = ("The harbour master kept a ledger of every ship. On the third page, written in "
           "green ink, was the name of the only vessel that never came back: the Albatross. ")
QUESTIONS = ["Which ship never came back?", "What colour was the ink?", "Which page?"]
SNAP = {"press": "snapkv", "compression_ratio": 0.5, "press_args": {"window_size": 8}}
ENGINE = dict(kv_budget="4MiB", max_running=4, max_tail=128)
FLAGS = ("--kv-budget", "4MiB", "--max-running", "4", "--max-tail", "128",
         "--max-body-bytes", "100000")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, path = tiny_llama(tmp_path_factory.mktemp("serve"), chat_template=CHATML_TEMPLATE)
    model, tok = models.load(path, progress=False, dtype=jnp.float32)
    return path, model, tok


@pytest.fixture(scope="module")
def server(tiny):
    srv = Server(tiny[0], *FLAGS)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def offline(tiny):
    _, model, tok = tiny
    return kvjax.Engine(model, tok, **ENGINE)


def _client(srv, key="none"):
    return openai.OpenAI(base_url=srv.base, api_key=key, max_retries=0, timeout=120)


def _snap():
    return kvjax.SnapKVPress(compression_ratio=0.5, window_size=8)


def _chat(client, srv, content, **kw):
    return client.chat.completions.create(model=srv.model, messages=[
        {"role": "user", "content": content}], **kw)


def _joined(stream):
    """(text, finish_reason, kvjax info, usage) of an openai stream."""
    text, finish, info, use = [], None, None, None
    for ch in stream:
        if ch.choices:
            c = ch.choices[0]
            text.append((c.delta.content if hasattr(c, "delta") else c.text) or "")
            finish = c.finish_reason or finish
            info = (ch.model_extra or {}).get("kvjax", info)
        if ch.usage is not None:
            use = ch.usage
    return "".join(text), finish, info, use


def test_chat_and_completions_equal_the_offline_engine(server, offline, tiny):
    _, _, tok = tiny
    client = _client(server)
    ask = CONTEXT + QUESTIONS[0]
    # chat, not streamed, greedy, the server's default press (the full cache)
    r = _chat(client, server, ask, max_tokens=8, temperature=0)
    want = offline.submit(ask, max_new_tokens=8).result()
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == len(want.tokens)
    assert r.choices[0].finish_reason == ("length" if want.finish_reason == "length"
                                          else "stop")
    # chat streamed, SnapKV, question-aware (the default): the whole prompt compressed
    text, finish, info, use = _joined(_chat(client, server, ask, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"kvjax": SNAP}))
    want = offline.submit(ask, max_new_tokens=8, press=_snap()).result()
    assert text == want.text and use.completion_tokens == len(want.tokens)
    assert info["press"] == "snapkv" and info["compression_ratio"] == 0.5
    # the question appended after compressing the rest (question_aware false)
    r = _chat(client, server, QUESTIONS[0], max_tokens=6, temperature=0,
              extra_body={"kvjax": {"press": "full", "question_aware": False}})
    assert r.choices[0].message.content == offline.submit(
        "", question=QUESTIONS[0], press=None, max_new_tokens=6).result().text
    # completions, streamed and not, with a stop string and a seeded top-p sampler
    prompt = CONTEXT[:90]
    ids = tok.encode(prompt)
    ref = offline.submit(ids, max_new_tokens=10, eos_id=tok.eos_ids).result()
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=10,
                                  temperature=0)
    assert r.choices[0].text == ref.text and r.usage.prompt_tokens == len(ids)
    stop = ref.text[3:5]
    want = offline.submit(ids, max_new_tokens=10, eos_id=tok.eos_ids, stop=[stop]).result()
    text, finish, _, _ = _joined(client.completions.create(
        model=server.model, prompt=prompt, max_tokens=10, temperature=0, stop=[stop],
        stream=True))
    assert text == want.text == ref.text[:ref.text.index(stop)] and finish == "stop"
    sampled = offline.submit(ids, max_new_tokens=10, eos_id=tok.eos_ids, rng=jax.random.key(3),
                             sampler=kvjax.TopP(p=0.9, temperature=0.8)).result()
    r = client.completions.create(model=server.model, prompt=prompt, max_tokens=10,
                                  temperature=0.8, top_p=0.9, seed=3)
    assert r.choices[0].text == sampled.text


def test_per_request_press_changes_the_kv_bytes(server, offline):
    client = _client(server)
    ask = CONTEXT + QUESTIONS[1]
    full = _chat(client, server, ask, max_tokens=4, temperature=0).model_extra["kvjax"]
    snap = _chat(client, server, ask, max_tokens=4, temperature=0,
                 extra_body={"kvjax": SNAP}).model_extra["kvjax"]
    reqs = [offline.submit(ask, max_new_tokens=4, press=p) for p in (None, _snap())]
    offline.run()
    assert (full["kv_bytes"], snap["kv_bytes"]) == tuple(r.kv_bytes for r in reqs)
    assert snap["kv_bytes"] < 0.6 * full["kv_bytes"]


def test_a_context_is_held_once_answered_and_freed(server, offline, tiny):
    client = _client(server)
    made = httpx.post(server.base + "/contexts", json={"text": CONTEXT, **SNAP},
                      timeout=120).json()
    ctx = offline.compress(CONTEXT, press=_snap())
    assert made["n_tokens"] == ctx.n_context and made["press"] == "snapkv"
    assert server.metrics()["kvjax_pool_slots_used"] == made["pool_slots"] > 0
    results = [None] * 3

    def ask(i):
        results[i] = _chat(client, server, QUESTIONS[i], max_tokens=6, temperature=0,
                           extra_body={"kvjax": {"context_id": made["id"]}})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for r, q in zip(results, QUESTIONS):
        assert r.choices[0].message.content == offline.submit(
            ctx, q, max_new_tokens=6).result().text
        assert r.model_extra["kvjax"]["context_id"] == made["id"]
    assert server.metrics()["kvjax_pool_slots_used"] == made["pool_slots"]  # held once
    listed = httpx.get(server.base + "/contexts").json()["data"]
    assert [c["id"] for c in listed] == [made["id"]]
    assert httpx.delete(f"{server.base}/contexts/{made['id']}").json()["deleted"] is True
    m = server.metrics()
    assert m["kvjax_pool_slots_used"] == 0 and m["kvjax_contexts_held"] == 0
    assert httpx.get(f"{server.base}/contexts/{made['id']}").status_code == 404
    with pytest.raises(openai.NotFoundError, match="no context"):
        _chat(client, server, "q", max_tokens=2, extra_body={"kvjax": {
            "context_id": made["id"]}})


@pytest.mark.parametrize("body, status, says", [
    (dict(n=2), 400, "n=2"),
    (dict(temperature=3), 400, "temperature=3"),
    (dict(max_tokens=0), 400, "max_tokens=0"),
    (dict(kvjax={"pres": "snapkv"}), 400, "kvjax.pres is not a kvjax option"),
    (dict(kvjax={"press": "snapkvv"}), 400, "snapkvv"),
    (dict(kvjax={"press": "think"}), 400, "prunes key channels"),
    (dict(kvjax={"context_id": "ctx-0"}), 404, "no context"),
    (dict(model="gpt-4"), 404, "model='gpt-4' is not served"),
    (dict(messages=[{"role": "assistant", "content": "hi"}]), 400, "must be the user's"),
    (dict(logprobs=True), 400, "logprobs=True is not supported"),
    (dict(max_tokens=100_000), 400, "exceeds the model's"),
    (dict(messages=[{"role": "user", "content": "x" * 600}]), 400, "exceeds the model's"),
    (dict(kvjax={"compression_ratio": 1.5}), 400, "compression_ratio=1.5"),
    (dict(messages=[{"role": "user", "content": "x" * 200_000}]), 413, "at most 100000"),
])
def test_bad_requests_are_refused_by_name(server, body, status, says):
    """Each bad body is an OpenAI-style error naming the value; none moves the pool."""
    before = server.metrics()["kvjax_pool_slots_used"]
    req = {"messages": [{"role": "user", "content": CONTEXT}], "max_tokens": 2, **body}
    r = httpx.post(server.base + "/chat/completions", json=req, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert says in err["message"] and {"message", "type", "param"} <= set(err)
    assert server.metrics()["kvjax_pool_slots_used"] == before


def test_bad_json_and_models_and_health(server):
    r = httpx.post(server.base + "/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert [m.id for m in _client(server).models.list().data] == [server.model]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


async def _sse_request(client, url, body):
    """(text, finish_reason, saw [DONE]) of one raw SSE chat request."""
    text, finish, done = [], None, False
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            for c in obj["choices"]:
                text.append(c["delta"].get("content") or "")
                finish = c["finish_reason"] or finish
    return "".join(text), finish, done


@pytest.mark.slow
def test_64_concurrent_streams_of_mixed_lengths_and_presses(server, offline):
    """64 streaming clients at once (4 run, the rest wait for slots and blocks): each stream
    ends with [DONE] and the offline engine's text; the pool is empty afterwards."""
    rng = np.random.RandomState(0)
    kinds = [{"press": "full"}, SNAP, {"press": "knorm", "compression_ratio": 0.5}]
    jobs = []
    for i in range(64):
        n_chars, n_new = int(rng.randint(40, 180)), int(rng.randint(2, 10))
        jobs.append((CONTEXT[:n_chars] + QUESTIONS[i % 3], n_new, kinds[i % 3]))
    presses = [None, _snap(), kvjax.KnormPress(compression_ratio=0.5)]
    reqs = [offline.submit(text, max_new_tokens=n, press=presses[i % 3])
            for i, (text, n, _) in enumerate(jobs)]
    offline.run()

    async def run_all():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*[
                _sse_request(client, server.base + "/chat/completions", {
                    "messages": [{"role": "user", "content": text}], "max_tokens": n,
                    "temperature": 0, "stream": True, "kvjax": kind})
                for text, n, kind in jobs]), timeout=600)

    got = asyncio.run(run_all())
    for (text, finish, done), req in zip(got, reqs):
        assert done and text == req.result().text
    m = server.metrics()
    assert m["kvjax_pool_slots_used"] == 0 and m["kvjax_requests_running"] == 0
    assert m["kvjax_requests_waiting"] == 0


def test_a_client_that_disconnects_frees_its_request(server):
    body = {"messages": [{"role": "user", "content": CONTEXT}], "max_tokens": 60,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.base + "/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            assert server.metrics()["kvjax_requests_running"] == 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = server.metrics()
        if m["kvjax_requests_running"] == 0 and m["kvjax_pool_slots_used"] == 0:
            break
        time.sleep(0.2)
    assert m["kvjax_requests_running"] == 0 and m["kvjax_pool_slots_used"] == 0
    text = httpx.get(server.url + "/metrics").text
    assert 'kvjax_requests_finished_total{reason="cancelled"} 1' in text


def test_restart_keeps_contexts_an_engine_failure_is_a_500_and_the_key_is_checked(
        tiny, tmp_path):
    path, _, _ = tiny
    flags = ("--kv-budget", "400000", "--max-running", "2", "--max-tail", "96",
             "--contexts-dir", str(tmp_path / "ctx"), "--api-key", "sekret")
    srv = Server(path, *flags)
    try:
        assert httpx.get(srv.base + "/models").status_code == 401
        client = _client(srv, "sekret")
        made = httpx.post(srv.base + "/contexts", json={"text": CONTEXT, **SNAP}, timeout=120,
                          headers={"Authorization": "Bearer sekret"}).json()
        before = [_chat(client, srv, q, max_tokens=6, temperature=0, extra_body={
            "kvjax": {"context_id": made["id"]}}).choices[0].message.content
            for q in QUESTIONS]
        # a full cache that can never fit the pool is a 400; a request that fails inside
        # the engine (KVzap weights made for another model) a 500 with the reason
        with pytest.raises(openai.BadRequestError, match="raise kv_budget"):
            _chat(client, srv, CONTEXT * 2, max_tokens=2, temperature=0,
                  extra_body={"kvjax": {"press": "full"}})
        with pytest.raises(openai.InternalServerError, match="KVzap weights are for a model"):
            _chat(client, srv, CONTEXT, max_tokens=2, temperature=0, extra_body={"kvjax": {
                "press": "kvzap", "press_args": {"weights": "smollm2"}}})
        assert _chat(client, srv, QUESTIONS[0], max_tokens=2, temperature=0).choices
        code, _ = srv.terminate()
        assert code == 0
        damaged = tmp_path / "ctx" / ("ctx-" + "0" * 24)  # not a context: skipped, logged
        damaged.mkdir()
        (damaged / "context.json").write_text("{not json")
        srv = Server(path, *flags)
        assert "1 contexts loaded, 1 skipped" in srv.output()
        client = _client(srv, "sekret")
        listed = httpx.get(srv.base + "/contexts",
                           headers={"Authorization": "Bearer sekret"}).json()["data"]
        assert [c["id"] for c in listed] == [made["id"]]
        assert srv.metrics()["kvjax_pool_slots_used"] == made["pool_slots"]
        after = [_chat(client, srv, q, max_tokens=6, temperature=0, extra_body={
            "kvjax": {"context_id": made["id"]}}).choices[0].message.content
            for q in QUESTIONS]
        assert after == before
    finally:
        srv.stop()


def test_sigterm_drains_then_exits_0(tmp_path):
    """SIGTERM while two requests stream: the short one finishes within the 1 s grace period,
    the long one ends with a clear error, new connections are refused; the exit code is 0. A wider random
    Llama (8 layers, d=1024) makes a step last milliseconds, so the long greedy answer (335
    tokens before its EOS) outlasts the grace period."""
    _, path = tiny_llama(tmp_path / "mid", chat_template=CHATML_TEMPLATE, n_layers=8,
                         n_heads=16, n_kv_heads=4, head_dim=64, hidden_size=1024)
    srv = Server(path, "--kv-budget", "64MiB", "--max-running", "2", "--max-tail", "512",
                 "--grace", "1")
    out, first = {}, {name: threading.Event() for name in ("short", "long")}

    def stream(name, content, n):
        with httpx.Client(timeout=120) as client:
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": n,
                    "temperature": 0, "stream": True}
            with client.stream("POST", srv.base + "/chat/completions", json=body) as r:
                out[name] = []
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        out[name].append(line)
                        first[name].set()

    try:
        for content in ("hi", "The Albatross."):  # compile outside the timed part
            _chat(_client(srv), srv, content, max_tokens=2, temperature=0)
        threads = {"long": threading.Thread(target=stream, args=("long", "hi", 400)),
                   "short": threading.Thread(target=stream, args=("short", "The Albatross.",
                                                                   40))}
        for name in ("long", "short"):
            threads[name].start()
            assert first[name].wait(60)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new connections while draining
            httpx.get(srv.url + "/health", timeout=5)
        for t in threads.values():
            t.join(60)
        assert srv.proc.wait(60) == 0, srv.output()[-3000:]
    finally:
        srv.stop()
    assert out["short"][-1] == "data: [DONE]"
    assert json.loads(out["short"][-2][6:])["choices"][0]["finish_reason"] == "stop"
    errors = [json.loads(line[6:]) for line in out["long"] if '"error"' in line]
    assert errors and "shutting down" in errors[0]["error"]["message"], out["long"][-3:]
    assert out["long"][-1] == "data: [DONE]"


def test_the_example_client_runs_against_the_server(server):
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, str(root / "examples" / "openai_client.py"),
                          "--base-url", server.base, "--model", server.model,
                          "--max-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "context ctx-" in res.stdout and "kvjax_pool_slots_used 0" in res.stdout


def test_a_server_on_a_mesh_answers_as_one_device(tiny, offline):
    """--mesh data=1,model=2 on 2 fake CPU devices: heads and the pool over "model", the
    answers of the one-device offline engine."""
    srv = Server(tiny[0], *FLAGS, "--mesh", "data=1,model=2",
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    try:
        client = _client(srv)
        for q in QUESTIONS[:2]:
            r = _chat(client, srv, CONTEXT + q, max_tokens=6, temperature=0,
                      extra_body={"kvjax": SNAP})
            want = offline.submit(CONTEXT + q, max_new_tokens=6, press=_snap()).result()
            assert r.choices[0].message.content == want.text
    finally:
        srv.stop()
