"""Tables and the per-layer plot of benchmarks/fidelity_ablation.py rows (issue #19)."""

import json
import math
import os
import pathlib

import numpy as np


def load_rows(path: pathlib.Path):
    if not path.exists():
        return None, []
    data = json.loads(path.read_text())
    return data["meta"], data["rows"]


def write_rows(path: pathlib.Path, meta, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=None, separators=(",", ":")))
    os.replace(tmp, path)


RETRIEVAL_LAYERS = 3


def retrieval_layers(rows) -> dict:
    """index -> the RETRIEVAL_LAYERS layers whose question rows attend most to the needle's
    value in the full cache (from the sample's "full" row)."""
    return {r["index"]: np.argsort(r["needle_attention"])[::-1][:RETRIEVAL_LAYERS]
            for r in rows if r["variant"] == "full"}


def cell_summary(rows, samples=None):
    """{(variant, ratio): dict(acc, n, kv_bytes, kept, needle_kept, needle_ret, same)} over
    index < samples; needle_ret = needle value kept in the sample's retrieval layers."""
    groups = {}
    for r in rows:
        if samples is None or r["index"] < samples:
            groups.setdefault((r["variant"], r["ratio"]), {})[r["index"]] = r
    ret = retrieval_layers(rows)
    out = {}
    for key, by_index in groups.items():
        rs = list(by_index.values())
        out[key] = dict(
            acc=float(np.mean([r["score"] for r in rs])), n=len(rs),
            hits=int(sum(r["score"] for r in rs)),
            kv_bytes=float(np.mean([r["context_kv_bytes"] for r in rs])),
            kept=float(np.mean([np.mean(r["kept"]) for r in rs])),
            needle_kept=float(np.mean([np.mean(r["needle_kept"]) for r in rs])),
            question_kept=float(np.mean([np.mean(r["question_kept"]) for r in rs])),
            needle_ret=float(np.mean([np.mean(np.asarray(r["needle_kept"])[ret[r["index"]]])
                                      for r in rs if r["index"] in ret] or [np.nan])),
            same=(all(r["same_as_ref"] for r in rs) if "same_as_ref" in rs[0] else None))
    return out


def markdown_table(rows, variants=None, samples=None, extra=True) -> str:
    """Accuracy % (hits/n) per variant x ratio, with KV MiB and mean kept slots per layer-head."""
    summary = cell_summary(rows, samples)
    ratios = sorted({r for _, r in summary if r > 0})
    names = variants or list(dict.fromkeys(v for v, _ in summary))
    head = "| variant | " + " | ".join(f"r={r:g}" for r in ratios) + " |"
    if extra:
        head += (" KV MiB / kept per layer-head / needle kept % all layers / in retrieval "
                 "layers (" + ", ".join(f"{r:g}" for r in ratios) + ") |")
    lines = [head, "|---|" + "---|" * (len(ratios) + int(extra))]
    for name in names:
        if name == "full":
            c = summary.get(("full", 0.0))
            if c:
                lines.append(f"| full cache | {100 * c['acc']:.0f}% ({c['hits']}/{c['n']}) |"
                             + " |" * (len(ratios) - 1 + int(extra)))
            continue
        cells = [summary.get((name, r)) for r in ratios]
        if not any(cells):
            continue
        line = f"| {name} | " + " | ".join(
            "-" if c is None else f"{100 * c['acc']:.0f}% ({c['hits']}/{c['n']})"
            for c in cells) + " |"
        if extra:
            line += " " + "; ".join(
                "-" if c is None else f"{c['kv_bytes'] / 2**20:.2f} / {c['kept']:.1f} / "
                f"{100 * c['needle_kept']:.0f} / {100 * c['needle_ret']:.0f}"
                + ("" if c["same"] is None else
                                                   f" (same idx as ref: {c['same']})")
                for c in cells) + " |"
        lines.append(line)
    return "\n".join(lines)


def combined_table(paths, variants, samples=None, needle=False) -> str:
    """One row per variant, accuracy % (hits/n) per length and ratio side by side; with
    `needle`, the share of the needle's value tokens kept (all layers / retrieval layers)."""
    summaries, heads = [], []
    for path in paths:
        meta, rows = load_rows(pathlib.Path(path))
        summaries.append(cell_summary(rows, samples))
        heads += [(meta["length"], r) for r in sorted({r for _, r in summaries[-1] if r > 0})]
    lines = ["| variant | " + " | ".join(f"{n} r={r:g}" for n, r in heads) + " |",
             "|---|" + "---|" * len(heads)]
    for name in variants:
        cells = []
        for summary, path in zip(summaries, paths):
            ratios = sorted({r for _, r in summary if r > 0})
            for r in ratios:
                c = summary.get((name, 0.0 if name == "full" else r))
                if c is None or (name == "full" and r != ratios[0]):
                    cells.append("")
                elif needle:
                    cells.append(f"{100 * c['needle_kept']:.0f} / {100 * c['needle_ret']:.0f}")
                else:
                    cells.append(f"{100 * c['acc']:.0f} ({c['hits']}/{c['n']})")
        if any(cells):
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bytes_table(paths, variants, samples=None) -> str:
    """Valid context KV MiB and mean kept slots per layer and kv head, per length and ratio."""
    lines = []
    for path in paths:
        meta, rows = load_rows(pathlib.Path(path))
        summary = cell_summary(rows, samples)
        ratios = sorted({r for _, r in summary if r > 0})
        lines += [f"{meta['length']} tokens:", "",
                  "| variant | " + " | ".join(f"r={r:g}" for r in ratios) + " |",
                  "|---|" + "---|" * len(ratios)]
        for name in variants:
            cells = [summary.get((name, r)) for r in ratios]
            if name != "full" and any(cells):
                lines.append(f"| {name} | " + " | ".join(
                    "" if c is None else f"{c['kv_bytes'] / 2**20:.2f} MiB / {c['kept']:.1f}"
                    for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def paired(paths, a: str, b: str, samples=None) -> str:
    """Exact two-sided sign test (McNemar) of variant a against b on the same answers, pooled
    over the files' lengths and ratios: (a right, b wrong) vs (a wrong, b right)."""
    wins = losses = n = 0
    for path in paths:
        _, rows = load_rows(pathlib.Path(path))
        by = {(r["variant"], r["ratio"], r["index"]): r["score"] for r in rows
              if samples is None or r["index"] < samples}
        for (v, ratio, i), sa in by.items():
            if v == a and (b, ratio, i) in by:
                n += 1
                wins += sa > by[(b, ratio, i)]
                losses += sa < by[(b, ratio, i)]
    k, m = min(wins, losses), wins + losses
    p = min(1.0, 2 * sum(math.comb(m, j) for j in range(k + 1)) / 2 ** m) if m else 1.0
    return f"{a} vs {b}: {n} paired answers, {wins} won, {losses} lost, sign test p = {p:.2g}"


def plot_layers(paths, ratio, out_png, variants):
    """Per layer: ZigZagKV's budgets next to the uniform one, the needle tokens each method
    keeps, and where the full-cache model looks for the needle."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(paths), 4, figsize=(24, 4.4 * len(paths)), squeeze=False)
    for ax_row, path in zip(axes, paths):
        meta, rows = load_rows(pathlib.Path(path))
        length = meta["length"]
        by = lambda v: [r for r in rows if r["variant"] == v and (v == "full" or r["ratio"] == ratio)]
        n_layers = len(rows[0]["kept"])
        x = np.arange(n_layers)
        ax = ax_row[0]
        for v in variants:
            rs = by(v)
            if rs and (v in ("snapkv", "pyramidkv") or v.startswith("zz")):
                ax.plot(x, np.mean([r["kept"] for r in rs], 0), marker=".",
                        label=f"{v} (n={len(rs)})")
        commits = ",".join(c.split()[0][:7] for c in meta.get("kvjax_commits", []))
        ax.set_title(f"{length} tokens (kvjax {commits}), r={ratio:g}: kept entries per layer")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
        ax = ax_row[1]
        for v in variants:
            rs = by(v)
            if rs and v != "full":
                acc = np.mean([r["score"] for r in rs])
                ax.plot(x, np.mean([r["needle_kept"] for r in rs], 0), marker=".",
                        label=f"{v}: acc {100 * acc:.0f}% (n={len(rs)})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("share of the needle's value tokens kept, per layer")
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
        ax = ax_row[2]
        full = by("full")
        if full:
            att = np.mean([r["needle_attention"] for r in full], 0)
            ax.bar(x, att, color="tab:gray", label="question rows' attention on the needle value")
            ax.set_ylabel("attention share (full cache)")
            ax2 = ax.twinx()
            ax2.plot(x, np.mean([r["lmba_w32"] for r in full], 0), "r.-", label="LMBA (window 32)")
            ax2.plot(x, np.mean([r["lmba_w64"] for r in full], 0), "m.--",
                     label="LMBA (window 64)")
            ax2.set_ylabel("LMBA (tokens)")
            ax2.legend(fontsize=7, loc="upper right")
            ax.legend(fontsize=7, loc="upper center")
        ax.set_title(f"full cache: where the model looks for the needle (n={len(full)})")
        ax.set_xlabel("layer")
        ax = ax_row[3]  # which layers' needle retention goes with a right answer
        comp = [r for r in rows if r["variant"] != "full"]
        kept = np.array([r["needle_kept"] for r in comp])
        ok = np.array([r["score"] for r in comp])
        corr = [np.corrcoef(kept[:, i], ok)[0, 1] if kept[:, i].std() > 0 else 0.0
                for i in range(n_layers)]
        ax.bar(x, corr, color="tab:green")
        ax.set_title(f"corr(needle kept in layer, answer right), {len(comp)} compressed answers\n"
                     f"(every variant and ratio of this length)", fontsize=9)
        ax.set_xlabel("layer")
    fig.tight_layout()
    pathlib.Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    print(f"wrote {out_png}")




def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="JSON files of benchmarks/fidelity_ablation.py")
    ap.add_argument("--variants", default=None, help="comma-separated, in table order")
    ap.add_argument("--samples", type=int, default=None, help="only indices < samples")
    ap.add_argument("--what", default="table",
                    choices=("table", "doc", "needle", "bytes", "paired", "plot"))
    ap.add_argument("--plot-ratio", type=float, default=0.5)
    ap.add_argument("--out-png", default=None)
    args = ap.parse_args(argv)
    variants = args.variants.split(",") if args.variants else None
    if args.what == "table":
        for path in args.files:
            meta, rows = load_rows(pathlib.Path(path))
            print(f"\n{path}: {meta['length']} tokens\n")
            print(markdown_table(rows, variants, args.samples))
    elif args.what in ("doc", "needle"):
        print(combined_table(args.files, variants, args.samples, args.what == "needle"))
    elif args.what == "bytes":
        print(bytes_table(args.files, variants, args.samples))
    elif args.what == "paired":  # consecutive pairs: a,b,c,d -> a vs b, c vs d
        for a, b in zip(variants[0::2], variants[1::2]):
            print(paired(args.files, a, b, args.samples))
    else:
        plot_layers(args.files, args.plot_ratio, args.out_png, variants)


if __name__ == "__main__":
    main()
