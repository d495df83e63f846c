"""In-context linear regression (Garg et al. 2022, modified): task, baselines, model.

    batch = task.sample_batch(seed, step, 64, n_points, d_max, d_active)
    pred_BN = model.ICRModel(d_max, n_max, d_model, num_layers, attn, rngs=...)(x_BNI, y_BN)
"""

from structattn.icr.baselines import (averaging, knn, least_squares, ridge, squared_errors,
                                      zero)
from structattn.icr.model import ICRModel, icr_loss
from structattn.icr.task import curriculum, eval_set, interleave, sample_batch

__all__ = [
    "ICRModel", "averaging", "curriculum", "eval_set", "icr_loss", "interleave",
    "knn", "least_squares", "ridge", "sample_batch", "squared_errors", "zero",
]
