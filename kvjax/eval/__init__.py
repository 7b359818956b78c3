"""Long-context evaluation: RULER-style task generators, scoring, perplexity with a compressed
cache, a resumable grid runner and plots. `kvjax eval` is its command line."""

from kvjax.eval.engine import Answer, answer_sample
from kvjax.eval.perplexity import PerplexityResult, corpus_ids, perplexities
from kvjax.eval.plots import plot_results
from kvjax.eval.results import FULL, Cell, library_pivot, read_results, summary_tables, write_summary
from kvjax.eval.runner import Grid, kvjax_answer_fn, kvjax_rows, run_grid
from kvjax.eval.sample import Sample
from kvjax.eval.scoring import exact_match, recall, score
from kvjax.eval.tasks import TASKS, make_sample, make_samples, task_names

__all__ = [
    "FULL",
    "TASKS",
    "Answer",
    "Cell",
    "Grid",
    "PerplexityResult",
    "Sample",
    "answer_sample",
    "corpus_ids",
    "exact_match",
    "kvjax_answer_fn",
    "kvjax_rows",
    "library_pivot",
    "make_sample",
    "make_samples",
    "perplexities",
    "plot_results",
    "read_results",
    "recall",
    "run_grid",
    "score",
    "summary_tables",
    "task_names",
    "write_summary",
]
