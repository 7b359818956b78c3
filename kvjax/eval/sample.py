"""`Sample`: one evaluation item (context, question, expected answers, scoring rule)."""

import dataclasses

METRICS = ("exact", "recall")


@dataclasses.dataclass(frozen=True)
class Sample:
    """A context to compress, a question, and how to score the answer.

    Attributes:
      task: task name; index: position in the task's sample list (seeded).
      context: instructions + haystack (what a press compresses, question-agnostic).
      question: asked after compression; answer_prefix: starts the assistant's answer.
      answers: expected items; metric: "exact" (the answer comes first) or "recall"
        (fraction of answers present), see `kvjax.eval.scoring`.
      max_new_tokens: decode budget; n_tokens: context tokens by the generator's tokenizer.
      depth: relative position of the (first queried) needle in the haystack, or None.
    """

    task: str
    index: int
    context: str
    question: str
    answer_prefix: str
    answers: tuple[str, ...]
    metric: str
    max_new_tokens: int
    n_tokens: int
    depth: float | None = None

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"{self.metric=} must be one of {METRICS}")
        if not self.answers:
            raise ValueError(f"{self.answers=} must not be empty")

    def to_json(self) -> dict:
        """Everything but the context (kept out of result files to keep them small)."""
        d = dataclasses.asdict(self)
        d.pop("context")
        d["answers"] = list(self.answers)
        return d
