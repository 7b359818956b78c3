"""`kvjax compress` and `kvjax ask`: compress a document once, ask it questions later."""

from pathlib import Path

from kvjax.cli.common import add_model_args, add_press_args, build_press, check_new_dir, load_model


def add_context_parsers(sub) -> None:
    c = sub.add_parser("compress", help="compress a document once (question-agnostic) and "
                       "save it for `kvjax ask`")
    add_model_args(c)
    add_press_args(c)
    c.add_argument("--input", required=True, help="text file of the document")
    c.add_argument("--out", required=True, help="directory to write (absent or empty)")
    c.set_defaults(func=cmd_compress)
    a = sub.add_parser("ask", help="answer a question from a saved compressed document")
    a.add_argument("context", help="directory written by `kvjax compress`")
    a.add_argument("question")
    a.add_argument("--max-new-tokens", type=int, default=64)
    a.add_argument("--model", default=None, help="default: the model it was compressed with")
    a.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None)
    a.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="shard weights and cache over a device mesh (default: one device)")
    a.set_defaults(func=cmd_ask)


def cmd_compress(args) -> int:
    from kvjax.memory import memory_report
    from kvjax.pipeline import Pipeline
    path = Path(args.input)
    if not path.is_file():
        raise FileNotFoundError(f"--input {str(path)!r} is not a file")
    check_new_dir(args.out)  # before the model loads and the document is compressed
    press = build_press(args)
    model, tokenizer = load_model(args.model, args.dtype, args.mesh)
    ctx = Pipeline(model, tokenizer, kv_dtype=args.kv_dtype).compress(path.read_text(),
                                                                      press=press)
    out = ctx.save(args.out, info={"model": args.model, "dtype": args.dtype})
    print(f"compressed {ctx.n_context} tokens with {ctx.press or 'the full cache'} -> {out} "
          f"({memory_report(ctx.cache)})")
    return 0


def cmd_ask(args) -> int:
    from kvjax.context import CompressedContext, read_info
    from kvjax.pipeline import Pipeline
    info = read_info(args.context)
    model_src = args.model or info.get("model")
    if model_src is None:
        raise ValueError(f"{args.context!r} does not say which model made it: pass --model")
    model, tokenizer = load_model(model_src, args.dtype or info.get("dtype"), args.mesh)
    ctx = CompressedContext.load(args.context, model)
    print(Pipeline(model, tokenizer).ask(ctx, args.question,
                                         max_new_tokens=args.max_new_tokens).text)
    return 0
