"""UNComp (Xiong et al., arXiv 2410.03090): matrix-entropy head groups and layer stages.

`entropy` holds the truncated matrix entropy, `calibration` the head-group / layer-stage
calibration file (with the shipped SmolLM2-135M-Instruct one; `kvjax.tools.uncomp_calibrate`
measures it); the press is
`kvjax.presses.uncomp.UNCompPress`, the prefill token pruning an option of `models.Decoder`.
"""

from kvjax.uncomp.calibration import UNCompCalibration, load_calibration, shipped_calibration
from kvjax.uncomp.entropy import effective_rank, matrix_spectrum, truncated_entropy

__all__ = ["UNCompCalibration", "effective_rank", "load_calibration",
           "matrix_spectrum", "shipped_calibration", "truncated_entropy"]
