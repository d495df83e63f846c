"""Reproduce a paper result: run its sweep, then fit and draw it.

    structattn-reproduce icr-head-dim --scale=tiny --workdir=runs/icr-head-dim
    structattn-reproduce lm-scaling --scale=paper --workdir=runs/lm --parallel=2

Figures (`FIGURES`):
  icr-head-dim    in-context regression, finding (a): MHA's last-point error against its head
                  dim r = D / heads, one line per d_input; the error falls only once r
                  approaches d_input.  (icr:sweep-head-dim-<scale>)
  icr-compute     in-context regression, finding (b): last-point error against forward
                  compute for MHA, bilinear BTT and bilinear MLR at several widths; the
                  structured variants below MHA at equal compute. (icr:sweep-compute-<scale>)
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


def _evaluated(root: Path, key: str):
  """(row, (step, value, sem)) of completed and interrupted runs with at least one eval."""
  out = []
  for r in results_lib.collect(root):
    if r.get("status") not in ("completed", "running"):
      continue
    ev = last_eval(Path(root) / r["run"], key)
    if ev is not None:
      out.append((r, ev))
  return out


def analyze_icr_head_dim(root: Path, out: Path) -> dict[str, Any]:
  """Last-point error against head dim r per d_input, with the baselines.  Runs cut short
  (status running) count with their last eval; the table gives the steps reached."""
  by_d: dict[int, list[tuple[int, float, float, int]]] = {}
  base: dict[int, dict[str, float]] = {}
  for r, (step, se, sem) in _evaluated(root, "eval/last_point_se"):
    d, width, heads = int(r["icr.d_input"]), int(r["model.d_model"]), int(
        r["attention.num_heads"])
    head_dim = int(r.get("attention.d_qk") or 0) or width // heads
    by_d.setdefault(d, []).append((head_dim, se, sem, step))
    base[d] = {k.split("/")[1]: float(r[k]) for k in r
               if k.startswith("baseline/") and k.endswith("/last_point_se") and _finite(r[k])}
  fig = _figure(figsize=(4.8 * max(1, len(by_d)), 3.6))
  axes = fig.subplots(1, max(1, len(by_d)), squeeze=False)[0]
  summary = {"figure": "icr-head-dim", "by_d_input": {}}
  for ax, d in zip(axes, sorted(by_d)):
    pts = sorted(by_d[d])
    r_, e_, s_, _ = (np.array(v) for v in zip(*pts))
    ax.errorbar(r_, e_, yerr=s_, marker="o", label="MHA")
    for name, style in (("zero", ":"), ("least_squares", "--"), ("averaging", "-.")):
      if name in base[d]:
        ax.axhline(max(base[d][name], 1e-6), ls=style, color="grey", lw=1, label=name)
    ax.axvline(d, color="k", lw=0.8, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("head dim r")
    ax.set_ylabel("last-point squared error")
    ax.set_title(f"d_input = {d}")
    ax.legend(fontsize=7)
    below = [e for r, e, _, _ in pts if r < d]
    at_or_above = [e for r, e, _, _ in pts if r >= d]
    summary["by_d_input"][str(d)] = {
        "head_dim": [int(v) for v in r_], "last_point_se": [float(v) for v in e_],
        "last_point_se_sem": [float(v) for v in s_], "steps": [p[3] for p in pts],
        "baselines": base[d],
        "best_below_d": min(below) if below else None,
        "best_at_or_above_d": min(at_or_above) if at_or_above else None,
        "finding_holds": bool(below and at_or_above and min(at_or_above) < min(below))}
  from structattn import figures as fig_lib
  summary["files"] = [str(p) for p in fig_lib.save(fig, out, "icr_head_dim")]
  lines = ["| d_input | " + " | ".join(f"r={r}" for r in sorted({p[0] for v in by_d.values()
                                                                  for p in v})) + " |"]
  all_r = sorted({p[0] for v in by_d.values() for p in v})
  lines.append("|---" * (len(all_r) + 1) + "|")
  for d in sorted(by_d):
    e = {p[0]: (p[1], p[3]) for p in by_d[d]}
    lines.append(f"| {d} | " + " | ".join(f"{e[r][0]:.3g} ({e[r][1]} steps)" if r in e else ""
                                          for r in all_r) + " |")
  summary["table"] = "\n".join(lines)
  return summary


def _curves(root: Path, y: str, x: str = "compute/paper_macs"):
  from structattn import fit as fit_lib
  return fit_lib.load_curves(root, x=x, y=y, statuses=("completed", "running"))


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


def analyze_icr_compute(root: Path, out: Path) -> dict[str, Any]:
  from structattn import figures as fig_lib
  y = "eval/last_point_se"
  curves = _curves(root, y)
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
                  for r, (step, se, _) in _evaluated(root, "eval/last_point_se")),
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


FIGURES: dict[str, tuple[str, str, Callable[[Path, Path], dict]]] = {
    "icr-head-dim": ("icr.py", "sweep-head-dim", analyze_icr_head_dim),
    "icr-compute": ("icr.py", "sweep-compute", analyze_icr_compute),
    "lm-scaling": ("lm.py", "sweep-scaling", analyze_lm_scaling),
    "forecast-table": ("forecast.py", "sweep-table", analyze_forecast_table),
}
SCALES = ("tiny", "short", "paper")
# Staged LM studies (structattn.lm_study): learning-rate grids, then the other widths at the
# chosen rate, then seeds; they run under --time-limit and keep their runs in --archive.
STUDY_SCALES = ("english", "mini")
# 'short' is the paper's LM architecture at a few minutes of one GPU.
FIGURE_SCALES = {"lm-scaling": SCALES + STUDY_SCALES}


def scales_for(figure: str) -> tuple[str, ...]:
  return FIGURE_SCALES.get(figure, ("tiny", "paper"))


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


def study_plan(spec, overrides: Mapping[str, Any] | None = None, only: Sequence[str] = ()):
  """The study's plan as a function of its run folder; with `only`, each stage keeps the points
  whose names contain one of those substrings (`--only`)."""
  from structattn import lm_study

  def plan(runs):
    stages = lm_study.plan(spec, runs, dict(overrides or {}))
    return [[p for p in st if any(o in p[0] for o in only)] for st in stages] if only else stages
  return plan


def _reproduce_study(scale, out: Path, parallel, vmap, overrides, analyze_only, cache_dir,
                     time_limit, archive, only: Sequence[str] = ()) -> dict[str, Any]:
  from structattn import lm_study
  from structattn import study as study_lib
  spec = lm_study.spec_for(scale)
  overrides = dict(overrides or {})
  plan = study_plan(spec, overrides, only)
  if analyze_only:
    study_lib.unpack(archive or out / "runs.tar.gz", out / "runs")
    summary = {"statuses": {}, "ran": [], "pending": [], "skipped_for_time": []}
  else:
    summary = study_lib.run_study(plan, out, time_limit=time_limit, archive=archive,
                                  parallel=parallel, vmap=vmap, cache_dir=cache_dir,
                                  flops_of=lm_study.flops_of, startup=spec.startup_seconds)
    print(study_lib.describe(summary), end="")
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


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="structattn-reproduce", description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="example:\n  structattn-reproduce icr-head-dim --scale=tiny "
      "--workdir=runs/icr-head-dim\n\nfigures and the config presets they run:\n" + "\n".join(
          f"  {f:15s} {file.removesuffix('.py')}:{preset}-<scale>"
          for f, (file, preset, _) in FIGURES.items()))
  p.add_argument("figure", choices=sorted(FIGURES))
  p.add_argument("--scale", default="tiny", choices=SCALES + STUDY_SCALES)
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
                 help=f"study scales {STUDY_SCALES}: start no run that would not finish "
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
