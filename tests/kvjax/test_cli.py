"""The kvjax command line."""

import pytest

from kvjax import cli
from kvjax.presses import press_names


def test_presses_lists_registry(capsys):
    assert cli.main(["presses"]) == 0
    out = capsys.readouterr().out
    for name in press_names():
        assert name in out


def test_parse_press_args():
    assert cli.parse_press_args(["window_size=32", "pooling=max", "alpha=0.5"]) == dict(
        window_size=32, pooling="max", alpha=0.5)
    with pytest.raises(ValueError, match="name=value"):
        cli.parse_press_args(["window_size"])


def test_unknown_press_is_a_clear_error(capsys):
    assert cli.main(["generate", "--prompt", "hi", "--press", "snapkvv"]) == 2
    assert "unknown press name='snapkvv'" in capsys.readouterr().err


def test_bad_press_argument(capsys):
    assert cli.main(["demo", "--press", "snapkv", "--press-arg", "windw=3"]) == 2
    assert "bad arguments" in capsys.readouterr().err


def test_build_press():
    args = cli.build_parser().parse_args(
        ["demo", "--press", "snapkv", "--compression-ratio", "0.75", "--press-arg",
         "window_size=16"])
    press = cli.build_press(args)
    assert press.compression_ratio == 0.75 and press.window_size == 16


@pytest.mark.slow
def test_generate_and_demo_on_smollm2(capsys):
    assert cli.main(["generate", "--prompt", "Name a colour.", "--max-new-tokens", "8",
                     "--press", "knorm", "--compression-ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "KV cache:" in out
    assert cli.main(["generate", "--prompt", "Name a colour.", "--max-new-tokens", "4",
                     "--press", "knorm", "--compression-ratio", "0.5", "--kv-dtype", "int8"]) == 0
    assert "int8 with f32 scales" in capsys.readouterr().out
    assert cli.main(["demo", "--context-tokens", "600"]) == 0  # full cache finds the needle
    out = capsys.readouterr().out
    assert "full cache" in out and "KVzipPress(0.75)" in out and "SnapKVPress(0.75)" in out


def test_seed_reaches_random_presses():
    parse = cli.build_parser().parse_args
    nacl = cli.build_press(parse(["generate", "--prompt", "x", "--press", "nacl", "--seed", "7"]))
    assert type(nacl).__name__ == "NACLPress" and nacl.seed == 7
    assert cli.build_press(parse(["demo", "--press", "random", "--seed", "3"])).seed == 3
    # an explicit --press-arg wins over --seed
    press = cli.build_press(parse(["demo", "--press", "nacl", "--seed", "3",
                                   "--press-arg", "seed=5"]))
    assert press.seed == 5


# -- flags checked before any model loads: --model names a missing path, so reaching the
# loader would print "does not exist" instead of the message each test expects --------------

def _missing_model(tmp_path) -> str:
    return str(tmp_path / "no-such-model")


def _document(tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document.")
    return str(doc)


def test_compress_refuses_non_empty_out_before_loading(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["compress", "--model", _missing_model(tmp_path), "--input",
                     _document(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not empty" in err and str(out) in err
    assert "no-such-model" not in err  # the loader was not reached
    assert (out / "keep.txt").read_text() == "x"


def test_compress_out_under_a_file_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["compress", "--model", _missing_model(tmp_path), "--input",
                     _document(tmp_path), "--out", str(blocker / "ctx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvjax compress: error: ") and "is not a directory" in err
    assert "no-such-model" not in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "x", "--question-aware"],
    ["compress", "--input", "a.txt", "--out", "b", "--question-aware"],
])
def test_question_aware_is_not_offered_where_it_cannot_act(argv, capsys):
    # generate compresses its whole prompt and compress has no question: the flag would do
    # nothing, so argparse refuses it
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2 and "--question-aware" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["demo", "--question-aware"]).question_aware


@pytest.mark.parametrize("extra, flag", [
    (["--press-arg", "window_size=3"], "--press-arg"),
    (["--seed", "3"], "--seed"),
    (["--press", "full", "--press-arg", "window_size=3"], "--press-arg"),
])
def test_demo_press_flags_need_a_press(tmp_path, capsys, extra, flag):
    # without --press, demo runs its fixed kvzip/snapkv comparison: those flags have no taker
    assert cli.main(["demo", "--model", _missing_model(tmp_path)] + extra) == 2
    err = capsys.readouterr().err
    assert f"{flag} " in err and "needs --press" in err and "no-such-model" not in err


def test_generate_seed_with_full_cache_is_an_error(tmp_path, capsys):
    assert cli.main(["generate", "--prompt", "x", "--model", _missing_model(tmp_path),
                     "--seed", "1"]) == 2
    assert "--seed 1 needs --press" in capsys.readouterr().err


def test_command_modules_import_only_the_shared_module():
    """Every kvjax/cli/ command module imports kvjax.cli.common and no other command module
    (the package's __init__ imports them all: one way)."""
    import ast
    from pathlib import Path

    folder = Path(cli.__file__).parent
    commands = sorted(p for p in folder.glob("*.py") if p.stem not in ("__init__", "__main__", "common"))
    assert {p.stem for p in commands} >= {"context", "eval", "generate", "serve",
                                          "train_scorer", "uncomp", "zigzag"}
    for path in commands:
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                     for a in n.names}
        cli_mods = {m for m in imported if m and m.startswith("kvjax.cli")}
        assert cli_mods == {"kvjax.cli.common"}, (path.name, cli_mods)
