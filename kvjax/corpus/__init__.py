"""The offline text corpus shipped with kvjax (original essays, ASCII, no digits), as data.

Below everything that reads it: the eval's haystacks (`kvjax.eval.haystack`), the KVzap
trainer and UNComp's calibration prompts (`kvjax.tools`).
"""

import importlib.resources


def corpus_paragraphs() -> tuple[str, ...]:
    """Paragraphs of the shipped corpus (one per line of `corpus.txt`)."""
    text = importlib.resources.files("kvjax.corpus").joinpath("corpus.txt").read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())
