"""The runner on the real SmolLM2-135M-Instruct (slow): full-cache needle retrieval.

Measured on CPU, f32 (2 cores), seed 0, samples 0-4 (needle depths 0, 1, 1/2, 1/4, 3/4):
niah_single at 1024 tokens, full cache: 5/5 exact (docs/results/README.md has every task at 1-4k).
"""

import json

import pytest

import models
from kvjax.eval import Grid, kvjax_rows, run_grid
from kvjax.pipeline import Pipeline

pytestmark = pytest.mark.slow

MEASURED_ACCURACY = 1.0


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = models.load("smollm2", progress=False)
    return Pipeline(model, tokenizer), tokenizer


def test_full_cache_niah_single_1k_reaches_measured_accuracy(smollm2, tmp_path):
    pipeline, tokenizer = smollm2
    grid = Grid(tasks=("niah_single",), lengths=(1024,), presses=("full",), ratios=(),
                samples=5)
    run_grid(grid, kvjax_rows(pipeline, tokenizer, seed=0), tmp_path,
             meta={"library": "kvjax", "model": "smollm2"}, progress=False)
    cell = json.loads((tmp_path / "niah_single__1024__full__0.json").read_text())
    assert cell["n_samples"] == 5
    assert all(abs(r["n_context"] - 1024) < 64 for r in cell["records"])  # + chat template
    assert cell["accuracy"] >= MEASURED_ACCURACY, [r["prediction"] for r in cell["records"]]
