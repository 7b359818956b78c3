"""The press protocol: frozen, hashable dataclasses made of parts (docs/architecture.md).

A press is a static jit argument. It never reads the model and never mutates itself. It is a
sequence of token *stages*, each a scorer (scores per kv head) x an allocator (how many slots
every layer and kv head keeps) x a selector (which slots, given scores and budgets), plus an
optional channel pruner (ThinK) and optional hooks: a decode-time hook (periodic merge, ring
decode) and a between-layers hook (UNComp's hidden-state pruning). `kvjax.compress` runs the
parts and writes one selection into the store.
"""

import abc
import dataclasses
import typing

import jax

from kvjax.observation import ObsSpec
from kvjax.presses.parts import (Stage, StaticSize, TopK, Uniform, check_fields,
                                  validate_ratio)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerContext:
    """What a part may know about the layer besides its view and observation.

    Attributes:
      prompt_len: [B] original prompt lengths (positions >= prompt_len - W are the window).
      layer_idx: [] int32 layer index (traced: compression maps over layers).
      n_layers: static number of layers.
    """

    prompt_len: jax.Array
    layer_idx: jax.Array | int = 0
    n_layers: int = dataclasses.field(metadata=dict(static=True), default=1)


def derive_ratio(press, derived: float) -> None:
    """Set a wrapper press's `compression_ratio` to the one its inner presses give.

    A wrapper's own field defaults to None; a value the user passed must equal the derived
    one, else ValueError (it would be silently replaced). Call it first in `__post_init__`.
    """
    given = press.compression_ratio
    if given is not None and (isinstance(given, bool) or not isinstance(given, (int, float))
                              or not abs(given - derived) <= 1e-9):  # NaN too
        raise ValueError(f"{type(press).__name__}(compression_ratio={given!r}): a wrapper's "
                         f"ratio is its inner presses' ({derived:g}); set compression_ratio "
                         "on the press it wraps")
    object.__setattr__(press, "compression_ratio", derived)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Press(abc.ABC):
    """Base class of every press: the token stages and the optional parts and hooks.

    `compression_ratio` is the fraction of prompt entries removed (wrappers derive it from the
    presses they hold).
    """

    compression_ratio: float = 0.0

    def __post_init__(self):
        check_fields(self)
        validate_ratio(self.compression_ratio)

    @property
    def obs_spec(self) -> ObsSpec:
        """What this press needs observed during prefill."""
        return ObsSpec()

    def check_prompt(self, min_prompt_len: int) -> None:
        """Raise ValueError when the shortest prompt cannot be compressed by this press."""

    @abc.abstractmethod
    def stages(self) -> tuple[Stage, ...]:
        """The token stages, applied in order (each to what the previous one kept)."""

    @property
    def channel_pruner(self):
        """A channel pruner applied after the token stages (ThinK), or None."""
        return None

    @property
    def decode_hook(self):
        """The decode-time hook this press brings (`kvjax.hooks`), or None."""
        return None

    @property
    def between_layers(self):
        """A between-layers prefill hook (hidden-state pruning), or None."""
        return None

    @property
    def prompt_observer(self):
        """Runs after the prefill, inside the same jit, and adds observations the model's own
        prefill cannot give (KVzip's repeat pass), or None. Called as
        `observer(fn, params, tokens, prompt, attn_impl) -> prompt`."""
        return None

    @property
    def kept_recent(self) -> int:
        """How many of the last prompt tokens every segment keeps whenever its budget allows
        (SnapKV's window: +inf scores); ThinK sizes the store without them, since they move
        to the tail. 0 when the press promises nothing."""
        return 0

    def with_tokenizer(self, tokenizer) -> "Press":
        """This press with what it needs from the tokenizer bound (KVzip's repeat prompt);
        `kvjax.Pipeline` and `kvjax eval` call it. Most presses need nothing."""
        return self

    def capacity(self, prompt: StaticSize, n_kv: int) -> StaticSize:
        """Static bounds of what the press keeps from a prompt whose bounds are `prompt`."""
        size = prompt
        for stage in self.stages():
            size = stage.allocator.capacity(size, n_kv)
        return size


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScorerPress(Press):
    """A press that scores prompt tokens per kv head: one stage of
    (itself, `allocator()`, `selector()`); uniform top-ceil((1 - r) n) by default.

    Subclasses implement `score`; allocators take any ScorerPress as their scorer.
    `score_scale` says what a score means beyond its ranking (`kvjax.presses.threshold`):
    "log" (calibrated log scores: KVzap), "attention" (attention received), or None.
    """

    score_scale: typing.ClassVar[str | None] = None

    @abc.abstractmethod
    def score(self, prefix, obs, ctx: LayerContext) -> jax.Array:
        """Return scores [B, K, C] for a LayerView `prefix` (higher = keep); invalid slots are
        masked afterwards."""

    def allocator(self):
        """How many slots each layer and kv head keeps (uniform by default)."""
        return Uniform(compression_ratio=self.compression_ratio)

    def selector(self):
        """Which slots are kept given scores and budgets (top-k by default)."""
        return TopK()

    def stages(self):
        if self.compression_ratio == 0:
            return ()
        return (Stage(scorer=self, allocator=self.allocator(), selector=self.selector()),)


def check_press_arg(press, name: str = "press") -> None:
    """ValueError unless `press` is None or a press instance (not its class or its name)."""
    if press is None or isinstance(press, Press):
        return
    if isinstance(press, type) and issubclass(press, Press):
        raise ValueError(f"{name}={press.__name__} is a press class: pass an instance, e.g. "
                         f"{press.__name__}(compression_ratio=0.5), or "
                         "kvjax.presses.make_press(name, ratio)")
    if isinstance(press, str):
        raise ValueError(f"{name}={press!r} is a name: build the press with "
                         f"kvjax.presses.make_press({press!r}, compression_ratio)")
    raise ValueError(f"{name}={press!r} is not a press (a kvjax Press instance or None)")
