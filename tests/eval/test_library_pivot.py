"""`library_pivot` on hand-built cell results of two libraries."""

from kvjax.eval import library_pivot


def cell(library, press, ratio, accuracy=None, error=None, n=4):
    return {"cell": {"task": "niah_single", "length": 512, "press": press, "ratio": ratio,
                     "question_aware": False},
            "meta": {"library": library}, "n_samples": n, "accuracy": accuracy, "error": error,
            "records": []}


def test_pivot_cells_and_markers():
    results = [cell("kvjax", "full", 0.0, 1.0), cell("kvpress", "full", 0.0, 0.75),
               cell("kvjax", "snapkv", 0.5, 0.5), cell("kvpress", "snapkv", 0.5, 0.25),
               cell("kvjax", "snapkv", 0.9, 0.0),  # kvpress cell missing
               cell("kvjax", "nacl", 0.5, 0.25),
               cell("kvpress", "nacl", 0.5, error="not comparable in kvpress"),
               cell("kvpress", "snapkv", 0.9, error="RuntimeError: boom", n=6)]
    lines = library_pivot(results).splitlines()
    assert lines[0] == "niah_single, 512 tokens, 6 samples: accuracy % kvjax / kvpress"
    assert lines[2] == "| press | ratio 0.5 | ratio 0.9 |"
    assert lines[4] == "| full | 100 / 75 |"
    assert lines[5] == "| nacl | 25 / n/a | - / - |"
    assert lines[6] == "| snapkv | 50 / 25 | 0 / crash |"
