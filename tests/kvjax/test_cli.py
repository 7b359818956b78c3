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
