"""The bridge between an NNX `Decoder` and kvjax's jitted loops (split once, merge in jit)."""

import dataclasses
from typing import Any

from flax import nnx


@dataclasses.dataclass(frozen=True)
class NNXFunctional:
    """Hashable functional view of an NNX decoder: a static jit argument.

    kvjax calls `prefill(params, ...)` and `decode(params, ...)` inside its jitted functions;
    each merges the graphdef with the (dynamic) params and runs the module method.
    """

    graphdef: Any
    max_seq_len: int

    def prefill(self, params, *args, **kwargs):
        return nnx.merge(self.graphdef, params).prefill(*args, **kwargs)

    def decode(self, params, *args, **kwargs):
        return nnx.merge(self.graphdef, params).decode(*args, **kwargs)


def split_model(model) -> tuple[NNXFunctional, Any]:
    """Return (NNXFunctional, params) for any module with `prefill`/`decode` and a config."""
    graphdef, params = nnx.split(model)
    return NNXFunctional(graphdef, model.config.max_seq_len), params
