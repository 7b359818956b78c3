"""Haystacks from offline text, needles inserted at depths, contexts fitted to a token count.

Two haystacks, as RULER (arXiv 2404.06654): `noise`, a repeated passage of trivial sentences,
and `essay`, varied natural text from `kvjax/corpus/corpus.txt` (original essays shipped with kvjax, ASCII,
no digits, so numeric needles are never ambiguous). A haystack is a stream of words with the
word indices where sentences start; needles go in at the sentence start nearest their depth.
"""

import dataclasses
import re
from collections.abc import Callable, Sequence

import numpy as np

from kvjax.corpus import corpus_paragraphs

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("essay", "noise")

TokenCounter = Callable[[str], int]


@dataclasses.dataclass(frozen=True)
class WordStream:
    """Haystack words and the indices of the words that start a sentence (0 included)."""

    words: tuple[str, ...]
    sentence_starts: tuple[int, ...]


def split_sentences(text: str) -> list[str]:
    """Split prose after '.', '!' or '?' followed by whitespace."""
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def corpus_vocabulary(min_len: int = 4) -> tuple[str, ...]:
    """Distinct lowercase alphabetic words of the corpus (>= min_len letters), sorted."""
    words = re.findall(r"[A-Za-z]+", " ".join(corpus_paragraphs()))
    return tuple(sorted({w.lower() for w in words if len(w) >= min_len}))


def essay_sentences(rng: np.random.Generator, n_words: int) -> list[str]:
    """Sentences of shuffled corpus paragraphs from a random start, >= n_words words in all.

    Paragraphs keep their sentence order; once the corpus is used up it is reshuffled and
    repeated (only lengths beyond the corpus, ~7k SmolLM2 tokens, repeat text).
    """
    paragraphs = corpus_paragraphs()
    order = list(np.roll(rng.permutation(len(paragraphs)), -int(rng.integers(len(paragraphs)))))
    sentences, count = [], 0
    while count < n_words:
        if not order:
            order = list(rng.permutation(len(paragraphs)))
        for sentence in split_sentences(paragraphs[order.pop(0)]):
            sentences.append(sentence)
            count += len(sentence.split())
    return sentences


def noise_sentences(n_words: int) -> list[str]:
    """The noise passage's sentences repeated to >= n_words words."""
    base = split_sentences(NOISE)
    per_pass = sum(len(s.split()) for s in base)
    return base * (n_words // per_pass + 1)


def word_stream(kind: str, rng: np.random.Generator, n_words: int) -> WordStream:
    """A haystack of at least n_words words of `kind` ("essay" or "noise")."""
    if kind not in HAYSTACKS:
        raise ValueError(f"{kind=} must be one of {HAYSTACKS}")
    sentences = essay_sentences(rng, n_words) if kind == "essay" else noise_sentences(n_words)
    words, starts = [], []
    for sentence in sentences:
        starts.append(len(words))
        words.extend(sentence.split())
    return WordStream(tuple(words), tuple(starts))


def insert_at_depths(stream: WordStream, n_words: int,
                     inserts: Sequence[tuple[float, str]]) -> str:
    """Join the first n_words words with each (depth, text) inserted at a sentence start.

    The insertion point is the sentence start nearest to depth * n_words (the end counts when
    the words end a sentence); texts sharing a point keep their order in `inserts`. Depth 0 puts
    a text first; depth 1 last, or before the last (truncated) sentence.
    """
    if not 0 <= n_words <= len(stream.words):
        raise ValueError(f"{n_words=} must be in [0, {len(stream.words)}]")
    # sentence starts, and the end only when it is one (never after a truncated sentence)
    starts = [s for s in stream.sentence_starts if s < n_words]
    ends_sentence = n_words == len(stream.words) or n_words in stream.sentence_starts
    points = np.array(starts + [n_words] if ends_sentence or not starts else starts)
    at: dict[int, list[str]] = {}
    for depth, text in inserts:
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"{depth=} must be in [0, 1]")
        point = int(points[np.argmin(np.abs(points - depth * n_words))])
        at.setdefault(point, []).append(text)
    pieces = []
    for i in range(n_words + 1):
        pieces.extend(at.get(i, []))
        if i < n_words:
            pieces.append(stream.words[i])
    return " ".join(pieces)


def fit_length(build: Callable[[int], str], count: TokenCounter, target: int,
               n_max: int) -> tuple[int, str]:
    """The n in [0, n_max] whose `build(n)` has a token count closest to `target`.

    Binary search for the largest n with count <= target (counts grow with n), then pick it
    or n + 1, whichever is closer. Returns (n, build(n)).
    """
    lo, hi = 0, n_max
    if count(build(lo)) > target:
        raise ValueError(f"{target=} tokens is too short: the fixed parts alone have "
                         f"{count(build(lo))} tokens")
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(build(mid)) <= target:
            lo = mid
        else:
            hi = mid - 1
    best = lo
    if lo < n_max and count(build(lo + 1)) - target < target - count(build(lo)):
        best = lo + 1
    return best, build(best)


def words_for_tokens(target_tokens: int) -> int:
    """A generous word budget for a text of target_tokens tokens (any tokenizer >= 1/word)."""
    return int(target_tokens) + 64
