"""The language-model study's compute-frontier analysis: frontiers at shared compute points,
MLR against its best rival with bootstrap and seed uncertainty, power-law fits, effective
compute multipliers, the learning-rate grid, the plateau check and a verdict.

    from structattn import frontier
    out = frontier.analyze("runs/lm-english", "docs/figures/lm", n_boot=1000, seed=0)
    print(out["report"])                    # markdown; out is JSON-serialisable

    structattn-frontier runs/lm-english --out=docs/figures/lm [--n-boot=1000]

Piece by piece (pure functions on the rows of `results.collect` and `fit.Curve`s):

    rows = frontier.load_rows(root)                 # collect() rows + 'run_dir'
    runs = frontier.main_runs(rows)                 # {variant: [Curve per width]}
    at = frontier.shared_points(runs, n=8)          # (P,) compute points
    cmp = frontier.compare(runs, at, seeds=frontier.seed_spread(rows))
    fits = frontier.fit_frontiers(runs)             # {variant: fit.PowerLawFit}
    mult = frontier.compute_multiplier(runs, at, baseline="mha", target="mlr", fits=fits)
    frontier.verdict(cmp)                           # 'below' | 'above' | 'indistinguishable'

Conventions. The compute axis is ``compute/paper_macs`` (cumulative forward non-embedding MACs,
the convention of the README's FLOP accounting) and the loss is ``eval/loss`` (nats per character) from each run's
metrics.jsonl. A variant's *frontier* is represented by its runs' curves (a mapping variant ->
sequence of `fit.Curve`, here called "frontiers"); its value at compute C is the least loss of
those curves at C, each curve interpolated piecewise-linearly in log10 C and undefined (NaN)
outside its own measured range. Docstrings here write lengths as P shared points, R runs, B
bootstrap replicates, G grid points (a shorthand of this module; its array names carry no
shape suffixes, whose letters mean what the package legend says).

Uncertainty. (a) Bootstrap over runs: each variant's runs are resampled with replacement
(independently per variant) and its frontier is rebuilt, B times from one seeded generator;
intervals are percentile intervals over the replicates where the quantity is defined
(`n_valid` counts them). With few runs per variant this resampling mostly *removes* runs, so
the replicate frontiers lie on or above the full one: the intervals are wide and skewed towards
higher loss, a conservative measure of how much the frontier rests on single runs. (b) Seed
spread: runs of one (variant, width, learning rate, steps) that differ only in ``seed``; the
standard deviation across seeds of the eval loss at matched compute (each seed's curve
interpolated at the first seed's eval points inside the common range), summarised as the root
mean square over the matched points in the second half of the run (compute >= half the common
maximum). A variant without seeds gets the pooled value of those with seeds (flagged
``pooled``). The seed standard error of a difference is sqrt(sd_a^2 + sd_b^2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from structattn import fit as fit_lib
from structattn import results as results_lib

X_KEY = "compute/paper_macs"
Y_KEY = "eval/loss"
VARIANT, WIDTH, LR, STEPS, SEED = ("attention.variant", "model.d_model", "train.lr",
                                   "train.steps", "seed")
FINAL = "final/eval_loss"
VARIANT_ORDER = ("mha", "swa", "gswa", "mlr")
VERDICTS = ("below", "above", "indistinguishable")
FIGURES = ("lm_loss_by_width", "lm_frontiers", "lm_frontier_difference", "lm_multiplier")

Frontiers = Mapping[str, Sequence[fit_lib.Curve]]


# ------------------------------------------------------------------------------ rows and runs

def load_rows(root: str | os.PathLike) -> list[dict[str, Any]]:
  """`results.collect(root)` with each row's absolute run directory as ``run_dir``; runs a
  study set aside because its protocol changed (``<name>.stale-N``) are left out."""
  root = Path(root)
  return [dict(r, run_dir=str((root / r["run"]).resolve())) for r in results_lib.collect(root)
          if ".stale-" not in Path(r["run"]).name]


def _dir(row: Mapping[str, Any], root: str | os.PathLike | None) -> Path:
  if root is not None:
    return Path(root) / row["run"]
  if "run_dir" not in row:
    raise KeyError(f"row {row.get('run')!r} has no 'run_dir': read the rows with "
                   "frontier.load_rows(root) or pass root=")
  return Path(row["run_dir"])


def _num(v: Any) -> float:
  return float(v) if results_lib._is_number(v) else math.nan


def _seed(row: Mapping[str, Any]) -> int:
  v = row.get(SEED)
  return int(v) if results_lib._is_number(v) else 0


def _steps(row: Mapping[str, Any]) -> int:
  v = row.get(STEPS)
  if results_lib._is_number(v):
    return int(v)
  v = row.get("curve/last_step")
  return int(v) if results_lib._is_number(v) else 0


def _variant_key(v: str) -> tuple:
  return (VARIANT_ORDER.index(v) if v in VARIANT_ORDER else len(VARIANT_ORDER), str(v))


def curve(row: Mapping[str, Any], root: str | os.PathLike | None = None, x: str = X_KEY,
          y: str = Y_KEY) -> fit_lib.Curve:
  """One run's (x, y) eval curve (`fit.curve_of`), its row attached."""
  return fit_lib.curve_of(_dir(row, root), x, y, row["run"], row)


def loss_at_step(row: Mapping[str, Any], step: int, root: str | os.PathLike | None = None,
                 y: str = Y_KEY) -> tuple[float, bool]:
  """A run's eval loss at `step`: (value, exact). The final eval loss when `step` is the run's
  last step; else the logged eval row at that step, or the linear interpolation in step between
  the neighbouring eval rows (exact=False); NaN outside the logged range."""
  if step == _steps(row) and math.isfinite(_num(row.get(FINAL))):
    return _num(row.get(FINAL)), True
  pts = sorted((int(m["step"]), float(m[y])) for m in results_lib.read_metrics(_dir(row, root))
               if results_lib._is_number(m.get(y)) and results_lib._is_number(m.get("step"))
               and math.isfinite(float(m[y])))
  for s, v in pts:
    if s == step:
      return v, True
  if len(pts) < 2 or not pts[0][0] <= step <= pts[-1][0]:
    return math.nan, False
  s, v = np.asarray(pts, float).T
  return float(np.interp(step, s, v)), False


def _main_protocol(rows: Iterable[Mapping[str, Any]], statuses: Sequence[str]) -> dict:
  """{(variant, width): [rows]} of seed-0 runs with the needed fields."""
  groups: dict[tuple, list] = {}
  for r in rows:
    if r.get("status") in statuses and _seed(r) == 0 and r.get(VARIANT) is not None \
        and results_lib._is_number(r.get(WIDTH)) and results_lib._is_number(r.get(LR)):
      groups.setdefault((r[VARIANT], int(r[WIDTH])), []).append(r)
  return groups


def equal_token_losses(group: Sequence[Mapping[str, Any]], root: str | os.PathLike | None = None
                       ) -> tuple[int, list[tuple[float, bool]]]:
  """The step at which one (variant, width)'s runs compare (the least ``train.steps`` among
  them) and each run's (eval loss there, exact) (`loss_at_step`)."""
  step = min(_steps(r) for r in group)
  return step, [loss_at_step(r, step, root) for r in group]


def choose_runs(group: Sequence[Mapping[str, Any]], root: str | os.PathLike | None = None
                ) -> tuple[Mapping[str, Any] | None, dict[str, Any]]:
  """The run of one (variant, width) that enters the frontier, and how it was chosen.

  The learning rate is the one with the least eval loss at equal training tokens (the final
  eval loss when every run has the same ``train.steps``; a longer run's eval at the shortest
  run's last step otherwise: the widest width's long run against its short runs); at that rate
  the longest run (most steps) is taken.
  """
  step, losses = equal_token_losses(group, root)
  ok = [(l, r) for (l, _), r in zip(losses, group) if math.isfinite(l)]
  if not ok:
    return None, {"compare_step": step, "lr": None}
  best_loss, best = min(ok, key=lambda t: t[0])
  lr = float(best[LR])
  at_lr = [r for r in group if math.isclose(float(r[LR]), lr, rel_tol=1e-9)]
  chosen = max(at_lr, key=lambda r: (_steps(r), r["run"]))
  return chosen, {"compare_step": step, "lr": lr, "loss_at_compare_step": best_loss,
                  "lrs": sorted({float(r[LR]) for r in group})}


def main_runs(rows: Iterable[Mapping[str, Any]], root: str | os.PathLike | None = None, *,
              statuses: Sequence[str] = ("completed",)) -> dict[str, list[fit_lib.Curve]]:
  """The runs forming each variant's frontier: {variant: [Curve, one per width, ascending]}.

  Per (variant, width), among the seed-0 runs of the main protocol (status in `statuses`):
  the run chosen by `choose_runs` (best learning rate at equal tokens, then the longest run at
  it). Each Curve's row gains ``frontier/compare_step`` and ``frontier/lrs``. Run directories
  are ``root/run`` when root is given, else each row's ``run_dir`` (`load_rows`).
  """
  out: dict[str, list[fit_lib.Curve]] = {}
  for (variant, width), group in sorted(_main_protocol(rows, statuses).items(),
                                        key=lambda kv: (_variant_key(kv[0][0]), kv[0][1])):
    chosen, how = choose_runs(group, root)
    if chosen is None:
      continue
    c = curve(chosen, root)
    if len(c.x):
      row = dict(c.row, **{"frontier/compare_step": how["compare_step"],
                           "frontier/lrs": how["lrs"]})
      out.setdefault(variant, []).append(fit_lib.Curve(c.run, c.x, c.y, row))
  return out


# ------------------------------------------------------------------------------ frontiers

@dataclasses.dataclass(frozen=True)
class Envelope:
  """A frontier evaluated at x (G,): loss y (G,), NaN where no run covers x; run (G,) names the
  run attaining it (None where NaN)."""
  x: np.ndarray
  y: np.ndarray
  run: tuple[str | None, ...]


def interp_log(c: fit_lib.Curve, at: Any) -> np.ndarray:
  """One curve at `at`: piecewise-linear in log10 x, NaN outside [x[0], x[-1]]."""
  at = np.asarray(at, float)
  if not len(c.x):
    return np.full(at.shape, np.nan)
  with np.errstate(divide="ignore", invalid="ignore"):
    la = np.log10(at)
  return np.interp(la, np.log10(c.x), c.y, left=np.nan, right=np.nan)


def best_so_far(c: fit_lib.Curve, at: Any) -> np.ndarray:
  """The least loss a run reached with at most `at` compute: its curve (`interp_log`) where
  that is lower than every earlier measured point, else the least earlier point, held past the
  run's last point; NaN before its first point."""
  at = np.asarray(at, float)
  if not len(c.x):
    return np.full(at.shape, np.nan)
  j = np.searchsorted(c.x, at, side="right") - 1
  prior = np.where(j >= 0, np.minimum.accumulate(c.y)[np.clip(j, 0, None)], np.nan)
  return np.fmin(interp_log(c, at), prior)


def run_matrix(curves: Sequence[fit_lib.Curve], at: Any, pareto: bool = True) -> np.ndarray:
  """(R, G): each curve at `at`: its least loss at compute <= each point (`best_so_far`,
  what a frontier is made of), or with pareto=False the curve itself (`interp_log`, NaN
  outside its range)."""
  at = np.asarray(at, float).ravel()
  if not curves:
    return np.zeros((0, at.size))
  one = best_so_far if pareto else interp_log
  return np.stack([one(c, at) for c in curves])


def _envelope(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Least finite value per column and its row (-1 and NaN where none)."""
  if matrix.shape[0] == 0:
    return np.full(matrix.shape[1], np.nan), np.full(matrix.shape[1], -1)
  F = np.where(np.isfinite(matrix), matrix, np.inf)
  i = np.argmin(F, axis=0)
  y = F[i, np.arange(F.shape[1])]
  ok = np.isfinite(y)
  return np.where(ok, y, np.nan), np.where(ok, i, -1)


def frontier_curve(curves: Sequence[fit_lib.Curve], at: Any = None, n: int = 200) -> Envelope:
  """A variant's compute frontier at `at` (G,): the least loss any of its runs reached with at
  most that compute.

  Each curve is interpolated piecewise-linearly in log10 compute and, past a point it has
  already beaten or past its last point, held at its best so far (`best_so_far`), so the
  frontier never rises where a smaller run ends and only larger, younger runs are left at that
  compute; NaN below every run's first point. Without `at`, n log-spaced points over the union
  of the curves' ranges.
  """
  curves = list(curves)
  if at is None:
    lo, hi = coverage(curves)
    at = np.geomspace(lo, hi, n) if math.isfinite(lo) else np.zeros(0)
  at = np.asarray(at, float).ravel()
  y, i = _envelope(run_matrix(curves, at))
  return Envelope(at, y, tuple(curves[k].run if k >= 0 else None for k in i))


def coverage(curves: Sequence[fit_lib.Curve]) -> tuple[float, float]:
  """(least, largest) compute any of the curves reaches (NaN, NaN when empty)."""
  xs = [c.x for c in curves if len(c.x)]
  if not xs:
    return math.nan, math.nan
  return float(min(x[0] for x in xs)), float(max(x[-1] for x in xs))


def shared_points(frontiers: Frontiers, n: int = 8, inset: float = 1e-6) -> np.ndarray:
  """(n,) log-spaced compute points inside the range every variant's frontier covers.

  The range is [max of the variants' least compute, min of their largest], pulled in by a
  relative `inset` so floating-point round-off cannot put an end point outside a curve. Points
  falling in a hole of some frontier (no run covering them) are dropped, so fewer than n may
  come back. Raises ValueError when the ranges do not overlap or n < 2.
  """
  if n < 2:
    raise ValueError(f"n={n} is invalid: need at least 2 points")
  ranges = {v: coverage(cs) for v, cs in frontiers.items()}
  lo = max(r[0] for r in ranges.values())
  hi = min(r[1] for r in ranges.values())
  if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
    raise ValueError(f"the variants' compute ranges do not overlap: {ranges}")
  at = np.geomspace(lo * (1 + inset), hi * (1 - inset), n)
  ok = np.ones(n, bool)
  for cs in frontiers.values():
    ok &= np.isfinite(frontier_curve(cs, at).y)
  return at[ok]


# ------------------------------------------------------------------------------ bootstrap

def _boot_envelopes(matrix: np.ndarray, idx: np.ndarray) -> np.ndarray:
  """(B, G): the envelope of each replicate's resampled rows."""
  if matrix.shape[0] == 0:
    return np.full((idx.shape[0], matrix.shape[1]), np.nan)
  F = np.where(np.isfinite(matrix), matrix, np.inf)
  y = F[idx].min(axis=1)
  return np.where(np.isfinite(y), y, np.nan)


def _boot_indices(frontiers: Frontiers, n_boot: int, seed: int) -> dict[str, np.ndarray]:
  """{variant: (B, R_v)} resampling indices, variants in sorted order from one generator."""
  rng = np.random.default_rng(seed)
  return {v: rng.integers(0, len(frontiers[v]), (n_boot, len(frontiers[v])))
          for v in sorted(frontiers)}


def _pct(samples: np.ndarray, ci: float) -> tuple[float, float, int]:
  """Percentile interval over the finite samples (actual sample values: inf allowed)."""
  s = np.asarray(samples, float)
  s = s[~np.isnan(s)]
  if s.size < 2:
    return math.nan, math.nan, int(s.size)
  lo = float(np.quantile(s, (1 - ci) / 2, method="lower"))
  hi = float(np.quantile(s, (1 + ci) / 2, method="higher"))
  return lo, hi, int(s.size)


def frontier_bands(frontiers: Frontiers, at: Any = None, n_boot: int = 1000, seed: int = 0,
                   ci: float = 0.95, n: int = 200) -> dict[str, dict[str, np.ndarray]]:
  """Per variant: its frontier on `at` (or n points over its own range) with the bootstrap
  percentile band: {variant: {'x', 'y', 'lo', 'hi'}} (arrays of G)."""
  idx = _boot_indices(frontiers, n_boot, seed)
  out = {}
  for v in sorted(frontiers, key=_variant_key):
    cs = list(frontiers[v])
    env = frontier_curve(cs, at, n)
    boot = _boot_envelopes(run_matrix(cs, env.x), idx[v])
    lo, hi = np.full(env.x.size, np.nan), np.full(env.x.size, np.nan)
    for g in range(env.x.size):
      lo[g], hi[g], _ = _pct(boot[:, g], ci)
    out[v] = {"x": env.x, "y": env.y, "lo": lo, "hi": hi}
  return out


# ------------------------------------------------------------------------------ seed spread

def seed_spread(rows: Iterable[Mapping[str, Any]], root: str | os.PathLike | None = None, *,
                statuses: Sequence[str] = ("completed",)) -> dict[str, dict[str, Any]]:
  """Seed-to-seed standard deviation of the eval loss at matched compute, per variant.

  Groups are runs of equal (variant, width, lr, steps) with two or more distinct seeds. Per
  group: each seed's curve at the first seed's eval points inside the common range; sd across
  seeds (ddof=1) per point; the summary sd is the root mean square over the points at compute
  >= half the common maximum. A variant's sd pools its groups (root mean square); ``sd_ci`` is
  its 95% chi-square interval with df = the number of seeds less one, summed over groups (with
  three seeds the sd is known to within a factor of about 0.5 to 6). Returns {variant: {'sd',
  'sd_ci', 'df', 'n_groups', 'groups': [{'width', 'lr', 'steps', 'seeds', 'runs', 'x',
  'sd_curve', 'sd'}]}} for variants that have seeds.
  """
  groups: dict[tuple, list] = {}
  for r in rows:
    if r.get("status") in statuses and r.get(VARIANT) is not None:
      key = (r[VARIANT], r.get(WIDTH), _num(r.get(LR)), _steps(r))
      groups.setdefault(key, []).append(r)
  out: dict[str, dict[str, Any]] = {}
  for (variant, width, lr, steps), rs in sorted(groups.items(),
                                                key=lambda kv: (_variant_key(kv[0][0]),
                                                                str(kv[0][1:]))):
    by_seed = {}
    for r in sorted(rs, key=lambda r: (_seed(r), r["run"])):
      by_seed.setdefault(_seed(r), r)
    if len(by_seed) < 2:
      continue
    cs = [curve(r, root) for r in by_seed.values()]
    cs = [c for c in cs if len(c.x)]
    if len(cs) < 2:
      continue
    lo, hi = max(c.x[0] for c in cs), min(c.x[-1] for c in cs)
    x = cs[0].x[(cs[0].x >= lo) & (cs[0].x <= hi)]
    if x.size == 0:
      continue
    Y = run_matrix(cs, x, pareto=False)
    sd_x = np.std(Y, axis=0, ddof=1)
    late = x >= 0.5 * x[-1]
    sd = float(np.sqrt(np.nanmean(sd_x[late] ** 2)))
    g = {"width": width, "lr": lr, "steps": steps, "seeds": sorted(by_seed),
         "runs": [c.run for c in cs], "x": x, "sd_curve": sd_x, "sd": sd}
    out.setdefault(variant, {"groups": []})["groups"].append(g)
  from scipy import stats
  for v, d in out.items():
    d["sd"] = float(np.sqrt(np.mean([g["sd"] ** 2 for g in d["groups"]])))
    d["n_groups"] = len(d["groups"])
    # the points of one run are strongly correlated: count a group's seeds, not its points
    df = sum(len(g["seeds"]) - 1 for g in d["groups"])
    d["df"] = df
    d["sd_ci"] = (d["sd"] * math.sqrt(df / stats.chi2.ppf(0.975, df)),
                  d["sd"] * math.sqrt(df / stats.chi2.ppf(0.025, df)))
  return out


def seed_sds(seeds: Mapping[str, Mapping[str, Any]] | None, variants: Iterable[str]
             ) -> dict[str, dict[str, Any]]:
  """{variant: {'sd', 'pooled'}}: a variant's own seed sd, else the pooled (root mean square)
  sd of the variants with seeds (pooled=True), else NaN."""
  seeds = dict(seeds or {})
  own = {v: float(d["sd"]) for v, d in seeds.items() if math.isfinite(float(d["sd"]))}
  pooled = float(np.sqrt(np.mean([s**2 for s in own.values()]))) if own else math.nan
  return {v: {"sd": own[v], "pooled": False} if v in own else {"sd": pooled, "pooled": True}
          for v in variants}


# ------------------------------------------------------------------------------ comparison

def compare(frontiers: Frontiers, at: Any, *, target: str = "mlr",
            seeds: Mapping[str, Mapping[str, Any]] | None = None, n_boot: int = 1000,
            seed: int = 0, ci: float = 0.95, z: float = 1.96) -> dict[str, Any]:
  """Each variant's frontier loss at `at` (P,) and `target` minus its rivals, with intervals.

  Returns a dict (lists of length P):
    at, target, variants, n_boot, ci
    loss {v: [P]}, loss_ci {v: [[lo, hi]] * P}, owner {v: [run]}
    best_rival [name] (least frontier loss among the other variants), diff [P] (target minus
      it), diff_ci (bootstrap interval of that difference), se_seed [P] (its seed standard
      error), diff_n_valid [P]
    total_ci [P]: the bootstrap interval widened by the seed spread, each half-width combined
      in quadrature with z * se_seed (both sources treated as independent; NaN without seeds)
    rivals {r: {'diff', 'diff_ci', 'total_ci', 'n_valid', 'p_below' (share of replicates
      with the difference < 0), 'se_seed', 'seed_pooled'}} for every other variant
    seed_sd {v: {'sd', 'pooled'}} (`seed_sds` of `seeds`, the output of `seed_spread`)
  The bootstrap resamples each variant's runs (see the module docstring); a replicate in which
  a variant does not cover a point counts as undefined there. It keeps each run's curve as
  measured, so the eval noise of the points and run-to-run variation are not in `diff_ci`:
  they are what the seed spread measures (`se_seed`, `total_ci`).
  """
  if target not in frontiers:
    raise KeyError(f"target {target!r} is not among the variants {sorted(frontiers)}")
  at = np.asarray(at, float).ravel()
  variants = sorted(frontiers, key=_variant_key)
  rivals = [v for v in variants if v != target]
  if not rivals:
    raise ValueError("compare needs at least one variant besides the target")
  idx = _boot_indices(frontiers, n_boot, seed)
  loss, owner, boot = {}, {}, {}
  for v in variants:
    env = frontier_curve(frontiers[v], at)
    loss[v], owner[v] = env.y, list(env.run)
    boot[v] = _boot_envelopes(run_matrix(list(frontiers[v]), at), idx[v])
  sds = seed_sds(seeds, variants)
  out_rivals = {}
  for r in rivals:
    diff_boot = boot[target] - boot[r]
    cis = [_pct(diff_boot[:, p], ci) for p in range(at.size)]
    with np.errstate(invalid="ignore"):
      p_below = [float(np.mean(diff_boot[np.isfinite(diff_boot[:, p]), p] < 0))
                 if np.isfinite(diff_boot[:, p]).any() else math.nan for p in range(at.size)]
    se = math.sqrt(sds[target]["sd"] ** 2 + sds[r]["sd"] ** 2)
    diff = loss[target] - loss[r]
    total = [(d - math.hypot(d - c[0], z * se), d + math.hypot(c[1] - d, z * se))
             for d, c in zip(diff, cis)]
    out_rivals[r] = {"diff": diff, "diff_ci": [c[:2] for c in cis], "total_ci": total,
                     "n_valid": [c[2] for c in cis], "p_below": p_below, "se_seed": se,
                     "seed_pooled": sds[target]["pooled"] or sds[r]["pooled"]}
  R = np.stack([loss[r] for r in rivals])
  best_i = np.argmin(np.where(np.isfinite(R), R, np.inf), axis=0)
  best = [rivals[i] if np.isfinite(R[i, p]) else None for p, i in enumerate(best_i)]
  none = (math.nan, math.nan)
  return {
      "at": at, "target": target, "variants": variants, "n_boot": int(n_boot), "ci": ci,
      "loss": loss, "owner": owner,
      "loss_ci": {v: [_pct(boot[v][:, p], ci)[:2] for p in range(at.size)] for v in variants},
      "best_rival": best,
      "diff": np.array([out_rivals[b]["diff"][p] if b else math.nan
                        for p, b in enumerate(best)]),
      "diff_ci": [out_rivals[b]["diff_ci"][p] if b else none for p, b in enumerate(best)],
      "diff_n_valid": [out_rivals[b]["n_valid"][p] if b else 0 for p, b in enumerate(best)],
      "total_ci": [out_rivals[b]["total_ci"][p] if b else none for p, b in enumerate(best)],
      "se_seed": np.array([out_rivals[b]["se_seed"] if b else math.nan for b in best]),
      "rivals": out_rivals, "seed_sd": sds,
  }


def compare_pairs(frontiers: Frontiers, *, target: str = "mlr",
                  seeds: Mapping[str, Mapping[str, Any]] | None = None, n_points: int = 8,
                  n_boot: int = 1000, seed: int = 0) -> dict[str, dict[str, Any]]:
  """The target against each rival alone, at `n_points` points of the compute range the two
  cover (wider than the range every variant covers when some variant has no run at the widest
  width): {rival: {'compare': `compare` of the pair, 'verdict': its `verdict`}}."""
  out = {}
  for r in sorted(frontiers, key=_variant_key):
    if r == target:
      continue
    pair = {target: frontiers[target], r: frontiers[r]}
    try:
      at = shared_points(pair, n_points)
    except ValueError:
      continue
    cmp = compare(pair, at, target=target, seeds=seeds, n_boot=n_boot, seed=seed)
    out[r] = {"compare": cmp, "verdict": verdict(cmp)}
  return out


def verdict(comparison: Mapping[str, Any], use_seed: bool = True, z: float = 1.96
            ) -> dict[str, Any]:
  """Does the target's frontier lie below each rival's at each shared point?

  Per point and rival: 'below' when the bootstrap interval of target minus rival lies below 0
  (and, with `use_seed` and a finite seed standard error se, diff + z se < 0 too), 'above' when
  it lies above 0 (diff - z se > 0), else 'indistinguishable'. A point without any measure of
  uncertainty (no seed standard error and a bootstrap interval of one value, i.e. a single run
  covers it in every replicate) is 'indistinguishable' too and counted in 'no_uncertainty'.
  Works on a `compare` result before or after `jsonable`. Returns {'per_rival': {r: [verdict]
  * P}, 'counts': {r: {verdict: n, 'no_uncertainty': n}}, 'text': a one-paragraph summary}.
  """
  at = np.asarray(comparison["at"], float)
  per, counts, lines = {}, {}, []
  target = comparison["target"]
  for r, d in comparison["rivals"].items():
    se = _num(d["se_seed"]) if use_seed else math.nan
    vs, blind = [], 0
    for p in range(at.size):
      lo, hi = (_num(v) for v in d["diff_ci"][p])
      diff = _num(d["diff"][p])
      if not (math.isfinite(lo) and math.isfinite(hi) and math.isfinite(diff)):
        vs.append("indistinguishable")
        continue
      if not math.isfinite(se):  # only the bootstrap interval decides
        if hi <= lo:
          vs.append("indistinguishable")
          blind += 1
          continue
        seed_lo, seed_hi = math.inf, -math.inf
      else:
        seed_lo, seed_hi = diff - z * se, diff + z * se
      if hi < 0 and seed_hi < 0:
        vs.append("below")
      elif lo > 0 and seed_lo > 0:
        vs.append("above")
      else:
        vs.append("indistinguishable")
    per[r] = vs
    counts[r] = {**{k: vs.count(k) for k in VERDICTS}, "no_uncertainty": blind}
    where = _ranges(at, vs, "below")
    lines.append(f"{target} is below {r} at {counts[r]['below']}/{at.size} shared points"
                 + (f" ({where})" if where else "") +
                 f", above at {counts[r]['above']}, indistinguishable at "
                 f"{counts[r]['indistinguishable']}" +
                 (f" ({blind} without any uncertainty estimate: one run and no seeds)"
                  if blind else ""))
  return {"per_rival": per, "counts": counts, "text": "; ".join(lines) + "."}


def _ranges(at: np.ndarray, vs: Sequence[str], which: str) -> str:
  """'C 1.2e13-4.5e14, 2e15' for the runs of consecutive points with verdict `which`."""
  out, start = [], None
  for p, v in enumerate(list(vs) + [None]):
    if v == which and start is None:
      start = p
    elif v != which and start is not None:
      out.append(f"{at[start]:.2g}" if start == p - 1 else f"{at[start]:.2g}-{at[p - 1]:.2g}")
      start = None
  return ("C " + ", ".join(out)) if out else ""


# ------------------------------------------------------------------------------ fits

def frontier_points(curves: Sequence[fit_lib.Curve]) -> fit_lib.Frontier:
  """The measured eval points on a variant's frontier; what the power law is fitted to.

  A point is kept when no other run's curve is lower at its compute (it lies on the
  interpolated envelope of `frontier_curve`) and it is below every kept point at smaller
  compute (`fit.frontier`'s staircase). The first condition drops a small model's saturating
  points that the staircase alone keeps although a larger model is already lower there.
  """
  curves = [c for c in curves if len(c.x)]
  if not curves:
    return fit_lib.frontier([])
  on = []
  for c in curves:
    env = frontier_curve(curves, c.x).y
    keep = c.y <= env + 1e-12 * np.abs(env)
    on.append(fit_lib.Curve(c.run, c.x[keep], c.y[keep], c.row))
  return fit_lib.frontier(on)


def fit_frontiers(frontiers: Frontiers, n_boot: int = 1000, seed: int = 0,
                  x_min: float | None = None, **fit_kwargs: Any
                  ) -> dict[str, fit_lib.PowerLawFit]:
  """L(C) = E + A C^-alpha per variant on its frontier points (`frontier_points`;
  `fit.fit_power_law`: bootstrap over points, 95% percentile intervals in ``E_ci``, ``A_ci``,
  ``alpha_ci``). `x_min` drops frontier points below that compute (e.g. the first evals of
  the smallest model, still near the plateau); fit_kwargs go to `fit.fit_power_law`."""
  out = {}
  for v in sorted(frontiers, key=_variant_key):
    fr = frontier_points(frontiers[v])
    keep = fr.x >= x_min if x_min is not None else np.ones(fr.x.shape, bool)
    out[v] = fit_lib.fit_power_law(fr.x[keep], fr.y[keep], n_boot=n_boot, seed=seed,
                                   **fit_kwargs)
  return out


# ------------------------------------------------------------------------------ multiplier

def _monotone(matrix: np.ndarray, grid: np.ndarray, rows: Sequence[int]
              ) -> tuple[np.ndarray, np.ndarray]:
  """(log10 grid, non-increasing frontier) of the given runs on the grid, holes dropped."""
  y, _ = _envelope(matrix[list(rows)])
  ok = np.isfinite(y)
  return np.log10(grid[ok]), np.minimum.accumulate(y[ok]) if ok.any() else y[ok]


def _invert(lg: np.ndarray, mono: np.ndarray, L: np.ndarray, f: fit_lib.PowerLawFit | None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Compute (P,) at which the monotone frontier reaches losses L (P,), whether each was
  extrapolated with the fit `f`, and whether the fit never reaches it (L <= E: infinite)."""
  C = np.full(L.shape, np.nan)
  ext = np.zeros(L.shape, bool)
  unreach = np.zeros(L.shape, bool)
  for p, l in enumerate(L):
    if not math.isfinite(l):
      continue
    if mono.size and mono[-1] <= l <= mono[0]:
      j = int(np.argmax(mono <= l))
      if j == 0:
        C[p] = 10 ** lg[0]
      else:
        t = (mono[j - 1] - l) / (mono[j - 1] - mono[j])
        C[p] = 10 ** (lg[j - 1] + t * (lg[j] - lg[j - 1]))
      continue
    ext[p] = True
    if f is None or not f.usable:
      continue
    if l <= f.E:
      C[p], unreach[p] = math.inf, True
    else:
      C[p] = f.x_ref * ((l - f.E) / f.A_ref) ** (-1.0 / f.alpha)
  return C, ext, unreach


def compute_multiplier(frontiers: Frontiers, at: Any, baseline: str = "mha",
                       target: str = "mlr", *, fits: Mapping[str, fit_lib.PowerLawFit] | None
                       = None, n_boot: int = 1000, seed: int = 0, ci: float = 0.95,
                       grid_n: int = 512, fit_x_min: float | None = None) -> dict[str, Any]:
  """Effective compute multiplier of `target` over `baseline` at each point C of `at` (P,).

  C' is the compute at which the baseline's frontier (made non-increasing by a running minimum,
  inverted piecewise-linearly in log10 C on a grid of `grid_n` points plus every measured x)
  reaches the target's frontier loss L_target(C); outside the baseline's measured losses C'
  comes from its power-law fit (``fits[baseline]``, else fitted here to the frontier points at
  compute >= `fit_x_min`), flagged
  ``extrapolated`` (``unreachable`` when L_target <= the fit's E: C' is infinite). The
  multiplier is C'/C: how much more compute the baseline needs to reach the target's loss.
  Bootstrap: both variants' runs resampled (the fit refitted, without its own bootstrap, for
  each distinct set of baseline runs that needs extrapolating); percentile intervals over the
  replicates where it is defined. Returns a dict of lists of length P: at, loss_target,
  c_baseline, multiplier, ci, n_valid, extrapolated, unreachable, boot_extrapolated (share of
  replicates extrapolating), and baseline, target, n_boot.
  """
  for v in (baseline, target):
    if v not in frontiers:
      raise KeyError(f"variant {v!r} is not among {sorted(frontiers)}")
  at = np.asarray(at, float).ravel()
  cb, ct = list(frontiers[baseline]), list(frontiers[target])
  lo, hi = coverage(cb)
  grid = np.unique(np.concatenate([np.geomspace(lo, hi, grid_n), *[c.x for c in cb]]))
  Mb = run_matrix(cb, grid)
  f_full = (fits or {}).get(baseline) or _quick_fit(cb, fit_x_min)
  L_t = frontier_curve(ct, at).y
  lg, mono = _monotone(Mb, grid, range(len(cb)))
  C, ext, unreach = _invert(lg, mono, L_t, f_full)
  mult = C / at

  idx = _boot_indices({baseline: cb, target: ct}, n_boot, seed)
  boot_Lt = _boot_envelopes(run_matrix(ct, at), idx[target])
  cache: dict[frozenset, tuple] = {}
  boot_m = np.full((n_boot, at.size), np.nan)
  boot_ext = np.zeros((n_boot, at.size), bool)
  for b in range(n_boot):
    key = frozenset(idx[baseline][b].tolist())
    if key not in cache:
      cache[key] = (*_monotone(Mb, grid, sorted(key)), f_full if len(key) == len(cb) else None)
    lg_b, mono_b, f_b = cache[key]
    need = np.isfinite(boot_Lt[b]) & ~_inside(mono_b, boot_Lt[b])
    if need.any() and f_b is None:
      f_b = _quick_fit([cb[i] for i in sorted(key)], fit_x_min)
      cache[key] = (lg_b, mono_b, f_b)
    Cb, eb, _ = _invert(lg_b, mono_b, boot_Lt[b], f_b)
    boot_m[b], boot_ext[b] = Cb / at, eb & np.isfinite(boot_Lt[b])
  cis = [_pct(boot_m[:, p], ci) for p in range(at.size)]
  return {"baseline": baseline, "target": target, "at": at, "loss_target": L_t,
          "c_baseline": C, "multiplier": mult, "ci": [c[:2] for c in cis],
          "n_valid": [c[2] for c in cis], "extrapolated": ext, "unreachable": unreach,
          "boot_extrapolated": boot_ext.mean(axis=0), "n_boot": int(n_boot)}


def _inside(mono: np.ndarray, L: np.ndarray) -> np.ndarray:
  """Whether each loss lies within the monotone frontier's measured losses."""
  if not mono.size:
    return np.zeros(L.shape, bool)
  with np.errstate(invalid="ignore"):
    return (L >= mono[-1]) & (L <= mono[0])


def _quick_fit(curves: Sequence[fit_lib.Curve], x_min: float | None) -> fit_lib.PowerLawFit:
  """The power law of some runs' frontier points, without a bootstrap."""
  return fit_frontiers({"_": curves}, n_boot=0, x_min=x_min)["_"]


# ------------------------------------------------------------------------------ plateau

def unigram_entropy(text_or_counts: str | Mapping[Any, int] | Iterable[int]) -> float:
  """Entropy in nats of a character distribution: from a text, or from counts (a mapping
  symbol -> count or a sequence of counts). The loss of a model that has learnt only
  character frequencies; the initial plateau of a character-level LM sits near it."""
  if isinstance(text_or_counts, str):
    counts = np.array(list(Counter(text_or_counts).values()), float)
  elif isinstance(text_or_counts, Mapping):
    counts = np.array(list(text_or_counts.values()), float)
  else:
    counts = np.array(list(text_or_counts), float)
  counts = counts[counts > 0]
  if counts.size == 0:
    raise ValueError("unigram_entropy: no characters")
  p = counts / counts.sum()
  return float(-(p * np.log(p)).sum())


def corpus_unigram_entropy(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> float:
  """`unigram_entropy` of the bytes of text files (``*.txt``, or ``*.txt.xz`` read through
  lzma): a file, a list of files, or a directory (its ``*.txt`` and ``*.txt.xz``). Counts
  bytes, which for the char96 corpora are the characters. The English study corpus
  (../shared/data/text, 151.0M characters) gives 3.299 nats."""
  import lzma
  if isinstance(paths, (str, os.PathLike)) and Path(paths).is_dir():
    d = Path(paths)
    files = sorted([*d.glob("*.txt"), *d.glob("*.txt.xz")])
  elif isinstance(paths, (str, os.PathLike)):
    files = [Path(paths)]
  else:
    files = [Path(p) for p in paths]
  if not files:
    raise FileNotFoundError(f"no *.txt or *.txt.xz files in {str(paths)!r}")
  counts = np.zeros(256, np.int64)
  for f in files:
    with (lzma.open(f, "rb") if f.suffix == ".xz" else open(f, "rb")) as fh:
      while chunk := fh.read(1 << 24):
        counts += np.bincount(np.frombuffer(chunk, np.uint8), minlength=256)
  return unigram_entropy(counts.tolist())


def plateau_check(rows: Iterable[Mapping[str, Any]], fraction: float = 0.1,
                  unigram_entropy: float | None = None, root: str | os.PathLike | None = None,
                  *, margin: float = 0.3, fallback_drop: float = 0.5,
                  statuses: Sequence[str] = ("completed", "running", "failed"),
                  plateau_loss: float | None = None) -> list[dict[str, Any]]:
  """Has each run left its initial plateau by `fraction` of its steps?

  Per run (status in `statuses`, with logged train losses): the ``train/loss`` at the logged
  step nearest to fraction * ``train.steps``, and ``left_plateau`` = that loss is below the
  threshold ``unigram_entropy - margin`` nats. Without `unigram_entropy` the threshold falls
  back to the run's first logged train loss minus `fallback_drop` (``threshold_from`` says
  which): that only detects a run that never leaves its initial (near-uniform) loss, not one
  stuck at the unigram plateau, so pass the corpus's unigram entropy (`unigram_entropy`) when
  known. `plateau_loss`, when given, replaces it: the loss of a model that predicts from the
  current character alone (the corpus's bigram conditional entropy), where a character model
  waits until attention forms. Returns one dict per run: run, variant, width, lr, steps, seed,
  status, step_checked, train_loss, threshold, threshold_from, left_plateau.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction={fraction!r} is invalid: need 0 < fraction <= 1")
  out = []
  for r in rows:
    if r.get("status") not in statuses:
      continue
    pts = [(int(m["step"]), float(m["train/loss"])) for m in
           results_lib.read_metrics(_dir(r, root))
           if results_lib._is_number(m.get("step")) and results_lib._is_number(
               m.get("train/loss"))]
    if not pts:
      continue
    pts.sort()
    steps = _steps(r) or pts[-1][0]
    want = fraction * steps
    step, loss = min(pts, key=lambda t: (abs(t[0] - want), t[0]))
    if plateau_loss is not None:
      thr, src = float(plateau_loss) - margin, f"plateau_loss - {margin:g}"
    elif unigram_entropy is not None:
      thr, src = float(unigram_entropy) - margin, f"unigram_entropy - {margin:g}"
    else:
      thr, src = pts[0][1] - fallback_drop, f"first logged train loss - {fallback_drop:g}"
    out.append({"run": r["run"], "variant": r.get(VARIANT), "width": r.get(WIDTH),
                "lr": r.get(LR), "steps": steps, "seed": _seed(r), "status": r.get("status"),
                "step_checked": step, "train_loss": loss, "threshold": thr,
                "threshold_from": src,
                "left_plateau": bool(math.isfinite(loss) and loss < thr)})
  return out


# ------------------------------------------------------------------------------ LR grid

def lr_grid(rows: Iterable[Mapping[str, Any]], root: str | os.PathLike | None = None, *,
            statuses: Sequence[str] = ("completed",)) -> dict[str, Any]:
  """The learning-rate grid: eval loss per (variant, width) and lr, at equal tokens.

  Per (variant, width) of the seed-0 runs: every run's eval loss at the compare step (the least
  ``train.steps`` there: a longer run is read at the short runs' last step, `loss_at_step`);
  when two runs share an lr, the one with the fewest steps (the exact one) is shown. Returns
  {'lrs': [all lrs], 'cells': [{'variant', 'width', 'compare_step', 'losses': {lr: loss},
  'exact': {lr: bool}, 'best_lr', 'at_edge'}], 'transfer': {variant: {'smallest', 'largest',
  'best_smallest', 'best_largest', 'agree' (None when either width has < 2 lrs)}}}.
  """
  cells = []
  for (variant, width), group in sorted(_main_protocol(rows, statuses).items(),
                                        key=lambda kv: (_variant_key(kv[0][0]), kv[0][1])):
    step, losses = equal_token_losses(group, root)
    by_lr: dict[float, tuple] = {}
    for r, (l, exact) in sorted(zip(group, losses), key=lambda t: -_steps(t[0])):
      by_lr[float(r[LR])] = (l, exact)
    finite = {lr: v for lr, v in by_lr.items() if math.isfinite(v[0])}
    best = min(finite, key=lambda lr: finite[lr][0]) if finite else None
    lrs = sorted(by_lr)
    cells.append({"variant": variant, "width": width, "compare_step": step,
                  "losses": {lr: by_lr[lr][0] for lr in lrs},
                  "exact": {lr: by_lr[lr][1] for lr in lrs}, "best_lr": best,
                  "at_edge": len(lrs) > 1 and best in (lrs[0], lrs[-1])})
  transfer = {}
  for v in sorted({c["variant"] for c in cells}, key=_variant_key):
    cs = [c for c in cells if c["variant"] == v]
    small, large = cs[0], cs[-1]
    tested = (len(small["losses"]) > 1 and len(large["losses"]) > 1 and small is not large
              and small["best_lr"] is not None and large["best_lr"] is not None)
    transfer[v] = {"smallest": small["width"], "largest": large["width"],
                   "best_smallest": small["best_lr"], "best_largest": large["best_lr"],
                   "agree": (small["best_lr"] == large["best_lr"]) if tested else None}
  return {"lrs": sorted({lr for c in cells for lr in c["losses"]}), "cells": cells,
          "transfer": transfer}


def lr_grid_table(rows: Iterable[Mapping[str, Any]] | Mapping[str, Any],
                  root: str | os.PathLike | None = None) -> str:
  """Markdown: final eval loss by (variant, width) x learning rate (the best in bold, '~' where
  a long run's loss at the compare step was interpolated between evals, '(edge)' where the best
  sits on the grid's edge), then one line per variant on whether the best rate at the smallest
  and the largest width agree (muP transfer). Accepts rows or an `lr_grid` result."""
  g = rows if isinstance(rows, Mapping) and "cells" in rows else lr_grid(rows, root)
  lrs = g["lrs"]
  lines = ["| variant | width | step | " + " | ".join(f"lr {lr:.3g}" for lr in lrs) + " |",
           "|---|---:|---:|" + "---:|" * len(lrs)]
  for c in g["cells"]:
    cell = []
    for lr in lrs:
      if lr not in c["losses"] or not math.isfinite(c["losses"][lr]):
        cell.append("" if lr not in c["losses"] else "nan")
        continue
      s = ("" if c["exact"][lr] else "~") + f"{c['losses'][lr]:.4f}"
      cell.append(f"**{s}**" + (" (edge)" if c["at_edge"] else "") if lr == c["best_lr"]
                  else s)
    lines.append(f"| {c['variant']} | {c['width']} | {c['compare_step']} | "
                 + " | ".join(cell) + " |")
  lines.append("")
  for v, t in g["transfer"].items():
    if t["agree"] is None:
      why = (f"only width {t['smallest']} has runs" if t["smallest"] == t["largest"] else
             f"fewer than two finished learning rates at width {t['smallest']} or "
             f"{t['largest']}")
      lines.append(f"- {v}: muP transfer not tested ({why}).")
    else:
      lines.append(f"- {v}: best lr {t['best_smallest']:.3g} at width {t['smallest']}, "
                   f"{t['best_largest']:.3g} at width {t['largest']}: "
                   + ("agree (the rate transfers)." if t["agree"] else "**disagree**."))
  return "\n".join(lines)


# ------------------------------------------------------------------------------ JSON

def jsonable(obj: Any) -> Any:
  """numpy arrays and scalars to lists and numbers, NaN/inf to None, tuples to lists, fits to
  their dicts, mapping keys to strings."""
  if isinstance(obj, fit_lib.PowerLawFit):
    return obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return jsonable(obj.tolist())
  if isinstance(obj, (np.bool_, bool)):
    return bool(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


# ------------------------------------------------------------------------------ figures

def _finite_values(values: Iterable[Any]) -> np.ndarray:
  v = np.concatenate([np.asarray(a, float).ravel() for a in values] or [np.zeros(0)])
  return v[np.isfinite(v)]


def _ylim(ax, values: Iterable[np.ndarray], pad: float = 0.04, *,
          extra: Iterable[np.ndarray] = (), reach: float = 0.0) -> tuple[float, float] | None:
  """Fit the y range to `values` (the estimates drawn), padded by `pad` of their span; then
  widen it towards `extra` (intervals, bands) by at most `reach` times that span on each side.
  An interval reaching further is cut at the edge (`_mark_clipped` marks it), so one wide
  interval does not flatten every estimate. Returns the limits (None without finite values)."""
  v = _finite_values(values)
  if not v.size:
    return None
  lo, hi = float(v.min()), float(v.max())
  span = max(hi - lo, 1e-3 * max(abs(hi), 1.0))
  e = _finite_values(extra)
  if e.size and reach > 0:
    lo = max(min(lo, float(e.min())), lo - reach * span)
    hi = min(max(hi, float(e.max())), hi + reach * span)
  span = hi - lo
  ax.set_ylim(lo - pad * span, hi + pad * span)
  return lo - pad * span, hi + pad * span


def _mark_clipped(ax, x: Any, lo: Any, hi: Any, color: Any) -> int:
  """A triangle on the edge (pointing out) where an interval [lo, hi] at x runs past the y
  limits; call after the limits are set. Returns how many ends were marked."""
  y0, y1 = ax.get_ylim()
  x, lo, hi = (np.asarray(a, float) for a in (x, lo, hi))
  up, down = np.isfinite(hi) & (hi > y1), np.isfinite(lo) & (lo < y0)
  for sel, y, m in ((up, y1, "^"), (down, y0, "v")):
    if sel.any():
      ax.plot(x[sel], np.full(int(sel.sum()), y), m, ms=5, color=color, clip_on=False,
              gid="clipped", zorder=5)
  return int(up.sum() + down.sum())


def _legend_right(ax, **kw) -> None:
  """The legend beside the axes (right), where it cannot cover data."""
  ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False,
            fontsize=kw.pop("fontsize", 8), **kw)


COLOURS = {"mha": "tab:blue", "swa": "tab:green", "gswa": "tab:purple", "mlr": "tab:orange"}


def colours(variants: Iterable[str]) -> dict[str, Any]:
  """A fixed colour per known variant (the same in every figure and study), tab10 for others."""
  from structattn import figures
  variants = list(dict.fromkeys(variants))
  other = figures.colours([v for v in variants if v not in COLOURS] or ["_"])
  return {v: COLOURS.get(v, other.get(v)) for v in variants}


def _axes_style(ax, xlabel: str, ylabel: str, title: str | None = None) -> None:
  """Log x (labels at 1, 2, 5 x 10^k when the data span less than 1.5 decades), grid, labels;
  call after plotting."""
  from matplotlib import ticker
  ax.set_xscale("log")
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  lo, hi = ax.get_xlim()
  if 0 < lo < hi < 30 * lo:
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(
        lambda v, _: f"{v:.0e}".replace("e+0", "e").replace("e+", "e")))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, which="both", alpha=0.2)
  if title:
    ax.set_title(title, fontsize=9)


def _lr_label(v: str, lrs: Sequence[tuple[Any, Any]]) -> str:
  """A variant's legend label from its (width, lr) pairs: the rate of most widths, and the
  widths at other rates, e.g. 'swa (lr 0.00316; 0.001 at width 768)'."""
  lrs = [(w, float(lr)) for w, lr in lrs if results_lib._is_number(lr)]
  if not lrs:
    return v
  main = Counter(lr for _, lr in lrs).most_common(1)[0][0]
  others: dict[float, list] = {}
  for w, lr in lrs:
    if lr != main:
      others.setdefault(lr, []).append(w)
  return f"{v} (lr {main:.3g}" + "".join(
      f"; {lr:.3g} at width {', '.join(map(str, ws))}" for lr, ws in others.items()) + ")"


def plot_loss_by_width(frontiers: Frontiers, width_key: str = WIDTH):
  """One panel per width, one line per variant (its chosen run at that width); the y range of
  each panel fitted to its curves, one legend beside the panels."""
  from matplotlib.figure import Figure
  from structattn import figures
  cols = colours(list(frontiers))
  widths = sorted({c.row.get(width_key) for cs in frontiers.values() for c in cs},
                  key=figures._sort_key)
  ncol = min(len(widths), 3) or 1
  nrow = max(math.ceil(len(widths) / ncol), 1)
  fig = Figure(figsize=(4.0 * ncol + 1.8, 3.2 * nrow), layout="constrained")
  axes = fig.subplots(nrow, ncol, squeeze=False)
  handles, lrs = {}, {}
  for ax, w in zip(axes.flat, widths):
    ys = []
    for v in sorted(frontiers, key=_variant_key):
      for c in frontiers[v]:
        if c.row.get(width_key) == w:
          (line,) = ax.plot(c.x, c.y, "-o", ms=2.5, lw=1.3, color=cols[v], label=v)
          handles.setdefault(v, line)
          lrs.setdefault(v, []).append((w, c.row.get(LR)))
          ys.append(c.y)
    _ylim(ax, ys)
    _axes_style(ax, "compute (paper MACs)", "eval loss (nats/char)", f"width {w}")
  for ax in list(axes.flat)[len(widths):]:
    ax.set_visible(False)
  if handles:
    fig.legend(list(handles.values()), [_lr_label(v, lrs[v]) for v in handles],
               loc="outside right upper", fontsize=8, frameon=False)
  return fig


def plot_frontiers(bands: Mapping[str, Mapping[str, np.ndarray]], at: np.ndarray,
                   comparison: Mapping[str, Any] | None = None,
                   fits: Mapping[str, fit_lib.PowerLawFit] | None = None):
  """Each variant's frontier with its bootstrap band (shaded, its edges drawn thin so
  overlapping bands stay apart), the shared points marked, each variant's fitted law dashed.
  The y range fits the frontiers, widened towards the bands by at most a quarter of their
  span."""
  from matplotlib.figure import Figure
  cols = colours(list(bands))
  fig = Figure(figsize=(7.4, 4.4), layout="constrained")
  ax = fig.subplots()
  ys, extra = [], []
  for v, b in bands.items():
    ok = np.isfinite(b["lo"]) & np.isfinite(b["hi"])
    lo, hi = np.where(ok, b["lo"], np.nan), np.where(ok, b["hi"], np.nan)
    ax.fill_between(b["x"], lo, hi, color=cols[v], alpha=0.15, lw=0, zorder=1)
    for edge in (lo, hi):
      ax.plot(b["x"], edge, color=cols[v], lw=0.5, alpha=0.6, zorder=1)
    ax.plot(b["x"], b["y"], color=cols[v], lw=1.8, label=v, zorder=3)
    ys += [b["y"]]
    extra += [lo, hi]
    f = (fits or {}).get(v)
    if f is not None and f.usable:
      ax.plot(b["x"], f.predict(b["x"]), color=cols[v], lw=0.8, ls="--", zorder=2)
    if comparison is not None:
      ax.plot(at, comparison["loss"][v], "o", ms=4, color=cols[v], mec="k", mew=0.5, zorder=4)
  for c in at:
    ax.axvline(c, color="0.6", lw=0.5, ls=":", zorder=0)
  _ylim(ax, ys, extra=extra, reach=0.25)
  _axes_style(ax, "compute (paper MACs)", "frontier eval loss (nats/char)",
              "compute frontiers, 95% bootstrap bands over runs; dashed: fits; "
              "dotted: shared points")
  _legend_right(ax)
  return fig


def plot_difference(comparison: Mapping[str, Any]):
  """Target minus each rival at the shared points: bootstrap intervals (bars) and +-1.96 seed
  standard errors (shaded), a line at 0. The y range fits the differences and 0, widened
  towards the intervals by at most half that span; bars cut there end in a triangle."""
  from matplotlib.figure import Figure
  at = np.asarray(comparison["at"], float)
  rivals = list(comparison["rivals"])
  cols = colours(comparison["variants"])
  fig = Figure(figsize=(7.4, 4.0), layout="constrained")
  ax = fig.subplots()
  ys, extra, bars = [np.zeros(1)], [], []
  for k, r in enumerate(rivals):
    d = comparison["rivals"][r]
    shift = 10 ** (0.015 * (k - (len(rivals) - 1) / 2))
    diff = np.asarray(d["diff"], float)
    lo = np.array([c[0] for c in d["diff_ci"]], float)
    hi = np.array([c[1] for c in d["diff_ci"]], float)
    ax.errorbar(at * shift, diff, yerr=[np.nan_to_num(diff - lo), np.nan_to_num(hi - diff)],
                fmt="o-", ms=4, lw=1, capsize=3, color=cols[r],
                label=f"{comparison['target']} - {r}")
    se = float(d["se_seed"])
    if math.isfinite(se):
      ax.fill_between(at * shift, diff - 1.96 * se, diff + 1.96 * se, color=cols[r], alpha=0.1,
                      lw=0)
      extra += [diff - 1.96 * se, diff + 1.96 * se]
    ys.append(diff)
    extra += [lo, hi]
    bars.append((at * shift, lo, hi, cols[r]))
  ax.axhline(0, color="k", lw=0.8)
  _ylim(ax, ys, extra=extra, reach=0.5)
  clipped = sum(_mark_clipped(ax, *b) for b in bars)
  _axes_style(ax, "compute (paper MACs)", "frontier loss difference (nats/char)",
              "bars: 95% bootstrap over runs; shaded: +-1.96 seed s.e."
              + ("; triangles: bar runs past the axis" if clipped else ""))
  _legend_right(ax)
  return fig


def plot_multiplier(multipliers: Mapping[str, Mapping[str, Any]]):
  """The compute multiplier vs compute with its interval per baseline; hollow markers where
  extrapolated with the baseline's fit; a line at 1. The log y range fits the estimates and 1,
  widened to the intervals by at most a factor 3; bars cut there end in a triangle."""
  from matplotlib.figure import Figure
  cols = colours([m["baseline"] for m in multipliers.values()] +
                         [m["target"] for m in multipliers.values()])
  fig = Figure(figsize=(7.6, 4.0), layout="constrained")
  ax = fig.subplots()
  ys, bars = [], []
  for k, (b, m) in enumerate(multipliers.items()):
    at = np.asarray(m["at"], float) * 10 ** (0.015 * (k - (len(multipliers) - 1) / 2))
    y = np.asarray(m["multiplier"], float)
    lo = np.array([c[0] for c in m["ci"]], float)
    hi = np.array([c[1] for c in m["ci"]], float)
    fin = np.isfinite(y)
    err = [np.where(np.isfinite(lo), y - lo, 0), np.where(np.isfinite(hi), hi - y, 0)]
    ax.errorbar(at[fin], y[fin], yerr=[err[0][fin], err[1][fin]], fmt="-", lw=1, capsize=3,
                color=cols[b], label=b)
    ext = np.asarray(m["extrapolated"], bool)
    ax.plot(at[fin & ~ext], y[fin & ~ext], "o", ms=5, color=cols[b])
    ax.plot(at[fin & ext], y[fin & ext], "o", ms=5, mfc="white", color=cols[b])
    ys += [y, lo, hi]
    bars.append((at[fin], lo[fin], hi[fin], cols[b]))
  ax.axhline(1.0, color="k", lw=0.8)
  ax.set_yscale("log")
  # the range of the estimates and 1, widened to the intervals by at most a factor 3 (an
  # interval reaching further is cut at the edge)
  est = np.concatenate([np.asarray(m["multiplier"], float) for m in multipliers.values()]
                       + [np.ones(1)])
  est = est[np.isfinite(est) & (est > 0)]
  v = np.concatenate([np.asarray(a, float) for a in ys] + [np.ones(1)])
  v = v[np.isfinite(v) & (v > 0)]
  lo, hi = max(v.min(), est.min() / 3), min(v.max(), est.max() * 3)
  ax.set_ylim(lo / 1.15, hi * 1.15)
  clipped = sum(_mark_clipped(ax, *bar) for bar in bars)
  from matplotlib import ticker
  ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda t, _: f"{t:g}"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  _axes_style(ax, "compute C (paper MACs)", "multiplier C' / C",
              "effective compute multiplier (95% bootstrap); hollow: extrapolated by the fit"
              + ("; triangles: bar runs past the axis" if clipped else ""))
  targets = sorted({str(m["target"]) for m in multipliers.values()})
  _legend_right(ax, title=f"compute to reach\n{' / '.join(targets)}'s loss", title_fontsize=8)
  return fig


# ------------------------------------------------------------------------------ report

def _f(v: Any, fmt: str = ".4f") -> str:
  return format(v, fmt) if results_lib._is_number(v) and math.isfinite(v) else "-"


def _iv(c: Sequence[float], fmt: str = ".4f") -> str:
  return f"[{_f(c[0], fmt)}, {_f(c[1], fmt)}]"


def report(res: Mapping[str, Any]) -> str:
  """The markdown report of an `analyze` result (before or after `jsonable`)."""
  res = jsonable(res)
  cmp, target = res["compare"], res["compare"]["target"]
  variants = list(cmp["variants"])
  at = list(cmp["at"])
  L = [f"# Compute-frontier analysis ({res['root']})", ""]
  L += ["## Runs on the frontiers", "",
        "| variant | width | lr | steps | run | final eval loss |", "|---|---:|---:|---:|---|---:|"]
  for v, rs in res["main_runs"].items():
    for r in rs:
      L.append(f"| {v} | {r['width']} | {_f(r['lr'], '.3g')} | {r['steps']} | {r['run']} | "
               f"{_f(r['final_eval_loss'])} |")
  n_b = cmp["n_boot"]
  L += ["", f"## Frontier loss at {len(at)} shared compute points", "",
        f"Bootstrap over runs (B = {n_b}), 95% percentile intervals; seed s.e. = "
        "sqrt(sd_target^2 + sd_rival^2) from the seed spread below.", "",
        "'n': replicates in which both frontiers cover the point (an interval of one value: "
        "a single run covers it); 'with seeds': each half-width combined in quadrature with "
        "1.96 seed s.e.", "",
        "| C (MACs) | " + " | ".join(variants) + f" | best rival | {target} - rival | 95% CI | "
        "n | seed s.e. | 95% CI with seeds |",
        "|---:|" + "---:|" * len(variants) + "---|---:|---|---:|---:|---|"]
  for p, c in enumerate(at):
    L.append(f"| {c:.3g} | " + " | ".join(_f(cmp["loss"][v][p]) for v in variants) +
             f" | {cmp['best_rival'][p] or '-'} | {_f(cmp['diff'][p], '+.4f')} | "
             f"{_iv(cmp['diff_ci'][p], '+.4f')} | {cmp['diff_n_valid'][p]} | "
             f"{_f(cmp['se_seed'][p])} | {_iv(cmp['total_ci'][p], '+.4f')} |")
  L += ["", f"{target} minus each rival:", "",
        "| C (MACs) | " + " | ".join(f"{target} - {r} [95% CI]" for r in cmp["rivals"]) + " |",
        "|---:|" + "---|" * len(cmp["rivals"])]
  for p, c in enumerate(at):
    L.append(f"| {c:.3g} | " + " | ".join(
        f"{_f(d['diff'][p], '+.4f')} {_iv(d['diff_ci'][p], '+.4f')}"
        for d in cmp["rivals"].values()) + " |")
  L += ["", "## Verdict", "", res["verdict"]["text"], "",
        "| C (MACs) | " + " | ".join(f"vs {r}" for r in res["verdict"]["per_rival"]) + " |",
        "|---:|" + "---|" * len(res["verdict"]["per_rival"])]
  for p, c in enumerate(at):
    L.append(f"| {c:.3g} | " + " | ".join(vs[p] for vs in res["verdict"]["per_rival"].values())
             + " |")
  pairs = res.get("pairs") or {}
  if pairs:
    L += ["", f"## {target} against each rival over the range the two cover", "",
          "Where a variant lacks the widest runs, the shared range above stops at its last "
          "run; each pair below uses the whole range its two variants cover. Intervals: "
          "bootstrap over runs with the seed s.e. in quadrature (as above).", ""]
    for r, pr in pairs.items():
      pc = pr["compare"]
      d = pc["rivals"][r]
      L += [f"{pr['verdict']['text']}", "",
            f"| C (MACs) | {target} | {r} | {target} - {r} | 95% CI with seeds | verdict |",
            "|---:|---:|---:|---:|---|---|"]
      for p, c in enumerate(pc["at"]):
        L.append(f"| {c:.3g} | {_f(pc['loss'][target][p])} | {_f(pc['loss'][r][p])} | "
                 f"{_f(d['diff'][p], '+.4f')} | {_iv(d['total_ci'][p], '+.4f')} | "
                 f"{pr['verdict']['per_rival'][r][p]} |")
      L.append("")
  L += ["", "## Effective compute multiplier", "",
        f"C'/C: the compute at which the baseline's frontier reaches {target}'s frontier loss at "
        "C, over C (above 1: the baseline needs more compute). 95% bootstrap intervals; 'ext' "
        "where C' lies outside the baseline's measured range and comes from its power-law fit.",
        "", "| C (MACs) | " + " | ".join(f"{b} [95% CI]" for b in res["multipliers"]) + " |",
        "|---:|" + "---|" * len(res["multipliers"])]
  for p, c in enumerate(at):
    cells = []
    for m in res["multipliers"].values():
      s = f"{_f(m['multiplier'][p], '.3g')} {_iv(m['ci'][p], '.3g')}"
      cells.append(s + (" ext" if m["extrapolated"][p] else ""))
    L.append(f"| {c:.3g} | " + " | ".join(cells) + " |")
  L += ["", "## Power-law fits L(C) = E + A C^-alpha (frontier points, 95% bootstrap)", "",
        "| variant | status | points | alpha [95% CI] | E [95% CI] | A [95% CI] | rmse log |",
        "|---|---|---:|---|---|---|---:|"]
  for v, f in res["fits"].items():
    L.append(f"| {v} | {f['status']} | {f['n_points']} | {_f(f['alpha'], '.3f')} "
             f"{_iv(f['alpha_ci'], '.3f')} | {_f(f['E'], '.3f')} {_iv(f['E_ci'], '.3f')} | "
             f"{_f(f['A'], '.3g')} {_iv(f['A_ci'], '.3g')} | {_f(f['rmse_log'], '.4f')} |")
  L += ["", "## Learning-rate grid (eval loss at equal tokens)", "", res["lr_table"], "",
        "## Seed spread", ""]
  if res["seed_spread"]:
    L += ["| variant | width | lr | steps | seeds | sd (late half) |",
          "|---|---:|---:|---:|---|---:|"]
    for v, d in res["seed_spread"].items():
      for g in d["groups"]:
        L.append(f"| {v} | {g['width']} | {_f(g['lr'], '.3g')} | {g['steps']} | "
                 f"{', '.join(map(str, g['seeds']))} | {_f(g['sd'])} |")
    spread = res["seed_spread"]
    L += [""] + [f"- {v}: sd {_f(s['sd'])}" + (
        f" (95% CI {_iv(spread[v]['sd_ci'])}, df {spread[v]['df']})" if v in spread else "")
        + (" (pooled from the variants with seeds)" if s["pooled"] else "")
        for v, s in cmp["seed_sd"].items()]
  else:
    L += ["No extra-seed runs (equal variant, width, lr and steps, another seed): the seed "
          "spread is unknown and the intervals are over runs only."]
  pl = res["plateau"]
  stuck = [p for p in pl if not p["left_plateau"]]
  L += ["", f"## Plateau check (train loss at {res['plateau_fraction']:.0%} of each run)", "",
        f"{len(pl) - len(stuck)}/{len(pl)} runs are below their threshold "
        f"({pl[0]['threshold_from'] if pl else '-'})."
        + (" Still on the plateau: " + ", ".join(p["run"] for p in stuck) + "." if stuck
           else ""), "",
        "| run | step | train loss | threshold | left plateau |", "|---|---:|---:|---:|---|"]
  for p in pl:
    L.append(f"| {p['run']} | {p['step_checked']} | {_f(p['train_loss'])} | "
             f"{_f(p['threshold'])} | {'yes' if p['left_plateau'] else '**no**'} |")
  if res.get("figures"):
    L += ["", "## Figures", ""] + [f"- {Path(p).name}" for p in res["figures"]
                                   if str(p).endswith(".png")]
  return "\n".join(L) + "\n"


# ------------------------------------------------------------------------------ analyze

def analyze(root: str | os.PathLike, out_dir: str | os.PathLike | None, n_boot: int = 1000,
            seed: int = 0, *, n_points: int = 8, target: str = "mlr", baseline: str = "mha",
            unigram_entropy: float | None = None, plateau_fraction: float = 0.1,
            plateau_loss: float | None = None,
            fit_boot: int | None = None, fit_x_min: float | None = None,
            figures: bool = True) -> dict[str, Any]:
  """The whole analysis of a study directory; JSON-serialisable (`jsonable` applied).

  Keys: root, main_runs, at, compare, verdict, fits, multipliers ({baseline: ...} for
  `baseline` first, then every other rival), seed_spread, lr_grid, lr_table, plateau,
  plateau_fraction, figures (written paths), report (markdown). `fit_boot` is the fits'
  bootstrap size (default n_boot; each replicate is a fit, ~15 ms) and `fit_x_min` their
  least compute (`fit_frontiers`; the multipliers' extrapolation uses these fits too). With
  `out_dir`, the figures (FIGURES, PNG and PDF), ``frontier_analysis.json`` and
  ``frontier_analysis.md`` are written there. About a minute at n_boot=1000, mostly the fits.
  """
  rows = load_rows(root)
  runs = main_runs(rows)
  if target not in runs or len(runs) < 2:
    raise ValueError(f"need completed seed-0 runs of {target!r} and at least one rival under "
                     f"{str(root)!r}; found variants {sorted(runs)}")
  at = shared_points(runs, n_points)
  seeds = seed_spread(rows)
  cmp = compare(runs, at, target=target, seeds=seeds, n_boot=n_boot, seed=seed)
  fits = fit_frontiers(runs, n_boot=n_boot if fit_boot is None else fit_boot, seed=seed,
                       x_min=fit_x_min)
  rivals = [v for v in cmp["variants"] if v != target]
  order = ([baseline] if baseline in rivals else []) + [r for r in rivals if r != baseline]
  mults = {b: compute_multiplier(runs, at, b, target, fits=fits, n_boot=n_boot, seed=seed,
                                fit_x_min=fit_x_min) for b in order}
  pairs = compare_pairs(runs, target=target, seeds=seeds, n_points=n_points, n_boot=n_boot,
                        seed=seed)
  grid = lr_grid(rows)
  res: dict[str, Any] = {
      "root": str(root), "at": at, "compare": cmp, "verdict": verdict(cmp), "fits": fits,
      "multipliers": mults, "pairs": pairs, "seed_spread": seeds, "lr_grid": grid,
      "lr_table": lr_grid_table(grid),
      "plateau": plateau_check(rows, plateau_fraction, unigram_entropy,
                               plateau_loss=plateau_loss),
      "plateau_fraction": plateau_fraction,
      "main_runs": {v: [{"run": c.run, "width": c.row.get(WIDTH), "lr": c.row.get(LR),
                         "steps": _steps(c.row), "final_eval_loss": c.row.get(FINAL),
                         "compute_max": float(c.x[-1])} for c in cs]
                    for v, cs in runs.items()},
      "figures": [],
  }
  if out_dir is not None and figures:
    from structattn import figures as figures_lib
    bands = frontier_bands(runs, None, n_boot=n_boot, seed=seed)
    paths = figures_lib.save(plot_loss_by_width(runs), out_dir, FIGURES[0])
    paths += figures_lib.save(plot_frontiers(bands, at, cmp, fits), out_dir, FIGURES[1])
    paths += figures_lib.save(plot_difference(cmp), out_dir, FIGURES[2])
    paths += figures_lib.save(plot_multiplier(mults), out_dir, FIGURES[3])
    res["figures"] = [str(p) for p in paths]
  res = jsonable(res)
  res["report"] = report(res)
  if out_dir is not None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier_analysis.json").write_text(json.dumps(res, indent=1))
    (out / "frontier_analysis.md").write_text(res["report"])
  return res


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="structattn-frontier", description="Compute-frontier analysis of an LM study "
      "directory.", formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="writes OUT/frontier_analysis.{json,md} and the figures (PNG and PDF)\n  "
      + ", ".join(FIGURES) + "\n\nexample:\n  structattn-frontier runs/lm-english/runs "
      "--out=runs/lm-english/analysis --n-boot=1000")
  p.add_argument("dir", help="study directory (run directories nested at any depth)")
  p.add_argument("--out", required=True, help="output directory: figures, JSON, markdown")
  p.add_argument("--n-boot", type=int, default=1000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--points", type=int, default=8)
  p.add_argument("--fit-x-min", type=float, default=None,
                 help="fit only frontier points at compute >= this")
  p.add_argument("--target", default="mlr")
  p.add_argument("--baseline", default="mha")
  p.add_argument("--unigram-entropy", type=float, default=None,
                 help="the corpus's unigram entropy in nats (plateau threshold)")
  p.add_argument("--corpus-dir", default=None,
                 help="compute --unigram-entropy from this directory's *.txt / *.txt.xz")
  a = p.parse_args(argv)
  try:
    if a.corpus_dir and a.unigram_entropy is None:
      a.unigram_entropy = corpus_unigram_entropy(a.corpus_dir)
    res = analyze(a.dir, a.out, a.n_boot, a.seed, n_points=a.points, target=a.target,
                  baseline=a.baseline, unigram_entropy=a.unigram_entropy,
                  fit_x_min=a.fit_x_min)
  except (FileNotFoundError, KeyError, ValueError) as e:
    print(f"structattn-frontier: error: {e.args[0] if e.args else e}", file=sys.stderr)
    return 1
  print(res["report"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
