"""Config sweeps: run every point of a sweep preset, skipping finished ones.

    structattn-sweep --config=icr:sweep-head-dim-tiny --workdir=runs/icr-a
    structattn-sweep --config=lm:sweep-scaling-paper --workdir=runs/lm \\
        --parallel=2 --vmap --dry_run

A sweep preset is a config with a `sweep` field: a list of override sets, each a dict of
dotted config keys (`{"model.d_model": 256, "train.lr": 3e-3}`), built with `product` /
`zip_` / plain comprehensions.  Each point runs in `WORKDIR/<name>` where the name is made
from its overrides, so re-running the same command skips completed points, resumes
interrupted ones from their checkpoints, and retries failed ones.  A point that raises is
recorded (`result.json` status `failed: <error>`, the traceback in `error.txt`) and the
others go on; `WORKDIR/sweep.json` lists every point and its final status.

`--parallel=N` runs N points at once in worker processes (on a GPU each takes 1/N of its
memory); `--vmap` trains points that differ only in seed and learning rate as one vmapped
group in one process (`structattn.train.train_group`).  JAX's persistent compilation cache
is on by default (`--compilation_cache`), so repeated shapes compile once.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import multiprocessing
import os
import re
import traceback
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import ml_collections

from structattn.runtime import DEFAULT_CACHE, enable_compilation_cache


# ------------------------------------------------------------------------ building sweeps


def product(**axes: Sequence[Any]) -> list[dict[str, Any]]:
  """Every combination: product(**{"model.d_model": (64, 128), "seed": (0, 1)})."""
  keys = list(axes)
  return [dict(zip(keys, vals)) for vals in itertools.product(*(axes[k] for k in keys))]


def zip_(**axes: Sequence[Any]) -> list[dict[str, Any]]:
  """Paired values: zip_(**{"model.d_model": (64, 128), "train.lr": (3e-3, 1e-3)})."""
  lengths = {k: len(v) for k, v in axes.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"zip_ needs axes of equal length, got {lengths}")
  keys = list(axes)
  return [dict(zip(keys, vals)) for vals in zip(*(axes[k] for k in keys))]


def cross(a: Iterable[Mapping[str, Any]], b: Iterable[Mapping[str, Any]]) -> list[dict]:
  """Every pair of override sets merged: cross(zip_(...), product(...))."""
  return [{**x, **y} for x, y in itertools.product(list(a), list(b))]


# ------------------------------------------------------------------------------ the points


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.3g}"
  if isinstance(v, (list, tuple)):
    return "x".join(_fmt(x) for x in v)
  return str(v)


def point_name(overrides: Mapping[str, Any]) -> str:
  """A directory name from the overrides: 'variant=mlr,d_model=256,lr=0.003'."""
  parts = [f"{k.split('.')[-1]}={_fmt(v)}" for k, v in overrides.items()]
  return re.sub(r"[^A-Za-z0-9=,._+-]", "_", ",".join(parts)) or "base"


def apply_overrides(base: ml_collections.ConfigDict, overrides: Mapping[str, Any]
                    ) -> ml_collections.ConfigDict:
  """A copy of base with dotted keys set; unknown keys are an error naming the key."""
  c = ml_collections.ConfigDict(base.to_dict())
  for key, value in overrides.items():
    parent, leaf = c, key.split(".")[-1]
    for part in key.split(".")[:-1]:
      if part not in parent:
        raise ValueError(f"sweep override {key!r}: no config field {part!r}")
      parent = parent[part]
    if leaf not in parent:
      raise ValueError(f"sweep override {key!r}: no config field {leaf!r} (known: "
                       f"{sorted(parent.keys())})")
    parent[leaf] = tuple(value) if isinstance(value, list) else value
  return c


def points(config: ml_collections.ConfigDict) -> list[tuple[str, ml_collections.ConfigDict]]:
  """(name, config) per sweep point, in order; names must be unique."""
  if "sweep" not in config or not config.sweep:
    from structattn import configs
    sweeps = [f"{n}:{p}" for n in configs.CONFIGS for p in configs.module(n).PRESETS.patterns
              if is_sweep_preset(p)]
    raise ValueError(f"config has no `sweep` list: use a sweep preset ({', '.join(sweeps)})")
  base = ml_collections.ConfigDict(config.to_dict())
  sweep = [dict(o) for o in base.sweep]
  del base["sweep"]
  if "sweep_name" in base:
    del base["sweep_name"]
  out = [(point_name(o), apply_overrides(base, o)) for o in sweep]
  names = [n for n, _ in out]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"sweep points with identical names (identical overrides?): {dup}")
  return out


def status_of(workdir: Path) -> str:
  p = workdir / "result.json"
  if not p.exists():
    return "pending"
  try:
    return str(json.loads(p.read_text()).get("status", "unknown"))
  except (OSError, ValueError):
    return "unreadable"


# ----------------------------------------------------------------------------- running


def _record_failure(workdir: Path, error: BaseException) -> str:
  workdir.mkdir(parents=True, exist_ok=True)
  msg = f"{type(error).__name__}: {error}".replace("\n", " ")[:500]
  (workdir / "error.txt").write_text("".join(traceback.format_exception(error)))
  p = workdir / "result.json"
  try:
    result = json.loads(p.read_text()) if p.exists() else {}
  except ValueError:
    result = {}
  if not str(result.get("status", "")).startswith("failed"):
    result["status"] = f"failed: {msg}"
  p.write_text(json.dumps(result, indent=1, sort_keys=True))
  return result["status"]


def run_points(configs: Sequence[dict], workdirs: Sequence[str], vmapped: bool) -> list[str]:
  """Run one point (or one vmapped group); returns each member's final status.  Failures
  are recorded in the member's run directory, never raised."""
  from structattn import train as train_lib
  del vmapped  # a point is a group of one; `groups` decides which points share a group
  cfgs = [ml_collections.ConfigDict(c) for c in configs]
  try:
    return [str(r.get("status")) for r in train_lib.train_group(cfgs, list(workdirs))]
  except Exception as e:  # noqa: BLE001  (a failing point must not stop the sweep)
    return [_record_failure(Path(w), e) for w in workdirs]


def _worker_init(mem_fraction: float | None, cache_dir: str | None) -> None:
  if mem_fraction:
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{mem_fraction:.3f}"
  enable_compilation_cache(cache_dir)


def groups(pts: Sequence[tuple[str, ml_collections.ConfigDict]], vmap: bool) -> list[list[int]]:
  """Indices of points run together: with vmap, points equal but for seed and train.lr."""
  if not vmap:
    return [[i] for i in range(len(pts))]
  from structattn.results import flatten
  from structattn.train import MEMBER_FIELDS
  keyed: dict[str, list[int]] = {}
  for i, (_, c) in enumerate(pts):
    shared = {k: v for k, v in flatten(c.to_dict()).items() if k not in MEMBER_FIELDS}
    keyed.setdefault(json.dumps(shared, sort_keys=True, default=str), []).append(i)
  return list(keyed.values())


def run_sweep(config: ml_collections.ConfigDict, workdir: str, parallel: int = 1,
              dry_run: bool = False, vmap: bool = False,
              cache_dir: str | None = DEFAULT_CACHE,
              only: Sequence[str] = ()) -> dict[str, str]:
  """Run the pending points of a sweep; returns {point name: status}.  `only`: run just the
  points whose names contain one of these substrings (the others keep their status)."""
  if parallel < 1:
    raise ValueError(f"--parallel={parallel} is invalid: must be >= 1")
  root = Path(workdir)
  pts = points(config)
  before = {n: status_of(root / n) for n, _ in pts}
  todo = [i for i, (n, _) in enumerate(pts) if before[n] != "completed"
          and (not only or any(s in n for s in only))]
  manifest = {"sweep_name": config.get("sweep_name", ""), "points": [
      {"name": n, "overrides": dict(o), "status": before[n]}
      for (n, _), o in zip(pts, config.sweep)]}
  if dry_run:
    for i, (n, _) in enumerate(pts):
      print(f"{'run ' if i in todo else 'skip'}  {n}  ({before[n]})")
    return before
  root.mkdir(parents=True, exist_ok=True)
  jobs = [[i for i in g if i in todo] for g in groups(pts, vmap)]
  jobs = [g for g in jobs if g]
  args = [([pts[i][1].to_dict() for i in g], [str(root / pts[i][0]) for i in g], vmap)
          for g in jobs]
  statuses = dict(before)
  if parallel == 1:
    enable_compilation_cache(cache_dir)
    outs = [run_points(*a) for a in args]
  else:
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(parallel, mp_context=ctx, initializer=_worker_init,
                                initargs=(0.9 / parallel, cache_dir)) as ex:
      outs = list(ex.map(run_points, *zip(*args)))
  for g, out in zip(jobs, outs):
    for i, s in zip(g, out):
      statuses[pts[i][0]] = s
  for p in manifest["points"]:
    p["status"] = statuses[p["name"]]
  (root / "sweep.json").write_text(json.dumps(manifest, indent=1, default=str))
  return statuses


# ------------------------------------------------------------------------------------- CLI


def _define_flags(fv, sys_argv):
  from absl import flags

  from structattn import configs
  configs.define_flag("config", example="icr:sweep-head-dim-tiny", lock_config=False,
                      flag_values=fv, sys_argv=sys_argv)
  flags.DEFINE_string("workdir", None, "Sweep directory (one run directory per point).",
                      flag_values=fv)
  flags.DEFINE_integer("parallel", 1, "Points run at once (worker processes).", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "List the points and their status; run nothing.",
                    flag_values=fv)
  flags.DEFINE_bool("vmap", False, "Vmap points that differ only in seed and train.lr.",
                    flag_values=fv)
  flags.DEFINE_string("compilation_cache", DEFAULT_CACHE, "Persistent compilation cache "
                      "directory ('' to disable).", flag_values=fv)
  flags.DEFINE_multi_string("only", [], "Run only points whose names contain this substring "
                            "(repeatable; point names themselves contain commas).",
                            flag_values=fv)


def _run_flags(f):
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  statuses = run_sweep(f.config, f.workdir, f.parallel, f.dry_run, f.vmap,
                       f.compilation_cache or None, only=f.only)
  if not f.dry_run:
    counts: dict[str, int] = {}
    for s in statuses.values():
      key = s.split(":")[0]
      counts[key] = counts.get(key, 0) + 1
    print(f"sweep {f.workdir}: {counts}")
    for n, s in statuses.items():
      if s.startswith("failed"):
        print(f"  {n}: {s}")


def is_sweep_preset(pattern: str) -> bool:
  """Whether a preset pattern is a sweep (a config with a `sweep` list)."""
  return pattern.startswith("sweep-")


def main(argv=None):
  """`structattn-sweep`; argv without the program name (default sys.argv[1:])."""
  from structattn import cli
  return cli.absl_main("structattn-sweep", __doc__, _define_flags, _run_flags, argv,
                       example="structattn-sweep --config=icr:sweep-head-dim-tiny "
                       "--workdir=runs/icr-a --parallel=2", presets=is_sweep_preset,
                       required=("config", "workdir"))


if __name__ == "__main__":
  main()
