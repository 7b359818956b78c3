"""UNComp (Xiong et al., arXiv 2410.03090): matrix-entropy head groups and layer stages.

`entropy` holds the truncated matrix entropy, `calibration` the offline head-group / layer-stage
calibration (with the shipped SmolLM2-135M-Instruct file); the press is
`kvjax.presses.uncomp.UNCompPress`, the prefill token pruning an option of `models.Decoder`.
"""

from kvjax.uncomp.calibration import (UNCompCalibration, calibrate, load_calibration,
                                      shipped_calibration)
from kvjax.uncomp.entropy import effective_rank, matrix_spectrum, truncated_entropy

__all__ = ["UNCompCalibration", "calibrate", "effective_rank", "load_calibration",
           "matrix_spectrum", "shipped_calibration", "truncated_entropy"]
