"""Run a forecasting results table under a wall-clock time limit.

    python -m structattn.forecast.table --out runs/fc-table --datasets etth1,etth2 \\
        --variants mha,swa,mlr --seeds 0,1,2 --workers 4 --time-limit 300 \\
        --csv-dir /data/timeseries [--preset patchtst] [--epochs 20] [--set data.source=csv ...]

Each (dataset, horizon, variant) is one group of seeds trained vmapped in one process
(`structattn.train.train_group` on the `forecast:` preset `[<preset>-]<dataset>-<horizon>-
<variant>`: `--preset patchtst` gives PatchTST/64's recipe, the default the LayerNorm
presets); groups run in `--workers` spawned processes, in the order given (dataset-major).
`--time-limit` seconds after the start no group is started any more (nor when less than
`--min-left` seconds remain), and groups still running are stopped; every completed group is
kept. A group whose seeds all completed under `--runs` is read back, not retrained, and a
stopped group resumes from its last checkpoint (`--checkpoint-epochs`; by default only the
end of training is checkpointed), so the same command run again continues the table; on a
machine without those run directories, `--previous <an earlier rows.json>` keeps that file's
completed groups instead of rerunning them. With several workers each preallocates
0.9/workers of the GPU (`XLA_PYTHON_CLIENT_MEM_FRACTION` overrides it); a group that runs
out of memory is retried after the others with half the workers, down to one (exchange needs
about 12 GB per group). `--compilation-cache` is the workers' persistent JAX compilation
cache (default `structattn.runtime.DEFAULT_CACHE`). Writes OUT/rows.json (one compact row
per group: per-seed test/val MSE and MAE, the drop-last test scores, best-validation steps,
mean and sample std over seeds, wall time, device) and OUT/summary.json (the same rows with
versions and arguments) after every group, and OUT/table.md at the end; run directories go
to `--runs` (default OUT/runs). Train batches are gathered on device (the presets'
`data.pipeline='device'`, an epoch of steps per compiled call, every seed of a group drawing
its own order); `--set data.pipeline=host` feeds numpy batches instead (not with the
patchtst presets' `data.drop_last`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from structattn import runtime

PATCHTST64_ETTH1_MSE = {96: 0.370, 192: 0.413, 336: 0.422, 720: 0.447}
# PatchTST/64 (Nie et al., ICLR 2023, Table 3): (MSE, MAE) per dataset and horizon
PATCHTST64 = {
    "etth1": {96: (0.370, 0.400), 192: (0.413, 0.429), 336: (0.422, 0.440), 720: (0.447, 0.468)},
    "etth2": {96: (0.274, 0.337), 192: (0.341, 0.382), 336: (0.329, 0.384), 720: (0.379, 0.422)},
}
PRESETS = ("", "patchtst")
RESULT_KEYS = ("test/mse", "test/mae", "test/mse_drop_last", "test/mae_drop_last",
               "final/val_mse", "final/val_mae", "select/best_step", "select/best_value")
COMPACT_KEYS = ("dataset", "horizon", "variant", "preset", "seeds", "status", "wall_s",
                "steps", "batch_size", "device", "from") + tuple(
                    k + suffix for k in RESULT_KEYS for suffix in ("", "_mean", "_std"))


def parse_value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def preset_name(preset, dataset, horizon, variant) -> str:
  return f"{preset + '-' if preset else ''}{dataset}-{horizon}-{variant}"


def job_config(dataset, horizon, variant, seed, overrides, epochs, preset="",
               checkpoint_epochs=0):
  from structattn.configs import forecast as fc
  c = fc.get_config(preset_name(preset, dataset, horizon, variant))
  if epochs and preset == "patchtst":  # the recipe's schedule, fewer or more epochs
    c.train.steps = int(epochs) * int(c.eval_every)
  elif epochs:
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
  if checkpoint_epochs:
    c.checkpoint_every = min(int(c.train.steps), int(checkpoint_epochs) * int(c.eval_every))
  return c


def finished_results(dirs) -> list[dict] | None:
  """The result.json of every run dir if all of them completed, else None."""
  from structattn.sweep import status_of
  if any(status_of(Path(d)) != "completed" for d in dirs):
    return None
  return [json.loads((Path(d) / "result.json").read_text()) for d in dirs]


def run_group(job):
  """Worker: one vmapped group; returns a summary row (or a skipped/failed row)."""
  dataset, horizon, variant, seeds, overrides, epochs, runs, deadline, min_left = job[:9]
  preset = job[9] if len(job) > 9 else ""
  checkpoint_epochs = job[10] if len(job) > 10 else 0
  row = {"dataset": dataset, "horizon": horizon, "variant": variant, "seeds": list(seeds),
         "preset": preset}
  if deadline - time.time() < min_left:
    return {**row, "status": "not run: time limit"}
  t0 = time.time()
  try:
    from structattn import rundir, train
    configs = [job_config(dataset, horizon, variant, s, overrides, epochs, preset,
                          checkpoint_epochs) for s in seeds]
    name = preset_name(preset, dataset, horizon, variant)
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
  for key in RESULT_KEYS:
    if any(key not in r for r in results):  # runs from before the key existed
      continue
    vals = [float(r[key]) for r in results]
    out[key] = vals
    out[key + "_mean"] = float(np.mean(vals))
    out[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
  r0 = results[0]
  for key in ("baseline/test_mse_repeat_last", "baseline/test_mae_repeat_last",
              "baseline/test_mse_repeat_last_drop_last",
              "params/total", "compute/paper_macs_per_window", "model/num_patches",
              "data/windows", "data/source", "data/drop_last", "model/bn_stats_windows"):
    out[key] = r0.get(key)
  return out


def out_of_memory(row) -> bool:
  status = row.get("status", "")
  return status.startswith("failed") and ("RESOURCE_EXHAUSTED" in status
                                          or "Out of memory" in status)


def _run_pass(jobs, workers, run, deadline):
  """Yield run(job) rows from `workers` spawned processes until done or the deadline."""
  ctx = mp.get_context("spawn")
  pool = ctx.Pool(workers)
  try:
    it = pool.imap_unordered(run, jobs)
    for _ in jobs:
      try:
        yield it.next(timeout=max(1.0, deadline - time.time()))
      except mp.TimeoutError:
        return
  finally:
    pool.terminate()


def schedule(jobs, workers, run, deadline, on_row):
  """Run every job in `workers` processes; a group that ran out of GPU memory is retried in a
  later pass with half the workers (so twice the memory each), down to one worker.

  With several workers each preallocates 0.9/workers of the GPU, so one group that needs more
  memory fails on its own instead of starving the others (12 workers growing freely on one
  H100 ran out of memory in 17 groups; exchange groups need about 12 GB, 20 GB for SWA before
  the band fix). A fraction set by the caller (XLA_PYTHON_CLIENT_MEM_FRACTION) is kept, and
  then out-of-memory groups are not retried. on_row gets the final row of every finished job.
  """
  managed = "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ
  pending = list(jobs)
  try:
    while pending:
      if managed:
        if workers > 1:
          os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 / workers:.3f}"
        else:
          os.environ.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
      retry = []
      for row in _run_pass(pending, min(workers, len(pending)), run, deadline):
        if managed and workers > 1 and out_of_memory(row):
          retry.append(row)
          print(f"out of memory with {workers} workers, retried with fewer: "
                f"{row['dataset']}-{row['horizon']}-{row['variant']}", flush=True)
        else:
          on_row(row)
      if not retry:
        return
      keys = {(r["dataset"], r["horizon"], r["variant"]) for r in retry}
      pending = [j for j in pending if (j[0], j[1], j[2]) in keys]
      workers = max(1, workers // 2)
      if time.time() >= deadline:  # report the failures as they were
        for row in retry:
          on_row(row)
        return
  finally:
    if managed:
      os.environ.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)


def _cell(r, key, digits=3):
  if f"{key}_mean" not in r:
    return ""
  return f"{r[key + '_mean']:.{digits}f} ± {r[key + '_std']:.{digits}f}"


def markdown(rows) -> str:
  lines = ["| dataset | F | variant | test MSE | test MAE | test MSE (drop last) | "
           "test MAE (drop last) | val MSE | steps | PatchTST/64 MSE / MAE |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if r.get("status") != "completed":
      lines.append(f"| {r['dataset']} | {r['horizon']} | {r['variant']} | {r['status']} "
                   f"| | | | | | |")
      continue
    ref = PATCHTST64.get(r["dataset"], {}).get(r["horizon"])
    lines.append(
        f"| {r['dataset']} | {r['horizon']} | {r['variant']} | {_cell(r, 'test/mse')} | "
        f"{_cell(r, 'test/mae')} | {_cell(r, 'test/mse_drop_last')} | "
        f"{_cell(r, 'test/mae_drop_last')} | {r['final/val_mse_mean']:.3f} | {r['steps']} | "
        f"{'%.3f / %.3f' % ref if ref else ''} |")
  return "\n".join(lines) + "\n"


def previous_rows(paths, preset, seeds, jobs) -> list[dict]:
  """The completed rows of earlier rows.json files that match a job (same preset, seeds)."""
  wanted = {(j[0], j[1], j[2]) for j in jobs}
  out = {}
  for path in paths:
    for r in json.loads(Path(path).read_text())["rows"]:
      key = (r["dataset"], r["horizon"], r["variant"])
      if (r.get("status") == "completed" and key in wanted and r.get("preset", "") == preset
          and list(r.get("seeds", [])) == list(seeds)):
        out[key] = {**r, "from": str(path)}
  return list(out.values())


def paired(rows, key: str = "test/mse_drop_last", base: str = "mha") -> list[dict]:
  """Per (dataset, horizon) and variant: the per-seed differences variant - base of `key`
  over the seeds both completed (same seed: same batch order and data), their mean and
  sample std, and how many seeds the variant is lower on."""
  done = {(r["dataset"], r["horizon"], r["variant"]): r for r in rows
          if r.get("status") == "completed" and key in r}
  out = []
  for (ds, h, v), r in done.items():
    ref = done.get((ds, h, base))
    if v == base or ref is None:
      continue
    by_seed = dict(zip(ref["seeds"], ref[key]))
    diffs = [float(x) - float(by_seed[s]) for s, x in zip(r["seeds"], r[key]) if s in by_seed]
    if not diffs:
      continue
    out.append({"dataset": ds, "horizon": h, "variant": v, "base": base, "metric": key,
                "diffs": diffs, "mean": float(np.mean(diffs)),
                "std": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else 0.0,
                "lower_on": int(sum(d < 0 for d in diffs)), "seeds": len(diffs)})
  return out


def paired_markdown(pairs) -> str:
  if not pairs:
    return ""
  lines = ["", f"Paired by seed: {pairs[0]['metric']} of the variant minus "
           f"{pairs[0]['base']}'s (mean ± sample std over seeds; seeds where it is lower)", "",
           "| dataset | F | variant | difference | lower on |", "|---|---|---|---|---|"]
  for p in pairs:
    lines.append(f"| {p['dataset']} | {p['horizon']} | {p['variant']} | "
                 f"{p['mean']:+.4f} ± {p['std']:.4f} | {p['lower_on']}/{p['seeds']} |")
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
  ap.add_argument("--time-limit", "--deadline_s", dest="time_limit", type=float, default=1e9,
                  help="seconds: no group starts after this, running ones are stopped")
  ap.add_argument("--min-left", "--min_left_s", dest="min_left", type=float, default=45.0,
                  help="seconds: no group starts with less than this left of --time-limit")
  ap.add_argument("--preset", default="", choices=PRESETS,
                  help="preset family: '' (LayerNorm presets) or patchtst (PatchTST/64)")
  ap.add_argument("--csv-dir", default="", help="data.csv_dir: the benchmark CSV directory")
  ap.add_argument("--checkpoint-epochs", type=int, default=0,
                  help="checkpoint every this many epochs (0: at the end only)")
  ap.add_argument("--epochs", type=int, default=0, help="0: the preset's")
  ap.add_argument("--previous", action="append", default=[],
                  help="rows.json of an earlier run: its completed groups (same preset and "
                  "seeds) are kept, not rerun (repeatable)")
  ap.add_argument("--compilation-cache", default=runtime.DEFAULT_CACHE,
                  help="persistent JAX compilation cache of the workers ('' to disable)")
  ap.add_argument("--set", action="append", default=[], help="dotted.key=value override")
  args = ap.parse_args(argv)
  if args.compilation_cache:  # read by jax in the spawned workers
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          str(Path(args.compilation_cache).expanduser()))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  from structattn.configs import forecast as fc
  t_start = time.time()
  deadline = t_start + args.time_limit
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  runs = args.runs or str(out / "runs")
  overrides = dict(kv.split("=", 1) for kv in args.set)
  overrides = {k: parse_value(v) for k, v in overrides.items()}
  if args.csv_dir:
    overrides["data.csv_dir"] = str(Path(args.csv_dir).expanduser().resolve())
  seeds = [int(s) for s in args.seeds.split(",")]
  jobs = []
  for ds in args.datasets.split(","):
    horizons = [int(h) for h in args.horizons.split(",")] if args.horizons else fc.HORIZONS[ds]
    for h in horizons:
      for v in args.variants.split(","):
        jobs.append((ds, h, v, seeds, overrides, args.epochs, runs, deadline, args.min_left,
                     args.preset, args.checkpoint_epochs))
  rows = previous_rows(args.previous, args.preset, seeds, jobs)
  carried = {(r["dataset"], r["horizon"], r["variant"]) for r in rows}
  if carried:
    print(f"{len(carried)} completed group(s) read from {args.previous}", flush=True)
  pending = [j for j in jobs if (j[0], j[1], j[2]) not in carried]

  def write():
    order = {(j[0], j[1], j[2]): i for i, j in enumerate(jobs)}
    rows.sort(key=lambda r: order[(r["dataset"], r["horizon"], r["variant"])])
    (out / "summary.json").write_text(json.dumps(
        {"rows": rows, "args": vars(args), "elapsed_s": time.time() - t_start}, indent=1))
    compact = [{k: r[k] for k in COMPACT_KEYS if k in r} for r in rows]
    (out / "rows.json").write_text(json.dumps(
        {"rows": compact, "paired": paired(rows), "preset": args.preset,
         "elapsed_s": round(time.time() - t_start, 1),
         "versions": next((r["versions"] for r in rows if r.get("versions")), None)},
        separators=(",", ":")) + "\n")

  def on_row(row):
    rows.append(row)
    print(json.dumps({k: row.get(k) for k in ("dataset", "horizon", "variant", "status",
                                               "test/mse_mean", "test/mae_mean", "wall_s")}),
          flush=True)
    write()

  if pending:
    schedule(pending, args.workers, run_group, deadline, on_row)
  done = {(r["dataset"], r["horizon"], r["variant"]) for r in rows}
  rows += [{"dataset": j[0], "horizon": j[1], "variant": j[2], "seeds": seeds,
            "preset": args.preset, "status": "not run or stopped: time limit"}
           for j in jobs if (j[0], j[1], j[2]) not in done]
  write()
  text = markdown(rows) + paired_markdown(paired(rows))
  (out / "table.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
