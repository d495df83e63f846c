"""Baselines on ICR prompts: predict y_i from the first i-1 points (x_j, y_j), every i.

Each takes x_BNI, y_BN (numpy or jax) and returns numpy float64 predictions (B, N); position
0 (no context) predicts 0.  Plain numpy loops over positions: correctness over speed.
"""

from __future__ import annotations

import numpy as np


def _np(x_BNI, y_BN):
  return np.asarray(x_BNI, np.float64), np.asarray(y_BN, np.float64)


def _per_position(x_BNI, y_BN, fit):
  """pred[:, i] = fit(x_prev_BNI, y_prev_BN, q_BI) for i >= 1 (the i points before i and
  the query x_i), 0 at i = 0."""
  x, y = _np(x_BNI, y_BN)
  pred_BN = np.zeros(y.shape)
  for i in range(1, y.shape[1]):
    pred_BN[:, i] = fit(x[:, :i], y[:, :i], x[:, i])
  return pred_BN


def zero(x_BNI, y_BN):
  """Predicts 0 everywhere (error E[y^2] ~= 1)."""
  return np.zeros(np.shape(y_BN))


def least_squares(x_BNI, y_BN):
  """Minimum-norm least squares: w = pinv(X_prev) y_prev."""
  def fit(x_prev_BNI, y_prev_BN, q_BI):
    w_BI = np.einsum("bdi,bi->bd", np.linalg.pinv(x_prev_BNI), y_prev_BN)
    return np.einsum("bd,bd->b", w_BI, q_BI)
  return _per_position(x_BNI, y_BN, fit)


def ridge(x_BNI, y_BN, lam: float = 1e-2):
  """Ridge regression: w = (X^T X + lam I)^-1 X^T y on the previous points."""
  def fit(x_prev_BNI, y_prev_BN, q_BI):
    d = x_prev_BNI.shape[-1]
    gram_BII = np.einsum("bid,bie->bde", x_prev_BNI, x_prev_BNI) + lam * np.eye(d)
    xty_BI = np.einsum("bid,bi->bd", x_prev_BNI, y_prev_BN)
    w_BI = np.linalg.solve(gram_BII, xty_BI[..., None])[..., 0]
    return np.einsum("bd,bd->b", w_BI, q_BI)
  return _per_position(x_BNI, y_BN, fit)


def knn(x_BNI, y_BN, k: int = 3):
  """Uniform average of the y of the k nearest previous points (all of them if fewer)."""
  def fit(x_prev_BNI, y_prev_BN, q_BI):
    dist_BN = np.sum(np.square(x_prev_BNI - q_BI[:, None]), axis=-1)
    kk = min(k, dist_BN.shape[1])
    nearest = np.argsort(dist_BN, axis=1, kind="stable")[:, :kk]  # (B, kk) point indices
    return np.take_along_axis(y_prev_BN, nearest, axis=1).mean(axis=1)
  return _per_position(x_BNI, y_BN, fit)


def averaging(x_BNI, y_BN, d: int | None = None):
  """Garg et al.'s averaging: w = d * mean_j(y_j x_j), prediction x_i . w.

  Garg et al. draw x ~ N(0, I) where w_hat = mean(y x) is unbiased; here x ~ N(0, I/d), so
  the same estimator carries the factor d (it is the identical predictor on rescaled x).
  d defaults to the number of coordinates that are non-zero anywhere in the batch."""
  x, _ = _np(x_BNI, y_BN)
  d = int(np.sum(np.any(x != 0, axis=(0, 1)))) if d is None else d
  def fit(x_prev_BNI, y_prev_BN, q_BI):
    w_BI = d * np.einsum("bid,bi->bd", x_prev_BNI, y_prev_BN) / x_prev_BNI.shape[1]
    return np.einsum("bd,bd->b", w_BI, q_BI)
  return _per_position(x_BNI, y_BN, fit)


def squared_errors(pred_BN, y_BN):
  """Squared error per position, averaged over the batch: shape (N,)."""
  diff = np.asarray(pred_BN, np.float64) - np.asarray(y_BN, np.float64)
  return np.mean(np.square(diff), axis=0)
