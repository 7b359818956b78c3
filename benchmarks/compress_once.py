"""Compress once, answer many: time to the first answer token, reused vs recompressed.

    python benchmarks/compress_once.py [--lengths 2048,4096] [--presses snapkv,kvzip]
                                       [--ratio 0.75] [--questions 10]

For each prompt length and press, on SmolLM2: question 1 warms the compilation; questions
2..N are answered (a) with `pipe.run(context, q, press=...)`, which prefills and compresses
the context again for every question, and (b) with `pipe.ask(compressed, q)` from one
`pipe.compress(context, press=...)`. Time to the first answer token = the time until the
logits after the question exist (`PipelineResult.prefill_s`). Also the bytes on disk of the
saved context (`CompressedContext.save`) next to the full cache's key/value bytes, and the
three-questions-batched decode vs three separate asks. Saves docs/results/compress_once.json.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, save_json  # noqa: E402

QUESTIONS = ["What is the special magic number mentioned in the text?",
             "Summarise the text in one sentence.", "What is the first word of the text?",
             "Which city is mentioned?", "Is there a number in the text?",
             "What is the text about?", "Name one object from the text.",
             "How many sentences are there?", "Who is the main character?",
             "What colour is mentioned?", "Give a title for the text."]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(pipe, context: str, press, questions: list[str], new_tokens: int) -> dict:
    from kvjax.memory import memory_report
    t0 = time.perf_counter()
    compressed = pipe.compress(context, press=press)
    jax.block_until_ready(compressed.logits)
    compress_s = time.perf_counter() - t0
    pipe.run(context, questions[0], press=press, max_new_tokens=new_tokens)  # compile
    pipe.ask(compressed, questions[0], max_new_tokens=new_tokens)
    recompressed = [pipe.run(context, q, press=press, max_new_tokens=new_tokens).prefill_s
                    for q in questions[1:]]
    reused = [pipe.ask(compressed, q, max_new_tokens=new_tokens).prefill_s
              for q in questions[1:]]
    three = questions[1:4]
    pipe.ask_many(compressed, three, max_new_tokens=new_tokens)  # compile batch 3
    t0 = time.perf_counter()
    pipe.ask_many(compressed, three, max_new_tokens=new_tokens)
    batched_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for q in three:
        pipe.ask(compressed, q, max_new_tokens=new_tokens)
    separate_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        disk = dir_bytes(compressed.save(Path(tmp) / "ctx"))
    rep = memory_report(compressed.cache)
    return dict(n_context=compressed.n_context, compress_s=compress_s,
                ttft_recompressed_s=statistics.median(recompressed),
                ttft_reused_s=statistics.median(reused),
                speedup=statistics.median(recompressed) / statistics.median(reused),
                three_batched_s=batched_s, three_separate_s=separate_s,
                disk_bytes=disk, kv_bytes_needed=rep.kv_bytes_needed,
                bytes_held=rep.bytes_held)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="2048,4096")
    ap.add_argument("--presses", default="snapkv,kvzip")
    ap.add_argument("--ratio", type=float, default=0.75)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", default="docs/results/compress_once.json")
    args = ap.parse_args(argv)
    import kvjax
    import models
    from kvjax.demo import needle_sample
    model, tok = models.load("smollm2", progress=False)
    pipe = kvjax.Pipeline(model, tok)
    questions = QUESTIONS[:args.questions]
    rows = []
    for n in map(int, args.lengths.split(",")):
        context = needle_sample(tok, n).context
        full = measure(pipe, context, None, questions, args.new_tokens)
        for name in ["full"] + args.presses.split(","):
            press = None if name == "full" else kvjax.make_press(name, args.ratio)
            r = full if press is None else measure(pipe, context, press, questions,
                                                   args.new_tokens)
            r = dict(r, press=name, ratio=0.0 if press is None else args.ratio, length=n,
                     disk_vs_full_kv=r["disk_bytes"] / full["kv_bytes_needed"])
            rows.append(r)
            print(f"{n:5d} {name:8s} context {r['n_context']} tok, compress "
                  f"{r['compress_s']:.2f}s | first token, questions 2..{len(questions)}: "
                  f"recompressed {r['ttft_recompressed_s']:.3f}s, reused "
                  f"{r['ttft_reused_s']:.3f}s ({r['speedup']:.1f}x) | 3 questions batched "
                  f"{r['three_batched_s']:.2f}s vs separate {r['three_separate_s']:.2f}s | "
                  f"on disk {r['disk_bytes'] / 2**20:.1f} MiB = {r['disk_vs_full_kv']:.2f} "
                  f"of the full cache's K/V", flush=True)
    save_json(dict(device=device_name(), ratio=args.ratio, new_tokens=args.new_tokens,
                   questions=len(questions), rows=rows), args.out)
    print(f"device: {device_name()}; saved {args.out}")


if __name__ == "__main__":
    main()
