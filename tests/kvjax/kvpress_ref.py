"""Run kvpress presses on a transformers model and read back what they kept (test helper)."""

import numpy as np
import torch
from transformers import DynamicCache


def prefill_cache(hf_model, ids: np.ndarray, press=None) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            hf_model.model(input_ids=torch.as_tensor(ids), past_key_values=cache)
        else:
            with press(hf_model):
                hf_model.model(input_ids=torch.as_tensor(ids), past_key_values=cache)
    return cache


def kept_positions_by_matching(full: DynamicCache, compressed: DynamicCache) -> list:
    """Per layer, a [B, K] nested list of sorted kept positions, found by matching each kept
    key row to the identical row of the uncompressed cache (kvpress gathers exact copies)."""
    out = []
    for lf, lc in zip(full.layers, compressed.layers):
        kf, kc = lf.keys.numpy(), lc.keys.numpy()  # [B, K, T, H], [B, K, n, H]
        layer = []
        for b in range(kf.shape[0]):
            heads = []
            for h in range(kf.shape[1]):
                d = np.abs(kc[b, h][:, None, :] - kf[b, h][None, :, :]).max(-1)  # [n, T]
                assert (d.min(1) == 0).all(), "a kept key is not a copy of a prompt key"
                heads.append(sorted(d.argmin(1).tolist()))
            layer.append(heads)
        out.append(layer)
    return out


def kept_positions_by_mask(hf_model, seq_len: int, batch: int = 1) -> list:
    """AdaKV-style masking presses: kept = complement of module.masked_key_indices."""
    out = []
    for layer in hf_model.model.layers:
        bi, hi, si = (t.numpy() for t in layer.self_attn.masked_key_indices)
        n_kv = hf_model.config.num_key_value_heads
        keep = np.ones((batch, n_kv, seq_len), bool)
        keep[bi, hi, si] = False
        out.append([[np.flatnonzero(keep[b, h]).tolist() for h in range(n_kv)]
                    for b in range(batch)])
    return out


def greedy_logits(hf_model, cache: DynamicCache, first_token: int, start_pos: int,
                  n_steps: int) -> tuple[list[int], np.ndarray]:
    """Greedy decode as kvpress's pipeline does (positions continue from the prompt length)."""
    tokens, logits = [first_token], []
    with torch.no_grad():
        for i in range(n_steps):
            out = hf_model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                           position_ids=torch.tensor([[start_pos + i]]))
            logits.append(out.logits[0, -1].float().numpy())
            tokens.append(int(logits[-1].argmax()))
    return tokens, np.stack(logits)


def greedy_logits_per_layer(hf_model, cache: DynamicCache, first_token: int, start_pos: int,
                            n_steps: int) -> tuple[list[int], np.ndarray]:
    """Like `greedy_logits`, but running the decoder layers by hand with no attention mask, so
    layers may hold caches of different lengths (transformers builds one mask for all layers,
    which breaks on PyramidKV caches). One query token may see every cached key, so no mask
    is the right mask."""
    inner = hf_model.model
    tokens, logits = [first_token], []
    with torch.no_grad():
        for i in range(n_steps):
            pos = torch.tensor([[start_pos + i]])
            h = inner.embed_tokens(torch.tensor([[tokens[-1]]]))
            pe = inner.rotary_emb(h, pos)
            for layer in inner.layers:
                out = layer(h, attention_mask=None, position_ids=pos, past_key_values=cache,
                            use_cache=True, position_embeddings=pe)
                h = out[0] if isinstance(out, tuple) else out
            logits.append(hf_model.lm_head(inner.norm(h))[0, -1].float().numpy())
            tokens.append(int(logits[-1].argmax()))
    return tokens, np.stack(logits)
