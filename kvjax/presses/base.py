"""The press protocol: frozen, hashable dataclasses made of parts (docs/architecture.md).

A press is a static jit argument, or a pytree one whose only leaves are its `value_fields`
(ThresholdPress's threshold: `kvjax.values`). It never reads the model and never mutates itself. It is a
sequence of token *stages*, each a scorer (scores per kv head) x an allocator (how many slots
every layer and kv head keeps) x a selector (which slots, given scores and budgets), plus an
optional channel pruner (ThinK) and optional hooks: a decode-time hook (periodic merge, ring
decode) and a between-layers hook (UNComp's hidden-state pruning). `kvjax.compress` runs the
parts and writes one selection into the store. Presses over presses (AdaKV, ThinK,
ComposedPress, ThresholdPress) are `WrapperPress`es: the optional members forward to the
presses they wrap, and each wrapper overrides only what it changes.
"""

import abc
import dataclasses
import functools
import typing

import jax

from kvjax.observation import ObsSpec
from kvjax.values import register_values
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
    # fields jit traces rather than keys on (kvjax/values.py): a new value never recompiles
    value_fields: typing.ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register_values(cls)

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


HOOKS = ("decode_hook", "between_layers", "prompt_observer")


def check_hooks(presses: tuple[Press, ...]) -> None:
    """ValueError when two of `presses` bring a hook of the same kind (`HOOKS`): a cache has
    one decode hook, a prefill one between-layers hook and one prompt observer."""
    for hook in HOOKS:
        owners = [type(p).__name__ for p in presses if getattr(p, hook) is not None]
        if len(owners) > 1:
            raise ValueError(f"{' and '.join(owners)} both bring a {hook}: compose at most "
                             "one of them")


@dataclasses.dataclass(frozen=True, kw_only=True)
class WrapperPress(Press):
    """A press over inner presses: every optional member of `Press` forwards to them.

    `wraps` names the field that holds them (a press, None, or a tuple of presses). Each
    default merges what the inner presses bring, in order:

      obs_spec        their merge (`ObsSpec.merge`)
      check_prompt    each one's
      stages          theirs, chained
      channel_pruner  the last one's
      decode_hook, between_layers, prompt_observer
                      the one inner press that brings it (`check_hooks` refuses two)
      kept_recent     their minimum (0 without inner presses)
      with_tokenizer  the wrapper over the inner presses' `with_tokenizer`
      capacity        over the wrapper's stages, then its channel pruner's `pruned_size`

    A wrapper overrides only what it changes (ThinK adds a channel pruner and its window,
    AdaKV and ThresholdPress replace the stage's allocator) and derives `compression_ratio`
    (`derive_ratio`). A member added to `Press` gets its forwarding default here.
    """

    wraps: typing.ClassVar[str] = "press"

    def inner_presses(self) -> tuple[Press, ...]:
        """The wrapped presses, in order (empty when the field is None)."""
        inner = getattr(self, self.wraps)
        if inner is None:
            return ()
        return inner if isinstance(inner, tuple) else (inner,)

    def _inner_hook(self, name: str):
        """The first non-None `name` hook of the inner presses, or None."""
        hooks = (getattr(p, name) for p in self.inner_presses())
        return next((h for h in hooks if h is not None), None)

    @property
    def obs_spec(self) -> ObsSpec:
        return functools.reduce(ObsSpec.merge, (p.obs_spec for p in self.inner_presses()),
                                ObsSpec())

    def check_prompt(self, min_prompt_len: int) -> None:
        for p in self.inner_presses():
            p.check_prompt(min_prompt_len)

    def stages(self) -> tuple[Stage, ...]:
        return tuple(s for p in self.inner_presses() for s in p.stages())

    @property
    def channel_pruner(self):
        inner = self.inner_presses()
        return inner[-1].channel_pruner if inner else None

    @property
    def decode_hook(self):
        return self._inner_hook("decode_hook")

    @property
    def between_layers(self):
        return self._inner_hook("between_layers")

    @property
    def prompt_observer(self):
        return self._inner_hook("prompt_observer")

    @property
    def kept_recent(self) -> int:
        return min((p.kept_recent for p in self.inner_presses()), default=0)

    def with_tokenizer(self, tokenizer) -> "Press":
        inner = getattr(self, self.wraps)
        if inner is None:
            return self
        bound = (tuple(p.with_tokenizer(tokenizer) for p in inner) if isinstance(inner, tuple)
                 else inner.with_tokenizer(tokenizer))
        return dataclasses.replace(self, **{self.wraps: bound})

    def capacity(self, prompt: StaticSize, n_kv: int) -> StaticSize:
        size = super().capacity(prompt, n_kv)
        pruner = self.channel_pruner
        return size if pruner is None else pruner.pruned_size(size, n_kv, self.kept_recent)


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
