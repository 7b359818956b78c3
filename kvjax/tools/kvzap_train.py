"""Train KVzap scorers (arXiv 2601.07891) on kvjax's own KVzip scores.

Data: contexts of `context_tokens` tokens built from the offline corpus shipped in
`kvjax.eval` (or the user's text), rendered through the model's chat template as
`kvjax.Pipeline` renders a context, then one jitted prefill with `ObsSpec(hidden=True)` and
KVzipPress's repeat pass (`kvjax.kvzip.RepeatPass`, kvpress 0.5.5's KVzipPress scores, single
chunk for contexts up to `chunk_size`). Inputs are every layer's attention input (after
input_layernorm) at a context position, targets `log(max(score, 1e-8))` per kv head; the
chat-template prefix and the first `n_sink` positions (KVzip keeps them whatever their score)
are skipped. Paragraphs are split once (seeded) into a training part and a held-out part, so
held-out contexts share no paragraph with training contexts.

This is a variant of kvpress's recipe (docs/kvzip_reference.md section 3): kvpress trains on
KVzip+ scores (normalised by the query and W_O v norms) of a single full-softmax forward in
which the assistant turn repeats the prompt, on Nemotron pretraining text, fitting the linear
scorer in closed form (ridge) and the MLP with AdamW; here both are fit with optax AdamW
(cosine schedule, gradient clipping) on the scores kvjax's KVzipPress itself ranks by.

Training standardises the inputs per layer and channel and folds the standardisation back
into the first linear map afterwards, so the saved weights take raw hidden states (kvpress's
layout) and give the same outputs. Same seed, same data: identical weights.
"""

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.kvzap.weights import KVzapWeights, LinearScorer, Scorer, check_scorer, scorer_named
from kvjax.kvzip import RepeatPass, RepeatPrompt
from kvjax.observation import ObsSpec

LOG_FLOOR = 1e-8
_SEPARATOR_CHAR = "#"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights (with the model and the text).

    Attributes:
      scorer: `LinearScorer()` or `MLPScorer(hidden_dim)` (`kvjax.kvzap.weights`).
      n_train, n_heldout: contexts built from the training / held-out paragraphs.
      context_tokens: tokens per context after the chat-template prefix.
      tokens_per_context: training positions sampled per training context (held-out contexts
        are scored at every position).
      heldout_fraction: share of the paragraphs kept for held-out contexts.
      epochs, batch_size, lr, weight_decay, clip: AdamW with a cosine decay over all steps.
      chunk_size, n_sink: KVzip's (the repeat pass's) settings.
      kvzip_plus: train on KVzip+ scores (the KVzap paper's target: repeat attention divided
        by the row's input norm, times ||W_O v||; `KVzipPress(kvzip_plus_normalization=True)`).
      seed: paragraphs split, contexts, sampled positions, initial weights, batch order.
    """

    scorer: Scorer = LinearScorer()
    n_train: int = 32
    n_heldout: int = 2
    context_tokens: int = 512
    tokens_per_context: int = 256
    heldout_fraction: float = 0.15
    epochs: int = 30
    batch_size: int = 256
    lr: float = 5e-3
    weight_decay: float = 0.01
    clip: float = 1.0
    chunk_size: int = 2048
    n_sink: int = 4
    kvzip_plus: bool = False
    seed: int = 0

    def __post_init__(self):
        check_scorer(self.scorer, "scorer")
        for name in ("n_train", "n_heldout", "context_tokens", "tokens_per_context", "epochs",
                     "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"{self.heldout_fraction=} must be in (0, 1)")
        if self.n_sink < 0 or self.lr <= 0:
            raise ValueError(f"{self.n_sink=} must be >= 0 and {self.lr=} > 0")

    def to_dict(self) -> dict:
        """JSON form (the weights' info): the scorer as its name and hidden size."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "scorer"}
        return {"kind": self.scorer.name, "hidden_dim": getattr(self.scorer, "hidden_dim", None),
                **d}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The inverse of `to_dict` (what a weights file's info records)."""
        d = dict(d)
        return cls(scorer=scorer_named(d.pop("kind", "linear"), d.pop("hidden_dim", None)), **d)


@dataclasses.dataclass
class TrainResult:
    """The trained weights and what training measured.

    Attributes:
      weights: KVzapWeights (raw hidden states in, log-KVzip-score predictions out).
      train_loss: mean squared error per epoch (mean over the epoch's batches).
      heldout_loss: mean squared error on every held-out position, before and after training.
      heldout_spearman: [L] rank correlation between learned and KVzip scores on held-out
        contexts (Spearman within one context and kv head, averaged over contexts and heads).
      heldout_overlap: [L] share of KVzip's per-head top half (uniform selection at ratio 0.5)
        that the learned scores keep too, averaged like the correlation.
      seconds: {"data": ..., "train": ...} wall time.
    """

    weights: KVzapWeights
    train_loss: list
    heldout_loss: tuple
    heldout_spearman: np.ndarray
    heldout_overlap: np.ndarray
    seconds: dict

    def summary(self) -> str:
        s = self.heldout_spearman
        return (f"held-out Spearman per layer: mean {s.mean():.3f}, min {s.min():.3f} "
                f"(layer {int(s.argmin())}), max {s.max():.3f} (layer {int(s.argmax())}); "
                f"top-half overlap mean {self.heldout_overlap.mean():.3f}; loss "
                f"{self.train_loss[0]:.3f} -> {self.train_loss[-1]:.3f} (held-out "
                f"{self.heldout_loss[0]:.3f} -> {self.heldout_loss[1]:.3f})")


# ---- statistics ---------------------------------------------------------------------------
def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties given their average rank (scipy's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, axis=-1, kind="stable")
    xs = np.take_along_axis(x, order, -1)
    n = x.shape[-1]
    out = np.empty(x.shape, np.float64)
    flat_xs, flat_order = xs.reshape(-1, n), order.reshape(-1, n)
    flat_out = out.reshape(-1, n)
    for r in range(flat_xs.shape[0]):
        v = flat_xs[r]
        new = np.r_[True, v[1:] != v[:-1]]
        starts = np.flatnonzero(new)
        ends = np.r_[starts[1:], n]
        avg = (starts + ends - 1) / 2.0 + 1.0  # 1-based average rank of each tie group
        flat_out[r, flat_order[r]] = np.repeat(avg, ends - starts)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation along the last axis (Pearson of average ranks)."""
    ra, rb = rankdata(a), rankdata(b)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(-1) * (rb ** 2).sum(-1))
    return np.where(den > 0, (ra * rb).sum(-1) / np.where(den > 0, den, 1.0), 0.0)


def top_overlap(pred: np.ndarray, target: np.ndarray, keep: float = 0.5) -> np.ndarray:
    """Share of the target's top `keep` fraction (last axis) also in the prediction's."""
    n = target.shape[-1]
    k = max(1, int(np.ceil(keep * n)))
    top_t = np.argsort(-target, -1, kind="stable")[..., :k]
    top_p = np.argsort(-pred, -1, kind="stable")[..., :k]
    hit = np.zeros(target.shape, bool)
    np.put_along_axis(hit, top_t, True, -1)
    return np.take_along_axis(hit, top_p, -1).mean(-1)


# ---- data ---------------------------------------------------------------------------------
def text_paragraphs(texts) -> tuple[str, ...]:
    """Paragraphs of the given texts: blocks separated by blank lines, whitespace collapsed."""
    out = []
    for text in texts:
        for block in text.replace("\r\n", "\n").split("\n\n"):
            block = " ".join(block.split())
            if block:
                out.append(block)
    return tuple(out)


def context_ids(tokenizer, text: str) -> list[int]:
    """A context's ids as `kvjax.Pipeline.encode` renders them: through the chat template (the
    user turn up to the context's end) or BOS + text without a template."""
    if tokenizer.chat_template is None:
        bos = tokenizer.bos_id
        rendered = ("" if bos is None else tokenizer.id_to_token(bos)) + text
    else:
        sep = _SEPARATOR_CHAR * (len(text) + 10)
        full = tokenizer.apply_chat_template([{"role": "user", "content": text + sep}],
                                             add_generation_prompt=True)
        if full.count(sep) != 1:
            raise ValueError("the chat template altered the context separator")
        rendered = full.split(sep)[0]
    return [int(i) for i in tokenizer.encode(rendered, add_bos=False)]


def build_contexts(tokenizer, paragraphs, cfg: TrainConfig, prefix_length: int):
    """(train contexts, held-out contexts): lists of id lists, each exactly
    `prefix_length + context_tokens` long. Paragraphs are split once (seeded) into held-out
    and training parts; a context is its part's paragraphs in a seeded order, truncated."""
    paragraphs = list(paragraphs)
    if len(paragraphs) < 2:
        raise ValueError(f"need at least 2 paragraphs of text to hold some out, got "
                         f"{len(paragraphs)}")
    rng = np.random.default_rng([cfg.seed, 0])
    order = rng.permutation(len(paragraphs))
    n_held = min(len(paragraphs) - 1, max(1, round(cfg.heldout_fraction * len(paragraphs))))
    parts = {"held-out": [paragraphs[i] for i in order[:n_held]],
             "training": [paragraphs[i] for i in order[n_held:]]}
    n_ids = prefix_length + cfg.context_tokens
    out = {}
    for name, count in (("training", cfg.n_train), ("held-out", cfg.n_heldout)):
        part = parts[name]
        contexts = []
        for _ in range(count):
            text = " ".join(part[i] for i in rng.permutation(len(part)))
            ids = context_ids(tokenizer, text)
            if len(ids) < n_ids:
                raise ValueError(
                    f"the {name} paragraphs give {len(ids) - prefix_length} context tokens, "
                    f"fewer than context_tokens={cfg.context_tokens}: give more text, lower "
                    "--context-tokens or change --heldout-fraction")
            contexts.append(ids[:n_ids])
        out[name] = contexts
    return out["training"], out["held-out"]


@functools.partial(jax.jit, static_argnames=("fn", "observer"))
def _observe(fn, params, tokens, lengths, observer):
    """-> hidden [L, B, T, D] (attention inputs), KVzip scores [L, B, K, T]."""
    from kvjax.loops import prefill_prompt
    _, prompt = prefill_prompt(fn, params, tokens, lengths, obs_spec=ObsSpec(hidden=True),
                               observer=observer)
    obs = prompt.groups[0].layers.obs
    return obs.hidden, obs.token_scores


def kvzip_targets(model, tokenizer, contexts, cfg: TrainConfig, *, progress: bool = True,
                  desc: str = "KVzip scores"):
    """Per context: (hidden [L, T, D] f32, log KVzip scores [L, T, K] f32) as numpy."""
    from tqdm.auto import tqdm
    fn, params = model.kvjax_split()
    repeat = RepeatPrompt.from_tokenizer(tokenizer)
    # A chunk is padded to chunk_size: no longer than the longest context (same chunks, same
    # scores, a repeat pass of the context's length rather than chunk_size's)
    longest = max(len(ids) for ids in contexts) - repeat.prefix_length
    observer = RepeatPass(repeat=repeat, chunk_size=min(cfg.chunk_size, longest),
                          n_sink=cfg.n_sink, plus=cfg.kvzip_plus)
    out = []
    for ids in tqdm(contexts, desc=desc, disable=not progress):
        tokens = jnp.asarray([ids], jnp.int32)
        hidden, scores = _observe(fn, params, tokens, jnp.asarray([len(ids)], jnp.int32),
                                  observer)
        hidden = np.asarray(hidden[:, 0], np.float32)  # [L, T, D]
        logs = np.log(np.maximum(np.asarray(scores[:, 0], np.float32), LOG_FLOOR))
        out.append((hidden, logs.transpose(0, 2, 1)))  # [L, T, K]
    return out


# ---- model and training -------------------------------------------------------------------
def _forward(kind, params, x):
    """x [N, L, D] -> [N, L, K], every layer's scorer on its own input (stacked params)."""
    stacked = tuple(params[n] for n in kind.names)
    return jax.vmap(kind.forward, in_axes=(0, 1), out_axes=1)(stacked, x)


def _fold(kind, params, mu, sd):
    """Weights on standardised inputs -> the same map on raw inputs (x - mu) / sd."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    first, bias = kind.first
    w = p[first] / sd[:, None, :]
    p[bias] = p[bias] - np.einsum("lod,ld->lo", w, mu)
    p[first] = w
    return {k: v.astype(np.float32) for k, v in p.items()}


def fit(x, y, cfg: TrainConfig, *, x_val=None, y_val=None, progress: bool = True):
    """AdamW on the mean squared error over every layer's scorer at once.

    Args:
      x: [N, L, D] hidden states; y: [N, L, K] targets; x_val, y_val: held-out pairs.

    Returns:
      (params on raw inputs (numpy dict), train loss per epoch, (held-out MSE before, after)).
    """
    import optax
    from tqdm.auto import tqdm
    n, n_layers, d = x.shape
    n_kv = y.shape[2]
    mu = x.mean(0, dtype=np.float64)
    sd = x.std(0, dtype=np.float64) + 1e-6
    xs = ((x - mu) / sd).astype(np.float32)
    init = KVzapWeights.init(cfg.scorer, n_layers, d, n_kv, seed=cfg.seed).params()
    params = {k: jnp.asarray(v) for k, v in init.items()}
    last_b = cfg.scorer.names[-1]
    params[last_b] = jnp.asarray(y.mean(0), jnp.float32)  # start at the mean target
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * cfg.epochs
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip),
                     optax.adamw(optax.cosine_decay_schedule(cfg.lr, total),
                                 weight_decay=cfg.weight_decay))
    opt_state = tx.init(params)
    loss_fn = lambda p, xb, yb: jnp.mean((_forward(cfg.scorer, p, xb) - yb) ** 2)

    @jax.jit
    def step(p, s, xb, yb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    def val_loss(p):
        if x_val is None:
            return float("nan")
        xv = jnp.asarray(((x_val - mu) / sd).astype(np.float32))
        return float(loss_fn(p, xv, jnp.asarray(y_val)))

    before = val_loss(params)
    rng = np.random.default_rng([cfg.seed, 2])
    history = []
    bar = tqdm(total=total, desc=f"KVzap {cfg.scorer.name}", disable=not progress)
    for _ in range(cfg.epochs):
        perm = rng.permutation(n)
        losses = []
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            params, opt_state, loss = step(params, opt_state, jnp.asarray(xs[idx]),
                                           jnp.asarray(y[idx]))
            losses.append(loss)
            bar.update(1)
        history.append(float(np.mean(jax.device_get(losses))))
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    bar.close()
    after = val_loss(params)
    return _fold(cfg.scorer, jax.device_get(params), mu, sd), history, (before, after)


def _sample_rows(data, start, k, rng):
    xs, ys = [], []
    for hidden, logs in data:
        t = hidden.shape[1]
        rows = np.sort(rng.choice(np.arange(start, t), size=min(k, t - start), replace=False))
        xs.append(hidden[:, rows].transpose(1, 0, 2))
        ys.append(logs[:, rows].transpose(1, 0, 2))
    return np.concatenate(xs), np.concatenate(ys)


def evaluate(weights: KVzapWeights, data, start: int):
    """Held-out (Spearman [L], top-half overlap [L]) of the weights' scores against KVzip's,
    per context and kv head over positions [start, T), averaged over contexts and heads."""
    rho, over = [], []
    for hidden, logs in data:
        pred = np.stack([np.asarray(weights.apply(jnp.asarray(hidden[l][None]), l))[0]
                         for l in range(hidden.shape[0])])  # [L, T, K]
        p = pred[:, start:].transpose(0, 2, 1)
        t = logs[:, start:].transpose(0, 2, 1)
        rho.append(spearman(p, t).mean(-1))
        over.append(top_overlap(p, t).mean(-1))
    return np.mean(rho, 0), np.mean(over, 0)


def train_scorer(model, tokenizer, cfg: TrainConfig = TrainConfig(), *, texts=None,
                 model_name: str = "", command: str = "",
                 progress: bool = True) -> TrainResult:
    """Train KVzap weights for `model` (a `models.Decoder`-like object with `kvjax_split`).

    Args:
      texts: strings to build contexts from (split into paragraphs at blank lines); default
        the offline corpus shipped in `kvjax.eval`.
      model_name, command: recorded in the weights' info.
    """
    t0 = time.perf_counter()
    if texts is None:
        from kvjax.corpus import corpus_paragraphs
        paragraphs, source = corpus_paragraphs(), "kvjax.eval shipped corpus"
    else:
        paragraphs, source = text_paragraphs(texts), f"{len(texts)} user text(s)"
    repeat = RepeatPrompt.from_tokenizer(tokenizer)
    train_ctx, held_ctx = build_contexts(tokenizer, paragraphs, cfg, repeat.prefix_length)
    start = max(repeat.prefix_length, cfg.n_sink)
    train_data = kvzip_targets(model, tokenizer, train_ctx, cfg, progress=progress,
                               desc="KVzip scores (training)")
    held_data = kvzip_targets(model, tokenizer, held_ctx, cfg, progress=progress,
                              desc="KVzip scores (held-out)")
    rng = np.random.default_rng([cfg.seed, 1])
    x, y = _sample_rows(train_data, start, cfg.tokens_per_context, rng)
    x_val = np.concatenate([h[:, start:].transpose(1, 0, 2) for h, _ in held_data])
    y_val = np.concatenate([g[:, start:].transpose(1, 0, 2) for _, g in held_data])
    del train_data
    t1 = time.perf_counter()
    params, history, held_loss = fit(x, y, cfg, x_val=x_val, y_val=y_val, progress=progress)
    t2 = time.perf_counter()
    n_layers, d = x.shape[1:]
    info = {"model": model_name, "signature": [n_layers, d, y.shape[2]],
            "corpus": source, "config": cfg.to_dict(),
            "target": target_name(cfg),
            "n_train_rows": int(x.shape[0]), "command": command}
    weights = KVzapWeights.from_params(cfg.scorer, params, info)
    rho, over = evaluate(weights, held_data, start)
    t3 = time.perf_counter()
    info.update(heldout_spearman=[round(float(r), 4) for r in rho],
                heldout_spearman_mean=round(float(rho.mean()), 4),
                heldout_top_half_overlap=[round(float(o), 4) for o in over],
                train_loss=[round(v, 5) for v in history],
                heldout_loss=[round(v, 5) for v in held_loss])
    weights = KVzapWeights.from_params(cfg.scorer, params, info)
    return TrainResult(weights=weights, train_loss=history, heldout_loss=held_loss,
                       heldout_spearman=rho, heldout_overlap=over,
                       seconds={"data": t1 - t0, "train": t2 - t1, "eval": t3 - t2})


def target_name(cfg: TrainConfig) -> str:
    """What the weights predict, for their info."""
    if cfg.kvzip_plus:
        return ("log(max(KVzip+ score, 1e-8)) from kvjax's KVzipPress repeat pass with "
                "kvzip_plus_normalization=True (the KVzap paper's target)")
    return ("log(max(KVzip score, 1e-8)) from kvjax's KVzipPress repeat pass "
            "(kvpress 0.5.5 KVzipPress scores, not KVzip+)")


def result_metrics(result: TrainResult) -> dict:
    """The measured numbers, for `kvzap.json` next to a checkpoint."""
    return json.loads(json.dumps({
        "train_loss": result.train_loss, "heldout_loss": list(result.heldout_loss),
        "heldout_spearman": [float(r) for r in result.heldout_spearman],
        "heldout_top_half_overlap": [float(o) for o in result.heldout_overlap],
        "seconds": result.seconds}))
