"""OpenAI request bodies -> engine submissions, and engine results -> OpenAI responses.

Pure functions over dicts: nothing here touches the engine or the network. A body that
cannot be served raises `ApiError` with the HTTP status and a message naming the field.

The `kvjax` object of a body (the openai client's `extra_body={"kvjax": {...}}`) chooses the
compression of that request: `press` (a registered name, or "full"), `compression_ratio`,
`press_args` (the press's other fields), `question_aware` (chat: compress the last user
message with the rest, the default, or append it after compressing the rest), and
`context_id` (chat: answer from a compressed context created by `POST /v1/contexts`).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from typing import Any

from kvjax.engine.request import Status
from kvjax.pipeline import chat_ids
from kvjax.sampling import Greedy, Temperature, TopP

NO_PRESS = ("full", "none")
KVJAX_KEYS = ("press", "compression_ratio", "press_args", "question_aware", "context_id")
UNSUPPORTED = dict(logprobs=(None, False, 0), echo=(None, False), best_of=(None, 1),
                   presence_penalty=(None, 0, 0.0), frequency_penalty=(None, 0, 0.0),
                   logit_bias=(None, {}), suffix=(None, ""), tools=(None, []),
                   top_logprobs=(None, 0), response_format=(None, {"type": "text"}))


class ApiError(Exception):
    """An HTTP error with an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}


@dataclasses.dataclass(frozen=True)
class PressSpec:
    """A press by name: (registered name or None for the full cache, ratio, other fields)."""

    name: str | None
    ratio: float = 0.5
    args: tuple = ()

    def build(self):
        if self.name is None:
            return None
        from kvjax.presses import make_press
        return make_press(self.name, self.ratio, **dict(self.args))

    def describe(self) -> dict:
        return {"press": self.name or "full",
                "compression_ratio": None if self.name is None else self.ratio}


@dataclasses.dataclass(frozen=True)
class Submission:
    """What `kvjax.Engine.submit` gets for one request, and how to answer it.

    Attributes:
      kind: "completion" or "chat"; x: context ids, or a context id to look up (chat);
      question: ids appended after compression, or the question text (context requests);
      press: the `PressSpec` (None for a context request); max_new_tokens (None: the
      default, `budget`), sampler, seed, stop; stream / include_usage: SSE and its final
      usage chunk; prompt_tokens: ids prefilled or appended (a context's own are added).
    """

    kind: str
    x: Any
    question: Any
    press: PressSpec | None
    max_new_tokens: int | None
    sampler: Any
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    context_id: str | None = None
    prompt_tokens: int = 0
    default_max: int = 16

    def budget(self) -> int:
        """max_new_tokens: the body's, or the default."""
        return self.default_max if self.max_new_tokens is None else self.max_new_tokens


def _get(body: dict, key: str, kinds, default, check=None, why: str = ""):
    """body[key] (default when absent or null), ApiError 400 unless of `kinds` and `check`."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ApiError(400, f"{key}={value!r} must be {why or names}", key)
    if check is not None and not check(value):
        raise ApiError(400, f"{key}={value!r} must be {why}", key)
    return value


def _common(body: dict, default_max: int):
    """(max_new_tokens, sampler, seed, stop, stream, include_usage) of a body."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    for key, allowed in UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise ApiError(400, f"{key}={body[key]!r} is not supported by kvjax serve", key)
    n = _get(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, f"n={n} is not supported: kvjax serve returns one choice (n=1)",
                       "n")
    max_new = _get(body, "max_completion_tokens", int, None, lambda v: v >= 1, "an int >= 1")
    max_new = _get(body, "max_tokens", int, max_new, lambda v: v >= 1, "an int >= 1")
    temperature = float(_get(body, "temperature", (int, float), 1.0,
                             lambda v: 0 <= v <= 2, "a number in [0, 2]"))
    top_p = float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1,
                       "a number in (0, 1]"))
    seed = _get(body, "seed", int, None)
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(
            isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop={body.get('stop')!r} must be a string or up to 4 "
                       "non-empty strings", "stop")
    stream = _get(body, "stream", bool, False)
    opts = _get(body, "stream_options", dict, {})
    if temperature == 0:
        sampler = Greedy()
    elif top_p < 1:
        sampler = TopP(p=top_p, temperature=temperature)
    else:
        sampler = Temperature(temperature)
    return (max_new, sampler, secrets.randbits(31) if seed is None else seed,
            tuple(stop), stream, bool(opts.get("include_usage", False)))


def _kvjax(body: dict, default: PressSpec, *, chat: bool) -> tuple[PressSpec | None, bool,
                                                                   str | None]:
    """(press spec, question_aware, context_id) from the body's `kvjax` object."""
    ext = _get(body, "kvjax", dict, {}, why="an object")
    unknown = sorted(set(ext) - set(KVJAX_KEYS))
    if unknown:
        raise ApiError(400, f"kvjax.{unknown[0]} is not a kvjax option (one of "
                       f"{', '.join(KVJAX_KEYS)})", f"kvjax.{unknown[0]}")
    context_id = _get(ext, "context_id", str, None)
    aware = _get(ext, "question_aware", bool, True)
    if not chat and ("question_aware" in ext or context_id is not None):
        raise ApiError(400, "kvjax.question_aware and kvjax.context_id are chat options: "
                       "a completion compresses its whole prompt", "kvjax")
    if context_id is not None:
        if any(k in ext for k in ("press", "compression_ratio", "press_args")):
            raise ApiError(400, "a context_id request is answered from a context compressed "
                           "already: do not pass press, compression_ratio or press_args",
                           "kvjax.context_id")
        return None, False, context_id
    return parse_press(ext, default, "kvjax."), aware, None


def parse_press(obj: dict, default: PressSpec, where: str = "") -> PressSpec:
    """A PressSpec from `press`, `compression_ratio` and `press_args` of `obj` (the server's
    press for what is missing; "full" for none). `where` prefixes the field names."""
    name = obj["press"] if "press" in obj else default.name
    if name is not None and not isinstance(name, str):
        raise ApiError(400, f"{where}press={name!r} must be a press name or 'full'",
                       f"{where}press")
    name = None if name is None or name.lower() in NO_PRESS else name
    ratio = _get(obj, "compression_ratio", (int, float), default.ratio,
                 lambda v: 0 <= v < 1, "a number in [0, 1)")
    args = _get(obj, "press_args", dict, dict(default.args) if name == default.name else {})
    if name is None and ("compression_ratio" in obj or obj.get("press_args")):
        raise ApiError(400, f"{where}compression_ratio/press_args need a press "
                       f"({where}press)", f"{where}press")
    return PressSpec(name, float(ratio), tuple(sorted(args.items())))


def parse_completion(body: dict, tokenizer, default: PressSpec, default_max: int = 16
                     ) -> Submission:
    """A `POST /v1/completions` body -> Submission: the prompt (a string, tokenized with
    the tokenizer's BOS, or a list of ids) is prefilled and compressed whole."""
    max_new, sampler, seed, stop, stream, usage = _common(body, default_max)
    press, _, _ = _kvjax(body, default, chat=False)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and not isinstance(prompt[0], int):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise ApiError(400, f"prompt={str(prompt)[:60]!r} must be a non-empty string or one "
                       "list of token ids (one prompt per request)", "prompt")
    return Submission(kind="completion", x=ids, question=[], press=press,
                      max_new_tokens=max_new, sampler=sampler, seed=seed, stop=stop,
                      stream=stream, include_usage=usage, prompt_tokens=len(ids),
                      default_max=default_max)


def _content(message, i: int) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise ApiError(400, f"messages[{i}] must be an object with a role", f"messages[{i}]")
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                           f"messages[{i}].content")
        content = "".join(p.get("text", "") for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string", f"messages[{i}]")
    return content


def parse_chat(body: dict, tokenizer, default: PressSpec, default_max: int = 256
               ) -> Submission:
    """A `POST /v1/chat/completions` body -> Submission. The last message is the user's
    question; with `question_aware` (the default) it is compressed with the conversation
    before it, otherwise the conversation is compressed alone and the question appended
    (`kvjax.pipeline.chat_ids`). With `context_id`, the one user message is the question."""
    max_new, sampler, seed, stop, stream, usage = _common(body, default_max)
    press, aware, context_id = _kvjax(body, default, chat=True)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    texts = [_content(m, i) for i, m in enumerate(messages)]
    if messages[-1]["role"] != "user":
        raise ApiError(400, f"the last message has role {messages[-1]['role']!r}: it must be "
                       "the user's", "messages")
    history = [{"role": m["role"], "content": t} for m, t in zip(messages[:-1], texts)]
    common = dict(kind="chat", press=press, max_new_tokens=max_new, sampler=sampler,
                  seed=seed, stop=stop, stream=stream, include_usage=usage,
                  default_max=default_max)
    if context_id is not None:
        if history:
            raise ApiError(400, "a context_id request takes one user message (the question)",
                           "messages")
        return Submission(x=None, question=texts[-1], context_id=context_id, **common)
    try:
        if aware:
            ctx, q = chat_ids(tokenizer, history, texts[-1], "")
        else:
            ctx, q = chat_ids(tokenizer, history, "", texts[-1])
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from e
    return Submission(x=ctx, question=q, prompt_tokens=len(ctx) + len(q), **common)


# -- responses ------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(sub: Submission, n_completion: int, n_context: int = 0) -> dict:
    prompt = sub.prompt_tokens + n_context
    return {"prompt_tokens": prompt, "completion_tokens": n_completion,
            "total_tokens": prompt + n_completion}


def kvjax_info(sub: Submission, req, context_info: dict | None = None) -> dict:
    """The response's `kvjax` object: the press, pool bytes and slots the request held."""
    info = dict(context_info or (sub.press.describe() if sub.press else {}))
    info.update(kv_bytes=int(req.kv_bytes), kept_slots=int(req.kept))
    if sub.context_id is not None:
        info["context_id"] = sub.context_id
    return info


def finish_reason(req) -> str:
    return "length" if req.finish_reason == "length" else "stop"


def response(sub: Submission, rid: str, model: str, text: str, req, n_context: int = 0,
             context_info: dict | None = None) -> dict:
    """The non-streaming response body of a finished request."""
    choice = {"index": 0, "finish_reason": finish_reason(req), "logprobs": None}
    if sub.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
        obj = "chat.completion"
    else:
        choice["text"] = text
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice], "usage": usage(sub, len(req.tokens), n_context),
            "kvjax": kvjax_info(sub, req, context_info)}


def chunk(sub: Submission, rid: str, model: str, delta: str | None = None,
          finish: str | None = None, first: bool = False) -> dict:
    """One streaming chunk: a text delta, or the final one with its finish reason."""
    if sub.kind == "chat":
        d = {} if delta is None else {"content": delta}
        if first:
            d["role"] = "assistant"
        choice, obj = {"index": 0, "delta": d}, "chat.completion.chunk"
    else:
        choice, obj = {"index": 0, "text": delta or "", "logprobs": None}, "text_completion"
    choice["finish_reason"] = finish
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [choice]}


def usage_chunk(sub: Submission, rid: str, model: str, req, n_context: int = 0,
                context_info: dict | None = None) -> dict:
    out = chunk(sub, rid, model)
    out["choices"] = []
    out["usage"] = usage(sub, len(req.tokens), n_context)
    out["kvjax"] = kvjax_info(sub, req, context_info)
    return out


class TextStream:
    """Incremental text of a request's tokens: `delta(tokens, done)` returns the new text.

    Text is held back while it may still change: a trailing partial UTF-8 character (the
    tokenizer's replacement character), and the last `len(stop) - 1` characters, which may
    begin a stop string (the engine cuts the final text at a stop string)."""

    def __init__(self, tokenizer, eos_ids, stop):
        self.tokenizer, self.eos = tokenizer, set(eos_ids)
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0

    def delta(self, tokens, done: bool, final_text: str | None = None) -> str:
        if done and final_text is not None:
            text = final_text
        else:
            text = self.tokenizer.decode([t for t in tokens if t not in self.eos])
            if not done:
                text = text.rstrip("\ufffd")
                text = text[:max(len(text) - self.hold, self.sent)]
        out, self.sent = text[self.sent:], max(self.sent, len(text))
        return out


def is_failed(req) -> bool:
    return req.status is Status.FINISHED and req.finish_reason in ("error", "cancelled")
