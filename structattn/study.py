"""Studies that outlast one process: staged sweeps under a time limit, kept in a small archive.

A study is a sequence of stages, each a list of sweep points (name, config) whose contents
may depend on the results of the stages before (e.g. the learning rate chosen by a grid).
`run_study` runs, in order, the next points that fit the time it is given, and after every
finished point writes an archive of the run directories (configs, metrics, results; no
checkpoints), so an invocation that is cut off loses only the point in flight. The next
invocation unpacks the archive, skips what is complete, tries failed points once more and
goes on; `structattn-results` and
`structattn-fit` read the unpacked run directories like any sweep's.

    plan = lambda runs_dir: [[(name, config), ...], ...]   # stages, from what is done so far
    run_study(plan, "runs/study", time_limit=540, archive="runs/study.tar.gz")

Points that differ only in seed and learning rate run as one vmapped group (`vmap=True`);
`parallel > 1` runs groups in that many worker processes.  The time a group will take is
estimated from its training FLOPs at the rate the finished runs of the same model achieved
(`estimate_seconds`); a group that would not finish before the limit is not started.  Rates
are kept per accelerator: a run measured while p groups shared it counts p times its own rate,
and a group started beside `parallel - 1` others is expected to get 1/parallel of it (the
accelerator, not the host, is what the groups share).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import math
import multiprocessing
import os
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from structattn import sweep as sweep_lib

Point = tuple[str, ml_collections.ConfigDict]
Plan = Callable[[Path], Sequence[Sequence[Point]]]

KEPT_FILES = ("config.json", "result.json", "metrics.jsonl", "error.txt", "study.json")
DEFAULT_RATE = 50e12  # training FLOP/s assumed before any run of a model has finished
STARTUP_SECONDS = 90.0  # start-up, compilation and data loading of a group (a GPU default)


# ---------------------------------------------------------------------------------- archive


def pack(runs_dir: str | os.PathLike, archive: str | os.PathLike) -> int:
  """Write the finished run directories under runs_dir (their KEPT_FILES only) to a .tar.gz,
  atomically; returns the number of runs packed."""
  root, archive = Path(runs_dir), Path(archive)
  runs = sorted(p.parent for p in root.rglob("result.json")
                if "checkpoints" not in p.parts and ".stale-" not in p.parent.name
                and _finished_status(p))
  archive.parent.mkdir(parents=True, exist_ok=True)
  tmp = archive.with_name(f".{archive.name}.{os.getpid()}.tmp")
  with tarfile.open(tmp, "w:gz") as tar:
    for run in runs:
      for name in KEPT_FILES:
        f = run / name
        if f.is_file():
          tar.add(f, arcname=str(f.relative_to(root)))
  os.replace(tmp, archive)
  return len(runs)


def unpack(archive: str | os.PathLike, runs_dir: str | os.PathLike) -> int:
  """Extract an archive written by `pack` into runs_dir; a run directory that is already
  complete is left as it is.  Returns the number of runs restored."""
  archive, root = Path(archive), Path(runs_dir)
  if not archive.is_file():
    return 0
  restored = set()
  with tarfile.open(archive, "r:gz") as tar:
    for member in tar.getmembers():
      path = Path(member.name)
      if not member.isfile() or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"--archive={str(archive)!r}: unexpected entry {member.name!r}")
      run = root / path.parent
      if sweep_lib.status_of(run) == "completed" and path.parent not in restored:
        continue  # the run directory here is already complete: keep it
      run.mkdir(parents=True, exist_ok=True)
      (run / path.name).write_bytes(tar.extractfile(member).read())
      restored.add(path.parent)
  return len(restored)


def _finished_status(result_json: Path) -> bool:
  try:
    status = str(json.loads(result_json.read_text()).get("status", ""))
  except (OSError, ValueError):
    return False
  return status == "completed" or status.startswith("failed")


# ------------------------------------------------------------------------------- estimates

MEMBER_FIELDS = ("seed", "train.lr")  # what the members of one vmapped group may differ in


def model_key(config: ml_collections.ConfigDict) -> str:
  """What the training rate depends on: everything but seed, lr and the number of steps."""
  from structattn.results import flatten
  drop = set(MEMBER_FIELDS) | {"train.steps", "train.compute_budget"}
  return json.dumps({k: v for k, v in flatten(config.to_dict()).items() if k not in drop},
                    sort_keys=True, default=str)


def units_of(config: ml_collections.ConfigDict) -> float:
  """Training units (tokens for a language model) a run consumes."""
  return float(config.train.steps) * float(config.train.batch_size) * float(
      config.model.get("seq_len", 1))


def observed_rates(runs_dir: Path, points: Sequence[Point]) -> dict[tuple[str, int], float]:
  """Units per second of finished runs, by (model key, members trained together): the median
  logged `throughput/<unit>_per_s` of each run (it counts every member of a group), times the
  number of groups that shared the accelerator with it (`parallel` in its study.json)."""
  rates: dict[tuple[str, int], float] = {}
  largest: dict[int, float] = {}  # group size -> the largest training FLOPs per unit seen
  for name, config in points:
    try:
      result = json.loads((runs_dir / name / "result.json").read_text())
      rows = [json.loads(line) for line in (runs_dir / name / "metrics.jsonl").open()]
      group = json.loads((runs_dir / name / "study.json").read_text())
    except (OSError, ValueError):
      continue
    unit = result.get("unit", "tokens")
    values = sorted(float(r[f"throughput/{unit}_per_s"]) for r in rows[1:]
                    if f"throughput/{unit}_per_s" in r)
    if result.get("status") == "completed" and values:
      m = int(group.get("group_size", 1))
      shared = max(1, int(group.get("parallel", 1)))
      rates[(model_key(config), m)] = values[len(values) // 2] * shared
      per_unit = float(result.get(f"compute/train_flops_per_{unit[:-1]}", 0) or 0)
      # FLOP/s, for models that have not run yet: that of the largest model seen (per unit),
      # since a larger model keeps the accelerator at least as busy as a smaller one.
      for size in (m, 0):  # 0: any group size
        if per_unit > 0 and per_unit >= largest.get(size, 0.0):
          largest[size] = per_unit
          rates[("", size)] = values[len(values) // 2] * shared * per_unit
  return rates


def finished_rows(runs_dir: Path):
  """(results row, metrics rows) of every completed run under runs_dir, stale ones skipped:
  what a study's compact rows file is made from."""
  from structattn import results as results_lib
  for row in results_lib.collect(runs_dir):
    if ".stale-" in Path(row["run"]).name or row.get("status") != "completed":
      continue
    yield row, results_lib.read_metrics(Path(runs_dir) / row["run"])


def finished_points(runs_dir: Path) -> list[Point]:
  """(name, config) of every run directory under runs_dir with a config and a result, planned
  or not (a plan narrowed by `--only` still estimates from every model that has run)."""
  out = []
  for result in sorted(Path(runs_dir).glob("*/result.json")):
    run = result.parent
    if ".stale-" in run.name:
      continue
    try:
      config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
    except (OSError, ValueError):
      continue
    out.append((run.name, config))
  return out


def estimate_seconds(group: Sequence[Point], rates: dict[tuple[str, int], float],
                     flops_of: Callable[[ml_collections.ConfigDict], float] | None = None,
                     default_rate: float = DEFAULT_RATE,
                     startup: float = STARTUP_SECONDS, parallel: int = 1) -> float:
  """Seconds a group (members trained together) is expected to take, start-up included: its
  units at the rate a finished group of the same model and size achieved, else (or when only
  other group sizes finished, at their rate scaled by size) its training FLOPs at the FLOP/s
  of the largest finished model, else at `default_rate` FLOP/s; observed rates are divided by
  `parallel`, the groups that will share the accelerator."""
  rates = {k: r / max(1, int(parallel)) for k, r in rates.items()}
  key, m = model_key(group[0][1]), len(group)
  units = sum(units_of(c) for _, c in group)
  if (key, m) in rates:
    return startup + units / rates[(key, m)]
  same = [(size, r) for (k, size), r in rates.items() if k == key]
  if same:  # a group of another size: assume per-member rate no better than the best seen
    return startup + units / max(r for _, r in same)
  if flops_of is None:
    return startup
  # The largest finished model's FLOP/s, in a group of this size if one ran, else of any size.
  seen = [r for (k, size), r in rates.items() if k == "" and size == m] or [
      r for (k, size), r in rates.items() if k == "" and size == 0]
  rate = min(seen) if seen else default_rate
  return startup + sum(flops_of(c) for _, c in group) / rate


# ----------------------------------------------------------------------------------- runner


def run_study(plan: Plan, workdir: str | os.PathLike, *, time_limit: float | None = None,
              archive: str | os.PathLike | None = None, parallel: int = 1, vmap: bool = True,
              cache_dir: str | None = sweep_lib.DEFAULT_CACHE,
              flops_of: Callable[[ml_collections.ConfigDict], float] | None = None,
              default_rate: float = DEFAULT_RATE, startup: float = STARTUP_SECONDS,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Run the study's pending points that fit in `time_limit` seconds (None: all).

  `flops_of(config)`: a run's training FLOPs, for time estimates before any run of that
  model has finished (at `default_rate` FLOP/s); `startup`: seconds a group needs before its
  first step (compilation, data).

  The run directories live in `workdir/runs`; `archive` (default `workdir/runs.tar.gz`) is
  unpacked first and rewritten after every finished group.  Returns {'statuses': {name:
  status}, 'ran': [names], 'skipped_for_time': [names], 'pending': [names], 'seconds': s}.
  """
  if parallel < 1:
    raise ValueError(f"--parallel={parallel} is invalid: must be >= 1")
  if time_limit is not None and time_limit <= 0:
    raise ValueError(f"--time-limit={time_limit} is invalid: must be > 0 seconds")
  t0 = time.time()
  deadline = math.inf if time_limit is None else t0 + float(time_limit)
  runs = Path(workdir) / "runs"
  runs.mkdir(parents=True, exist_ok=True)
  archive = Path(archive) if archive else Path(workdir) / "runs.tar.gz"
  restored = unpack(archive, runs)
  if restored:
    log(f"study: {restored} finished runs restored from {archive}")
  ran: list[str] = []
  skipped: list[str] = []
  tried: set[str] = set()  # each point runs at most once per invocation
  ctx = multiprocessing.get_context("spawn")
  pool = (cf.ProcessPoolExecutor(parallel, mp_context=ctx, initializer=sweep_lib._worker_init,
                                 initargs=(0.9 / parallel, cache_dir))
          if parallel > 1 else None)
  if pool is None:
    sweep_lib.enable_compilation_cache(cache_dir)
  try:
    while True:
      if set_aside_stale(runs, [p for st in plan(runs) for p in st], log):
        continue  # the plan may change now that those runs are gone
      stage = _next_stage(plan, runs, tried)
      if stage is None:
        break
      todo = [p for p in stage
              if sweep_lib.status_of(runs / p[0]) != "completed" and p[0] not in tried]
      planned = dict(p for st in plan(runs) for p in st)  # a planned config wins over its
      rates = observed_rates(runs, list({**dict(finished_points(runs)), **planned}.items()))
      jobs = [[todo[i] for i in g] for g in sweep_lib.groups(todo, vmap)]
      running: dict[cf.Future, tuple[list[Point], int]] = {}
      sharing = min(parallel, len(jobs))  # groups that share the accelerator in this stage
      for job in jobs:
        tried.update(n for n, _ in job)
        need = estimate_seconds(job, rates, flops_of, default_rate, startup, parallel=sharing)
        if time.time() + need > deadline:
          skipped += [n for n, _ in job]
          log(f"study: not starting {[n for n, _ in job]} (needs ~{need:.0f} s, "
              f"{max(0.0, deadline - time.time()):.0f} s left)")
          continue
        args = ([c.to_dict() for _, c in job], [str(runs / n) for n, _ in job], vmap)
        if pool is None:
          _finish(job, sweep_lib.run_points(*args), runs, archive, ran, log, 1)
        else:
          running[pool.submit(sweep_lib.run_points, *args)] = (job, sharing)
          while len(running) >= parallel:
            _drain(running, runs, archive, ran, log, cf.FIRST_COMPLETED)
      _drain(running, runs, archive, ran, log, cf.ALL_COMPLETED)
      # Out of time for some of this stage: go on to the next stage `plan` already knows
      # (its points depend only on finished runs), so short remaining time still runs the
      # cheaper later points.
  finally:
    if pool is not None:
      pool.shutdown(wait=True, cancel_futures=True)
  stages = plan(runs)
  names = [n for stage in stages for n, _ in stage]
  statuses = {n: sweep_lib.status_of(runs / n) for n in names}
  return {"statuses": statuses, "ran": ran, "skipped_for_time": skipped,
          "pending": [n for n, s in statuses.items() if s != "completed"],
          "seconds": time.time() - t0, "archive": str(archive)}


# Config fields that may differ between machines without changing a run's result.
MACHINE_FIELDS = ("data.corpus_dir", "data.tfds_dir", "data.data_dir", "progress")


def stale(run_dir: Path, config: ml_collections.ConfigDict) -> bool:
  """Whether run_dir holds a run of another config than the planned one (the protocol
  changed since it ran), ignoring MACHINE_FIELDS and fields the run resolved itself."""
  from structattn.results import flatten
  try:
    ran = flatten(json.loads((run_dir / "config.json").read_text()))
  except (OSError, ValueError):
    return False
  planned = flatten(config.to_dict())
  return any(k not in MACHINE_FIELDS and k in ran and ran[k] != _jsonable(v)
             for k, v in planned.items())


def _jsonable(v):
  return json.loads(json.dumps(v, default=str))


def set_aside_stale(runs: Path, points: Sequence[Point], log=print) -> list[str]:
  """Move run directories whose config no longer matches the plan to `<name>.stale-N`."""
  moved = []
  for name, config in points:
    run = runs / name
    if run.is_dir() and stale(run, config):
      n = 1
      while (runs / f"{name}.stale-{n}").exists():
        n += 1
      run.rename(runs / f"{name}.stale-{n}")
      for group in runs.glob("group-*"):  # a vmapped group's shared checkpoints
        if name in group.name[len("group-"):].split("+"):
          group.rename(runs / f"{group.name}.stale-{n}")
      moved.append(name)
      log(f"study: {name} ran with another config; moved to {name}.stale-{n}")
  return moved


def _next_stage(plan: Plan, runs: Path, tried: set[str]) -> Sequence[Point] | None:
  """The first stage with a point that is not completed and not yet tried by this
  invocation (a point that failed in an earlier one is tried again, as sweeps do)."""
  for stage in plan(runs):
    if any(sweep_lib.status_of(runs / n) != "completed" and n not in tried for n, _ in stage):
      return stage
  return None


def _drain(running, runs, archive, ran, log, when) -> None:
  if not running:
    return
  done, _ = cf.wait(list(running), return_when=when)
  for future in done:
    job, shared = running.pop(future)
    try:
      statuses = future.result()
    except Exception as e:  # noqa: BLE001  (a broken worker must not stop the study)
      statuses = [sweep_lib._record_failure(runs / n, e) for n, _ in job]
    _finish(job, statuses, runs, archive, ran, log, shared)


def _finish(job, statuses, runs, archive, ran, log, parallel) -> None:
  for (name, _), status in zip(job, statuses):
    ran.append(name)
    (runs / name).mkdir(parents=True, exist_ok=True)
    (runs / name / "study.json").write_text(json.dumps(
        {"group_size": len(job), "group": [n for n, _ in job], "parallel": parallel},
        indent=1))
    log(f"study: {name}: {status}")
  n = pack(runs, archive)
  log(f"study: archive {archive} holds {n} finished runs")


def describe(summary: dict[str, Any]) -> str:
  """A short text report of `run_study`'s summary."""
  counts: dict[str, int] = {}
  for s in summary["statuses"].values():
    counts[s.split(":")[0]] = counts.get(s.split(":")[0], 0) + 1
  buf = io.StringIO()
  buf.write(f"study: {counts} after {summary['seconds']:.0f} s; ran {len(summary['ran'])}, "
            f"{len(summary['pending'])} pending\n")
  for n, s in summary["statuses"].items():
    if s.startswith("failed"):
      buf.write(f"  {n}: {s}\n")
  return buf.getvalue()
