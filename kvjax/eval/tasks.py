"""Every evaluation task by name, and deterministic sample lists.

`make_samples(task, tokenizer, length, n, seed)` gives the same samples for the same
arguments: each sample draws from its own generator seeded by (seed, task name, index).
Depth-swept tasks sweep the needle from 0% to 100% with a sequence that does not depend on n
(0, 1, 1/2, 1/4, 3/4, 1/8, ...), so the first n samples of a longer run are the same samples.
`length` counts the tokens of the context (instructions + haystack) by `tokenizer`; the chat
template and the question add a few dozen tokens on top.
"""

import zlib

import numpy as np

from kvjax.eval.haystack import TokenCounter
from kvjax.eval.needles import NeedleTask, PasskeyTask
from kvjax.eval.sample import Sample
from kvjax.eval.synthetic import CommonWordsTask, FrequentWordsTask, VariableTrackingTask

TASKS = {
    "niah_single": NeedleTask(),
    "niah_single_noise": NeedleTask(haystack="noise"),
    "niah_multikey": NeedleTask(n_keys=4),
    "niah_multivalue": NeedleTask(n_values=4),
    "niah_multiquery": NeedleTask(n_keys=4, n_queries=4),
    "passkey": PasskeyTask(),
    "vt": VariableTrackingTask(),
    "cwe": CommonWordsTask(),
    "fwe": FrequentWordsTask(),
}


def task_names() -> list[str]:
    return list(TASKS)


def token_counter(tokenizer) -> TokenCounter:
    """Count tokens with `tokenizer.encode(text, add_bos=False)` (kvjax / models tokenizers)."""
    return lambda text: len(tokenizer.encode(text, add_bos=False))


def depth(index: int) -> float:
    """Needle depth of sample `index`: 0, 1, then the base-2 van der Corput sequence."""
    if index < 0:
        raise ValueError(f"{index=} must be >= 0")
    if index < 2:
        return float(index)
    k, d, scale = index - 1, 0.0, 0.5
    while k:
        d, k, scale = d + scale * (k & 1), k >> 1, scale / 2
    return d


def sample_rng(seed: int, task: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(task.encode()), int(index)])


def make_sample(task: str, tokenizer, length: int, index: int, seed: int = 0) -> Sample:
    """Sample `index` of `task` with a ~`length`-token context."""
    if task not in TASKS:
        raise ValueError(f"unknown {task=}; known: {', '.join(TASKS)}")
    if length < 64:
        raise ValueError(f"{length=} must be >= 64 tokens")
    spec = TASKS[task]
    return spec.make(token_counter(tokenizer), int(length), sample_rng(seed, task, index),
                     depth(index) if spec.uses_depth else None, name=task, index=index)


def make_samples(task: str, tokenizer, length: int, n: int, seed: int = 0) -> list[Sample]:
    """The first n deterministic samples of `task` with ~`length`-token contexts."""
    if n < 1:
        raise ValueError(f"{n=} must be >= 1")
    return [make_sample(task, tokenizer, length, i, seed) for i in range(n)]
