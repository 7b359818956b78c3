"""KVzap (arXiv 2601.07891): learned per-layer scorers approximating KVzip's scores from
hidden states. `weights` holds the weights type (with the shipped SmolLM2 file); the trainer
is `kvjax.tools.kvzap_train` (`kvjax train-scorer`), the press
`kvjax.presses.kvzap.KVzapPress`."""

from kvjax.kvzap.weights import (KVzapWeights, LinearScorer, MLPScorer, ShippedWeights,
                                 UntrainedWeights, apply_params, load_dir, load_weights, save_dir,
                                 scorer_named, shipped_weights)

__all__ = ["KVzapWeights", "LinearScorer", "MLPScorer", "ShippedWeights", "UntrainedWeights",
           "apply_params", "load_dir", "load_weights", "save_dir", "scorer_named",
           "shipped_weights"]
