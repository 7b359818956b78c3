"""`kvjax serve`: an OpenAI-compatible HTTP server over one `kvjax.Engine`.

    kvjax serve --model smollm2 --press kvzap --ratio 0.75 --kv-dtype int8 --kv-budget 2GiB \\
        --host 127.0.0.1 --port 8000
"""

from __future__ import annotations

import logging

from kvjax.cli.common import (add_model_args, add_press_args, build_press, load_model,
                              parse_press_args)


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible server (completions, chat, metrics, "
                       "compressed contexts) over one continuous-batching engine")
    add_model_args(s)
    add_press_args(s)
    s.add_argument("--kv-budget", default="2GiB",
                   help="bytes for the pool of kept entries and the running requests' tails")
    s.add_argument("--max-running", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-tail", type=int, default=512,
                   help="dense tail tokens per running request (a full tail moves into the pool)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes")
    s.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: --model)")
    s.add_argument("--contexts-dir", default=None,
                   help="save compressed contexts here and reload them at start-up")
    s.add_argument("--max-body-bytes", type=int, default=16 * 2**20,
                   help="a larger request body is refused with 413")
    s.add_argument("--grace", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    s.add_argument("--log-level", default="warning")
    s.set_defaults(func=cmd_serve)


def press_spec(args):
    """The server's default press as a `PressSpec` (validated by building it once)."""
    from kvjax.serve.protocol import NO_PRESS, PressSpec
    build_press(args)  # ValueError for a bad name or arguments, before the model loads
    name = None if args.press in (None,) + NO_PRESS else args.press
    kwargs = parse_press_args(args.press_arg)
    if args.seed is not None:
        kwargs.setdefault("seed", args.seed)
    return PressSpec(name, args.compression_ratio, tuple(sorted(kwargs.items())))


def cmd_serve(args) -> int:
    import uvicorn

    from kvjax.engine import Engine
    from kvjax.serve.app import ServeConfig, build_app
    from kvjax.serve.contexts import ContextStore
    from kvjax.serve.server import DrainingServer
    from kvjax.serve.worker import EngineWorker

    logging.basicConfig(level=args.log_level.upper(), format="%(name)s: %(message)s")
    spec = press_spec(args)
    model, tokenizer = load_model(args.model, args.dtype, args.mesh)
    if tokenizer is None:
        raise ValueError(f"--model {args.model!r} has no tokenizer: the server needs one")
    engine = Engine(model, tokenizer, kv_budget=args.kv_budget, max_running=args.max_running,
                    press=spec.build(), kv_dtype=args.kv_dtype, max_tail=args.max_tail)
    engine.warmup()  # every decode bucket compiled before the first request
    worker = EngineWorker(engine).start()
    contexts = ContextStore(engine, model, args.contexts_dir)
    loaded, skipped = worker.call(contexts.load_all).result()
    config = ServeConfig(model_name=args.served_model_name or args.model, press=spec,
                         api_key=args.api_key, grace_s=args.grace,
                         max_body_bytes=args.max_body_bytes)
    app = build_app(worker, contexts, tokenizer, config)
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level=args.log_level, lifespan="off"),
                            worker, args.grace)
    print(f"kvjax serve: {config.model_name} on http://{args.host}:{args.port} "
          f"(press {spec.describe()['press']}, {engine.allocator.n_slots} pool slots, "
          f"{len(loaded)} contexts loaded" + (f", {len(skipped)} skipped: {skipped}"
                                              if skipped else "") + ")", flush=True)
    try:
        server.run()
    finally:
        worker.stop()
    return 0
