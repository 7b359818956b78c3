"""The shipped SmolLM2 KVzap weights on the real model (slow): the held-out rank correlation
recorded in the file is reproduced from its own recipe (the held-out contexts are rebuilt from
the recorded seed and split, KVzip scores recomputed), is above the threshold we measured, and
the press runs through the Pipeline."""


import numpy as np
import pytest

import kvjax
from kvjax.kvzap import shipped_weights
from kvjax.tools.kvzap_train import TrainConfig, build_contexts, evaluate, kvzip_targets

pytestmark = pytest.mark.slow

# Measured when the file was made (python benchmarks/kvzap_cost.py / kvjax train-scorer output):
# mean held-out Spearman 0.76 over the 30 layers, worst layer 0.64 (KVzip targets) and 0.56
# (KVzip+ targets).
MIN_MEAN_SPEARMAN = 0.7
MIN_LAYER_SPEARMAN = 0.5


@pytest.fixture(scope="module")
def smollm2():
    import models
    return models.load("smollm2", dtype="float32", progress=False)


@pytest.mark.parametrize("name", ["smollm2", "smollm2_plus"])  # KVzip, KVzip+ targets
def test_shipped_heldout_rank_correlation(smollm2, name):
    model, tok = smollm2
    w = shipped_weights(name)
    meta = w.metadata
    cfg = TrainConfig.from_dict(meta["config"])
    from kvjax.corpus import corpus_paragraphs
    from kvjax.kvzip import RepeatPrompt
    repeat = RepeatPrompt.from_tokenizer(tok)
    _, held = build_contexts(tok, corpus_paragraphs(), cfg, repeat.prefix_length)
    data = kvzip_targets(model, tok, held, cfg, progress=False)
    rho, overlap = evaluate(w, data, max(repeat.prefix_length, cfg.n_sink))
    np.testing.assert_allclose(rho, meta["heldout_spearman"], atol=2e-3)
    assert rho.mean() > MIN_MEAN_SPEARMAN and rho.min() > MIN_LAYER_SPEARMAN
    assert overlap.mean() > 0.7


def test_shipped_press_in_pipeline(smollm2):
    model, tok = smollm2
    from kvjax.corpus import corpus_paragraphs
    context = " ".join(corpus_paragraphs()[:4])
    pipe = kvjax.Pipeline(model, tok)
    out = pipe.run(context, "What is this text about?", max_new_tokens=4,
                   press=kvjax.KVzapPress(compression_ratio=0.5, weights="smollm2"))
    n_ctx = out.n_context
    kept = [int((p < n_ctx).sum()) for layer in range(30)
            for p in kvjax.kept_positions(out.cache, layer)[0]]
    assert sum(kept) == -(-(30 * 3 * n_ctx) // 2) and len(set(kept)) > 1  # one global top-k


def test_default_weights_are_the_shipped_ones_for_smollm2(smollm2):
    """KVzapPress(compression_ratio=r) with no weights finds the shipped SmolLM2 file: the
    same answer and kept entries as weights="smollm2"."""
    model, tok = smollm2
    from kvjax.corpus import corpus_paragraphs
    context = " ".join(corpus_paragraphs()[:2])
    pipe = kvjax.Pipeline(model, tok)
    runs = [pipe.run(context, "What is this text about?", max_new_tokens=4, press=p)
            for p in (kvjax.KVzapPress(compression_ratio=0.75),
                      kvjax.KVzapPress(compression_ratio=0.75, weights="smollm2"))]
    assert runs[0].tokens == runs[1].tokens
    np.testing.assert_array_equal(np.asarray(runs[0].cache.store.length),
                                  np.asarray(runs[1].cache.store.length))
