"""WrapperPress (kvjax/presses/base.py): every optional member of `Press` reaches through every
wrapper (AdaKVPress, ThinKPress, ComposedPress, ThresholdPress) unless the wrapper documents a
change. The members are read off `Press` itself, so a member added there fails here until
`WrapperPress` forwards it and `CHECKS` says how. Also ThinK's store bound when its token
press protects more recent tokens than its budget holds."""

import dataclasses
import inspect

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
import models
from kvjax import loops
from kvjax.observation import ObsSpec
from kvjax.presses.base import Press, ScorerPress, WrapperPress
from kvjax.presses.parts import StaticSize

SPEC = ObsSpec(window=7, column_sums=True, query_stats=True, query_stats_skip=3,
               proxy_ratio=0.25, hidden=True)
PROMPT = StaticSize.prompt((64, 48), 2)


@dataclasses.dataclass(frozen=True)
class Marker:
    """A distinctive hook or channel pruner: any observation suits it (`check_obs`), and its
    store bound reports the `kept_recent` it was given."""

    name: str

    def check_obs(self, spec):
        pass

    def pruned_size(self, size, n_kv, kept_recent):
        return StaticSize((kept_recent,), 11)


PRUNER, DECODE, BETWEEN, OBSERVER = (Marker(n) for n in ("pruner", "decode", "between",
                                                          "observer"))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Marked(ScorerPress):
    """A scorer whose every optional member is distinctive; `hooks=False` drops the channel
    pruner, decode hook and between-layers hook (ThinK refuses them)."""

    score_scale = "log"
    tag: str = ""
    hooks: bool = True

    def score(self, prefix, obs, ctx):
        raise NotImplementedError

    @property
    def obs_spec(self):
        return SPEC

    def check_prompt(self, min_prompt_len):
        raise ValueError(f"Marked refuses {min_prompt_len}")

    @property
    def channel_pruner(self):
        return PRUNER if self.hooks else None

    @property
    def decode_hook(self):
        return DECODE if self.hooks else None

    @property
    def between_layers(self):
        return BETWEEN if self.hooks else None

    @property
    def prompt_observer(self):
        return OBSERVER

    @property
    def kept_recent(self):
        return 5

    def with_tokenizer(self, tokenizer):
        return dataclasses.replace(self, tag=tokenizer)


def _optional_members() -> set[str]:
    """Every public member `Press` defines but its abstract `stages`, its fields and its
    class-level declarations (`value_fields`: each class names its own)."""
    fields = {f.name for f in dataclasses.fields(Press)}
    fields |= {n for n, t in Press.__annotations__.items() if "ClassVar" in str(t)}
    return {name for name, value in vars(Press).items()
            if not name.startswith("_") and name not in fields
            and not getattr(value, "__isabstractmethod__", False)}


def _check_prompt(w, m):
    with pytest.raises(ValueError, match="Marked refuses 20"):
        w.check_prompt(20)


def _with_tokenizer(w, m):
    bound = w.with_tokenizer("tok")
    assert type(bound) is type(w)
    assert bound.inner_presses() == tuple(p.with_tokenizer("tok") for p in w.inner_presses())
    assert all(p.tag == "tok" for p in bound.inner_presses())
    assert dataclasses.replace(bound, **{w.wraps: getattr(w, w.wraps)}) == w  # nothing else


# member -> check of a wrapper `w` over the Marked press `m` (what forwarding means)
CHECKS = {
    "obs_spec": lambda w, m: w.obs_spec == m.obs_spec,
    "check_prompt": _check_prompt,
    "channel_pruner": lambda w, m: w.channel_pruner is m.channel_pruner,
    "decode_hook": lambda w, m: w.decode_hook is m.decode_hook,
    "between_layers": lambda w, m: w.between_layers is m.between_layers,
    "prompt_observer": lambda w, m: w.prompt_observer is OBSERVER,
    "kept_recent": lambda w, m: w.kept_recent == 5,
    "with_tokenizer": _with_tokenizer,
    "capacity": lambda w, m: w.capacity(PROMPT, 2) == StaticSize((5,), 11),  # m's pruner
}


def _think_check_prompt(w, m):
    with pytest.raises(ValueError, match="must exceed window_size=9 of ThinKPress"):
        w.check_prompt(9)
    _check_prompt(w, m)


# ThinK's documented changes: its window joins the observation and the prompt check, it is
# the channel pruner, and it refuses a press with a pruner, decode hook or between-layers hook
THINK = {
    "obs_spec": lambda w, m: w.obs_spec == ObsSpec(window=9).merge(SPEC),
    "check_prompt": _think_check_prompt,
    "channel_pruner": lambda w, m: w.channel_pruner is w,
    "decode_hook": lambda w, m: w.decode_hook is None,
    "between_layers": lambda w, m: w.between_layers is None,
    "capacity": lambda w, m: w.capacity(PROMPT, 2) == w.pruned_size(m.capacity(PROMPT, 2), 2,
                                                                      5),
}

# name -> (the wrapper over a press, that press, the wrapper's own checks)
WRAPPERS = {
    "adakv": (lambda m: kvjax.AdaKVPress(press=m), Marked(compression_ratio=0.5), {}),
    "think": (lambda m: kvjax.ThinKPress(press=m, window_size=9),
              Marked(compression_ratio=0.5, hooks=False), THINK),
    "composed": (lambda m: kvjax.ComposedPress(presses=(m,)), Marked(compression_ratio=0.5),
                 {}),
    "threshold": (lambda m: kvjax.ThresholdPress(press=m, threshold=-4.0), Marked(), {}),
}


def test_checks_cover_every_optional_member():
    """A member added to `Press` needs a forwarding default in `WrapperPress`, a distinctive
    value in `Marked` (capacity is computed over the wrapper's own stages) and a check."""
    members = _optional_members()
    assert members == set(CHECKS)
    assert members <= set(vars(WrapperPress))
    assert members - {"capacity"} <= set(vars(Marked))
    for build, inner, _ in WRAPPERS.values():
        cls = type(build(inner))
        assert issubclass(cls, WrapperPress)
        assert not inspect.isabstract(cls)


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
@pytest.mark.parametrize("member", sorted(CHECKS))
def test_member_reflects_the_wrapped_press(wrapper, member):
    build, inner, own = WRAPPERS[wrapper]
    check = own.get(member, CHECKS[member])
    assert check(build(inner), inner) is not False


def test_stages_and_ratio_are_the_wrappers():
    m = Marked(compression_ratio=0.5)
    ada, composed = kvjax.AdaKVPress(press=m), kvjax.ComposedPress(presses=(m,))
    assert ada.compression_ratio == composed.compression_ratio == 0.5
    assert type(ada.stages()[0].allocator).__name__ == "AdaKV"
    assert composed.stages() == m.stages()
    bare = Marked(compression_ratio=0.5, hooks=False)
    assert kvjax.ThinKPress(press=bare, window_size=4).stages() == bare.stages()
    threshold = kvjax.ThresholdPress(press=Marked(), threshold=-4.0)
    assert threshold.compression_ratio == 0 and len(threshold.stages()) == 1
    with pytest.raises(ValueError, match="a wrapper's ratio is its inner presses'"):
        kvjax.AdaKVPress(press=m, compression_ratio=0.25)


@pytest.mark.parametrize("hook", ["channel_pruner", "decode_hook", "between_layers"])
def test_think_refuses_what_it_cannot_wrap(hook):
    class One(Marked):
        pass

    setattr(One, hook, property(lambda self: Marker(hook)))
    with pytest.raises(ValueError, match="ThinKPress cannot wrap One"):
        kvjax.ThinKPress(press=One(compression_ratio=0.5, hooks=False))


def test_composed_merges_several_presses():
    """Observations merged, each prompt check, the last press's pruner, each hook from the
    one press that brings it, the window kept by every selecting press."""
    first = kvjax.SnapKVPress(compression_ratio=0.5, window_size=12)
    press = kvjax.ComposedPress(presses=(first, Marked(compression_ratio=0.5)))
    assert press.obs_spec == SPEC.merge(ObsSpec(window=12))
    assert press.channel_pruner is PRUNER and press.decode_hook is DECODE
    assert press.between_layers is BETWEEN and press.prompt_observer is OBSERVER
    assert press.kept_recent == 5
    assert press.compression_ratio == 0.75
    with pytest.raises(ValueError, match="Marked refuses 20"):
        press.check_prompt(20)
    class Hooked(Marked):  # hooks, no channel pruner: it may come first
        channel_pruner = None

    with pytest.raises(ValueError, match="Hooked and Marked both bring a decode_hook"):
        kvjax.ComposedPress(presses=(Hooked(compression_ratio=0.5),
                                     Marked(compression_ratio=0.5)))


def test_think_store_holds_what_a_short_budget_keeps():
    """SnapKV protects its last 16 tokens but a 0.9 ratio keeps fewer: which of them survive
    is a tie, so ThinK's store (window 8) must hold those before its window. The kept set is
    SnapKV's plus ThinK's window, also under AdaKV (whose kept_recent is SnapKV's)."""
    cfg = models.ModelConfig.tiny(n_layers=2, n_heads=8, n_kv_heads=4, head_dim=16,
                                  vocab_size=97)
    fn, params = models.Decoder(cfg, rngs=nnx.Rngs(5)).kvjax_split()
    prompts = [list(np.random.RandomState(s).randint(0, 97, n)) for s, n in enumerate((50, 37))]
    tokens, lengths = loops.pad_prompts(prompts)

    def prefill(press):
        return loops.prefill(fn, params, jnp.asarray(tokens), jnp.asarray(lengths),
                             tail_capacity=8, press=press)[1]

    snap = kvjax.SnapKVPress(compression_ratio=0.9, window_size=16)
    for token_press in (snap, kvjax.AdaKVPress(press=snap, alpha_safeguard=0.5)):
        assert token_press.kept_recent == 16
        base = prefill(token_press)
        thin = prefill(kvjax.ThinKPress(press=token_press, window_size=8,
                                        key_channel_compression_ratio=0.5))
        for layer in range(2):
            want, got = kvjax.kept_positions(base, layer), kvjax.kept_positions(thin, layer)
            for b, n in enumerate(len(p) for p in prompts):
                for h in range(4):
                    assert got[b][h].tolist() == sorted(set(want[b][h].tolist())
                                                        | set(range(n - 8, n)))
