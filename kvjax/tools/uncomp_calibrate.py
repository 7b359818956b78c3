"""UNComp offline calibration (`kvjax uncomp-calibrate`): kv-head entropy groups per layer and
layer stages, written as a `kvjax.uncomp.calibration.UNCompCalibration`.

`calibrate` runs calibration prompts through the model once each and measures, per layer,
  * the truncated matrix entropy H_k of every query head's post-RoPE queries Q_h [T, H]
    (k = 32 by default, UNComp's "svd32"), aggregated per kv head (mean over its query heads),
    so whole kv heads are grouped and the memory saving is real under GQA;
  * the truncated entropy H_k of the layer's output hidden states [T, D] (the layer profile).
Head groups come from a vote over prompts (the official `head_type_search_2`, generalised to n
groups): in every prompt the kv heads are sorted by entropy and bucketed into n near-equal
groups; a head's vote is the sum of its bucket indices over prompts; heads sorted by
(vote, mean entropy, id) and bucketed again give the groups, low entropy first.
Stages: a new stage starts at layer l when layer_entropy[l] < layer_entropy[l-1] - threshold.
The result is a small versioned JSON file; SmolLM2-135M-Instruct's ships with kvjax.
"""

import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.observation import ObsSpec
from kvjax.uncomp.calibration import DEFAULT_THRESHOLD, VERSION, UNCompCalibration
from kvjax.uncomp.entropy import truncated_entropy


def calibration_prompts(tokenizer, n_prompts: int = 8, n_tokens: int = 512) -> list[list[int]]:
    """Deterministic calibration prompts of exactly `n_tokens` ids from the offline corpus.

    Prompt i is the eval suite's shipped essay corpus (`kvjax.eval`) read from paragraph i
    on (wrapping around), BOS first; nothing is downloaded.
    """
    from kvjax.corpus import corpus_paragraphs
    paras = corpus_paragraphs()
    prompts = []
    for i in range(n_prompts):
        j = i % len(paras)
        text = " ".join(paras[j:] + paras[:j])
        ids = tokenizer.encode(text)
        while len(ids) < n_tokens:
            ids = ids + tokenizer.encode(" " + text, add_bos=False)
        prompts.append([int(t) for t in ids[:n_tokens]])
    return prompts


def prompt_hash(prompts) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(np.asarray(p, np.int64).tobytes() + b"|")
    return h.hexdigest()[:16]


def _measure(fn, k):
    """Jitted (params, tokens [1, T]) -> (query H_k [L, N], hidden H_k [L])."""
    def run(params, tokens):
        t = tokens.shape[1]
        lengths = jnp.array([t], jnp.int32)
        _, prompt, hidden = fn.prefill(params, tokens, lengths, obs_spec=ObsSpec(window=t),
                                       attn_impl="reference", return_hidden=True)
        q = prompt.groups[0].layers.obs.q_window[:, 0]  # [L, T, N, H]
        q_ent = truncated_entropy(q.transpose(0, 2, 1, 3), k)  # [L, N]
        h_ent = truncated_entropy(jnp.stack([x[0] for x in hidden]), k)  # [L]
        return q_ent, h_ent
    return jax.jit(run)


def vote_groups(entropy: np.ndarray, n_groups: int) -> tuple[tuple[int, ...], ...]:
    """Head groups (low -> high) from per-prompt kv-head entropies [S, K] (see module doc)."""
    s, n_kv = entropy.shape
    if not 1 <= n_groups <= n_kv:
        raise ValueError(f"{n_groups=} groups cannot be formed from {n_kv} kv heads (a group "
                         "would be empty)")
    bucket = np.zeros(n_kv, np.int64)
    for b, part in enumerate(np.array_split(np.arange(n_kv), n_groups)):
        bucket[part] = b
    votes = np.zeros(n_kv, np.int64)
    for row in entropy:
        order = np.lexsort((np.arange(n_kv), row))  # ascending entropy, ties by id
        votes[order] += bucket
    final = np.lexsort((np.arange(n_kv), entropy.mean(0), votes))
    return tuple(tuple(sorted(int(h) for h in part))
                 for part in np.array_split(final, n_groups))


def split_stages(profile, threshold: float) -> tuple[int, ...]:
    """First layer of every stage: a new one where the profile drops by more than threshold."""
    return (0,) + tuple(l for l in range(1, len(profile))
                        if profile[l] < profile[l - 1] - threshold)


def calibrate(model, tokenizer, prompts=None, *, k: int = 32, groups: int = 2,
              threshold: float = DEFAULT_THRESHOLD, n_prompts: int = 8, n_tokens: int = 512,
              progress: bool = True) -> UNCompCalibration:
    """Calibrate UNComp for `model` (a `models.Decoder`-like object with `kvjax_split`).

    Args:
      prompts: token-id lists (equal lengths compile once); default `calibration_prompts`.
      k: truncation of the matrix entropy (<= head_dim); groups: number of head groups.
      threshold: entropy drop that starts a new layer stage.
    """
    cfg = model.config
    if k > cfg.head_dim:
        raise ValueError(f"truncation k={k} exceeds head_dim={cfg.head_dim}")
    if not 1 <= groups <= cfg.n_kv_heads:
        raise ValueError(f"{groups=} groups cannot be formed from {cfg.n_kv_heads} kv heads "
                         "(a group would be empty)")
    source = "custom prompts"
    if prompts is None:
        prompts = calibration_prompts(tokenizer, n_prompts, n_tokens)
        source = f"kvjax.eval corpus, {n_prompts} prompts x {n_tokens} tokens"
    fn, params = model.kvjax_split()
    measure = _measure(fn, k)
    q_ents, h_ents = [], []
    from tqdm.auto import tqdm
    for p in tqdm(prompts, desc="UNComp calibration", disable=not progress):
        q_ent, h_ent = measure(params, jnp.asarray([p], jnp.int32))
        q_ents.append(np.asarray(q_ent, np.float64))
        h_ents.append(np.asarray(h_ent, np.float64))
    g = cfg.n_heads // cfg.n_kv_heads
    kv_ent = np.stack(q_ents).reshape(len(prompts), cfg.n_layers, cfg.n_kv_heads, g).mean(-1)
    layer_entropy = np.stack(h_ents).mean(0)
    return UNCompCalibration(
        version=VERSION,
        model_signature=(cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim),
        head_groups=tuple(vote_groups(kv_ent[:, l], groups) for l in range(cfg.n_layers)),
        head_entropy=tuple(tuple(round(float(x), 6) for x in kv_ent[:, l].mean(0))
                           for l in range(cfg.n_layers)),
        layer_entropy=tuple(round(float(x), 6) for x in layer_entropy),
        stages=split_stages(layer_entropy, threshold), k=k, threshold=threshold,
        source=source, prompt_sha256=prompt_hash(prompts))
