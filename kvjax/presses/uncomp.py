"""UNComp: matrix-entropy head groups with SnapKV selection (Xiong et al., arXiv 2410.03090).

The head-level part of UNComp ("Can Matrix Entropy Uncover Sparsity?"): an offline
calibration (`kvjax.uncomp.calibrate`) ranks every layer's kv heads by the truncated matrix
entropy of their queries and splits them into groups; high-entropy (retrieval-like) heads get
larger budgets than low-entropy (streaming-like) ones. Inside each head tokens are chosen
SnapKV-style (window 8, max-pool 7, the official setting). The layer-level part (hidden-state
token pruning between stages) is `HiddenPruning`, a between-layers hook that kvjax hands the
decoder (`UNCompPress(prefill_keep=...)`).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvjax.presses import select
from kvjax.presses.allocating import ScoredAllocation
from kvjax.presses.base import Press, ScorerPress
from kvjax.presses.parts import LayerwiseAllocator, StaticSize
from kvjax.presses.pruning import HiddenPruning
from kvjax.uncomp.calibration import UNCompCalibration, load_calibration


DECODE_MODES = ("tail", "ring")


def group_weights(n_groups: int, ratio: float) -> np.ndarray:
    """Relative budget per group, low -> high entropy: linear from 1 to `ratio`."""
    if n_groups == 1:
        return np.ones(1)
    return 1.0 + (ratio - 1.0) * np.arange(n_groups) / (n_groups - 1)


def allocate(total, n_valid, weights, xp=jnp):
    """Integer per-head budgets [B, K] summing to `total` [B], proportional to weights [K].

    Water-filling: shares are floored and capped at the head's valid count n_valid [B, K];
    what is left goes again to unsaturated heads, the last units one each to the heads of
    largest weight (ties: lower id). Works with numpy (static capacities) and jnp (traced,
    also with traced weights).
    """
    k = weights.shape[0]
    w = xp.asarray(weights, xp.float32)
    b = xp.zeros_like(n_valid)
    for _ in range(k + 1):
        wf = xp.where(b < n_valid, w[None, :], 0.0)
        room = (total - b.sum(-1))[:, None].astype(xp.float32)  # f32 on host and in jit alike
        share = xp.floor(room * wf / xp.maximum(wf.sum(-1, keepdims=True), xp.float32(1e-9)))
        b = xp.minimum(b + share.astype(b.dtype), n_valid)
    order = xp.argsort(-w, stable=True) if xp is jnp else np.argsort(-w, kind="stable")
    for _ in range(2):
        for r in range(k):
            h = order[r]
            give = ((total - b.sum(-1)) > 0) & (b[:, h] < n_valid[:, h])
            b = b + xp.where(xp.arange(k)[None, :] == h, give[:, None], False).astype(b.dtype)
    return b


@dataclasses.dataclass(frozen=True)
class HeadGroups(LayerwiseAllocator):
    """UNComp's per-head budgets: the layer total of a uniform press, split over kv heads in
    proportion to their entropy group's weight (static per layer).

    Heads are grouped by `calibration` (low -> high entropy) or, without one, by index.
    """

    compression_ratio: float
    groups: int = 2
    group_budget_ratio: float = 2.0
    calibration: UNCompCalibration | None = None

    def head_groups(self, layer_idx: int, n_kv: int) -> np.ndarray:
        """Group index of every kv head of the layer [K] (static)."""
        if self.calibration is not None:
            return np.asarray(self.calibration.group_of_heads(layer_idx))
        if self.groups > n_kv:
            raise ValueError(f"{self.groups=} head groups from {n_kv} kv heads: a group is empty")
        out = np.zeros(n_kv, np.int64)
        for g, part in enumerate(np.array_split(np.arange(n_kv), self.groups)):
            out[part] = g
        return out

    def head_weights(self, layer_idx: int, n_kv: int) -> np.ndarray:
        """[K] budget weight of every kv head of the layer (static)."""
        return group_weights(self.groups, self.group_budget_ratio)[
            self.head_groups(layer_idx, n_kv)].astype(np.float32)

    def layer_budgets(self, n_valid, layer_idx, n_layers):
        n_kv = n_valid.shape[-1]
        if self.calibration is not None:
            self.calibration.check_model(n_layers, None, n_kv)
        table = np.stack([self.head_weights(l, n_kv) for l in range(n_layers)])
        base = select.ceil_keep(n_valid, self.compression_ratio)
        return allocate(base.sum(-1), n_valid, jnp.asarray(table)[layer_idx], jnp)

    def static_budgets(self, n_valid: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Budgets [N, K] for host valid counts [N, K] and static weights [K] (numpy)."""
        ceil = np.vectorize(lambda n: select.ceil_keep_static(int(n), self.compression_ratio))
        base = ceil(n_valid).astype(n_valid.dtype)
        return allocate(base.sum(-1), n_valid, weights, np)

    def capacity(self, size, n_kv):
        segs, total = [], 0
        for l, seg in enumerate(size.segments):
            n = np.broadcast_to(np.arange(1, seg + 1)[:, None], (seg, n_kv)).astype(np.int64)
            b = self.static_budgets(n, self.head_weights(l, n_kv))
            segs.append(int(min(seg, b.max())))
            total += n_kv * select.ceil_keep_static(seg, self.compression_ratio)
        return StaticSize(tuple(segs), min(size.total, total))


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNCompPress(ScoredAllocation, Press):
    """UNComp head-group budgets over SnapKV scores (arXiv 2410.03090).

    Per layer the kv heads of group g (0 = lowest entropy) get budgets proportional to
    w_g = 1 + (group_budget_ratio - 1) g / (groups - 1), so high : low = group_budget_ratio,
    and the layer total equals K * ceil((1 - r) n) (the mean per-head budget of a uniform
    press at the same ratio, so byte counts compare at equal budget). The budgets are segment
    sizes in the store (`HeadGroups`), so the bytes held equal the kept entries. Tokens inside
    a head are chosen by `scorer`, SnapKV with the official setting (window 8, max-pool 7) by
    default; any ScorerPress works.

    Args:
      calibration: a `UNCompCalibration`, a JSON path or "smollm2" (the shipped file). None
        groups kv heads by index (a placeholder for models without a calibration, not
        UNComp's entropy ranking).
      decode: "tail" (new tokens go to the dense tail, nothing is evicted while decoding) or
        "ring" (the official decode, `kvjax.presses.ring.RingDecode`: every (layer, head) segment
        holds exactly its budget; each new token enters and the segment re-selects with the
        attention of the last `window_size` queries).
      prefill_keep: UNComp's hidden-state token pruning during prefill (`HiddenPruning`):
        per layer the number of tokens entering it, or None; e.g. from
        `UNCompCalibration.prefill_keep(n)`. None: no pruning.
    """

    groups: int = 2
    group_budget_ratio: float = 2.0
    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "max"
    calibration: UNCompCalibration | None = None
    decode: str = "tail"
    scorer: ScorerPress | None = None
    prefill_keep: tuple[int | None, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.decode not in DECODE_MODES:
            raise ValueError(f"{self.decode=} is not one of {DECODE_MODES}")
        if self.groups < 1 or self.group_budget_ratio < 1.0:
            raise ValueError(f"{self.groups=} must be >= 1 and {self.group_budget_ratio=} >= 1")
        if self.calibration is not None and not isinstance(self.calibration, UNCompCalibration):
            object.__setattr__(self, "calibration", load_calibration(self.calibration))
        if self.calibration is not None and self.calibration.n_groups != self.groups:
            raise ValueError(f"calibration has {self.calibration.n_groups} head groups, "
                             f"press has {self.groups=}")
        self.check_scorer()
        if self.prefill_keep is not None:
            HiddenPruning(keep=self.prefill_keep, window=self.window_size).check_obs(
                self.token_scorer().obs_spec)

    @property
    def decode_hook(self):
        if self.decode != "ring":
            return None
        from kvjax.presses.ring import RingDecode
        return RingDecode(window_size=self.window_size, kernel_size=self.kernel_size,
                          pooling=self.pooling)

    @property
    def between_layers(self):
        if self.prefill_keep is None:
            return None
        return HiddenPruning(keep=self.prefill_keep, window=self.window_size)

    def allocator(self) -> HeadGroups:
        return HeadGroups(compression_ratio=self.compression_ratio, groups=self.groups,
                          group_budget_ratio=self.group_budget_ratio,
                          calibration=self.calibration)

    def head_weights(self, layer_idx: int, n_kv: int) -> np.ndarray:
        """[K] budget weight of every kv head of the layer (static)."""
        return self.allocator().head_weights(layer_idx, n_kv)
