"""Plots of result directories: accuracy against KV-cache bytes and against compression ratio.

One panel per (task, length), one line per press; the full cache is a black star (and the
ratio-0 point of every line). Results of another library (kvpress) are drawn dashed in the
same colour. Perplexity cells get their own figure (perplexity against ratio).
"""

from collections import defaultdict
from pathlib import Path

from kvjax.eval.results import FULL, read_results

MIB = 2 ** 20


def _panels(results: list[dict], perplexity: bool) -> dict:
    """(task, length, question_aware) -> [result] for accuracy or perplexity cells."""
    panels = defaultdict(list)
    for r in results:
        if (r.get("perplexity") is not None) != perplexity or r.get("error"):
            continue
        if not perplexity and r.get("accuracy") is None:
            continue
        c = r["cell"]
        panels[(c["task"], c["length"], c["question_aware"])].append(r)
    return dict(sorted(panels.items()))


def _lines(rows: list[dict], value_key: str) -> tuple[dict, dict]:
    """(library, press) -> sorted [(ratio, bytes, value)], the full cache prepended to each."""
    full = {}
    lines = defaultdict(list)
    for r in rows:
        lib, c = r["meta"].get("library", "kvjax"), r["cell"]
        press, ratio = c["press"], c["ratio"]
        if c.get("threshold") is not None:  # at the ratio it reached
            press, ratio = f"{press} (threshold)", r.get("achieved_ratio") or 0.0
        point = (ratio, r.get("context_kv_bytes") or 0.0, r[value_key])
        if press == FULL:
            full[lib] = point
        else:
            lines[(lib, press)].append(point)
    return {k: ([full[k[0]]] if k[0] in full else []) + sorted(v) for k, v in lines.items()}, full


def _figure(panels: dict, value_key: str, x_axis: str, ylabel: str, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(panels)
    cols = min(3, n)
    rows_n = -(-n // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5.2 * cols, 3.8 * rows_n), squeeze=False)
    presses = sorted({r["cell"]["press"] + (" (threshold)" if r["cell"].get("threshold")
                                            is not None else "")
                      for rows in panels.values() for r in rows} - {FULL})
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(presses)}
    for ax, ((task, length, qa), rows) in zip(axes.flat, panels.items()):
        lines, full = _lines(rows, value_key)
        xi = 0 if x_axis == "ratio" else 1
        scale = 1.0 if x_axis == "ratio" else 1.0 / MIB
        for (lib, press), pts in sorted(lines.items()):
            style = "-" if lib == "kvjax" else "--"
            ax.plot([p[xi] * scale for p in pts], [p[2] * (100 if value_key == "accuracy" else 1)
                                                   for p in pts], style, marker="o", ms=3,
                    color=colors[press], label=press if lib == "kvjax" else f"{press} ({lib})")
        for lib, p in full.items():
            y = p[2] * (100 if value_key == "accuracy" else 1)
            ax.plot([p[xi] * scale], [y], "*", ms=12, color="black",
                    mfc="black" if lib == "kvjax" else "none",
                    label="full cache" if lib == "kvjax" else f"full cache ({lib})")
        ax.set_title(f"{task}, {length} tokens" + (" (question-aware)" if qa else ""))
        ax.set_xlabel("compression ratio (reached, for thresholds)" if x_axis == "ratio"
                      else "KV cache of the compressed context, MiB")
        ax.set_ylabel(ylabel)
        if value_key == "accuracy":
            ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="center left", fontsize=8,
               bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_results(root: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write accuracy_vs_kv_bytes.png, accuracy_vs_ratio.png (and perplexity_vs_ratio.png)
    for every cell JSON under `root`; returns the written paths."""
    root = Path(root)
    out_dir = root if out_dir is None else Path(out_dir)
    results = read_results(root)
    written = []
    acc = _panels(results, perplexity=False)
    if acc:
        written.append(_figure(acc, "accuracy", "bytes", "accuracy %",
                               out_dir / "accuracy_vs_kv_bytes.png"))
        written.append(_figure(acc, "accuracy", "ratio", "accuracy %",
                               out_dir / "accuracy_vs_ratio.png"))
    ppl = _panels(results, perplexity=True)
    if ppl:
        written.append(_figure(ppl, "perplexity", "ratio", "perplexity",
                               out_dir / "perplexity_vs_ratio.png"))
    return written
