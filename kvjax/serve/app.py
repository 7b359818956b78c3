"""The ASGI app of `kvjax serve` (Starlette): OpenAI's completions, chat, models; health,
Prometheus metrics and compressed contexts. Every engine call goes through the
`EngineWorker`, so a handler awaits and never blocks the engine or other requests."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time

import jax
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from kvjax.serve import protocol as P
from kvjax.serve.metrics import Throughput, render

log = logging.getLogger("kvjax.serve")


@dataclasses.dataclass(frozen=True)
class Progress:
    """A snapshot of a request taken on the engine thread after a step."""

    tokens: tuple[int, ...]
    done: bool
    finish_reason: str | None
    error: str
    text: str | None
    kv_bytes: int
    kept: int
    eos_ids: tuple[int, ...]

    @classmethod
    def of(cls, req) -> Progress:
        return cls(tuple(req.tokens), req.done, req.finish_reason, req.error, req.text,
                   req.kv_bytes, req.kept, req.eos_ids)


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """model_name: the id clients send; press: the default `PressSpec`; api_key: required
    as `Authorization: Bearer <key>` on /v1 routes when set; grace_s: drain time;
    max_body_bytes: a larger request body is a 413."""

    model_name: str
    press: P.PressSpec
    api_key: str | None = None
    grace_s: float = 30.0
    max_body_bytes: int = 16 * 2**20


def _error(err: P.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def build_app(worker, contexts, tokenizer, config: ServeConfig) -> Starlette:
    """The Starlette app over a started `EngineWorker` and its `ContextStore`."""
    engine = worker.engine
    rate = Throughput()

    def check_auth(request: Request) -> None:
        if config.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {config.api_key}".encode()):
            raise P.ApiError(401, "missing or wrong API key (Authorization: Bearer ...)",
                             kind="authentication_error")

    async def read_body(request: Request) -> dict:
        check_auth(request)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > config.max_body_bytes:
            raise P.ApiError(413, f"the body has {declared} bytes; this server takes at most "
                             f"{config.max_body_bytes} (--max-body-bytes)")
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise P.ApiError(413, f"the body has {len(raw)} bytes; this server takes at most "
                             f"{config.max_body_bytes} (--max-body-bytes)")
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as e:
            raise P.ApiError(400, f"the body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise P.ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != config.model_name:
            raise P.ApiError(404, f"model={model!r} is not served here (this server serves "
                             f"{config.model_name!r})", "model", kind="model_not_found")
        return body

    async def on_worker(fn):
        try:
            return await asyncio.wrap_future(worker.call(fn))
        except KeyError as e:
            raise P.ApiError(404, str(e.args[0]), kind="not_found_error") from e
        except (ValueError, TypeError) as e:
            raise P.ApiError(400, str(e)) from e

    def guarded(handler):
        async def run(request: Request):
            try:
                return await handler(request)
            except P.ApiError as err:
                return _error(err)
            except Exception as err:  # noqa: BLE001 - a bug answers 500 with its reason
                log.exception("%s failed", request.url.path)
                return _error(P.ApiError(500, f"{type(err).__name__}: {err}",
                                         kind="server_error"))
        return run

    # -- generation ---------------------------------------------------------------------

    async def generate(request: Request, kind: str):
        body = await read_body(request)
        parse = P.parse_chat if kind == "chat" else P.parse_completion
        sub = parse(body, tokenizer, config.press)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listen(req):
            loop.call_soon_threadsafe(events.put_nowait, Progress.of(req))

        def submit():
            if worker.draining:
                raise P.ApiError(503, "the server is shutting down", kind="server_error")
            kw = dict(sampler=sub.sampler, rng=jax.random.key(sub.seed), stop=sub.stop)
            if sub.context_id is not None:
                entry = contexts.get(sub.context_id)
                req = engine.submit(entry.context, sub.question,
                                    max_new_tokens=sub.budget(), **kw)
                info = (entry.context.n_context, {**entry.press, "context_id": entry.id})
            else:
                req = engine.submit(sub.x, question=sub.question, press=sub.press.build(),
                                    max_new_tokens=sub.budget(),
                                    eos_id=tokenizer.eos_ids, **kw)
                info = (0, None)
            worker.watch(req, listen)
            return req, info

        req, (n_context, ctx_info) = await on_worker(submit)
        rid = P.new_id(kind)
        if sub.stream:
            return StreamingResponse(
                stream(sub, req, rid, events, n_context, ctx_info),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while not (last := await events.get()).done:
                pass
        except asyncio.CancelledError:
            worker.call(lambda: None if req.done else engine.cancel(req))
            raise
        if last.finish_reason in ("error", "cancelled"):
            status = 503 if last.error == "" or "shutting down" in last.error else 500
            raise P.ApiError(status, f"the request failed in the engine: "
                             f"{last.error or last.finish_reason}", kind="server_error")
        return JSONResponse(P.response(sub, rid, config.model_name, last.text or "", last,
                                       n_context, ctx_info))

    async def stream(sub, req, rid, events, n_context, ctx_info):
        text = P.TextStream(tokenizer, req.eos_ids, sub.stop)
        name, first, finished = config.model_name, True, False
        try:
            while True:
                p = await events.get()
                if p.done and p.finish_reason in ("error", "cancelled"):
                    err = P.ApiError(500, f"the request failed in the engine: "
                                     f"{p.error or p.finish_reason}", kind="server_error")
                    yield _sse(err.body())
                    break
                delta = text.delta(p.tokens, p.done, p.text)
                if delta or (first and sub.kind == "chat"):
                    yield _sse(P.chunk(sub, rid, name, delta, first=first))
                    first = False
                if p.done:
                    final = P.chunk(sub, rid, name, finish=P.finish_reason(p))
                    final["kvjax"] = P.kvjax_info(sub, p, ctx_info)
                    yield _sse(final)
                    if sub.include_usage:
                        yield _sse(P.usage_chunk(sub, rid, name, p, n_context, ctx_info))
                    break
            finished = True
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away: free its slot and block now
                worker.call(lambda: None if req.done else engine.cancel(req))

    async def completions(request):
        return await generate(request, "completion")

    async def chat(request):
        return await generate(request, "chat")

    # -- contexts -----------------------------------------------------------------------

    async def create_context(request):
        body = await read_body(request)
        spec = P.parse_press(body, config.press)
        text = body.get("text")
        entry = await on_worker(lambda: contexts.create(text, spec))
        return JSONResponse(entry.describe())

    async def list_contexts(request):
        check_auth(request)
        entries = await on_worker(contexts.list)
        return JSONResponse({"object": "list", "data": [e.describe() for e in entries]})

    async def get_context(request):
        check_auth(request)
        cid = request.path_params["cid"]
        return JSONResponse((await on_worker(lambda: contexts.get(cid))).describe())

    async def delete_context(request):
        check_auth(request)
        cid = request.path_params["cid"]
        await on_worker(lambda: contexts.delete(cid))
        return JSONResponse({"id": cid, "object": "kvjax.context.deleted", "deleted": True})

    # -- service --------------------------------------------------------------------------

    async def models(request):
        check_auth(request)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": int(time.time()),
             "owned_by": "kvjax", "kvjax": config.press.describe()}]})

    async def health(request):
        if worker.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request):
        stats = await asyncio.wrap_future(worker.call(engine.stats))
        text = render(stats, list(worker.ttft), dict(worker.completed),
                      rate.rate(stats.tokens_generated))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    routes = [
        Route("/v1/completions", guarded(completions), methods=["POST"]),
        Route("/v1/chat/completions", guarded(chat), methods=["POST"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/contexts", guarded(create_context), methods=["POST"]),
        Route("/v1/contexts", guarded(list_contexts), methods=["GET"]),
        Route("/v1/contexts/{cid}", guarded(get_context), methods=["GET"]),
        Route("/v1/contexts/{cid}", guarded(delete_context), methods=["DELETE"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    return Starlette(routes=routes)
