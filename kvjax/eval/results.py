"""Result files: one JSON per cell (task, length, press, ratio), and summary tables.

A cell file holds the run's metadata, per-sample records and their means. Files are written
atomically after every sample, so an interrupted run resumes where it stopped.
"""

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from kvjax.eval.perplexity import LONG_GENERATION, PERPLEXITY_TASKS

FULL = "full"
SUMMARY_FILES = ("summary.json",)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the grid: a task at a context length under a press and ratio, or under
    `kvjax.ThresholdPress(press, threshold)` when `threshold` is set (ratio 0: it follows the
    input, and each record says what it reached).

    `press` is a registry name or "full" (no compression, ratio 0).
    """

    task: str
    length: int
    press: str
    ratio: float
    question_aware: bool = False
    threshold: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"{self.ratio=} must be in [0, 1)")
        if self.press == FULL and self.ratio != 0.0:
            raise ValueError(f"{self.ratio=} must be 0 for the full cache")
        if self.threshold is not None and (self.press == FULL or self.ratio != 0.0
                                           or math.isnan(self.threshold)):
            raise ValueError(f"threshold={self.threshold} needs a press, ratio 0 and a number "
                             f"(got press={self.press!r}, ratio={self.ratio})")

    @property
    def name(self) -> str:
        qa = "__qa" if self.question_aware else ""
        if self.threshold is not None:
            return f"{self.task}__{self.length}__{self.press}__t{self.threshold:g}{qa}"
        return f"{self.task}__{self.length}__{self.press}__{self.ratio:g}{qa}"


def cell_path(out_dir: Path, cell: Cell) -> Path:
    return Path(out_dir) / f"{cell.name}.json"


def load_records(out_dir: Path, cell: Cell, meta: dict) -> dict[int, dict]:
    """Records already measured for `cell` (index -> record); {} when there is no file.

    Raises ValueError when the file was made with other metadata (model, library, seed...).
    """
    path = cell_path(out_dir, cell)
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    if data.get("meta") != meta:
        raise ValueError(f"{str(path)!r} was written with meta={data.get('meta')}, not "
                         f"{meta=}; use another output directory")
    return {int(r["index"]): r for r in data["records"]}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _median(values: list) -> float | None:
    values = sorted(v for v in values if v is not None)
    return None if not values else (values[(len(values) - 1) // 2]
                                    + values[len(values) // 2]) / 2


def cell_result(cell: Cell, meta: dict, records: dict[int, dict]) -> dict:
    """The JSON object of a cell: metadata, means over samples, records sorted by index."""
    rows = [records[i] for i in sorted(records)]
    errors = sorted({r["error"] for r in rows if r.get("error")})
    out = {"cell": dataclasses.asdict(cell), "meta": meta, "n_samples": len(rows),
           "accuracy": None if errors else _mean([r["score"] for r in rows])}
    for key in ("kv_bytes_needed", "bytes_held", "context_kv_bytes", "n_context", "kept_share",
                "achieved_ratio"):
        out[key] = _mean([r.get(key) for r in rows])
    for key in ("prefill_s", "compress_s", "decode_s"):  # medians: the first call compiles
        out[key] = _median([r.get(key) for r in rows])
    nll = _mean([r.get("nll") for r in rows])
    if nll is not None:
        out["perplexity"] = math.exp(nll)
    if errors:
        out["error"] = errors[0]
    out["records"] = rows
    return out


def save_cell(out_dir: Path, cell: Cell, meta: dict, records: dict[int, dict]) -> Path:
    """Write the cell's JSON atomically (temp file + rename)."""
    path = cell_path(out_dir, cell)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cell_result(cell, meta, records), indent=1))
    os.replace(tmp, path)
    return path


def read_results(root: Path, recursive: bool = True) -> list[dict]:
    """Every cell JSON under `root` (summary files skipped)."""
    paths = Path(root).rglob("*.json") if recursive else Path(root).glob("*.json")
    out = []
    for path in sorted(paths):
        if path.name in SUMMARY_FILES:
            continue
        data = json.loads(path.read_text())
        if "cell" in data and "records" in data:
            out.append(data)
    return out


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def fmt_mib(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def summary_tables(results: Iterable[dict]) -> str:
    """Markdown: per (task, length, library), presses x ratios of accuracy % and KV MiB."""
    groups: dict = {}
    for r in results:
        c = r["cell"]
        key = (c["task"], c["length"], r["meta"].get("library", "kvjax"), c["question_aware"])
        groups.setdefault(key, []).append(r)
    parts = []
    for (task, length, library, qa), rows in sorted(groups.items()):
        plain = [r for r in rows if r["cell"].get("threshold") is None]
        ratios = sorted({r["cell"]["ratio"] for r in plain if r["cell"]["press"] != FULL})
        presses = sorted({r["cell"]["press"] for r in plain}, key=lambda p: (p != FULL, p))
        by = {(r["cell"]["press"], r["cell"]["ratio"]): r for r in plain}
        n = max(r["n_samples"] for r in rows)
        mode = "question-aware" if qa else "question-agnostic"
        parts.append(f"### {task}, {length} tokens, {library}, {mode} ({n} samples)\n")
        head = " / ".join(f"{x:g}" for x in ratios) or "0"
        what = "perplexity" if task in PERPLEXITY_TASKS else "accuracy %"
        size = ("kept % of the tokens seen, at the end" if task == LONG_GENERATION
                else "compressed context KV MiB")
        parts.append(f"| press | {what} at ratio {head} | {size} | compression / prefill |")
        parts.append("|---|---|---|---|")
        for p in presses:
            cols = [0.0] if p == FULL else ratios
            cells = [by.get((p, x)) for x in cols]
            acc = " / ".join(_acc_text(c) for c in cells)
            if task == LONG_GENERATION:
                mib = " / ".join(fmt_pct(c.get("kept_share")) if c else "-" for c in cells)
            else:
                mib = " / ".join(fmt_mib(c.get("context_kv_bytes")) if c else "-" for c in cells)
            cost = " / ".join(_cost_text(c) for c in cells)
            parts.append(f"| {p} | {acc} | {mib} | {cost} |")
        parts.append("")
        parts += threshold_table(rows)
    return "\n".join(parts)


def threshold_table(rows: list[dict]) -> list[str]:
    """Markdown lines for a group's ThresholdPress cells: accuracy against the ratio reached."""
    cells = sorted((r for r in rows if r["cell"].get("threshold") is not None),
                   key=lambda r: (r["cell"]["press"], r["cell"]["threshold"]))
    if not cells:
        return []
    out = ["| ThresholdPress over | threshold | accuracy % | achieved ratio (mean) | "
           "compressed context KV MiB |", "|---|---|---|---|---|"]
    for r in cells:
        ratio = r.get("achieved_ratio")
        out.append(f"| {r['cell']['press']} | {r['cell']['threshold']:g} | {_acc_text(r)} | "
                   f"{'-' if ratio is None else f'{ratio:.3f}'} | "
                   f"{fmt_mib(r.get('context_kv_bytes'))} |")
    return out + [""]


def library_pivot(results: Iterable[dict], libraries: Sequence[str] = ("kvjax", "kvpress")) -> str:
    """Markdown per (task, length): presses x ratios, each cell "kvjax / kvpress" accuracy %.

    `results` are cell dicts of several libraries (`meta["library"]`); a missing cell is "-",
    a cell that crashed is "crash", one the other library lacks is "n/a".
    """
    by = {(r["cell"]["task"], r["cell"]["length"], r["cell"]["press"], r["cell"]["ratio"],
           r["meta"].get("library", "kvjax")): r for r in results}
    out = []
    for task, length in sorted({k[:2] for k in by}):
        mine = [k for k in by if k[:2] == (task, length)]
        ratios = sorted({k[3] for k in mine if k[2] != FULL})
        presses = sorted({k[2] for k in mine}, key=lambda p: (p != FULL, p))
        n = max(by[k]["n_samples"] for k in mine)
        out += [f"{task}, {length} tokens, {n} samples: accuracy % {' / '.join(libraries)}", "",
                "| press | " + " | ".join(f"ratio {x:g}" for x in ratios) + " |",
                "|---|" + "---|" * len(ratios)]
        for p in presses:
            cells = [" / ".join(_lib_acc(by.get((task, length, p, x, lib))) for lib in libraries)
                     for x in ([0.0] if p == FULL else ratios)]
            out.append(f"| {p} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _lib_acc(result: dict | None) -> str:
    if result is None:
        return "-"
    if result.get("error"):
        return "n/a" if result["error"].startswith("not comparable") else "crash"
    return fmt_pct(result["accuracy"])


def _cost_text(result: dict | None) -> str:
    """Median compression seconds over median prefill seconds (the press's own work)."""
    if not result or not result.get("prefill_s") or result.get("compress_s") is None:
        return "-"
    return f"{result['compress_s'] / result['prefill_s']:.2f}"


def _acc_text(result: dict | None) -> str:
    if result is None:
        return "-"
    if result.get("error"):
        return "error"
    if result.get("perplexity") is not None:
        return f"{result['perplexity']:.2f}"
    return fmt_pct(result["accuracy"])


def write_summary(out_dir: Path) -> Path:
    """Write summary.md (tables) and summary.json (cells without records) for `out_dir`."""
    results = read_results(out_dir)
    slim = [{k: v for k, v in r.items() if k != "records"} for r in results]
    Path(out_dir, "summary.json").write_text(json.dumps(slim, indent=1))
    path = Path(out_dir, "summary.md")
    path.write_text(summary_tables(results))
    return path
