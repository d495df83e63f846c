"""Scaling-law figures (matplotlib, Agg): loss vs compute per width and combined, frontiers
with fitted laws and bootstrap bands, and each group's predicted loss at 10x the budget.

    from structattn import figures
    paths = figures.make_figures("runs/lm-sweep", "out/figs", x="compute/paper_macs",
                                 y="eval/loss", group=("attention.variant",),
                                 width_key="model.d_model")   # PNG + PDF of each figure

    fits = fit.fit_dir("runs/lm-sweep")                        # or piece by piece:
    fig = figures.plot_frontiers(fits); figures.save(fig, "out/figs", "frontier")

Figures are `matplotlib.figure.Figure` objects made without pyplot (no global backend is set;
files are rendered by Agg; a notebook displays them inline). All axes are log-log, as in the
paper. Colours follow the group (variant); within a width
panel each run is a thin line and the run ending lowest in its group is drawn bold.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import ticker
from matplotlib.figure import Figure

from structattn import fit as fit_lib
from structattn import results as results_lib

FORMATS = ("png", "pdf")
NAMES = ("curves_by_width", "curves_combined", "frontier", "predictions")


def _key(row: Mapping[str, Any], group: Sequence[str]) -> tuple:
  return tuple(results_lib._hashable(row.get(g)) for g in group)


def colours(labels: Sequence[str]) -> dict[str, Any]:
  """A stable colour per label (tab10 in sorted order)."""
  cmap = matplotlib.colormaps["tab10"]
  return {lab: cmap(i % 10) for i, lab in enumerate(sorted(set(labels)))}


def _group_label(group: Sequence[str], key: tuple) -> str:
  return fit_lib._label(group, key)


def _sort_key(v: Any) -> tuple:
  return (not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else str(v))


def _draw_runs(ax, curves: Sequence[fit_lib.Curve], group: Sequence[str], cols: dict,
               labelled: set) -> None:
  by_group: dict[tuple, list[fit_lib.Curve]] = {}
  for c in curves:
    by_group.setdefault(_key(c.row, group), []).append(c)
  for key, cs in sorted(by_group.items(), key=lambda kv: str(kv[0])):
    lab = _group_label(group, key)
    best = min(cs, key=lambda c: c.y[-1])
    for c in cs:
      bold = c is best
      ax.plot(c.x, c.y, color=cols[lab], lw=1.8 if bold else 0.6, alpha=1.0 if bold else 0.35,
              marker="o" if len(c.x) < 3 else None, ms=3,
              label=lab if bold and lab not in labelled else None)
    labelled.add(lab)


def _style(ax, x: str, y: str, title: str | None = None) -> None:
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  lo, hi = ax.get_ylim()
  if 0 < lo and hi / lo < 20:  # less than a decade or so: plain numbers on the loss axis
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.set_xlabel(x)
  ax.set_ylabel(y)
  ax.grid(True, which="both", alpha=0.2)
  if title:
    ax.set_title(title)


def plot_curves_by_width(curves: Sequence[fit_lib.Curve], group: Sequence[str] =
                         ("attention.variant",), width_key: str | None = "model.d_model",
                         x: str = "compute/paper_macs", y: str = "eval/loss"):
  """One panel per width (one panel if no run has `width_key`), one colour per group."""
  if not curves:
    raise ValueError("plot_curves_by_width: no curves to plot")
  widths = sorted({c.row.get(width_key) for c in curves} if width_key else {None},
                  key=_sort_key)
  cols = colours([_group_label(group, _key(c.row, group)) for c in curves])
  ncol = min(len(widths), 4)
  nrow = math.ceil(len(widths) / ncol)
  fig = Figure(figsize=(4.2 * ncol, 3.4 * nrow), layout="tight")
  axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True)
  for ax, w in zip(axes.flat, widths):
    labelled: set = set()
    _draw_runs(ax, [c for c in curves if not width_key or c.row.get(width_key) == w], group,
               cols, labelled)
    _style(ax, x, y, f"{width_key} = {w}" if width_key and w is not None else None)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(widths):]:
    ax.set_visible(False)
  return fig


def plot_curves_combined(curves: Sequence[fit_lib.Curve], group: Sequence[str] =
                         ("attention.variant",), x: str = "compute/paper_macs",
                         y: str = "eval/loss", fits: fit_lib.ScalingFits | None = None):
  """Every run on one panel, coloured by group; with `fits`, each group's frontier too."""
  if not curves:
    raise ValueError("plot_curves_combined: no curves to plot")
  cols = colours([_group_label(group, _key(c.row, group)) for c in curves])
  fig = Figure(figsize=(6, 4.2), layout="tight")
  ax = fig.subplots()
  for c in curves:
    ax.plot(c.x, c.y, color=cols[_group_label(group, _key(c.row, group))], lw=0.7, alpha=0.5)
  for lab, col in cols.items():
    ax.plot([], [], color=col, label=lab)
  if fits is not None:
    for g in fits.groups:
      ax.step(g.frontier.x, g.frontier.y, where="post", color=cols.get(g.label, "k"), lw=2)
  _style(ax, x, y, "all runs" + (" and frontiers" if fits is not None else ""))
  ax.legend(fontsize=8)
  return fig


def plot_frontiers(fits: fit_lib.ScalingFits):
  """Each group's frontier points, its fitted law extended to x_pred, and the bootstrap band."""
  if not fits.groups:
    raise ValueError("plot_frontiers: no groups")
  cols = colours([g.label for g in fits.groups])
  fig = Figure(figsize=(6, 4.2), layout="tight")
  ax = fig.subplots()
  for g in fits.groups:
    col = cols[g.label]
    ax.plot(g.frontier.x, g.frontier.y, "o", ms=3, color=col, alpha=0.7)
    f = g.fit
    if f.usable:
      xs = np.geomspace(g.frontier.x[0], fits.x_pred, 200)
      ax.plot(xs, f.predict(xs), color=col, lw=1.6,
              label=f"{g.label}: E={f.E:.3g} + A C^-{f.alpha:.3f}")
      lo, hi = f.predict_ci(xs)
      if np.isfinite(lo).all():
        ax.fill_between(xs, lo, hi, color=col, alpha=0.18, lw=0)
    else:
      ax.plot([], [], "o", color=col, label=f"{g.label}: fit {f.status}")
  ax.axvline(fits.x_pred, color="0.5", ls=":", lw=1)
  _style(ax, fits.x, fits.y, "compute frontier and fit L = E + A C^-alpha")
  ax.legend(fontsize=7)
  return fig


def plot_predictions(fits: fit_lib.ScalingFits):
  """Predicted y at x_pred per group, with its bootstrap interval."""
  groups = list(fits.groups)
  if not groups:
    raise ValueError("plot_predictions: no groups")
  cols = colours([g.label for g in groups])
  fig = Figure(figsize=(1.2 + 0.9 * len(groups), 3.6), layout="tight")
  ax = fig.subplots()
  for i, g in enumerate(groups):
    if math.isfinite(g.y_pred):
      lo, hi = g.y_pred_ci
      err = None
      if math.isfinite(lo) and math.isfinite(hi):
        err = [[g.y_pred - lo], [hi - g.y_pred]]
      ax.errorbar([i], [g.y_pred], yerr=err, fmt="o", color=cols[g.label], capsize=4, ms=7)
    else:
      ax.annotate(g.fit.status, (i, 0.5), xycoords=("data", "axes fraction"), ha="center",
                  rotation=90, fontsize=7)
  ax.set_xticks(range(len(groups)), [g.label for g in groups], rotation=30, ha="right")
  ax.set_xlim(-0.6, len(groups) - 0.4)
  ax.set_ylabel(f"predicted {fits.y}")
  ax.set_title(f"at {fits.x} = {fits.x_pred:.3g}", fontsize=9)
  ax.grid(True, axis="y", alpha=0.2)
  return fig


def save(fig, out_dir: str | os.PathLike, name: str,
         formats: Sequence[str] = FORMATS) -> list[Path]:
  """Write fig as OUT_DIR/NAME.{png,pdf}; returns the paths."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  paths = []
  for ext in formats:
    p = out / f"{name}.{ext}"
    fig.savefig(p, dpi=150, bbox_inches="tight")
    paths.append(p)
  return paths


def make_figures(root: str | os.PathLike, out_dir: str | os.PathLike,
                 x: str = "compute/paper_macs", y: str = "eval/loss",
                 group: Sequence[str] = ("attention.variant",),
                 width_key: str | None = "model.d_model",
                 fits: fit_lib.ScalingFits | None = None, **fit_kwargs: Any) -> list[Path]:
  """All figures of a results directory (see NAMES), PNG and PDF; returns the written paths.

  `fits` reuses an earlier `fit.fit_dir` result (then its x, y, group win); otherwise
  fit_kwargs go to `fit.fit_dir` (filter, statuses, x_min, best_lr_per, n_boot, ...).
  """
  if fits is None:
    fits = fit_lib.fit_dir(root, x, y, group, **fit_kwargs)
  x, y, group = fits.x, fits.y, fits.group
  curves = [c for g in fits.groups for c in g.curves]
  if width_key and not any(width_key in c.row for c in curves):
    width_key = None
  paths = save(plot_curves_by_width(curves, group, width_key, x, y), out_dir, NAMES[0])
  paths += save(plot_curves_combined(curves, group, x, y, fits), out_dir, NAMES[1])
  paths += save(plot_frontiers(fits), out_dir, NAMES[2])
  paths += save(plot_predictions(fits), out_dir, NAMES[3])
  return paths
