"""The bridge between an NNX `Decoder` and kvjax's jitted loops (split once, merge in jit)."""

import dataclasses
from typing import Any

from flax import nnx

from models.sharding import mesh_of


@dataclasses.dataclass(frozen=True)
class NNXFunctional:
    """Hashable functional view of an NNX decoder: a static jit argument.

    kvjax calls `prefill(params, ...)` and `decode(params, ...)` inside its jitted functions;
    each merges the graphdef with the (dynamic) params and runs the module method.
    """

    graphdef: Any
    max_seq_len: int
    mesh: Any = None  # the jax.sharding.Mesh the parameters live on (kvjax.sharding), or None
    vocab_size: int | None = None  # token ids must lie in [0, vocab_size) (kvjax.plan)
    supports_between: bool = False  # prefill runs a between-layers hook (kvjax.model)

    def prefill(self, params, *args, **kwargs):
        return nnx.merge(self.graphdef, params).prefill(*args, **kwargs)

    def decode(self, params, *args, **kwargs):
        return nnx.merge(self.graphdef, params).decode(*args, **kwargs)


def split_model(model, max_seq_len: int | None = None) -> tuple[NNXFunctional, Any]:
    """Return (NNXFunctional, params) for any NNX module with kvjax-style `prefill`/`decode`.

    The module's `prefill(tokens, lengths, *, obs_spec, attn_impl, between=None)` returns
    (last logits [B, V], kvjax.Prompt) and its `decode(tokens, n_new, cache, *, attn_impl)`
    returns (logits [B, T, V], KVCache); see `kvjax.prefill_layer` / `kvjax.decode_layer`. `max_seq_len` defaults to
    `model.config.max_seq_len`. A module whose prefill runs the between-layers hook (as
    `models.Decoder` does) declares it with a class attribute `supports_between = True`
    (the contract: `kvjax.model.ModelFunction`).
    """
    if max_seq_len is None:
        max_seq_len = model.config.max_seq_len
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    graphdef, params = nnx.split(model)
    return NNXFunctional(graphdef, int(max_seq_len), mesh_of(params),
                         None if vocab is None else int(vocab),
                         bool(getattr(model, "supports_between", False))), params
