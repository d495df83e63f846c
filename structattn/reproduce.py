"""Reproduce a paper result: run its sweep, then fit and draw it.

    structattn-reproduce icr-head-dim --scale=tiny --workdir=runs/icr-head-dim
    structattn-reproduce icr-study --scale=gpu --workdir=runs/icr-study --time-limit=540
    structattn-reproduce lm-scaling --scale=paper --workdir=runs/lm --parallel=2

Figures (`FIGURES`):
  icr-head-dim    in-context regression, finding (a): MHA's last-point error against its head
                  dim r = D / heads, one panel per d_input (mean and s.e.m. over seeds, r =
                  d_input dashed); the error falls only once r approaches d_input.
                  (icr:sweep-head-dim-<scale>)
  icr-compute     in-context regression, finding (b): last-point error against forward
                  compute for MHA, bilinear BTT and bilinear MLR at several widths; the
                  structured variants below MHA at equal compute. (icr:sweep-compute-<scale>)
  icr-study       in-context regression, findings (b) and (a) as one staged study
                  (structattn.icr_study): the icr-compute grid at d_input 32 over widths,
                  learning rates and seeds, then the icr-head-dim points at d_input 64; both
                  figures for the runs finished so far. (--scale=gpu|mini, --time-limit)
  lm-scaling      language modelling: held-out loss against non-embedding compute per width
                  and combined, the compute frontier per variant with fitted power laws.
                  (lm:sweep-scaling-<scale>)
  forecast-table  forecasting: test MSE / MAE per dataset, horizon and variant, mean and std
                  over seeds. (forecast:sweep-table-<scale>)

The sweep goes to WORKDIR/runs (finished points are skipped, so re-running only redraws),
figures (PNG and PDF), `summary.json` and a markdown table to WORKDIR.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from structattn import results as results_lib
from structattn.runtime import DEFAULT_CACHE


def load_preset(name: str, preset: str):
  """The package config `name` ('icr.py' or 'icr', 'lm', 'forecast') at `preset`."""
  from structattn import configs
  return configs.load(f"{name.removesuffix('.py')}:{preset}")


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(float(v))


def _figure(**kw):
  from matplotlib.figure import Figure  # drawn on a Figure directly: no pyplot, no backend
  return Figure(**kw)


def _completed(rows):
  return [r for r in rows if r.get("status") == "completed"]


# -------------------------------------------------------------------------------- analyses


def last_eval(run_dir: Path, key: str) -> tuple[int, float, float] | None:
  """(step, value, sem) of the last logged eval of `key` in a run's metrics.jsonl."""
  for row in reversed(results_lib.read_metrics(run_dir)):
    if _finite(row.get(key)):
      return int(row["step"]), float(row[key]), float(row.get(key + "_sem") or 0.0)
  return None


def _evaluated(root: Path, key: str, select: Callable[[Mapping], bool] | None = None):
  """(row, (step, value, sem)) of completed and interrupted runs with at least one eval (and
  passing `select`, a predicate on the results row, when given)."""
  out = []
  for r in results_lib.collect(root):
    if r.get("status") not in ("completed", "running") or (select and not select(r)):
      continue
    ev = last_eval(Path(root) / r["run"], key)
    if ev is not None:
      out.append((r, ev))
  return out


def _head_dim_points(root: Path, select: Callable[[Mapping], bool] | None = None):
  """Per d_input: one point per head dim r, aggregated over seeds, and the baselines.

  Returns ({d: [(r, mean, sem, seeds, steps)]}, {d: {baseline: value}}). The error bar is the
  standard error of the mean over seeds (std ddof=1 / sqrt(n)) where a point has two or more
  seeds; with one seed it is that run's standard error over its held-out prompts, which
  measures the eval noise only. `steps` is the least step reached among the seeds."""
  runs: dict[int, dict[int, list[tuple[int, float, float]]]] = {}
  base: dict[int, dict[str, float]] = {}
  for r, (step, se, sem) in _evaluated(root, "eval/last_point_se", select):
    d, width, heads = int(r["icr.d_input"]), int(r["model.d_model"]), int(
        r["attention.num_heads"])
    head_dim = int(r.get("attention.d_qk") or 0) or width // heads
    runs.setdefault(d, {}).setdefault(head_dim, []).append((int(r.get("seed") or 0), se, sem,
                                                            step))
    base.setdefault(d, {}).update(
        {k.split("/")[1]: float(r[k]) for k in r
         if k.startswith("baseline/") and k.endswith("/last_point_se") and _finite(r[k])})
  points = {}
  for d, by_r in runs.items():
    pts = []
    for head_dim, rs in sorted(by_r.items()):
      by_seed = {s: (se, sem, step) for s, se, sem, step in sorted(rs)}
      e = np.array([v[0] for v in by_seed.values()])
      n = len(e)
      sem = float(e.std(ddof=1) / math.sqrt(n)) if n > 1 else float(next(iter(
          by_seed.values()))[1])
      pts.append((head_dim, float(e.mean()), sem, n, min(v[2] for v in by_seed.values())))
    points[d] = pts
  return points, base


# (key in the run's baseline/<key>/last_point_se, label, line style), smallest error last
HEAD_DIM_BASELINES = (("zero", "zero", ":"), ("averaging", "averaging", "-."),
                      ("ridge", "ridge", (0, (5, 2, 1, 2))),
                      ("least_squares", "least squares", "--"))


def _head_dim_ylim(pts, baselines: Mapping[str, float], near: float = 2.0,
                   min_ratio: float = 1.5, pad: float = 0.08) -> tuple[float, float]:
  """Log-axis limits fitted to the points and their error bars: their range (at least a factor
  `min_ratio`), widened to a baseline lying within a factor `near` of it and padded by `pad` of
  the log span. Baselines further away do not widen it (they are marked at the edge)."""
  e = np.array([p[1] for p in pts], float)
  s = np.nan_to_num(np.array([p[2] for p in pts], float))
  lo_v = np.where(e - s > 0, e - s, e)
  a, b = math.log10(float(lo_v.min())), math.log10(float((e + s).max()))
  if b - a < math.log10(min_ratio):
    mid = (a + b) / 2
    a, b = mid - math.log10(min_ratio) / 2, mid + math.log10(min_ratio) / 2
  a0, b0 = a, b
  for v in baselines.values():
    if v > 0 and a0 - math.log10(near) <= math.log10(v) <= b0 + math.log10(near):
      a, b = min(a, math.log10(v)), max(b, math.log10(v))
  span = b - a
  return 10 ** (a - pad * span), 10 ** (b + pad * span)


def _log_ticks(ax, lo: float, hi: float) -> None:
  """Plain-number ticks on a log y axis spanning under two decades: the first of the mantissa
  sets below giving at least four ticks inside [lo, hi] (default log ticks otherwise)."""
  from matplotlib import ticker
  if math.log10(hi / lo) >= 2:
    return
  for subs in ((1,), (1, 2, 5), (1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 7),
               (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
    ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)),
                                          math.ceil(math.log10(hi)) + 1) for m in subs]
    ticks = [t for t in ticks if lo <= t <= hi]
    if len(ticks) >= 4:
      break
  ax.yaxis.set_major_locator(ticker.FixedLocator(ticks))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
  ax.yaxis.set_minor_locator(ticker.NullLocator())


def _edge_labels(ax, labels: list[tuple[float, float, str]], gap: float = 0.075) -> None:
  """(axes-fraction height, value, text) as texts in the right margin, in the order of
  (height, value), pushed apart by `gap`."""
  labels = sorted(labels)
  ys = [y for y, *_ in labels]
  for i in range(1, len(ys)):
    ys[i] = max(ys[i], ys[i - 1] + gap)
  if ys and ys[-1] > 0.98:  # the top of the stack back inside, the ones below it as needed
    ys[-1] = 0.98
    for i in range(len(ys) - 2, -1, -1):
      ys[i] = min(ys[i], ys[i + 1] - gap)
  for y, (*_, text) in zip(ys, labels):
    ax.text(1.02, y, text, transform=ax.transAxes, fontsize=7, va="center", ha="left",
            color="0.3", clip_on=False)


def plot_icr_head_dim(points: Mapping[int, Sequence[tuple]],
                      baselines: Mapping[int, Mapping[str, float]]):
  """One panel per d_input: MHA's last-point error against head dim r (mean over seeds,
  error bars the s.e.m., `_head_dim_points`), the baselines, and r = d_input dashed.

  The log y axis spans the model points (`_head_dim_ylim`): a baseline inside it is a grey line
  labelled with its value in the right margin; one outside it is an arrow label at the top or
  bottom edge with its value, so the ~1e-14 of least squares does not flatten the points."""
  from matplotlib import ticker
  if not points:
    raise ValueError("plot_icr_head_dim: no evaluated runs")
  ds = sorted(points)
  fig = _figure(figsize=(4.6 * len(ds), 3.6), layout="constrained")
  axes = fig.subplots(1, len(ds), squeeze=False)[0]
  seeds = sorted({p[3] for d in ds for p in points[d]})
  for ax, d in zip(axes, ds):
    pts = sorted(points[d])
    r_, e_, s_ = (np.array([p[i] for p in pts], float) for i in range(3))
    ax.errorbar(r_, e_, yerr=np.nan_to_num(s_), marker="o", ms=5, capsize=3, lw=1.5,
                color="tab:blue", label="MHA", zorder=3)
    base = dict(baselines.get(d) or {})
    lo, hi = _head_dim_ylim(pts, base)
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    labels = []
    for key, name, style in HEAD_DIM_BASELINES:
      v = base.get(key)
      if v is None:
        continue
      if lo <= v <= hi:
        ax.axhline(v, ls=style, color="0.45", lw=1, label=name, zorder=1)
        labels.append(((math.log10(v) - math.log10(lo)) / math.log10(hi / lo), v,
                       f"{name} {v:.2g}"))
      else:  # off the axis: an arrow label at the edge it lies beyond
        labels.append((0.98, v, f"\u2191 {name} {v:.2g}") if v > hi else
                      (0.02, v, f"\u2193 {name} {v:.2g}"))
    _edge_labels(ax, labels)
    ax.axvline(d, ls="--", color="k", lw=0.9, gid="r=d_input", zorder=2)
    ax.annotate("r = d_input", (d, 0.97), xycoords=("data", "axes fraction"), xytext=(-3, 0),
                textcoords="offset points", rotation=90, ha="right", va="top", fontsize=7)
    ax.set_xscale("log", base=2)
    xs = sorted({int(v) for v in r_} | {int(d)})
    ax.set_xlim(xs[0] / 2 ** 0.3, xs[-1] * 2 ** 0.3)
    ax.set_xticks(xs, [str(v) for v in xs])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    _log_ticks(ax, lo, hi)
    ax.grid(True, which="major", alpha=0.2)
    ax.set_xlabel("head dim r")
    ax.set_ylabel("last-point squared error")
    ax.set_title(f"d_input = {d}", fontsize=10)
  if seeds == [1]:
    how = "s.e.m. over held-out prompts (one seed per point)"
  elif len(seeds) == 1:
    how = f"s.e.m. over {seeds[0]} seeds"
  else:
    how = (f"s.e.m. over {seeds[0]}-{seeds[-1]} seeds" if seeds[0] > 1 else
           f"s.e.m. over up to {seeds[-1]} seeds (one seed: over held-out prompts)")
  fig.suptitle(f"MHA error against head dim; bars: {how}", fontsize=9)
  return fig


def analyze_icr_head_dim(root: Path, out: Path,
                         select: Callable[[Mapping], bool] | None = None) -> dict[str, Any]:
  """Last-point error against head dim r per d_input (mean and s.e.m. over seeds), with the
  baselines. Runs cut short (status running) count with their last eval; the table gives the
  steps reached. `select`: a predicate on the results rows of the runs to include."""
  by_d, base = _head_dim_points(root, select)
  if not by_d:
    raise ValueError(f"no evaluated runs under {str(root)!r}")
  fig = plot_icr_head_dim(by_d, base)
  summary = {"figure": "icr-head-dim", "by_d_input": {}}
  for d in sorted(by_d):
    pts = by_d[d]
    below = [e for r, e, *_ in pts if r < d]
    at_or_above = [e for r, e, *_ in pts if r >= d]
    summary["by_d_input"][str(d)] = {
        "head_dim": [p[0] for p in pts], "last_point_se": [p[1] for p in pts],
        "last_point_se_sem": [p[2] for p in pts], "seeds": [p[3] for p in pts],
        "steps": [p[4] for p in pts], "baselines": base[d],
        "best_below_d": min(below) if below else None,
        "best_at_or_above_d": min(at_or_above) if at_or_above else None,
        "finding_holds": bool(below and at_or_above and min(at_or_above) < min(below))}
  from structattn import figures as fig_lib
  summary["files"] = [str(p) for p in fig_lib.save(fig, out, "icr_head_dim")]
  all_r = sorted({p[0] for v in by_d.values() for p in v})
  lines = ["| d_input | " + " | ".join(f"r={r}" for r in all_r) + " |",
           "|---" * (len(all_r) + 1) + "|"]
  for d in sorted(by_d):
    e = {p[0]: p for p in by_d[d]}
    lines.append(f"| {d} | " + " | ".join(
        f"{e[r][1]:.3g} ± {e[r][2]:.2g} ({e[r][4]} steps"
        + (f", {e[r][3]} seeds)" if e[r][3] > 1 else ")") if r in e else "" for r in all_r)
        + " |")
  summary["table"] = "\n".join(lines)
  return summary


def _curves(root: Path, y: str, x: str = "compute/paper_macs", select=None):
  from structattn import fit as fit_lib
  return fit_lib.load_curves(root, x=x, y=y, statuses=("completed", "running"), filter=select)


def _compare_at_equal_compute(curves, group: str, y_better=min) -> dict[str, Any]:
  """Per variant, the frontier's value at shared compute points (log-interpolated)."""
  from structattn import fit as fit_lib
  fronts = {}
  for c in curves:
    fronts.setdefault(str(c.row.get(group)), []).append(c)
  fr = {k: fit_lib.frontier(v) for k, v in fronts.items()}
  lo = max(float(np.min(f.x)) for f in fr.values())
  hi = min(float(np.max(f.x)) for f in fr.values())
  out: dict[str, Any] = {"compute_range": [lo, hi], "at": {}}
  if not lo < hi:
    return out
  grid = np.geomspace(lo, hi, 5)
  for k, f in fr.items():
    out["at"][k] = [float(f.at(g)) for g in grid]
  out["grid"] = [float(g) for g in grid]
  return out


def analyze_icr_compute(root: Path, out: Path,
                        select: Callable[[Mapping], bool] | None = None) -> dict[str, Any]:
  """Last-point error against forward compute per variant (`select`: a predicate on the
  results rows of the runs to include)."""
  from structattn import figures as fig_lib
  y = "eval/last_point_se"
  curves = _curves(root, y, select=select)
  if not curves:
    raise ValueError(f"no evaluated runs under {str(root)!r}")
  group = ("attention.variant",)
  paths = []
  for name, fig in (("icr_compute_by_width", fig_lib.plot_curves_by_width(curves, group=group,
                                                                          x="compute/paper_macs",
                                                                          y=y)),
                    ("icr_compute_combined", fig_lib.plot_curves_combined(
                        curves, group, "compute/paper_macs", y))):
    paths += [str(p) for p in fig_lib.save(fig, out, name)]
  cmp = _compare_at_equal_compute(curves, "attention.variant")
  final = sorted(((str(r["attention.variant"]), int(r["model.d_model"]), se, step,
                   step * float(r.get("compute/paper_macs_per_prompt") or 0) *
                   int(r["train.batch_size"]))
                  for r, (step, se, _) in _evaluated(root, "eval/last_point_se", select)),
                 key=lambda t: (t[1], t[0]))
  table = ["| variant | width | last-point SE | steps | forward MACs |",
           "|---|---|---|---|---|"]
  table += [f"| {v} | {w} | {e:.3g} | {s} | {c:.3g} |" for v, w, e, s, c in final]
  holds = None
  if cmp.get("at") and "mha" in cmp["at"]:
    mha = np.array(cmp["at"]["mha"])
    holds = {k: bool(np.all(np.array(v) < mha)) for k, v in cmp["at"].items() if k != "mha"}
  return {"figure": "icr-compute", "files": paths, "frontier_at_equal_compute": cmp,
          "structured_below_mha_everywhere": holds, "table": "\n".join(table)}


def analyze_lm_scaling(root: Path, out: Path) -> dict[str, Any]:
  from structattn import figures as fig_lib
  from structattn import fit as fit_lib
  fits = fit_lib.fit_dir(root, x="compute/paper_macs", y="eval/loss",
                         group=("attention.variant",), statuses=("completed",), n_boot=100)
  fits.write_json(out / "fits.json")
  paths = [str(p) for p in fig_lib.make_figures(root, out, x="compute/paper_macs",
                                                y="eval/loss", fits=fits)]
  curves = _curves(root, "eval/loss")
  cmp = _compare_at_equal_compute(curves, "attention.variant")
  return {"figure": "lm-scaling", "files": paths, "fits": fits.to_dict(),
          "frontier_at_equal_compute": cmp, "mlr_frontier_lowest": mlr_frontier_lowest(cmp),
          "table": fits.format()}


def mlr_frontier_lowest(cmp: Mapping[str, Any]) -> dict[str, Any] | None:
  """The paper's LM claim on the measured range: at each shared compute point, whether MLR's
  frontier is below every other variant's (None when MLR or a rival is missing)."""
  at = cmp.get("at") or {}
  if "mlr" not in at or len(at) < 2:
    return None
  mlr = np.array(at["mlr"])
  rivals = {k: np.array(v) for k, v in at.items() if k != "mlr"}
  per_point = [bool(all(mlr[i] < v[i] for v in rivals.values())) for i in range(len(mlr))]
  return {"at_every_point": all(per_point), "per_point": per_point,
          "margin_to_best_rival": [float(min(v[i] for v in rivals.values()) - mlr[i])
                                   for i in range(len(mlr))]}


def analyze_forecast_table(root: Path, out: Path) -> dict[str, Any]:
  rows = _completed(results_lib.collect(root))
  cells: dict[tuple, list[tuple[float, float]]] = {}
  for r in rows:
    key = (str(r["data.dataset"]), int(r["data.horizon"]), str(r["attention.variant"]))
    cells.setdefault(key, []).append((float(r["test/mse"]), float(r["test/mae"])))
  table = ["| dataset | horizon | variant | seeds | test MSE | test MAE |",
           "|---|---|---|---|---|---|"]
  summary = {}
  for (ds, h, v), vals in sorted(cells.items()):
    mse, mae = np.array(vals).T
    sd = lambda a: float(a.std(ddof=1)) if len(a) > 1 else float("nan")
    summary[f"{ds}-{h}-{v}"] = {"mse": float(mse.mean()), "mse_std": sd(mse),
                                "mae": float(mae.mean()), "mae_std": sd(mae), "seeds": len(vals)}
    table.append(f"| {ds} | {h} | {v} | {len(vals)} | {mse.mean():.3f} ± {sd(mse):.3f} | "
                 f"{mae.mean():.3f} ± {sd(mae):.3f} |")
  return {"figure": "forecast-table", "cells": summary, "table": "\n".join(table)}


def analyze_icr_study(root: Path, out: Path, names: Mapping[str, set[str]]) -> dict[str, Any]:
  """Both ICR figures, each from its own stage's runs (`names`: {stage: run names}); a figure
  whose stage has no evaluated run yet is reported as pending instead."""
  from structattn import icr_study
  summary: dict[str, Any] = {"figure": "icr-study"}
  tables = []
  for stage, analyze, title in ((icr_study.COMPUTE, analyze_icr_compute, "compute (b)"),
                                (icr_study.HEAD_DIM, analyze_icr_head_dim, "head dim (a)")):
    wanted = set(names.get(stage, ()))
    try:
      result = analyze(root, out, select=lambda r, w=wanted: Path(r["run"]).name in w)
    except (ValueError, KeyError) as e:  # nothing finished in this stage yet
      result = {"pending": f"analysis not yet possible: {e}"}
    summary[stage] = result
    tables.append(f"## ICR {title}\n\n" + (result.get("table") or result.get("pending", "")))
  summary["table"] = "\n\n".join(tables)
  return summary


FIGURES: dict[str, tuple[str, str | None, Callable[..., dict]]] = {
    "icr-head-dim": ("icr.py", "sweep-head-dim", analyze_icr_head_dim),
    "icr-compute": ("icr.py", "sweep-compute", analyze_icr_compute),
    "icr-study": ("icr.py", None, analyze_icr_study),  # planned by structattn.icr_study
    "lm-scaling": ("lm.py", "sweep-scaling", analyze_lm_scaling),
    "forecast-table": ("forecast.py", "sweep-table", analyze_forecast_table),
}
SCALES = ("tiny", "short", "paper")
# Staged LM studies (structattn.lm_study): learning-rate grids, then the other widths at the
# chosen rate, then seeds; they run under --time-limit and keep their runs in --archive.
STUDY_SCALES = ("english", "mini")
# The staged ICR study (structattn.icr_study): findings (b) and (a) at paper scale on a GPU,
# and a CPU miniature.
ICR_STUDY_SCALES = ("gpu", "mini")
STUDY_FIGURES = {"lm-scaling": STUDY_SCALES, "icr-study": ICR_STUDY_SCALES}
# 'short' is the paper's LM architecture at a few minutes of one GPU.
FIGURE_SCALES = {"lm-scaling": SCALES + STUDY_SCALES, "icr-study": ICR_STUDY_SCALES}
ALL_SCALES = tuple(dict.fromkeys(SCALES + STUDY_SCALES + ICR_STUDY_SCALES))


def scales_for(figure: str) -> tuple[str, ...]:
  return FIGURE_SCALES.get(figure, ("tiny", "paper"))


def study_scales_for(figure: str) -> tuple[str, ...]:
  """The scales of `figure` that run as staged studies (--time-limit, --archive)."""
  return STUDY_FIGURES.get(figure, ())


def reproduce(figure: str, scale: str, workdir: str, parallel: int = 1, vmap: bool = True,
              overrides: Mapping[str, Any] | None = None, analyze_only: bool = False,
              cache_dir: str | None = DEFAULT_CACHE,
              only: Sequence[str] = (), time_limit: float | None = None,
              archive: str | None = None) -> dict[str, Any]:
  """Run the figure's sweep (unless analyze_only), then its analysis; returns the summary.

  Study scales (`STUDY_SCALES`) run the pending points that fit in `time_limit` seconds and
  keep finished runs in `archive` (default WORKDIR/runs.tar.gz), see `structattn.study`."""
  if figure not in FIGURES:
    raise ValueError(f"figure={figure!r} is invalid: allowed values are {sorted(FIGURES)}")
  if scale not in scales_for(figure):
    raise ValueError(f"--scale={scale!r} is invalid for {figure}: allowed values are "
                     f"{scales_for(figure)}")
  file, preset, analyze = FIGURES[figure]
  out = Path(workdir)
  runs = out / "runs"
  statuses = {}
  if figure == "icr-study":
    return _reproduce_icr_study(scale, out, parallel, vmap, overrides, analyze_only, cache_dir,
                                time_limit, archive, only)
  if scale in STUDY_SCALES:
    return _reproduce_study(scale, out, parallel, vmap, overrides, analyze_only, cache_dir,
                            time_limit, archive, only)
  if not analyze_only:
    from structattn import sweep as sweep_lib
    config = load_preset(file, f"{preset}-{scale}")
    if overrides:
      base_sweep = list(config.sweep)
      config = sweep_lib.apply_overrides(config, overrides)
      config.sweep = base_sweep
    statuses = sweep_lib.run_sweep(config, str(runs), parallel=parallel, vmap=vmap,
                                   cache_dir=cache_dir, only=only)
  out.mkdir(parents=True, exist_ok=True)
  summary = analyze(runs, out)
  summary.update(scale=scale, points=statuses or None)
  (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
  (out / "table.md").write_text(summary.get("table", "") + "\n")
  return summary


def study_plan(spec, overrides: Mapping[str, Any] | None = None, only: Sequence[str] = (),
               planner: Callable | None = None):
  """The study's plan as a function of its run folder; with `only`, each stage keeps the points
  whose names contain one of those substrings (`--only`).  `planner(spec, runs, overrides)`
  gives the stages (default `lm_study.plan`)."""
  from structattn import lm_study
  planner = planner or lm_study.plan

  def plan(runs):
    stages = planner(spec, runs, dict(overrides or {}))
    return [[p for p in st if any(o in p[0] for o in only)] for st in stages] if only else stages
  return plan


def _reproduce_study(scale, out: Path, parallel, vmap, overrides, analyze_only, cache_dir,
                     time_limit, archive, only: Sequence[str] = ()) -> dict[str, Any]:
  from structattn import lm_study
  spec = lm_study.spec_for(scale)
  overrides = dict(overrides or {})
  plan = study_plan(spec, overrides, only)
  summary = _run_or_restore(plan, out, analyze_only, time_limit, archive, parallel, vmap,
                            cache_dir, lm_study.flops_of, spec.startup_seconds)
  from structattn import frontier
  try:
    result = frontier.analyze(out / "runs", out, n_boot=spec.n_boot, fit_boot=spec.n_boot,
                              plateau_loss=spec.plateau_loss)
  except ValueError as e:  # too few finished runs yet: the study goes on next time
    result = {"report": f"analysis not yet possible: {e}"}
  result.update(scale=scale, points=summary["statuses"] or None, study=summary,
                chosen_lr=lm_study.chosen_lrs(spec, out / "runs", overrides))
  result["table"] = result.get("report", "")
  (out / "rows.json").write_text(json.dumps(lm_study.export_rows(out / "runs"), default=str))
  (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
  (out / "table.md").write_text(result.get("table", "") + "\n")
  return result


def _run_or_restore(plan, out: Path, analyze_only, time_limit, archive, parallel, vmap,
                    cache_dir, flops_of, startup) -> dict[str, Any]:
  """Run the study's pending points that fit (or, with analyze_only, only unpack its archive);
  returns `run_study`'s summary."""
  from structattn import study as study_lib
  if analyze_only:
    study_lib.unpack(archive or out / "runs.tar.gz", out / "runs")
    return {"statuses": {}, "ran": [], "pending": [], "skipped_for_time": []}
  summary = study_lib.run_study(plan, out, time_limit=time_limit, archive=archive,
                                parallel=parallel, vmap=vmap, cache_dir=cache_dir,
                                flops_of=flops_of, startup=startup)
  print(study_lib.describe(summary), end="")
  return summary


def _reproduce_icr_study(scale, out: Path, parallel, vmap, overrides, analyze_only, cache_dir,
                         time_limit, archive, only: Sequence[str] = ()) -> dict[str, Any]:
  from structattn import icr_study
  spec = icr_study.spec_for(scale)
  overrides = dict(overrides or {})
  plan = study_plan(spec, overrides, only, planner=icr_study.plan)
  summary = _run_or_restore(plan, out, analyze_only, time_limit, archive, parallel, vmap,
                            cache_dir, icr_study.flops_of, spec.startup_seconds)
  (out / "runs").mkdir(parents=True, exist_ok=True)  # --analyze-only before any run
  result = analyze_icr_study(out / "runs", out, icr_study.stage_names(spec, overrides))
  result.update(scale=scale, points=summary["statuses"] or None, study=summary)
  (out / "rows.json").write_text(json.dumps(icr_study.export_rows(out / "runs"), default=str))
  (out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
  (out / "table.md").write_text(result.get("table", "") + "\n")
  return result


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
  out = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set {item!r}: expected key=value")
    k, v = item.split("=", 1)
    try:
      out[k] = json.loads(v)
    except ValueError:
      out[k] = v
  return out


def preset_label(figure: str) -> str:
  """What `figure` runs, for --help: its sweep preset, or the module planning its study."""
  file, preset, _ = FIGURES[figure]
  return f"{file.removesuffix('.py')}:{preset}-<scale>" if preset else "structattn.icr_study"


def _epilog() -> str:
  """The figures, the config presets they run and their scales, then a one-line example."""
  presets = {f: preset_label(f) for f in FIGURES}
  width = max(map(len, presets.values()))
  rows = []
  for f, preset in presets.items():
    plain = [s for s in scales_for(f) if s not in study_scales_for(f)]
    study = [s for s in scales_for(f) if s in study_scales_for(f)]
    if plain:
      rows.append(f"  {f:15s} {preset:{width}s}  " + ", ".join(plain))
    if study:
      rows.append(f"  {f if not plain else '':15s} {preset if not plain else '':{width}s}  "
                  + ", ".join(study)
                  + " (staged studies: --time-limit, --archive)")
  return ("figures, the config presets they run (--set KEY=VALUE overrides a field of each)\n"
          "and their --scale values:\n" + "\n".join(rows) + "\n\nexample:\n"
          "  structattn-reproduce icr-head-dim --scale=tiny --workdir=runs/icr-head-dim")


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="structattn-reproduce", description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=_epilog())
  p.add_argument("figure", choices=sorted(FIGURES))
  p.add_argument("--scale", default="tiny", choices=ALL_SCALES)
  p.add_argument("--workdir", default=None, help="default runs/<figure>-<scale>")
  p.add_argument("--parallel", type=int, default=1)
  p.add_argument("--no-vmap", action="store_true", help="one process per seed / LR")
  p.add_argument("--analyze-only", action="store_true", help="redraw from existing runs")
  p.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                 help="run only the points whose names contain this substring (repeatable; "
                 "point names themselves contain commas)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a base-config field for every point (JSON values)")
  p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                 help="study scales (" + "; ".join(
                     f"{f}: {', '.join(v)}" for f, v in STUDY_FIGURES.items())
                 + "): start no run that would not finish "
                 "within this many seconds; finished runs are kept in --archive")
  p.add_argument("--archive", default=None, metavar="FILE",
                 help="study scales: .tar.gz of the finished run directories (no "
                 "checkpoints), read first and rewritten after every run; default "
                 "WORKDIR/runs.tar.gz")
  a = p.parse_args(argv)
  workdir = a.workdir or f"runs/{a.figure}-{a.scale}"
  try:
    summary = reproduce(a.figure, a.scale, workdir, a.parallel, not a.no_vmap,
                        _parse_set(a.set), a.analyze_only,
                        only=a.only, time_limit=a.time_limit, archive=a.archive)
  except (ValueError, FileNotFoundError) as e:
    print(f"structattn-reproduce: error: {e}", file=sys.stderr)
    return 1
  print(summary.get("table", ""))
  failed = {k: v for k, v in (summary.get("points") or {}).items() if str(v).startswith("fail")}
  for k, v in failed.items():
    print(f"failed point {k}: {v}")
  print(f"figures and summary in {workdir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
