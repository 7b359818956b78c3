"""UNComp: matrix-entropy head groups with SnapKV selection (Xiong et al., arXiv 2410.03090).

The head-level part of UNComp ("Can Matrix Entropy Uncover Sparsity?"): an offline
calibration (`kvjax.uncomp.calibrate`) ranks every layer's kv heads by the truncated matrix
entropy of their queries and splits them into groups; high-entropy (retrieval-like) heads get
larger budgets than low-entropy (streaming-like) ones. Inside each head tokens are chosen
SnapKV-style (window 8, max-pool 7, the official setting). The layer-level part (hidden-state
token pruning between stages) is `models.Decoder.prefill(prefill_keep=...)`.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from kvjax import grouped  # module import: kvjax.layer -> grouped -> presses -> here
from kvjax.cache import LayerCache, init_tail
from kvjax.observation import ObsSpec
from kvjax.presses import select
from kvjax.presses.base import Press, validate_ratio
from kvjax.presses.snapkv import POOLINGS, check_window, snapkv_scores
from kvjax.presses.window import window_attention
from kvjax.uncomp.calibration import UNCompCalibration, load_calibration


DECODE_MODES = ("tail", "ring")


def group_weights(n_groups: int, ratio: float) -> np.ndarray:
    """Relative budget per group, low -> high entropy: linear from 1 to `ratio`."""
    if n_groups == 1:
        return np.ones(1)
    return 1.0 + (ratio - 1.0) * np.arange(n_groups) / (n_groups - 1)


def allocate(total, n_valid, weights, xp=jnp):
    """Integer per-head budgets [B, K] summing to `total` [B], proportional to weights [K].

    `weights` is a static numpy array. Water-filling: shares are floored and capped at the
    head's valid count n_valid [B, K]; what is left goes again to unsaturated heads, the
    last units one each to the heads of largest weight (ties: lower id). Works with numpy
    (static capacities) and jnp (traced).
    """
    k = weights.shape[0]
    w = xp.asarray(weights, xp.float32)
    b = xp.zeros_like(n_valid)
    for _ in range(k + 1):
        wf = xp.where(b < n_valid, w[None, :], 0.0)
        room = (total - b.sum(-1))[:, None]
        share = xp.floor(room * wf / xp.maximum(wf.sum(-1, keepdims=True), 1e-9))
        b = xp.minimum(b + share.astype(b.dtype), n_valid)
    order = sorted(range(k), key=lambda h: (-float(weights[h]), h))
    for _ in range(2):
        for h in order:
            give = ((total - b.sum(-1)) > 0) & (b[:, h] < n_valid[:, h])
            b = b + xp.where(xp.arange(k)[None, :] == h, give[:, None], False).astype(b.dtype)
    return b


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNCompPress(Press):
    """UNComp head-group budgets over SnapKV scores (arXiv 2410.03090).

    Per layer the kv heads of group g (0 = lowest entropy) get budgets proportional to
    w_g = 1 + (group_budget_ratio - 1) g / (groups - 1), so high : low = group_budget_ratio,
    and the layer total equals K * ceil((1 - r) n) (the mean per-head budget of a uniform
    press at the same ratio, so byte counts compare at equal budget). Each head group is
    stored as its own dense array (`kvjax.grouped.GroupedLayerCache`) whose capacity is the
    group's largest head budget, so the bytes held equal the kept entries (heads of one group
    differ by at most one slot of integer rounding).

    Args:
      calibration: a `UNCompCalibration`, a JSON path or "smollm2" (the shipped file). None
        groups kv heads by index (a placeholder for models without a calibration, not
        UNComp's entropy ranking).
      decode: "tail" (new tokens go to each group's dense tail, nothing is evicted while
        decoding) or "ring" (the official decode: each group holds exactly its capacity
        C_g; every new token enters and the group re-selects with the attention of the last
        `window_size` queries, see `kvjax.grouped`).
    """

    compression_ratio: float = 0.0
    groups: int = 2
    group_budget_ratio: float = 2.0
    window_size: int = 8
    kernel_size: int = 7
    pooling: str = "max"
    calibration: UNCompCalibration | None = None
    decode: str = "tail"

    def __post_init__(self):
        validate_ratio(self.compression_ratio)
        if self.decode not in DECODE_MODES:
            raise ValueError(f"{self.decode=} is not one of {DECODE_MODES}")
        if self.groups < 1 or self.group_budget_ratio < 1.0:
            raise ValueError(f"{self.groups=} must be >= 1 and {self.group_budget_ratio=} >= 1")
        if self.window_size < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"{self.window_size=} must be >= 1, {self.kernel_size=} odd")
        if self.pooling not in POOLINGS:
            raise ValueError(f"{self.pooling=} is not one of {POOLINGS}")
        if self.calibration is not None and not isinstance(self.calibration, UNCompCalibration):
            object.__setattr__(self, "calibration", load_calibration(self.calibration))
        if self.calibration is not None and self.calibration.n_groups != self.groups:
            raise ValueError(f"calibration has {self.calibration.n_groups} head groups, "
                             f"press has {self.groups=}")

    @property
    def obs_spec(self):
        return ObsSpec(window=self.window_size)

    def check_prompt(self, min_prompt_len):
        check_window(self, min_prompt_len)

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
        return group_weights(self.groups, self.group_budget_ratio)[
            self.head_groups(layer_idx, n_kv)].astype(np.float32)

    def budgets(self, n_valid, weights, xp=jnp):
        """Per-head budgets [B, K] for valid counts n_valid [B, K]."""
        base = (select.ceil_keep(n_valid, self.compression_ratio) if xp is jnp else
                np.vectorize(lambda n: select.ceil_keep_static(int(n), self.compression_ratio))(
                    n_valid).astype(n_valid.dtype))
        return allocate(base.sum(-1), n_valid, weights, xp)

    def capacity(self, n_slots: int, weights: np.ndarray) -> int:
        """Largest head budget over every valid count 1..n_slots (static)."""
        return self.group_capacity(n_slots, weights, range(len(weights)))

    def head_partition(self, layer_idx: int, n_kv: int) -> tuple[tuple[int, ...], ...]:
        """The kv heads of every non-empty group, low to high entropy (static)."""
        g = self.head_groups(layer_idx, n_kv)
        return tuple(tuple(int(h) for h in np.flatnonzero(g == i)) for i in np.unique(g))

    def group_capacity(self, n_slots: int, weights: np.ndarray, heads) -> int:
        """Largest budget of the heads `heads` over every valid count 1..n_slots (static)."""
        n = np.broadcast_to(np.arange(1, n_slots + 1)[:, None], (n_slots, len(weights)))
        return int(self.budgets(n.astype(np.int64), weights, np)[:, list(heads)].max())

    def compress_layer(self, layer, obs, ctx):
        if self.compression_ratio == 0:
            return layer
        p = layer.prefix
        n_kv = p.k.shape[1]
        if self.calibration is not None:
            self.calibration.check_model(ctx.n_layers, obs.q_window.shape[2], n_kv,
                                         obs.q_window.shape[3])
        w = self.head_weights(ctx.layer_idx, n_kv)
        scores = select.mask_invalid(snapkv_scores(p, obs, ctx.prompt_len, self.window_size,
                                                   self.kernel_size, self.pooling), p.length)
        n_keep = self.budgets(p.length, w)
        probs = (window_attention(p, obs, ctx.prompt_len, self.window_size)
                 if self.decode == "ring" else None)  # [B, K, G, W, C]
        parts, rows = [], []
        for heads in self.head_partition(ctx.layer_idx, n_kv):
            idx = np.asarray(heads)
            cap = self.group_capacity(p.capacity, w, heads)
            part = grouped.take_heads(layer, heads)
            mask = select.topk_mask(scores[:, idx], n_keep[:, idx], cap)
            kept, length = select.kept_indices(mask, cap)
            prefix = select.compact(part.prefix, mask, cap)
            if probs is not None:
                r = jnp.take_along_axis(probs[:, idx], kept[:, :, None, None, :], axis=4)
                rows.append(grouped.valid_rows(r, length))
                b, k_g, _, h = part.tail.k.shape
                part = dataclasses.replace(part, tail=init_tail(b, k_g, 0, h, part.tail.k.dtype))
            parts.append(LayerCache(prefix=prefix, tail=part.tail))
        return grouped.GroupedLayerCache(
            parts=tuple(parts), rows=tuple(rows) if probs is not None else None,
            heads=self.head_partition(ctx.layer_idx, n_kv), kernel_size=self.kernel_size,
            pooling=self.pooling)
