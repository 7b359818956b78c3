"""What the `kvjax` subcommands share: model and press flags, press construction, loading,
and checks of output paths made before any model loads."""

import argparse
import ast
import sys
from pathlib import Path

_NO_PRESS = (None, "full", "none")


def parse_press_args(items: list[str] | None) -> dict:
    """["window_size=32", "pooling=max"] -> {"window_size": 32, "pooling": "max"}."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"--press-arg {item!r} must look like name=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


def build_press(args):
    """The press named on the command line, or None for the full cache (or no --press).

    Raises ValueError when --press-arg or --seed is given without a press to receive it."""
    from kvjax.presses import make_press
    seed = getattr(args, "seed", None)
    if args.press in _NO_PRESS:
        if args.press_arg:
            raise ValueError(f"--press-arg {args.press_arg} needs --press NAME "
                             f"(got --press {args.press})")
        if seed is not None:
            raise ValueError(f"--seed {seed} needs --press NAME of a random press "
                             f"(got --press {args.press})")
        return None
    kwargs = parse_press_args(args.press_arg)
    if seed is not None:
        kwargs.setdefault("seed", seed)
    return make_press(args.press, args.compression_ratio, **kwargs)


def add_source_arg(p: argparse.ArgumentParser) -> None:
    """--model: what `load_model` loads."""
    p.add_argument("--model", default="smollm2",
                   help="'smollm2', a .gguf file, an HF checkpoint dir or a saved kvjax dir")


def add_model_args(p: argparse.ArgumentParser) -> None:
    add_source_arg(p)
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    p.add_argument("--kv-dtype", choices=("int8", "float8_e4m3fn"), default=None,
                   help="keep the compressed store quantized (default: the compute dtype)")
    p.add_argument("--mesh", default=None, metavar="data=D,model=M",
                   help="shard weights and cache over a device mesh (tensor parallel over "
                        "'model', batch over 'data'); default: one device")


def add_press_args(p: argparse.ArgumentParser, default=None, ratio: float = 0.5) -> None:
    p.add_argument("--press", default=default, help="press name (see `kvjax presses`) or full")
    p.add_argument("--compression-ratio", "--ratio", dest="compression_ratio", type=float,
                   default=ratio)
    p.add_argument("--press-arg", action="append", metavar="NAME=VALUE",
                   help="press hyperparameter, repeatable (e.g. window_size=32); needs --press")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for random presses; needs --press")


def load_model(source: str, dtype: str | None = None, mesh: str | None = None, *,
               progress: bool = True):
    """`models.load` from command-line strings ("auto"/None dtype: the source's own)."""
    import models  # the CLI is the one place kvjax imports models (lazily)
    return models.load(source, dtype=None if dtype in (None, "auto") else dtype,
                       mesh=None if mesh is None else models.parse_mesh(mesh),
                       progress=progress)


def check_new_dir(path: str | Path, flag: str = "--out") -> Path:
    """Raise OSError unless `path` can become a new directory (absent or empty, under a
    directory), so a command fails before it loads a model and computes."""
    path = Path(path)
    if path.is_dir():
        if any(path.iterdir()):
            raise FileExistsError(f"{flag} {str(path)!r} exists and is not empty")
        return path
    if path.exists():
        raise FileExistsError(f"{flag} {str(path)!r} exists and is not a directory")
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise NotADirectoryError(f"{flag} {str(path)!r}: {str(parent)!r} is not a directory")
    return path


def run_command(args) -> int:
    """Run `args.func(args)`; a ValueError or OSError becomes one line on stderr and exit 2."""
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        print(f"kvjax {args.command}: error: {e}", file=sys.stderr)
        return 2
