"""kvjax and kvpress side by side on the same model, samples, token ids and presses.

Both libraries answer the samples of `kvjax.eval` (question-agnostic by default, RULER answer
prefix, greedy). kvpress runs on transformers with SmolLM2-135M-Instruct loaded from the same
GGUF file (f32) and its own pipeline code (`KVPressTextGenerationPipeline._forward`: prefill
the context under `with press(model)`, then greedy-decode the question with positions
continuing from the context length). It is fed the token ids of kvjax's tokenizer, and its
answers are decoded by that tokenizer, so both see identical inputs. Presses use each
library's class defaults (equal: SnapKV window 64 / kernel 5, StreamingLLM 4 sinks, ...).

  python benchmarks/compare_kvpress.py --tasks niah_single --lengths 2048 \\
      --presses full,streaming_llm,snapkv,pyramidkv,adakv,observed_attention,tova,knorm,expected_attention \\
      --ratios 0.5,0.75,0.9 --samples 20 --out docs/results/compare

Results: <out>/kvjax/*.json and <out>/kvpress/*.json (resumable, one file per cell),
<out>/comparison.md and plots. kvpress rows record the whole call time as `prefill_s`, and
the bytes of its cache after the answer is cut off (the compressed context; AdaKV's masked
entries subtracted from `kv_bytes_needed`).
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from kvjax.eval.engine import Answer
from kvjax.eval.plots import plot_results
from kvjax.eval.results import FULL, library_pivot, read_results
from kvjax.eval.runner import Grid, answer_rows, kvjax_rows, run_grid

# kvjax registry name -> (kvpress factory(ratio), attention implementation kvpress needs)
KVPRESS = {
    "streaming_llm": (lambda kp, r: kp.StreamingLLMPress(compression_ratio=r), "sdpa"),
    "snapkv": (lambda kp, r: kp.SnapKVPress(compression_ratio=r), "sdpa"),
    "pyramidkv": (lambda kp, r: kp.PyramidKVPress(compression_ratio=r), "sdpa"),
    "adakv": (lambda kp, r: kp.AdaKVPress(kp.SnapKVPress(compression_ratio=r)), "sdpa"),
    "observed_attention": (lambda kp, r: kp.ObservedAttentionPress(compression_ratio=r), "eager"),
    "tova": (lambda kp, r: kp.TOVAPress(compression_ratio=r), "sdpa"),
    "knorm": (lambda kp, r: kp.KnormPress(compression_ratio=r), "sdpa"),
    "expected_attention": (lambda kp, r: kp.ExpectedAttentionPress(compression_ratio=r), "sdpa"),
}
NOT_IN_KVPRESS = "not comparable in kvpress"


class _Decoder:
    """Stands in for the HF tokenizer inside kvpress's pipeline: decodes with kvjax's."""

    model_max_length = 10 ** 9

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=True):
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens)


def load_hf_smollm2():
    """transformers' SmolLM2 from the same GGUF file as `models.load("smollm2")`, f32, eval."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from models.smollm2 import find_smollm2
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    path = find_smollm2()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


def kvpress_answer_fn(hf_model, pipeline):
    """(sample, cells) -> Answers from kvpress on `hf_model`, fed kvjax's token ids."""
    import kvpress
    import torch
    from kvpress.pipeline import KVPressTextGenerationPipeline
    from transformers import DynamicCache

    kv_pipe = KVPressTextGenerationPipeline(model=hf_model, tokenizer=_Decoder(pipeline.tokenizer))

    def one(cell, ctx_ids, q_ids, max_new_tokens):
        if cell.press != FULL and cell.press not in KVPRESS:
            return _failed(ctx_ids, q_ids, NOT_IN_KVPRESS)
        factory, attn = (None, "sdpa") if cell.press == FULL else KVPRESS[cell.press]
        press = None if factory is None else factory(kvpress, cell.ratio)
        hf_model.set_attn_implementation(attn)
        for layer in hf_model.model.layers:  # AdaKV's mask is reset by sdpa prefills only
            layer.self_attn.masked_key_indices = None
        cache, t0 = DynamicCache(), time.perf_counter()
        try:
            with torch.no_grad():
                text = kv_pipe._forward({"context_ids": torch.tensor([ctx_ids]),
                                         "questions_ids": [torch.tensor([q_ids])]},
                                        max_new_tokens=max_new_tokens, press=press,
                                        cache=cache)[0]
        except Exception as e:  # noqa: BLE001 (recorded, e.g. PyramidKV's per-layer lengths vs the CPU mask builder
            msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            return _failed(ctx_ids, q_ids, msg)
        held, needed = _cache_bytes(hf_model, cache)
        return Answer(text=text, tokens=(), kv_bytes_needed=needed, bytes_held=held,
                      context_kv_bytes=needed, n_context=len(ctx_ids), n_question=len(q_ids),
                      prefill_s=time.perf_counter() - t0, decode_s=0.0)

    def answer(sample, cells):
        ctx_ids, q_ids = pipeline.encode(sample.context, sample.question,
                                         answer_prefix=sample.answer_prefix,
                                         question_aware=cells[0].question_aware)
        return [one(c, ctx_ids, q_ids, sample.max_new_tokens) for c in cells]

    return answer


def _failed(ctx_ids, q_ids, error: str) -> Answer:
    return Answer(text="", tokens=(), kv_bytes_needed=0, bytes_held=0, context_kv_bytes=0,
                  n_context=len(ctx_ids), n_question=len(q_ids), prefill_s=0.0, decode_s=0.0,
                  error=error)


def _cache_bytes(hf_model, cache) -> tuple[int, int]:
    """(bytes of the compressed context's keys + values, minus AdaKV-masked entries)."""
    held = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
    masked = 0
    for layer, cl in zip(hf_model.model.layers, cache.layers):
        idx = getattr(layer.self_attn, "masked_key_indices", None)
        if idx is not None:
            masked += len(idx[0]) * cl.keys.shape[-1] * cl.keys.element_size() * 2
    return held, held - masked


def on_common_samples(results: list[dict]) -> list[dict]:
    """Cells restricted to the sample indices that every cell of every library answered for
    the same task and length (accuracy recomputed), so a pivot compares the same samples."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["cell"]["task"], r["cell"]["length"]), []).append(r)
    out = []
    for rows in groups.values():
        done = [{x["index"] for x in r["records"]} for r in rows if not r.get("error")]
        common = set.intersection(*done) if done else set()
        for r in rows:
            if r.get("error"):
                out.append(r)
                continue
            recs = [x for x in r["records"] if x["index"] in common]
            acc = sum(x["score"] for x in recs) / max(len(recs), 1)
            out.append({**r, "records": recs, "n_samples": len(common), "accuracy": acc})
    return out


def tables(root: Path) -> str:
    """Both libraries on the samples they share, then every cell with its own sample count."""
    results = read_results(root)
    return ("On the samples both libraries answered:\n\n" + library_pivot(on_common_samples(results))
            + "\nkvjax on all its samples:\n\n"
            + library_pivot([r for r in results if r["meta"]["library"] == "kvjax"], ("kvjax",))
            + "\n" + comparison_table(root))


def comparison_table(root: Path) -> str:
    """Markdown: kvjax / kvpress accuracy per press and ratio, and answer agreement."""
    by = {}
    for r in read_results(root):
        c = r["cell"]
        by[(r["meta"]["library"], c["task"], c["length"], c["press"], c["ratio"])] = r
    keys = sorted({k[1:] for k in by}, key=lambda k: (k[0], k[1], k[2] != FULL, k[2], k[3]))
    lines = ["| task | length | press | ratio | kvjax % | kvpress % | same answer % | n |",
             "|---|---|---|---|---|---|---|---|"]
    for task, length, press, ratio in keys:
        a, b = by.get(("kvjax",) + (task, length, press, ratio)), by.get(
            ("kvpress",) + (task, length, press, ratio))
        lines.append(f"| {task} | {length} | {press} | {ratio:g} | {_acc(a)} | {_acc(b)} | "
                     f"{_agree(a, b)} | {_n(a, b)} |")
    return "\n".join(lines) + "\n"


def _acc(r, short: bool = False) -> str:
    if r is None:
        return "-"
    if r.get("error"):
        if r["error"] == NOT_IN_KVPRESS:
            return "n/a"
        return "crash" if short else f"error ({r['error'][:60]})"
    return f"{100 * r['accuracy']:.0f}"


def _agree(a, b) -> str:
    if a is None or b is None or a.get("error") or b.get("error"):
        return "-"
    pa = {x["index"]: x["prediction"].strip() for x in a["records"]}
    pb = {x["index"]: x["prediction"].strip() for x in b["records"]}
    common = sorted(set(pa) & set(pb))
    return f"{100 * sum(pa[i] == pb[i] for i in common) / max(len(common), 1):.0f}"


def _n(a, b) -> str:
    return " / ".join(str(r["n_samples"]) if r else "-" for r in (a, b))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    csv = lambda kind: lambda s: tuple(kind(x) for x in s.split(",") if x)
    p.add_argument("--tasks", type=csv(str), default=("niah_single",))
    p.add_argument("--lengths", type=csv(int), default=(2048,))
    p.add_argument("--presses", type=csv(str), default=("full",) + tuple(KVPRESS))
    p.add_argument("--ratios", type=csv(float), default=(0.5, 0.75, 0.9))
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--question-aware", action="store_true")
    p.add_argument("--library", choices=("both", "kvjax", "kvpress"), default="both")
    p.add_argument("--out", type=Path, default=Path("results/compare"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--table-only", action="store_true", help="only print the tables of --out")
    args = p.parse_args(argv)
    if args.table_only:
        print(tables(args.out))
        return 0

    import jax
    import torch

    import models
    from kvjax.pipeline import Pipeline
    torch.set_num_threads(os.cpu_count() or 1)
    grid = Grid(tasks=args.tasks, lengths=args.lengths, presses=args.presses,
                ratios=args.ratios, samples=args.samples, seed=args.seed,
                question_aware=args.question_aware)
    model, tokenizer = models.load("smollm2", progress=False)
    pipeline = Pipeline(model, tokenizer)
    meta = {"model": "smollm2", "seed": args.seed, "dtype": "float32",
            "backend": jax.default_backend()}
    if args.library in ("both", "kvjax"):
        run_grid(grid, kvjax_rows(pipeline, tokenizer, args.seed), args.out / "kvjax",
                 meta={"library": "kvjax", **meta}, progress=not args.no_progress)
    if args.library in ("both", "kvpress"):
        rows = answer_rows(tokenizer, kvpress_answer_fn(load_hf_smollm2(), pipeline), args.seed)
        run_grid(grid, rows, args.out / "kvpress", meta={"library": "kvpress", **meta},
                 progress=not args.no_progress)
    table = tables(args.out)
    (args.out / "comparison.md").write_text(table)
    print(table)
    for path in plot_results(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
