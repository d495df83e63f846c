"""Compute frontiers and scaling-law fits: L(C) = E + A C^-alpha and L(N, D) = E + A N^-alpha
+ B D^-beta.

    from structattn import fit
    f = fit.fit_power_law(C, L, n_boot=200, seed=0)   # PowerLawFit: E, A, alpha, *_ci, status
    f.predict(10 * C.max())
    fr = fit.frontier([(C1, L1), (C2, L2)])           # lower envelope of many runs' curves
    res = fit.fit_dir("runs/lm-sweep", x="compute/paper_macs", y="eval/loss",
                      group=("attention.variant",))  # ScalingFits: one GroupFit per variant
    res.write_json("out/fits.json"); print(res.format())

    nd = fit.fit_nd_dir("runs/lm-sweep")  # {group label: LossNDFit}: L(N, D) on every eval

The command line (`structattn-fit`, with figures) is `structattn.fit_cli`; this module holds
the numerics and reads run directories, and draws nothing.

**Frontier.** All runs' (x, y) points pooled; a point is on the frontier when its y is below
every y at smaller or equal x: the lower-left staircase, strictly decreasing in y and strictly
increasing in x. `Frontier.at(x)` is the least y reached at compute <= x.

**Fitting** (variable projection). x is divided by x_ref, its geometric mean. For a fixed
exponent the model is linear in the coefficients, which are found by *non-negative* weighted
least squares (E, A >= 0; exactly, by enumerating active sets, with QR: no normal equations).
The exponent (exponents) is then a 1-D (2-D) search on a log grid refined by a bounded
optimiser, so no starting point is needed and the E/A/alpha trade-off of nearly flat curves
(the ill-conditioned case) cannot send the optimiser astray. weights='relative' divides each
residual by y (so it is the log-loss residual to first order, and curves spanning decades are
fitted evenly); robust=True replaces the squared loss by Huber's (iteratively reweighted).
Confidence intervals: percentile bootstrap over points (`seed`-ed).

**Status:** 'ok'; 'alpha_at_bound' (the best exponent is at its search bound: not identified);
'degenerate' (fewer than 3 distinct x, a non-decreasing curve with A = 0, collinear N and D);
'too_few_points' (below `min_points`); 'no_convergence' (a non-finite optimum). Parameters of a
fit that is not 'ok' or 'alpha_at_bound' are NaN.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize

from structattn import results as results_lib

STATUSES = ("ok", "alpha_at_bound", "degenerate", "too_few_points", "no_convergence")
WEIGHTS = ("relative", "uniform")
DEFAULT_STATUSES = ("completed", "running")


# ------------------------------------------------------------------------------ curves

@dataclasses.dataclass(frozen=True)
class Curve:
  """One run's finite points (x > 0), sorted by x; `row` is its results row."""
  run: str
  x: np.ndarray
  y: np.ndarray
  row: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Frontier:
  """The lower envelope: x strictly increasing, y strictly decreasing; run[i] reached it."""
  x: np.ndarray
  y: np.ndarray
  run: tuple[str, ...]

  def at(self, x: Any) -> np.ndarray:
    """The least y reached at compute <= x (NaN before the first point)."""
    i = np.searchsorted(self.x, np.asarray(x, float), side="right") - 1
    return np.where(i >= 0, self.y[np.maximum(i, 0)], np.nan) if len(self.x) else \
        np.full(np.shape(x), np.nan)


def _as_curve(c: Any, i: int) -> Curve:
  if isinstance(c, Curve):
    return c
  x, y = c
  return Curve(str(i), np.asarray(x, float), np.asarray(y, float))


def frontier(curves: Iterable[Curve | tuple[Any, Any]]) -> Frontier:
  """Lower envelope of all curves' points; curves are `Curve`s or (x, y) pairs.

  Non-finite points and x <= 0 are ignored. A point is kept when its y is strictly below
  the y of every point with smaller or equal x.
  """
  curves = [_as_curve(c, i) for i, c in enumerate(curves)]
  xs, ys, owner = [], [], []
  for k, c in enumerate(curves):
    x, y = np.asarray(c.x, float).ravel(), np.asarray(c.y, float).ravel()
    if x.shape != y.shape:
      raise ValueError(f"curve {c.run!r}: x has {x.size} points but y has {y.size}")
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
    xs.append(x[ok]), ys.append(y[ok]), owner.append(np.full(ok.sum(), k))
  if not xs or not sum(len(x) for x in xs):
    return Frontier(np.zeros(0), np.zeros(0), ())
  x, y, owner = np.concatenate(xs), np.concatenate(ys), np.concatenate(owner)
  order = np.lexsort((y, x))
  x, y, owner = x[order], y[order], owner[order]
  best_before = np.concatenate([[np.inf], np.minimum.accumulate(y)[:-1]])
  keep = y < best_before
  return Frontier(x[keep], y[keep], tuple(curves[k].run for k in owner[keep]))


# ------------------------------------------------------------------------------ NNLS core

def _wnnls(X: np.ndarray, y: np.ndarray, sw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Batched exact non-negative least squares min ||sw * (y - X c)||, c >= 0, for few terms.

  X: (settings, points, terms), one design matrix per exponent setting; y: (points,); sw:
  (settings, points) weights.  The NNLS optimum is the least-squares solution on its
  support, so it is the best feasible one among all supports; each is solved by QR of the
  column-normalised weighted matrix.  Returns the coefficients (settings, terms) and the
  weighted residual vectors (settings, points).
  """
  G, N, K = X.shape  # settings, points, terms
  Xw = X * sw[..., None]
  yw = np.broadcast_to(y * sw, (G, N))
  best_rss = np.einsum("gn,gn->g", yw, yw)  # the empty support: c = 0
  best = np.zeros((G, K))
  for size in range(1, K + 1):
    for S in itertools.combinations(range(K), size):
      A = Xw[..., S]
      norm = np.linalg.norm(A, axis=1, keepdims=True)
      norm = np.where(norm > 0, norm, 1.0)
      Q, R = np.linalg.qr(A / norm)
      qty = np.einsum("gnk,gn->gk", Q, yw)
      diag = np.abs(np.diagonal(R, axis1=1, axis2=2))
      solvable = diag.min(axis=1) > 1e-12 * np.maximum(diag.max(axis=1), 1e-300)
      R = np.where(solvable[:, None, None], R, np.eye(size))
      c = np.linalg.solve(R, qty[..., None])[..., 0] / norm[:, 0, :]
      r = yw - np.einsum("gnk,gk->gn", A, c)
      rss = np.einsum("gn,gn->g", r, r)
      better = solvable & (c >= 0).all(axis=1) & (rss < best_rss)
      best_rss = np.where(better, rss, best_rss)
      best[better] = 0.0
      best[np.ix_(better, S)] = c[better]
  r = yw - np.einsum("gnk,gk->gn", Xw, best)
  return best, r


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _profile(X: np.ndarray, y: np.ndarray, w: np.ndarray, robust: bool,
             delta: float) -> tuple[np.ndarray, np.ndarray]:
  """Objective and coefficients at each exponent setting (X: (settings, points, terms); y,
  w: (points,)); IRLS for Huber."""
  sw = np.broadcast_to(w, X.shape[:2]).copy()
  coef, r = _wnnls(X, y, sw)
  if not robust:
    return np.einsum("gn,gn->g", r, r), coef
  for _ in range(12):
    rr = (y - np.einsum("gnk,gk->gn", X, coef)) * w
    a = np.maximum(np.abs(rr), 1e-300)
    coef, r = _wnnls(X, y, w * np.sqrt(np.minimum(1.0, delta / a)))
  rr = (y - np.einsum("gnk,gk->gn", X, coef)) * w
  return _huber(rr, delta).sum(axis=1), coef


def _clean_points(*arrays: Any) -> tuple[list[np.ndarray], int]:
  arrs = [np.asarray(a, float).ravel() for a in arrays]
  n = arrs[0].size
  for a in arrs[1:]:
    if a.size != n:
      raise ValueError(f"inputs have different lengths: {[a.size for a in arrs]}")
  ok = np.ones(n, bool)
  for a in arrs:
    ok &= np.isfinite(a) & (a > 0)
  return [a[ok] for a in arrs], int(n - ok.sum())


def _weights(y: np.ndarray, weights: str) -> np.ndarray:
  if weights not in WEIGHTS:
    raise ValueError(f"weights={weights!r} is invalid: allowed values are {WEIGHTS}")
  return 1.0 / y if weights == "relative" else np.ones_like(y)


def _ci(samples: np.ndarray, ci: float) -> tuple[float, float]:
  s = samples[np.isfinite(samples)]
  if s.size < 2:
    return (math.nan, math.nan)
  lo, hi = np.quantile(s, [(1 - ci) / 2, (1 + ci) / 2])
  return (float(lo), float(hi))


def _num(v: float) -> float | None:
  """JSON: NaN/Inf become null."""
  return float(v) if v is not None and math.isfinite(v) else None


# ------------------------------------------------------------------------------ L(C)

@dataclasses.dataclass(frozen=True)
class PowerLawFit:
  """L(x) = E + A x^-alpha, with A in the units of x (A = A_ref * x_ref^alpha)."""
  status: str
  E: float
  A: float
  alpha: float
  E_ci: tuple[float, float]
  A_ci: tuple[float, float]
  alpha_ci: tuple[float, float]
  n_points: int
  x_ref: float
  A_ref: float  # the reducible loss at x_ref: A x_ref^-alpha
  rmse_log: float  # root-mean-square of log(y / prediction)
  message: str = ""
  boot_E_Aref_alpha: np.ndarray = dataclasses.field(  # bootstrap samples (n, 3)
      default_factory=lambda: np.zeros((0, 3)), repr=False)
  ci: float = 0.95

  @property
  def usable(self) -> bool:
    return self.status in ("ok", "alpha_at_bound")

  def predict(self, x: Any) -> np.ndarray:
    x = np.asarray(x, float)
    return self.E + self.A_ref * (x / self.x_ref) ** -self.alpha

  def predict_ci(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Pointwise bootstrap percentile band (NaN without bootstrap samples)."""
    x = np.asarray(x, float)
    b = self.boot_E_Aref_alpha
    if len(b) < 2:
      return np.full(x.shape, np.nan), np.full(x.shape, np.nan)
    preds = b[:, :1] + b[:, 1:2] * (x.ravel()[None] / self.x_ref) ** -b[:, 2:3]
    lo, hi = np.quantile(preds, [(1 - self.ci) / 2, (1 + self.ci) / 2], axis=0)
    return lo.reshape(x.shape), hi.reshape(x.shape)

  def to_dict(self) -> dict[str, Any]:
    return {"status": self.status, "message": self.message, "n_points": self.n_points,
            "alpha": _num(self.alpha), "alpha_ci": [_num(v) for v in self.alpha_ci],
            "E": _num(self.E), "E_ci": [_num(v) for v in self.E_ci],
            "A": _num(self.A), "A_ci": [_num(v) for v in self.A_ci],
            "x_ref": _num(self.x_ref), "A_ref": _num(self.A_ref),
            "rmse_log": _num(self.rmse_log), "n_boot": int(len(self.boot_E_Aref_alpha)),
            "ci": self.ci}


def _failed_fit(status: str, message: str, n: int, ci: float) -> PowerLawFit:
  nan2 = (math.nan, math.nan)
  return PowerLawFit(status, math.nan, math.nan, math.nan, nan2, nan2, nan2, n, math.nan,
                     math.nan, math.nan, message, ci=ci)


def _power_law_point(logc: np.ndarray, y: np.ndarray, sw: np.ndarray, bounds: tuple[float, float],
                     grid: int, robust: bool, delta: float) -> tuple[float, float, float, bool]:
  """(E, A_ref, alpha, alpha_at_bound) of one fit on normalised log x."""
  def profile(alphas: np.ndarray):
    X = np.stack([np.ones((alphas.size, logc.size)), np.exp(-alphas[:, None] * logc)], -1)
    return _profile(X, y, sw, robust, delta)
  la = np.linspace(math.log(bounds[0]), math.log(bounds[1]), grid)
  obj, _ = profile(np.exp(la))
  i = int(np.nanargmin(obj))
  lo, hi = la[max(i - 1, 0)], la[min(i + 1, grid - 1)]
  res = optimize.minimize_scalar(lambda t: profile(np.exp(np.array([t])))[0][0],
                                 bounds=(lo, hi), method="bounded",
                                 options={"xatol": 1e-9})
  t = float(res.x) if res.fun <= obj[i] else la[i]
  _, coef = profile(np.exp(np.array([t])))
  step = la[1] - la[0]
  at_bound = t - la[0] < 0.5 * step or la[-1] - t < 0.5 * step
  return float(coef[0, 0]), float(coef[0, 1]), math.exp(t), at_bound


def fit_power_law(x: Any, y: Any, *, weights: str = "relative", robust: bool = False,
                  huber_delta: float = 0.01, alpha_bounds: tuple[float, float] = (1e-3, 4.0),
                  n_boot: int = 200, ci: float = 0.95, seed: int = 0, min_points: int = 4,
                  grid: int = 161) -> PowerLawFit:
  """Fit L(x) = E + A x^-alpha (E, A >= 0) to points; see the module docstring.

  Points with non-finite or non-positive x or y are dropped. `huber_delta` is in units of
  the weighted residual (relative error with weights='relative').
  """
  if not 0 < alpha_bounds[0] < alpha_bounds[1]:
    raise ValueError(f"alpha_bounds={alpha_bounds!r} is invalid: need 0 < low < high")
  if not 0 < ci < 1:
    raise ValueError(f"ci={ci!r} is invalid: need 0 < ci < 1")
  (x, y), dropped = _clean_points(x, y)
  sw = _weights(y, weights)
  n = int(x.size)
  note = f"{dropped} non-finite or non-positive points dropped; " if dropped else ""
  if n < min_points:
    return _failed_fit("too_few_points", f"{note}{n} points < min_points={min_points}", n, ci)
  if np.unique(x).size < 3:
    return _failed_fit("degenerate", f"{note}x takes {np.unique(x).size} distinct values; "
                       "3 are needed", n, ci)
  x_ref = float(np.exp(np.mean(np.log(x))))
  logc = np.log(x / x_ref)

  def one(idx):
    return _power_law_point(logc[idx], y[idx], sw[idx], alpha_bounds, grid, robust, huber_delta)
  E, A_ref, alpha, at_bound = one(np.arange(n))
  if not all(map(math.isfinite, (E, A_ref, alpha))):
    return _failed_fit("no_convergence", f"{note}non-finite optimum", n, ci)
  if A_ref <= 0:
    return _failed_fit("degenerate", f"{note}y does not decrease with x (A = 0)", n, ci)
  status = "alpha_at_bound" if at_bound else "ok"
  msg = note + (f"alpha={alpha:.4g} is at a bound of alpha_bounds={alpha_bounds}"
                if at_bound else "")
  rng = np.random.default_rng(seed)
  boot = []
  for _ in range(n_boot):
    idx = rng.integers(0, n, n)
    if np.unique(x[idx]).size >= 3:
      boot.append(one(idx)[:3])
  boot = np.asarray(boot, float).reshape(-1, 3)
  boot_amp = boot[:, 1] * x_ref ** boot[:, 2]  # each bootstrap fit's A (at x = 1)
  pred = E + A_ref * np.exp(-alpha * logc)
  rmse_log = float(np.sqrt(np.mean(np.log(y / np.maximum(pred, 1e-300)) ** 2)))
  return PowerLawFit(status, E, A_ref * x_ref**alpha, alpha, _ci(boot[:, 0], ci),
                     _ci(boot_amp, ci), _ci(boot[:, 2], ci), n, x_ref, A_ref, rmse_log,
                     msg.rstrip("; "), boot, ci)


# ------------------------------------------------------------------------------ L(N, D)

@dataclasses.dataclass(frozen=True)
class LossNDFit:
  """L(N, D) = E + A N^-alpha + B D^-beta (Chinchilla form), A and B in the units of N, D."""
  status: str
  E: float
  A: float
  alpha: float
  B: float
  beta: float
  E_ci: tuple[float, float]
  A_ci: tuple[float, float]
  alpha_ci: tuple[float, float]
  B_ci: tuple[float, float]
  beta_ci: tuple[float, float]
  n_points: int
  N_ref: float
  D_ref: float
  A_ref: float
  B_ref: float
  rmse_log: float
  message: str = ""
  ci: float = 0.95

  @property
  def usable(self) -> bool:
    return self.status in ("ok", "alpha_at_bound")

  def predict(self, N: Any, D: Any) -> np.ndarray:
    N, D = np.asarray(N, float), np.asarray(D, float)
    return self.E + self.A_ref * (N / self.N_ref) ** -self.alpha + \
        self.B_ref * (D / self.D_ref) ** -self.beta

  def to_dict(self) -> dict[str, Any]:
    out: dict[str, Any] = {"status": self.status, "message": self.message,
                           "n_points": self.n_points}
    for k in ("E", "A", "alpha", "B", "beta"):
      out[k] = _num(getattr(self, k))
      out[k + "_ci"] = [_num(v) for v in getattr(self, k + "_ci")]
    out.update(N_ref=_num(self.N_ref), D_ref=_num(self.D_ref), rmse_log=_num(self.rmse_log),
               ci=self.ci)
    return out


def _nd_point(lN, lD, y, sw, ab, bb, grid, robust, delta):
  def profile(alphas, betas):
    X = np.stack([np.ones((alphas.size, lN.size)), np.exp(-alphas[:, None] * lN),
                  np.exp(-betas[:, None] * lD)], -1)
    return _profile(X, y, sw, robust, delta)
  ga = np.linspace(math.log(ab[0]), math.log(ab[1]), grid)
  gb = np.linspace(math.log(bb[0]), math.log(bb[1]), grid)
  TA, TB = [t.ravel() for t in np.meshgrid(ga, gb, indexing="ij")]
  obj, _ = profile(np.exp(TA), np.exp(TB))
  i = int(np.nanargmin(obj))

  def f(t):
    t = np.clip(t, [ga[0], gb[0]], [ga[-1], gb[-1]])
    return profile(np.exp(t[:1]), np.exp(t[1:]))[0][0]
  res = optimize.minimize(f, np.array([TA[i], TB[i]]), method="Nelder-Mead",
                          options={"xatol": 1e-8, "fatol": 1e-14, "maxiter": 400})
  t = np.clip(res.x, [ga[0], gb[0]], [ga[-1], gb[-1]]) if res.fun <= obj[i] else \
      np.array([TA[i], TB[i]])
  _, coef = profile(np.exp(t[:1]), np.exp(t[1:]))
  sa, sb = ga[1] - ga[0], gb[1] - gb[0]
  at_bound = min(t[0] - ga[0], ga[-1] - t[0]) < 0.5 * sa or min(t[1] - gb[0], gb[-1] - t[1]) \
      < 0.5 * sb
  return (*coef[0].tolist(), math.exp(t[0]), math.exp(t[1]), bool(at_bound))


def fit_loss_nd(N: Any, D: Any, L: Any, *, weights: str = "relative", robust: bool = False,
                huber_delta: float = 0.01, alpha_bounds: tuple[float, float] = (1e-2, 3.0),
                beta_bounds: tuple[float, float] = (1e-2, 3.0), n_boot: int = 50,
                ci: float = 0.95, seed: int = 0, min_points: int = 6,
                grid: int = 33) -> LossNDFit:
  """Fit L(N, D) = E + A N^-alpha + B D^-beta (E, A, B >= 0) where N and D both vary.

  N is e.g. non-embedding parameters and D tokens. Same method as `fit_power_law` with a
  2-D exponent search; 'alpha_at_bound' means either exponent is at its bound.
  """
  (N, D, L), dropped = _clean_points(N, D, L)
  sw = _weights(L, weights)
  n = int(L.size)
  nan2 = (math.nan, math.nan)

  def failed(status, msg):
    return LossNDFit(status, *[math.nan] * 5, *[nan2] * 5, n, *[math.nan] * 5, msg, ci)
  note = f"{dropped} non-finite or non-positive points dropped; " if dropped else ""
  if n < min_points:
    return failed("too_few_points", f"{note}{n} points < min_points={min_points}")
  for name, v in (("N", N), ("D", D)):
    if np.unique(v).size < 3:
      return failed("degenerate", f"{note}{name} takes {np.unique(v).size} distinct values; "
                    "L(N, D) needs both N and D to vary (3 values or more)")
  N_ref, D_ref = float(np.exp(np.log(N).mean())), float(np.exp(np.log(D).mean()))
  lN, lD = np.log(N / N_ref), np.log(D / D_ref)
  if abs(np.corrcoef(lN, lD)[0, 1]) > 0.999:
    return failed("degenerate", f"{note}log N and log D are collinear: the terms cannot be "
                  "separated; vary N and D independently")

  def one(idx):
    return _nd_point(lN[idx], lD[idx], L[idx], sw[idx], alpha_bounds, beta_bounds, grid,
                     robust, huber_delta)
  E, A_ref, B_ref, alpha, beta, at_bound = one(np.arange(n))
  if not all(map(math.isfinite, (E, A_ref, B_ref, alpha, beta))):
    return failed("no_convergence", f"{note}non-finite optimum")
  if A_ref <= 0 or B_ref <= 0:
    return failed("degenerate", f"{note}L does not decrease with {'N' if A_ref <= 0 else 'D'}")
  rng = np.random.default_rng(seed)
  boot = []
  for _ in range(n_boot):
    idx = rng.integers(0, n, n)
    if np.unique(N[idx]).size >= 3 and np.unique(D[idx]).size >= 3:
      boot.append(one(idx)[:5])
  b = np.asarray(boot, float).reshape(-1, 5)
  pred = E + A_ref * np.exp(-alpha * lN) + B_ref * np.exp(-beta * lD)
  rmse_log = float(np.sqrt(np.mean(np.log(L / np.maximum(pred, 1e-300)) ** 2)))
  return LossNDFit("alpha_at_bound" if at_bound else "ok", E, A_ref * N_ref**alpha, alpha,
                   B_ref * D_ref**beta, beta, _ci(b[:, 0], ci),
                   _ci(b[:, 1] * N_ref ** b[:, 3], ci), _ci(b[:, 3], ci),
                   _ci(b[:, 2] * D_ref ** b[:, 4], ci), _ci(b[:, 4], ci), n, N_ref, D_ref,
                   A_ref, B_ref, rmse_log,
                   (note + ("an exponent is at its bound" if at_bound else "")).rstrip("; "),
                   ci)


# ------------------------------------------------------------------------------ run dirs

def _matches(filter: Callable[[Mapping[str, Any]], bool] | Mapping[str, Any] | None,
             rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  if filter is None:
    return rows
  if callable(filter):
    return [r for r in rows if filter(r)]
  results_lib.check_fields(rows, filter, "filter")

  def ok(r):
    return all(r.get(k) in (v if isinstance(v, (list, tuple, set, frozenset)) else (v,))
               for k, v in filter.items())
  return [r for r in rows if ok(r)]


def curve_of(run_dir: str | os.PathLike, x: str, y: str, run: str = "",
             row: Mapping[str, Any] | None = None) -> Curve:
  """The finite (x, y) points (x > 0) of one run's metrics.jsonl, sorted by x."""
  pts = [(m[x], m[y]) for m in results_lib.read_metrics(run_dir)
         if results_lib._is_number(m.get(x)) and results_lib._is_number(m.get(y))]
  a = np.asarray(pts, float).reshape(-1, 2)
  a = a[np.isfinite(a).all(axis=1) & (a[:, 0] > 0)]
  a = a[np.argsort(a[:, 0], kind="stable")]
  return Curve(run or str(run_dir), a[:, 0], a[:, 1], dict(row or {}))


def load_curves(root: str | os.PathLike, x: str = "compute/paper_macs", y: str = "eval/loss",
                filter: Callable[[Mapping[str, Any]], bool] | Mapping[str, Any] | None = None,
                statuses: Sequence[str] = DEFAULT_STATUSES) -> list[Curve]:
  """Every run's curve under root (status in `statuses`, passing `filter`), empty ones dropped.

  `filter` is a predicate on the results row or a mapping field -> value (or list of values).
  Raises KeyError naming x or y and the metrics present when no run logs them.
  """
  bad = [s for s in statuses if s not in results_lib.STATUSES]
  if bad:
    raise ValueError(f"statuses={bad!r} are invalid: allowed values are {results_lib.STATUSES}")
  rows = _matches(filter, [r for r in results_lib.collect(root) if r["status"] in statuses])
  curves = [curve_of(Path(root) / r["run"], x, y, r["run"], r) for r in rows]
  if rows and not any(len(c.x) for c in curves):
    keys = sorted({k for r in rows for m in results_lib.read_metrics(Path(root) / r["run"])
                   for k in m})
    raise KeyError(f"no run logs both x={x!r} and y={y!r} with finite values; metrics "
                   f"present: {', '.join(keys) or '(none)'}")
  return [c for c in curves if len(c.x)]


@dataclasses.dataclass(frozen=True)
class GroupFit:
  """One group's curves, frontier, fit and the prediction at `x_pred`."""
  key: tuple[Any, ...]
  label: str
  curves: tuple[Curve, ...]
  frontier: Frontier
  fit: PowerLawFit
  x_pred: float
  y_pred: float
  y_pred_ci: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class ScalingFits:
  """Per-group frontier fits of one results directory."""
  root: str
  x: str
  y: str
  group: tuple[str, ...]
  x_pred: float
  groups: tuple[GroupFit, ...]

  def __getitem__(self, label: str) -> GroupFit:
    for g in self.groups:
      if g.label == label:
        return g
    raise KeyError(f"group {label!r} not found; groups: {[g.label for g in self.groups]}")

  def to_dict(self) -> dict[str, Any]:
    return {"root": self.root, "x": self.x, "y": self.y, "group": list(self.group),
            "x_pred": _num(self.x_pred),
            "fits": [{"label": g.label, "group": dict(zip(self.group, g.key)),
                      "n_runs": len(g.curves), **g.fit.to_dict(),
                      "x_max": _num(float(g.frontier.x[-1])) if len(g.frontier.x) else None,
                      "y_min": _num(float(g.frontier.y[-1])) if len(g.frontier.y) else None,
                      "x_pred": _num(g.x_pred), "y_pred": _num(g.y_pred),
                      "y_pred_ci": [_num(v) for v in g.y_pred_ci]} for g in self.groups]}

  def write_json(self, path: str | os.PathLike) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(self.to_dict(), indent=1))
    return Path(path)

  def format(self) -> str:
    tab = results_lib.Table.from_rows(
        {"group": g.label, "status": g.fit.status, "runs": len(g.curves),
         "points": g.fit.n_points, "alpha": g.fit.alpha,
         "alpha_ci": "[{:.3g}, {:.3g}]".format(*g.fit.alpha_ci), "E": g.fit.E,
         "A": g.fit.A, "y_pred": g.y_pred,
         "y_pred_ci": "[{:.4g}, {:.4g}]".format(*g.y_pred_ci)} for g in self.groups)
    cols = ("group", "status", "runs", "points", "alpha", "alpha_ci", "E", "A", "y_pred",
            "y_pred_ci")
    return tab.format(cols) + f"\n(y_pred: {self.y} at {self.x} = {self.x_pred:.4g})"


def _label(group: Sequence[str], key: tuple[Any, ...]) -> str:
  if len(group) == 1:
    return str(key[0])
  return ",".join(f"{g.rsplit('.', 1)[-1]}={v}" for g, v in zip(group, key))


def fit_dir(root: str | os.PathLike, x: str = "compute/paper_macs", y: str = "eval/loss",
            group: Sequence[str] = ("attention.variant",),
            filter: Callable[[Mapping[str, Any]], bool] | Mapping[str, Any] | None = None, *,
            statuses: Sequence[str] = DEFAULT_STATUSES, x_min: float | None = None,
            best_lr_per: Sequence[str] | None = None, lr_key: str = "train.lr",
            pred_factor: float = 10.0, **fit_kwargs: Any) -> ScalingFits:
  """Read runs, build each group's frontier of (x, y) curves and fit L = E + A x^-alpha.

  x_min drops points below it (e.g. warm-up). best_lr_per=('model.d_model',) first keeps, per
  group and width, only the LR whose run ends lowest (its last y). The prediction is at
  x_pred = pred_factor * the largest x over all groups (one common budget, so groups compare).
  fit_kwargs go to `fit_power_law`.
  """
  group = tuple(group)
  curves = load_curves(root, x, y, filter, statuses)
  if not curves:
    raise FileNotFoundError(f"no runs with status in {tuple(statuses)} and (x, y) points "
                            f"under {str(root)!r}")
  rows = [dict(c.row) for c in curves]
  results_lib.check_fields(rows, group, "group")
  if x_min is not None:
    curves = [Curve(c.run, c.x[c.x >= x_min], c.y[c.x >= x_min], c.row) for c in curves]
    curves = [c for c in curves if len(c.x)]
  if best_lr_per:
    by_run = {c.run: c for c in curves}
    marked = [dict(c.row, **{"curve/last_y": float(c.y[-1])}) for c in curves]
    keep = results_lib.best_lr(marked, (*group, *best_lr_per), "curve/last_y", lr_key,
                               statuses=tuple(statuses))
    curves = [by_run[r["run"]] for r in keep]
  groups: dict[tuple, list[Curve]] = {}
  for c in curves:
    groups.setdefault(tuple(results_lib._hashable(c.row.get(g)) for g in group), []).append(c)
  x_pred = pred_factor * max(float(c.x.max()) for c in curves)
  out = []
  for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
    fr = frontier(groups[key])
    f = fit_power_law(fr.x, fr.y, **fit_kwargs)
    lo, hi = f.predict_ci(x_pred) if f.usable else (math.nan, math.nan)
    out.append(GroupFit(key, _label(group, key), tuple(groups[key]), fr, f, x_pred,
                        float(f.predict(x_pred)) if f.usable else math.nan,
                        (float(lo), float(hi))))
  return ScalingFits(str(root), x, y, group, x_pred, tuple(out))


def fit_nd_dir(root: str | os.PathLike, y: str = "eval/loss", n_key: str = "params/non_embedding",
               d_key: str = "tokens", group: Sequence[str] = ("attention.variant",),
               filter: Callable[[Mapping[str, Any]], bool] | Mapping[str, Any] | None = None, *,
               statuses: Sequence[str] = DEFAULT_STATUSES, **fit_kwargs: Any
               ) -> dict[str, LossNDFit]:
  """Per group, L(N, D) = E + A N^-alpha + B D^-beta over every logged (D, y) point of every
  run, N the run's `n_key` (a results field, e.g. non-embedding parameters) and D the metric
  `d_key` (e.g. tokens seen at that point).  fit_kwargs go to `fit_loss_nd`."""
  group = tuple(group)
  curves = load_curves(root, d_key, y, filter, statuses)
  if not curves:
    raise FileNotFoundError(f"no runs with status in {tuple(statuses)} and ({d_key}, {y}) "
                            f"points under {str(root)!r}")
  results_lib.check_fields([dict(c.row) for c in curves], (*group, n_key), "group / N")
  groups: dict[tuple, list[Curve]] = {}
  for c in curves:
    groups.setdefault(tuple(results_lib._hashable(c.row.get(g)) for g in group), []).append(c)
  out = {}
  for key in sorted(groups, key=lambda k: tuple(str(v) for v in k)):
    cs = groups[key]
    N = np.concatenate([np.full(len(c.x), float(c.row.get(n_key) or math.nan)) for c in cs])
    D = np.concatenate([c.x for c in cs])
    L = np.concatenate([c.y for c in cs])
    out[_label(group, key)] = fit_loss_nd(N, D, L, **fit_kwargs)
  return out
