"""Run a forecasting results table under a wall-clock deadline.

    python -m structattn.forecast.table --out runs/fc-table --datasets etth1,etth2 \\
        --variants mha,swa,mlr --seeds 0,1,2 --workers 4 --deadline_s 300 \\
        [--epochs 20] [--set data.data_dir=.tsdata --set data.source=csv ...]

Each (dataset, horizon, variant) is one group of seeds trained vmapped in one process
(`structattn.train.train_group` on the `configs/forecast.py` preset `<dataset>-<horizon>-
<variant>`); groups run in `--workers` spawned processes, in the order given (dataset-major),
and a group is not started when less than `--min_left_s` of the deadline remains. With
several workers each preallocates 0.9/workers of the GPU (`XLA_PYTHON_CLIENT_MEM_FRACTION`
overrides it); exchange needs about 12 GB per group, so use at most 6 workers on an 80 GB card.
A group whose seeds all completed under `--runs` is read back, not retrained. Writes
OUT/summary.json (per group: per-seed test/val MSE and MAE, mean and sample std over seeds,
steps, wall time, device, versions) after every group, and OUT/table.md at the end; run
directories go to `--runs` (default OUT/runs). Train batches are gathered on device (the
presets' `data.pipeline='device'`, an epoch of steps per compiled call, every seed of a group
drawing its own order); `--set data.pipeline=host` feeds numpy batches instead.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

PATCHTST64_ETTH1_MSE = {96: 0.370, 192: 0.413, 336: 0.422, 720: 0.447}


def parse_value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def job_config(dataset, horizon, variant, seed, overrides, epochs):
  from configs import forecast as fc
  c = fc.get_config(f"{dataset}-{horizon}-{variant}")
  if epochs:
    fc._set_steps(c, int(epochs))
  for key, value in overrides.items():
    node = c
    *path, last = key.split(".")
    for p in path:
      node = node[p]
    node[last] = type(node[last])(value) if isinstance(node[last], (int, float)) and \
        not isinstance(node[last], bool) else value
  c.seed = int(seed)
  c.progress = False
  c.checkpoint_every = int(c.train.steps)
  return c


def finished_results(dirs) -> list[dict] | None:
  """The result.json of every run dir if all of them completed, else None."""
  from structattn.sweep import status_of
  if any(status_of(Path(d)) != "completed" for d in dirs):
    return None
  return [json.loads((Path(d) / "result.json").read_text()) for d in dirs]


def run_group(job):
  """Worker: one vmapped group; returns a summary row (or a skipped/failed row)."""
  dataset, horizon, variant, seeds, overrides, epochs, runs, deadline, min_left = job
  row = {"dataset": dataset, "horizon": horizon, "variant": variant, "seeds": list(seeds)}
  if deadline - time.time() < min_left:
    return {**row, "status": "skipped: deadline"}
  t0 = time.time()
  try:
    from structattn import rundir, train
    configs = [job_config(dataset, horizon, variant, s, overrides, epochs) for s in seeds]
    name = f"{dataset}-{horizon}-{variant}"
    dirs = [str(Path(runs) / f"{name}-s{s}") for s in seeds]
    results = finished_results(dirs)  # a group whose every seed completed is not rerun
    if results is None:
      results = train.train_group(configs, dirs, group_dir=str(Path(runs) / f"group-{name}"))
  except Exception as e:  # noqa: BLE001  (reported in the table, the other groups go on)
    return {**row, "status": f"failed: {type(e).__name__}: {str(e)[:500]}",
            "wall_s": time.time() - t0}
  out = {**row, "status": "completed", "wall_s": time.time() - t0,
         "steps": int(configs[0].train.steps), "batch_size": int(configs[0].train.batch_size),
         "device": results[0].get("device") or rundir.device_description(),
         "versions": results[0].get("versions") or rundir.versions()}
  for key in ("test/mse", "test/mae", "final/val_mse", "final/val_mae"):
    vals = [float(r[key]) for r in results]
    out[key] = vals
    out[key + "_mean"] = float(np.mean(vals))
    out[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
  r0 = results[0]
  for key in ("baseline/test_mse_repeat_last", "baseline/test_mae_repeat_last",
              "params/total", "compute/paper_macs_per_window", "model/num_patches",
              "data/windows", "data/source"):
    out[key] = r0.get(key)
  return out


def markdown(rows) -> str:
  lines = ["| dataset | H | variant | test MSE | test MAE | val MSE | steps | PatchTST/64 MSE |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("status") != "completed":
      lines.append(f"| {r['dataset']} | {r['horizon']} | {r['variant']} | {r['status']} "
                   f"| | | | |")
      continue
    ref = PATCHTST64_ETTH1_MSE.get(r["horizon"]) if r["dataset"] == "etth1" else None
    lines.append(
        f"| {r['dataset']} | {r['horizon']} | {r['variant']} | "
        f"{r['test/mse_mean']:.3f} ± {r['test/mse_std']:.3f} | "
        f"{r['test/mae_mean']:.3f} ± {r['test/mae_std']:.3f} | "
        f"{r['final/val_mse_mean']:.3f} | {r['steps']} | {ref if ref else ''} |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--runs", default="")
  ap.add_argument("--datasets", default="etth1")
  ap.add_argument("--variants", default="mha,swa,mlr")
  ap.add_argument("--horizons", default="", help="default: every preset horizon")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--workers", type=int, default=1)
  ap.add_argument("--deadline_s", type=float, default=1e9)
  ap.add_argument("--min_left_s", type=float, default=45.0)
  ap.add_argument("--epochs", type=int, default=0, help="0: the preset's")
  ap.add_argument("--set", action="append", default=[], help="dotted.key=value override")
  args = ap.parse_args(argv)
  from configs import forecast as fc
  t_start = time.time()
  deadline = t_start + args.deadline_s
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  runs = args.runs or str(out / "runs")
  overrides = dict(kv.split("=", 1) for kv in args.set)
  overrides = {k: parse_value(v) for k, v in overrides.items()}
  seeds = [int(s) for s in args.seeds.split(",")]
  jobs = []
  for ds in args.datasets.split(","):
    horizons = [int(h) for h in args.horizons.split(",")] if args.horizons else fc.HORIZONS[ds]
    for h in horizons:
      for v in args.variants.split(","):
        jobs.append((ds, h, v, seeds, overrides, args.epochs, runs, deadline, args.min_left_s))
  # Each worker gets its own slice of the GPU (preallocated), so one group that needs more
  # memory fails on its own instead of starving the others: 12 workers growing freely on one
  # H100 ran out of memory in 17 groups. Exchange (D=128) needs about 12 GB per group of 3 seeds.
  if args.workers > 1 and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / args.workers:.3f}"
  rows = []

  def write():
    order = {(j[0], j[1], j[2]): i for i, j in enumerate(jobs)}
    rows.sort(key=lambda r: order[(r["dataset"], r["horizon"], r["variant"])])
    (out / "summary.json").write_text(json.dumps(
        {"rows": rows, "args": vars(args), "elapsed_s": time.time() - t_start}, indent=1))

  ctx = mp.get_context("spawn")
  pool = ctx.Pool(args.workers, maxtasksperchild=None)
  try:
    it = pool.imap_unordered(run_group, jobs)
    for _ in jobs:
      try:
        row = it.next(timeout=max(1.0, deadline - time.time()))
      except mp.TimeoutError:
        break
      rows.append(row)
      print(json.dumps({k: row.get(k) for k in ("dataset", "horizon", "variant", "status",
                                                 "test/mse_mean", "test/mae_mean", "wall_s")}),
            flush=True)
      write()
  finally:
    pool.terminate()
  done = {(r["dataset"], r["horizon"], r["variant"]) for r in rows}
  rows += [{"dataset": j[0], "horizon": j[1], "variant": j[2], "seeds": seeds,
            "status": "not run: deadline"} for j in jobs if (j[0], j[1], j[2]) not in done]
  write()
  (out / "table.md").write_text(markdown(rows))
  print(markdown(rows))


if __name__ == "__main__":
  main()
