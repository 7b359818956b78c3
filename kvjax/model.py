"""The model contract: what kvjax calls on the functional model a `kvjax_split()` returns.

A model plugs into kvjax by returning `(fn, params)` from `kvjax_split()`, where `fn` is
hashable (a static jit argument) and satisfies `ModelFunction`:

    fn.prefill(params, tokens [B, T], lengths [B], *, obs_spec, attn_impl, between=None)
        -> (logits [B, V] of each prompt's last token, kvjax.Prompt)
    fn.decode(params, tokens [B, T], n_new [B], cache, *, attn_impl)
        -> (logits [B, T, V], KVCache)
    fn.max_seq_len: int

and optionally `mesh` (the jax Mesh its parameters live on; None), `vocab_size` (token ids are
checked against it; None) and `supports_between` (True when its prefill runs a between-layers
hook at `between.starts(T)` and returns one PromptGroup per segment, as `models.Decoder`
does; False by default). Inside, a model calls `kvjax.prefill_layer` / `kvjax.decode_layer`
per layer (docs/loading.md). kvjax refuses a press whose hook the model does not declare
(UNComp's `prefill_keep`) before anything runs, and checks after the prefill that a declared
hook really split the layers (`kvjax.prefill.check_between_ran`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class ModelFunction(Protocol):
    """The functional model kvjax runs (see the module docstring for shapes)."""

    max_seq_len: int

    def prefill(self, params, tokens, lengths, *, obs_spec, attn_impl, between=None) -> Any:
        ...

    def decode(self, params, tokens, n_new, cache, *, attn_impl) -> Any:
        ...


def check_model_fn(fn) -> None:
    """TypeError naming what `fn` lacks of `ModelFunction` (prefill, decode, max_seq_len)."""
    missing = [name for name in ("prefill", "decode") if not callable(getattr(fn, name, None))]
    if not isinstance(getattr(fn, "max_seq_len", None), int):
        missing.append("max_seq_len (an int)")
    if missing:
        raise TypeError(f"the functional model {type(fn).__name__} from kvjax_split() lacks "
                        f"{', '.join(missing)} (kvjax.model.ModelFunction, docs/loading.md)")


def supports_between(fn) -> bool:
    """Whether `fn` declares that its prefill runs a between-layers hook."""
    return bool(getattr(fn, "supports_between", False))


def check_hook_support(fn, press) -> None:
    """ValueError when `press` needs a between-layers hook `fn` does not declare."""
    if press is None or press.between_layers is None or supports_between(fn):
        return
    raise ValueError(
        f"{type(press).__name__} prunes hidden states between layers "
        f"({type(press.between_layers).__name__}), and this model does not declare that its "
        "prefill runs such a hook (supports_between=True on its functional model; "
        "kvjax.model): without it the press would prune nothing. Drop prefill_keep, or run "
        "the hook in the model's prefill and declare it")
