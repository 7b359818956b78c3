"""`kvjax demo`: a needle in a ~2,000-token haystack, answered with the full cache and with
compressed ones, side by side (answers, cache bytes, speed, compression time)."""

import dataclasses
import random

from kvjax.memory import fmt_bytes, memory_report

_SUBJECTS = ("The river", "A quiet village", "The old library", "Our committee", "The harbor",
             "A travelling merchant", "The orchestra", "The mountain pass", "The archive",
             "A young botanist", "The lighthouse keeper", "The city council")
_VERBS = ("described", "remembered", "carefully recorded", "argued about", "celebrated",
          "measured", "rebuilt", "painted", "forgot", "studied")
_OBJECTS = ("the autumn harvest", "a long winter", "the northern road", "several old maps",
            "the price of wool", "a forgotten song", "the tides of the bay", "the stone bridge",
            "a letter from abroad", "the evening market", "the migration of geese")
_TAILS = ("before the first snow.", "with great patience.", "for many years.",
          "without saying much.", "in the local newspaper.", "while the bells rang.",
          "as the lamps were lit.", "during the long festival.")

NEEDLE = "The special magic number is {value}."
QUESTION = "What is the special magic number mentioned in the text?"
ANSWER_PREFIX = "The special magic number is"


@dataclasses.dataclass(frozen=True)
class NeedleSample:
    context: str
    question: str
    answer: str
    answer_prefix: str = ANSWER_PREFIX


def filler_sentences(seed: int):
    rng = random.Random(seed)
    while True:
        yield (f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
               f"{rng.choice(_TAILS)}")


def needle_sample(tokenizer, n_tokens: int = 2000, depth: float = 0.5,
                  seed: int = 0) -> NeedleSample:
    """A haystack of about `n_tokens` tokens with one 7-digit needle at `depth` in [0, 1]."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"{depth=} must be in [0, 1]")
    value = str(random.Random(seed + 1).randrange(1_000_000, 10_000_000))
    sentences, count = [], 0
    for s in filler_sentences(seed):
        if count >= n_tokens:
            break
        sentences.append(s)
        count += len(tokenizer.encode(" " + s, add_bos=False))
    sentences.insert(round(depth * len(sentences)), NEEDLE.format(value=value))
    return NeedleSample(context=" ".join(sentences), question=QUESTION, answer=value)


def run_demo(model, tokenizer, *, presses=(), n_tokens: int = 2000,
             question_aware: bool = False, max_new_tokens: int = 12,
             print_fn=print, kv_dtype=None) -> list[dict]:
    """Answer the needle question with the full cache and with each press; print a
    comparison (prefill time includes the press's compression, e.g. KVzip's repeat pass)."""
    from kvjax.pipeline import Pipeline

    pipe = Pipeline(model, tokenizer, kv_dtype=kv_dtype)
    sample = needle_sample(tokenizer, n_tokens)
    runs = [("full cache", None)] + [(_press_label(p), p) for p in presses]
    rows = []
    for label, p in runs:
        kw = dict(max_new_tokens=max_new_tokens, press=p, answer_prefix=sample.answer_prefix,
                  question_aware=question_aware)
        pipe.run(sample.context, sample.question, **{**kw, "max_new_tokens": 1})  # compile
        r = pipe.run(sample.context, sample.question, **kw)
        mem = memory_report(r.cache)
        rows.append(dict(label=label, answer=r.text.strip(), correct=sample.answer in r.text,
                         context_tokens=r.n_context, kv_bytes=mem.kv_bytes_needed,
                         bytes_held=mem.bytes_held, prefill_s=r.prefill_s,
                         prefill_tok_s=r.n_context / r.prefill_s,
                         decode_tok_s=len(r.tokens) / max(r.decode_s, 1e-9)))
    _print_rows(rows, sample, question_aware, print_fn)
    return rows


def _press_label(press) -> str:
    return f"{type(press).__name__}({getattr(press, 'compression_ratio', '')})"


def _print_rows(rows, sample, question_aware, print_fn) -> None:
    mode = "question-aware" if question_aware else "question-agnostic"
    print_fn(f"Needle: {sample.answer}   context: {rows[0]['context_tokens']} tokens   ({mode})")
    print_fn(f"{'cache':<26}{'answer':<28}{'ok':<5}{'KV bytes':>11}{'held':>11}"
             f"{'prefill+compress s':>20}{'decode tok/s':>14}")
    for r in rows:
        print_fn(f"{r['label']:<26}{r['answer'][:26]:<28}{'yes' if r['correct'] else 'no':<5}"
                 f"{fmt_bytes(r['kv_bytes']):>11}{fmt_bytes(r['bytes_held']):>11}"
                 f"{r['prefill_s']:>20.2f}{r['decode_tok_s']:>14.1f}")
