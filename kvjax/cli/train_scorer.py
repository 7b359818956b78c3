"""`kvjax train-scorer`: train KVzap weights (a per-layer scorer of hidden states that
approximates KVzip's scores) for a model and write them as a directory.

    kvjax train-scorer --model smollm2 --out runs/kvzap_smollm2

DIR gets `checkpoint/` (orbax), `kvzap.json` (shapes, recipe, metrics) and `kvzap.npz` (the
same weights in one small file, the format kvjax ships); use them with
`KVzapPress(compression_ratio=..., weights=DIR)` or `--press kvzap --press-arg weights=DIR`.
"""

import argparse
import shlex

from kvjax.cli.common import add_source_arg, load_model
from kvjax.kvzap.weights import scorer_named
from kvjax.tools.kvzap_train import TrainConfig

_D = TrainConfig()
# What the shipped SmolLM2 file (kvjax/kvzap/smollm2_135m_linear.npz = DIR/kvzap.npz) was
# made with: the defaults below (its info records the command).
SHIPPED_COMMAND = "kvjax train-scorer --model smollm2 --out DIR"


def add_train_scorer_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `train-scorer` subcommand on an argparse subparsers object."""
    p = subparsers.add_parser("train-scorer", help="train KVzap scorer weights (a learned "
                              "approximation of KVzip's scores, arXiv 2601.07891)")
    add_source_arg(p)
    p.add_argument("--out", required=True, help="output directory (orbax checkpoint + npz)")
    p.add_argument("--kind", choices=("linear", "mlp"), default=_D.scorer.name)
    p.add_argument("--hidden-dim", type=int, default=None,
                   help="the MLP's hidden size (default 64 for --kind mlp)")
    p.add_argument("--text", action="append", metavar="FILE",
                   help="train on this text file (paragraphs split at blank lines); "
                        "repeatable; default: the corpus shipped in kvjax.corpus")
    p.add_argument("--n-train", type=int, default=_D.n_train, help="training contexts")
    p.add_argument("--n-heldout", type=int, default=_D.n_heldout, help="held-out contexts")
    p.add_argument("--context-tokens", type=int, default=_D.context_tokens)
    p.add_argument("--tokens-per-context", type=int, default=_D.tokens_per_context,
                   help="training positions sampled per context")
    p.add_argument("--heldout-fraction", type=float, default=_D.heldout_fraction,
                   help="share of paragraphs kept for the held-out contexts")
    p.add_argument("--epochs", type=int, default=_D.epochs)
    p.add_argument("--batch-size", type=int, default=_D.batch_size)
    p.add_argument("--lr", type=float, default=_D.lr)
    p.add_argument("--weight-decay", type=float, default=_D.weight_decay)
    p.add_argument("--chunk-size", type=int, default=_D.chunk_size, help="KVzip chunk size")
    p.add_argument("--n-sink", type=int, default=_D.n_sink)
    p.add_argument("--kvzip-plus", action="store_true",
                   help="train on KVzip+ scores (the KVzap paper's target)")
    p.add_argument("--seed", type=int, default=_D.seed)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="float32")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train_scorer)
    return p


def cmd_train_scorer(args) -> int:
    from pathlib import Path

    from kvjax.tools.kvzap_train import result_metrics, train_scorer
    from kvjax.kvzap.weights import CHECKPOINT_DIR, save_dir
    if (Path(args.out) / CHECKPOINT_DIR).exists():
        raise ValueError(f"{args.out!r} already holds a checkpoint; choose another --out")
    if args.kind == "linear" and args.hidden_dim is not None:
        raise ValueError("--hidden-dim is for --kind mlp")
    cfg = TrainConfig(scorer=scorer_named(args.kind, args.hidden_dim), n_train=args.n_train,
                      n_heldout=args.n_heldout, context_tokens=args.context_tokens,
                      tokens_per_context=args.tokens_per_context,
                      heldout_fraction=args.heldout_fraction, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      chunk_size=args.chunk_size, n_sink=args.n_sink,
                      kvzip_plus=args.kvzip_plus, seed=args.seed)
    texts = None
    if args.text:
        texts = [Path(f).read_text(encoding="utf-8") for f in args.text]
    model, tokenizer = load_model(args.model, args.dtype)
    command = _command(args)
    result = train_scorer(model, tokenizer, cfg, texts=texts, model_name=str(args.model),
                          command=command, progress=not args.no_progress)
    out = save_dir(result.weights, args.out, metrics=result_metrics(result))
    rho = result.heldout_spearman
    print(f"wrote {out}: {result.weights!r}")
    print(result.summary())
    print("held-out Spearman per layer: " + " ".join(f"{r:.2f}" for r in rho))
    print(f"data {result.seconds['data']:.0f}s, training {result.seconds['train']:.0f}s")
    return 0


def _command(args) -> str:
    """The command that reproduces these weights: the options that differ from the defaults
    (--out shown as DIR)."""
    parts = ["kvjax", "train-scorer", "--model", shlex.quote(str(args.model)), "--out", "DIR"]
    defaults = {"kind": _D.scorer.name, "hidden_dim": None, "text": None, "n_train": _D.n_train,
                "n_heldout": _D.n_heldout, "context_tokens": _D.context_tokens,
                "tokens_per_context": _D.tokens_per_context,
                "heldout_fraction": _D.heldout_fraction, "epochs": _D.epochs,
                "batch_size": _D.batch_size, "lr": _D.lr, "weight_decay": _D.weight_decay,
                "chunk_size": _D.chunk_size, "n_sink": _D.n_sink, "seed": _D.seed,
                "kvzip_plus": _D.kvzip_plus, "dtype": "float32"}
    for name, default in defaults.items():
        value = getattr(args, name)
        if value == default:
            continue
        flag = "--" + name.replace("_", "-")
        if value is True:
            parts.append(flag)
            continue
        for v in (value if isinstance(value, list) else [value]):
            parts += [flag, shlex.quote(str(v))]
    return " ".join(parts)

