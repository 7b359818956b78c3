"""Run a grid of tasks x lengths x presses x ratios; resumable, one JSON per cell.

Samples are the outer loop: each sample is generated once and answered under every press of
its (task, length) that still lacks it, so presses share the sample's prefill (see
`kvjax.eval.engine`). Cell files are rewritten after every sample; a rerun skips finished
samples, and asking for more samples extends the cells (sample i never depends on n).
"""

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

from kvjax.eval.engine import Answer, answer_sample
from kvjax.eval.perplexity import (LONG_GENERATION, PERPLEXITY, PERPLEXITY_TASKS, corpus_ids,
                                   perplexities)
from kvjax.eval.results import FULL, Cell, load_records, save_cell, write_summary
from kvjax.eval.sample import Sample
from kvjax.eval.scoring import exact_match, recall, score
from kvjax.eval.tasks import TASKS, make_sample
from kvjax.presses.decode_budget import RatioOfSeen
from kvjax.presses.decode_scores import decode_scores
from kvjax.presses.decoding import DecodingPress
from kvjax.presses.registry import make_press, press_names
from kvjax.presses.threshold import ThresholdPress

AnswerFn = Callable[[Sample, Sequence[Cell]], list[Answer]]
# (task, length, sample index, cells lacking it) -> one record per cell
RowsFn = Callable[[str, int, int, Sequence[Cell]], list[dict]]


@dataclasses.dataclass(frozen=True)
class Grid:
    """What to evaluate. `presses` are registry names or "full" (one cell, ratio 0)."""

    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    presses: tuple[str, ...]
    ratios: tuple[float, ...]
    samples: int
    seed: int = 0
    question_aware: bool = False
    threshold_presses: tuple[str, ...] = ()  # each as ThresholdPress at every threshold
    thresholds: tuple[float, ...] = ()

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS and t not in PERPLEXITY_TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}, "
                             f"{', '.join(PERPLEXITY_TASKS)}")
        if self.samples < 1:
            raise ValueError(f"{self.samples=} must be >= 1")
        if any(n < 64 for n in self.lengths):
            raise ValueError(f"{self.lengths=} must all be >= 64 tokens")
        if any(not 0 < r < 1 for r in self.ratios):
            raise ValueError(f"{self.ratios=} must all be in (0, 1)")
        if any(p != FULL for p in self.presses) and not self.ratios:
            raise ValueError(f"{self.presses=} need at least one ratio")
        if bool(self.threshold_presses) != bool(self.thresholds):
            raise ValueError(f"{self.threshold_presses=} and {self.thresholds=}: give both "
                             "(ThresholdPress over each press at each threshold) or neither")
        if any(math.isnan(t) for t in self.thresholds):
            raise ValueError(f"{self.thresholds=} must be numbers")

    def cells(self) -> list[Cell]:
        """Cells in (task, length, press, ratio) order."""
        out = []
        for task, length, press in itertools.product(self.tasks, self.lengths, self.presses):
            for ratio in ([0.0] if press == FULL else self.ratios):
                out.append(Cell(task, length, press, ratio, self.question_aware))
        for task, length, press in itertools.product(self.tasks, self.lengths,
                                                     self.threshold_presses):
            out += [Cell(task, length, press, 0.0, self.question_aware, threshold=t)
                    for t in self.thresholds]
        return out


def record(sample: Sample, answer: Answer) -> dict:
    """One sample's result row (the context is left out)."""
    row = {"index": sample.index, "depth": sample.depth, "answers": list(sample.answers),
           "metric": sample.metric, "prediction": answer.text,
           "score": None if answer.error else score(sample, answer.text),
           "exact": exact_match(answer.text, sample.answers),
           "recall": recall(answer.text, sample.answers)}
    row.update({k: getattr(answer, k) for k in (
        "kv_bytes_needed", "bytes_held", "context_kv_bytes", "n_context", "n_question",
        "achieved_ratio", "prefill_s", "compress_s", "decode_s")})
    if answer.error:
        row["error"] = answer.error
    return row


def build_press(cell: Cell):
    """The kvjax press of a cell (registry class defaults, e.g. SnapKV window 64), None for
    the full cache, or `ThresholdPress(press, threshold)` for a threshold cell."""
    if cell.press == FULL:
        return None
    if cell.threshold is not None:
        return ThresholdPress(press=make_press(cell.press, 0.0), threshold=cell.threshold)
    return make_press(cell.press, cell.ratio)


def check_kvjax_presses(presses, grid: Grid | None = None) -> None:
    """Raise ValueError naming any press that is neither "full" nor in the kvjax registry, or
    (with `grid`) a threshold cell whose press has no scale a threshold could mean."""
    unknown = [p for p in presses if p != FULL and p not in press_names()]
    if unknown:
        raise ValueError(f"unknown presses {unknown}; known: full, {', '.join(press_names())}")
    if grid is not None:
        check_kvjax_presses(grid.threshold_presses)
        for cell in grid.cells():
            if cell.threshold is not None:
                build_press(cell)  # ThresholdPress refuses a scorer without a scale


def kvjax_answer_fn(pipeline) -> AnswerFn:
    """Answer with kvjax presses, one prefill per observation spec (`engine.answer_sample`)."""
    def answer(sample: Sample, cells: Sequence[Cell]) -> list[Answer]:
        return answer_sample(pipeline, sample, [build_press(c) for c in cells],
                             question_aware=cells[0].question_aware)
    return answer


def answer_rows(tokenizer, answer_fn: AnswerFn, seed: int) -> RowsFn:
    """Rows of the RULER-style tasks: build sample `index`, answer it under every cell."""
    def rows(task: str, length: int, index: int, cells: Sequence[Cell]) -> list[dict]:
        sample = make_sample(task, tokenizer, length, index, seed)
        return [record(sample, a) for a in answer_fn(sample, cells)]
    return rows


def _bound(press, tokenizer):
    return None if press is None else press.with_tokenizer(tokenizer)


def perplexity_rows(pipeline, tokenizer, seed: int, n_score: int = 256) -> RowsFn:
    """Rows of the perplexity task: `length` context tokens compressed, n_score scored."""
    def rows(task: str, length: int, index: int, cells: Sequence[Cell]) -> list[dict]:
        ids = corpus_ids(tokenizer, length + n_score, seed, index)
        results = perplexities(pipeline.fn, pipeline.params, ids, length, n_score,
                               [_bound(build_press(c), tokenizer) for c in cells],
                               attn_impl=pipeline.attn_impl, quant=pipeline.kv_quant)
        return [{"index": index, "score": None, "nll": r.mean_nll, "n_scored": n_score,
                 "kv_bytes_needed": r.kv_bytes_needed, "bytes_held": r.bytes_held,
                 "context_kv_bytes": r.kv_bytes_needed,
                 "n_context": length} for r in results]
    return rows


def decoding_hook(press, ratio: float, interval: int, window: int = 0) -> DecodingPress | None:
    """The long-generation task's decode hook of a cell: its press scoring every `interval`
    tokens with a budget of (1 - ratio) of the tokens seen, the `window` most recent kept
    (None for the full cache)."""
    if press is None:
        return None
    return DecodingPress(press=press, compression_interval=interval, budget=RatioOfSeen(ratio),
                         window_size=window)


def check_decode_scorers(grid: Grid) -> None:
    """ValueError naming a press of a long-generation grid that cannot score while decoding,
    before anything runs."""
    if LONG_GENERATION not in grid.tasks:
        return
    for cell in grid.cells():
        press = build_press(cell)
        if cell.task == LONG_GENERATION and press is not None:
            try:
                decode_scores(press)
            except ValueError as e:
                raise ValueError(f"task {LONG_GENERATION}, press {cell.press!r}: {e}") from e


def long_generation_rows(pipeline, tokenizer, seed: int, n_score: int = 2048,
                         interval: int = 64, window: int = 0) -> RowsFn:
    """Rows of the long-generation task: `length` context tokens compressed by the cell's
    press at its ratio, then n_score tokens scored teacher-forced while the same scorer
    re-selects every `interval` tokens, keeping (1 - ratio) of the tokens seen (the `window`
    most recent always)."""
    def rows(task: str, length: int, index: int, cells: Sequence[Cell]) -> list[dict]:
        ids = corpus_ids(tokenizer, length + n_score, seed, index)
        presses = [_bound(build_press(c), tokenizer) for c in cells]
        hooks = [decoding_hook(p, c.ratio, interval, window) for p, c in zip(presses, cells)]
        results = perplexities(pipeline.fn, pipeline.params, ids, length, n_score, presses,
                               hooks=hooks, attn_impl=pipeline.attn_impl,
                               quant=pipeline.kv_quant)
        return [{"index": index, "score": None, "nll": r.mean_nll, "n_scored": n_score,
                 "interval": interval, "window": window, "kv_bytes_needed": r.kv_bytes_needed,
                 "bytes_held": r.bytes_held, "context_kv_bytes": r.kv_bytes_needed,
                 "kept_share": r.kept_share,
                 "n_context": length} for r in results]
    return rows


def kvjax_rows(pipeline, tokenizer, seed: int, n_score: int = 256,
               long_tokens: int = 2048, interval: int = 64, window: int = 0) -> RowsFn:
    """Rows for any task with kvjax: perplexity, long generation or the generated QA tasks."""
    qa = answer_rows(tokenizer, kvjax_answer_fn(pipeline), seed)
    by_task = {PERPLEXITY: perplexity_rows(pipeline, tokenizer, seed, n_score),
               LONG_GENERATION: long_generation_rows(pipeline, tokenizer, seed, long_tokens,
                                                     interval, window)}
    return lambda task, *args: by_task.get(task, qa)(task, *args)


def run_grid(grid: Grid, rows_fn: RowsFn, out_dir: str | Path, *, meta: dict,
             progress: bool = True) -> Path:
    """Evaluate every missing (cell, sample) of `grid`; returns the summary.md path.

    Args:
      grid: tasks, lengths, presses, ratios, sample count, seed.
      rows_fn: (task, length, index, cells) -> one record per cell, e.g. `kvjax_rows(...)`.
      out_dir: where the cell JSONs go (created).
      meta: stored in every cell file (model, library, dtype...); resuming requires equality.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cells = grid.cells()
    done = {c: load_records(out_dir, c, meta) for c in cells}
    todo = sum(1 for c in cells for i in range(grid.samples) if i not in done[c])
    with tqdm(total=todo, desc="eval", unit="answer", disable=not progress) as bar:
        for (task, length), group in itertools.groupby(cells, key=lambda c: (c.task, c.length)):
            group = list(group)
            for index in range(grid.samples):
                pending = [c for c in group if index not in done[c]]
                if not pending:
                    continue
                bar.set_postfix_str(f"{task} {length} #{index}")
                rows = rows_fn(task, length, index, pending)
                for cell, row in zip(pending, rows, strict=True):
                    done[cell][index] = row
                    save_cell(out_dir, cell, meta, done[cell])
                bar.update(len(pending))
    return write_summary(out_dir)
