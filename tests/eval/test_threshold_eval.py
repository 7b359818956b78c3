"""ThresholdPress cells in `kvjax eval`: accuracy against the ratio each input reached.

On a tiny random model with a character tokenizer: the CLI's threshold cells record the ratio
`kvjax.achieved_ratio` gives for the same sample compressed through `Pipeline.run`; a larger
share of attention mass keeps more; the summary's threshold table and the plots are written;
bad threshold grids are refused by name."""

import json

import pytest
from eval_helpers import char_tokenizer, tiny_model

import kvjax
import models
from kvjax.cli import main
from kvjax.eval import Grid
from kvjax.eval.runner import check_kvjax_presses
from kvjax.eval.tasks import make_sample


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("thr")
    models.save(tiny_model(), char_tokenizer(), root / "model")
    out = root / "results"
    assert main(["eval", "--model", str(root / "model"), "--tasks", "niah_single",
                 "--lengths", "256", "--presses", "full", "--samples", "2",
                 "--threshold-presses", "snapkv", "--thresholds=0.5,0.9", "--no-progress",
                 "--out", str(out)]) == 0
    return out


def test_cells_record_the_ratio_reached(run):
    half = json.loads((run / "niah_single__256__snapkv__t0.5.json").read_text())
    most = json.loads((run / "niah_single__256__snapkv__t0.9.json").read_text())
    assert half["cell"]["threshold"] == 0.5 and half["cell"]["ratio"] == 0.0
    pipe = kvjax.Pipeline(tiny_model(), char_tokenizer())
    for cell, t in ((half, 0.5), (most, 0.9)):
        press = kvjax.ThresholdPress(press=kvjax.SnapKVPress(), threshold=t)
        for rec in cell["records"]:
            sample = make_sample("niah_single", pipe.tokenizer, 256, rec["index"], 0)
            ref = pipe.run(sample.context, sample.question, press=press,
                           max_new_tokens=sample.max_new_tokens,
                           answer_prefix=sample.answer_prefix)
            want = kvjax.achieved_ratio(ref.cache, [ref.n_context])[0]
            assert rec["achieved_ratio"] == pytest.approx(want, abs=1e-9)
            assert rec["prediction"] == ref.text
    assert 0 < most["achieved_ratio"] < half["achieved_ratio"] < 1  # more mass keeps more
    full = json.loads((run / "niah_single__256__full__0.json").read_text())
    assert full["achieved_ratio"] == 0.0


def test_summary_table_and_plots(run):
    summary = (run / "summary.md").read_text()
    assert "| ThresholdPress over | threshold | accuracy % | achieved ratio (mean) |" in summary
    assert "| snapkv | 0.5 |" in summary and "| snapkv | 0.9 |" in summary
    assert (run / "accuracy_vs_ratio.png").stat().st_size > 10_000


def test_bad_threshold_grids_are_named():
    base = dict(tasks=("niah_single",), lengths=(256,), presses=("full",), ratios=(),
                samples=1)
    with pytest.raises(ValueError, match="give both"):
        Grid(**base, threshold_presses=("snapkv",))
    with pytest.raises(ValueError, match="must be numbers"):
        Grid(**base, threshold_presses=("kvzap",), thresholds=(float("nan"),))
    knorm = Grid(**base, threshold_presses=("knorm",), thresholds=(0.5,))
    with pytest.raises(ValueError, match="KnormPress scores have no calibrated scale"):
        check_kvjax_presses(knorm.presses, knorm)
    with pytest.raises(ValueError, match="unknown presses"):
        check_kvjax_presses((), Grid(**base, threshold_presses=("nope",), thresholds=(1.0,)))


def test_negative_threshold_lists_parse_without_equals():
    from kvjax.cli import attach_number_lists, build_parser
    argv = ["eval", "--threshold-presses", "kvzap", "--thresholds", "-6,-4.5", "--out", "x"]
    assert build_parser().parse_args(attach_number_lists(argv)).thresholds == (-6.0, -4.5)
    assert attach_number_lists(["eval", "--thresholds", "0.5,0.9"]) == [
        "eval", "--thresholds", "0.5,0.9"]
