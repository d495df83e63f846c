"""The results table of a sweep: one flat row per run directory.

    from structattn import results
    rows = results.collect("runs/lm-sweep")        # list of flat dicts, one per run
    best = results.best_lr(rows)                   # the best-LR row per (variant, width)
    tab = results.table("runs/lm-sweep")           # Table: columns + rows
    tab.write("out/lm")                            # out/lm.csv and out/lm.parquet
    print(tab.format(["run", "status", "final/eval_loss"]))

    structattn-results runs/lm-sweep --out=out/lm --best-lr --metric=final/eval_loss

A directory is a run if it holds ``config.json`` (or a lone ``result.json``: a sweep point
that failed before training started); runs may be nested at any depth, and ``checkpoints/``
and ``tb/`` are not searched. Row fields:

  run        the run directory relative to root ('.' when root is itself a run)
  status     completed | running | failed | pending (no result.json yet) | unreadable
  error      why a run failed (the text after 'failed: ') or why a file is unreadable, else None
  a.b.c      config.json fields, nested keys joined by dots (model.d_model, train.lr, ...)
  k/v        result.json fields as written (final/eval_loss, params/non_embedding, ...); nested
             ones dotted (versions.jax); one that collides with a config field gets 'result.'
  curve/*    metrics.jsonl summary: n_rows, n_eval (rows with an eval/* value), last_step,
             last_tokens, eval_min (the least finite eval/loss or eval/last_point_se)

Non-finite numbers stored as the strings "nan"/"inf"/"-inf" are read back as floats.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from structattn.configs.renames import migrate_dict

STATUSES = ("completed", "running", "failed", "pending", "unreadable")
FIXED_COLUMNS = ("run", "status", "error")
EVAL_METRICS = ("eval/loss", "eval/last_point_se")  # curve/eval_min uses the first present
_SKIP_DIRS = {"checkpoints", "tb", "__pycache__"}
_NONFINITE = {"nan": math.nan, "+nan": math.nan, "-nan": math.nan, "inf": math.inf,
              "+inf": math.inf, "-inf": -math.inf, "infinity": math.inf,
              "+infinity": math.inf, "-infinity": -math.inf}
_INT64_MAX = 2**63 - 1
_RESULT_BOOKKEEPING = {"device", "started", "finished", "resumed_from", "wall_time_s", "tokens",
                       "unit", "units_per_step"}


# ------------------------------------------------------------------------------ reading runs

def decode(v: Any) -> Any:
  """Undo the run directory's JSON encoding of non-finite floats ("nan", "inf", "-inf")."""
  if isinstance(v, str) and v.strip().lower() in _NONFINITE:
    return _NONFINITE[v.strip().lower()]
  if isinstance(v, dict):
    return {k: decode(x) for k, x in v.items()}
  if isinstance(v, list):
    return [decode(x) for x in v]
  return v


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'model': {'d_model': 64}} -> {'model.d_model': 64}; lists stay values."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(flatten(v, key + "."))
    else:
      out[key] = v
  return out


def natural_key(s: str) -> tuple:
  """'w32/lr1e-3' < 'w128/lr1e-3': digit runs compare as numbers."""
  return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s))


def find_runs(root: str | os.PathLike) -> list[Path]:
  """Run directories under root (root itself included), sorted by relative path."""
  root = Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"results root {str(root)!r} is not a directory")
  found = []
  for d, subdirs, files in os.walk(root):
    subdirs[:] = sorted(s for s in subdirs if s not in _SKIP_DIRS)
    if "config.json" in files or "result.json" in files:
      found.append(Path(d))
  return sorted(found, key=lambda p: natural_key(p.relative_to(root).as_posix()))


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
  """The rows of metrics.jsonl (empty if absent); undecodable lines, e.g. a line being
  written while the run is live, are skipped."""
  p = Path(run_dir) / "metrics.jsonl"
  if not p.exists():
    return []
  rows = []
  for line in p.read_text().splitlines():
    if line.strip():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict):
        rows.append(decode(row))
  return rows


def _read_json(p: Path) -> tuple[Any, str | None]:
  if not p.exists():
    return None, None
  try:
    return json.loads(p.read_text()), None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    return None, f"{p.name}: {e}"


def _split_status(raw: Any) -> tuple[str, str | None]:
  if not isinstance(raw, str) or not raw:
    return "unreadable", f"result.json: status={raw!r} is invalid: allowed values are " \
        "'running', 'completed', 'failed: <reason>'"
  head, _, reason = raw.partition(":")
  head = head.strip()
  if head == "failed":
    return "failed", reason.strip() or None
  if head in ("running", "completed") and not reason:
    return head, None
  return "unreadable", f"result.json: status={raw!r} is invalid: allowed values are " \
      "'running', 'completed', 'failed: <reason>'"


def curve_summary(metrics: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """curve/* fields of a row from the metrics.jsonl rows."""
  evals = [m for m in metrics if any(k.startswith("eval/") for k in m)]
  key = next((k for k in EVAL_METRICS if any(k in m for m in metrics)), None)
  vals = [float(m[key]) for m in metrics if key and _is_number(m.get(key))
          and math.isfinite(float(m[key]))]
  return {"curve/n_rows": len(metrics), "curve/n_eval": len(evals),
          "curve/last_step": metrics[-1].get("step") if metrics else None,
          "curve/last_tokens": metrics[-1].get("tokens") if metrics else None,
          "curve/eval_min": min(vals) if vals else None}


def read_run(run_dir: str | os.PathLike, root: str | os.PathLike | None = None) -> dict[str, Any]:
  """One flat row for one run directory (see the module docstring for the fields)."""
  run_dir = Path(run_dir)
  rel = run_dir.relative_to(root).as_posix() if root is not None else run_dir.as_posix()
  row: dict[str, Any] = {"run": rel or ".", "status": "pending", "error": None}
  errors = []
  config, err = _read_json(run_dir / "config.json")
  if err:
    errors.append(err)
  result, err = _read_json(run_dir / "result.json")
  if err:
    errors.append(err)
  if isinstance(config, Mapping):
    row.update(flatten(migrate_dict(decode(dict(config)))))  # older keys: current ones
  elif config is not None:
    errors.append(f"config.json: expected a JSON object, got {type(config).__name__}")
  if isinstance(result, Mapping):
    result = decode(dict(result))
    row["status"], row["error"] = _split_status(result.pop("status", None))
    for k, v in flatten(result).items():
      row["result." + k if k in row else k] = v
  elif result is not None:
    errors.append(f"result.json: expected a JSON object, got {type(result).__name__}")
  if errors:
    row["status"], row["error"] = "unreadable", "; ".join(errors)
  row.update(curve_summary(read_metrics(run_dir)))
  return row


def collect(root: str | os.PathLike) -> list[dict[str, Any]]:
  """One row per run directory under root, sorted by run path."""
  return [read_run(d, root) for d in find_runs(root)]


# ------------------------------------------------------------------------------ best LR

def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _hashable(v: Any) -> Any:
  return json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v


def check_fields(rows: Sequence[Mapping[str, Any]], fields: Iterable[str], what: str) -> None:
  """Raise a KeyError naming the field and the available ones if no row has it."""
  have = set().union(*(r.keys() for r in rows)) if rows else set()
  for f in fields:
    if f not in have:
      avail = ", ".join(sorted(k for k in have if not k.startswith("curve/")))
      raise KeyError(f"{what}: field {f!r} is in no row; available fields: {avail}")


def best_lr(rows: Iterable[Mapping[str, Any]],
            group: Sequence[str] = ("attention.variant", "model.d_model"),
            metric: str = "final/eval_loss", lr_key: str = "train.lr",
            statuses: Sequence[str] = ("completed",)) -> list[dict[str, Any]]:
  """The row with the least finite `metric` per group, sorted by group.

  Only rows whose status is in `statuses` count. Each returned row gains
  ``best_lr/n_tried`` (rows with a finite metric in the group), ``best_lr/lrs`` (the LRs tried,
  sorted) and ``best_lr/at_edge`` (True when the best LR is the smallest or largest tried: the
  grid may be too narrow).
  """
  rows = list(rows)
  check_fields(rows, [*group, metric, lr_key], "best_lr")
  bad = [s for s in statuses if s not in STATUSES]
  if bad:
    raise ValueError(f"statuses={bad!r} are invalid: allowed values are {STATUSES}")
  groups: dict[tuple, list[Mapping[str, Any]]] = {}
  for r in rows:
    v = r.get(metric)
    if r.get("status") in statuses and _is_number(v) and math.isfinite(v):
      groups.setdefault(tuple(_hashable(r.get(g)) for g in group), []).append(r)
  out = []
  for key in sorted(groups, key=lambda k: tuple((v is None, str(type(v)), v) for v in k)):
    members = groups[key]
    best = min(members, key=lambda r: r[metric])
    lrs = sorted({r.get(lr_key) for r in members if _is_number(r.get(lr_key))})
    out.append(dict(best, **{"best_lr/n_tried": len(members), "best_lr/lrs": lrs,
                             "best_lr/at_edge": len(lrs) > 1 and best.get(lr_key) in
                             (lrs[0], lrs[-1])}))
  return out


# ------------------------------------------------------------------------------ the table

def is_config_field(name: str) -> bool:
  """Whether a row field is (most likely) a config field: result.json fields have a '/' or
  are run bookkeeping (device, started, versions.*, ...). Used to order and print tables."""
  return name not in FIXED_COLUMNS and "/" not in name and name not in _RESULT_BOOKKEEPING \
      and not name.startswith(("result.", "versions."))


def _column_kind(values: Sequence[Any]) -> str:
  """'null' | 'bool' | 'int' | 'float' | 'str' | 'json' (lists, dicts, mixed types)."""
  present = [v for v in values if v is not None]
  if not present:
    return "null"
  if all(isinstance(v, bool) for v in present):
    return "bool"
  if all(isinstance(v, int) and not isinstance(v, bool) for v in present):
    return "int" if all(abs(v) <= _INT64_MAX for v in present) else "float"
  if all(_is_number(v) for v in present):
    return "float"
  if all(isinstance(v, str) for v in present):
    return "str"
  return "json"


def _coerce(v: Any, kind: str) -> Any:
  if v is None:
    return None
  if kind == "float":
    return float(v)
  if kind == "json":
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True)
  return v


@dataclasses.dataclass(frozen=True)
class Table:
  """Rows with a fixed column order and one type per column (see `Table.kinds`).

  Lists and dicts (e.g. ``attention.mlr_ranks``) and columns of mixed types are stored as
  JSON strings, so every column has one of the types null, bool, int, float, str.
  """
  columns: tuple[str, ...]
  rows: tuple[dict[str, Any], ...]

  @classmethod
  def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> Table:
    rows = [dict(r) for r in rows]
    seen = dict.fromkeys(c for r in rows for c in r)
    rest = [c for c in seen if c not in FIXED_COLUMNS]
    config = sorted(c for c in rest if is_config_field(c))
    curve = sorted(c for c in rest if c.startswith(("curve/", "best_lr/")))
    other = sorted(c for c in rest if c not in config and c not in curve)
    columns = (*[c for c in FIXED_COLUMNS if c in seen or not rows], *config, *other, *curve)
    kinds = {c: _column_kind([r.get(c) for r in rows]) for c in columns}
    return cls(tuple(columns),
               tuple({c: _coerce(r.get(c), kinds[c]) for c in columns} for r in rows))

  def __len__(self) -> int:
    return len(self.rows)

  @property
  def kinds(self) -> dict[str, str]:
    return {c: _column_kind(self.column(c)) for c in self.columns}

  def column(self, name: str) -> list[Any]:
    if name not in self.columns:
      raise KeyError(f"column {name!r} is not in the table; columns: {', '.join(self.columns)}")
    return [r[name] for r in self.rows]

  def select(self, predicate: Callable[[Mapping[str, Any]], bool]) -> Table:
    return Table(self.columns, tuple(r for r in self.rows if predicate(r)))

  def to_arrow(self):
    import pyarrow as pa
    types = {"null": pa.null(), "bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(),
             "str": pa.string(), "json": pa.string()}
    kinds = self.kinds
    return pa.table({c: pa.array(self.column(c), type=types[kinds[c]]) for c in self.columns})

  def write_parquet(self, path: str | os.PathLike) -> Path:
    try:
      import pyarrow.parquet as pq
    except ImportError as e:  # pyarrow is optional: CSV needs nothing
      raise ImportError("writing parquet needs pyarrow: pip install pyarrow") from e
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(self.to_arrow(), str(path))
    return Path(path)

  def write_csv(self, path: str | os.PathLike) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
      w = csv.writer(f)
      w.writerow(self.columns)
      for r in self.rows:
        w.writerow(["" if r[c] is None else repr(r[c]) if isinstance(r[c], float) else r[c]
                    for c in self.columns])
    return Path(path)

  def write(self, prefix: str | os.PathLike) -> tuple[Path, Path]:
    """PREFIX.csv and PREFIX.parquet."""
    return self.write_csv(f"{prefix}.csv"), self.write_parquet(f"{prefix}.parquet")

  def format(self, columns: Sequence[str] | None = None, width: int = 24,
             max_rows: int | None = None) -> str:
    """A compact fixed-width text table; numbers with 4 significant digits."""
    columns = list(columns or self.columns)
    for c in columns:
      self.column(c)  # raises on unknown columns

    def cell(v: Any) -> str:
      if v is None:
        return "-"
      s = f"{v:.4g}" if isinstance(v, float) else str(v)
      return s if len(s) <= width else s[:width - 1] + "~"
    rows = self.rows if max_rows is None else self.rows[:max_rows]
    cells = [[cell(r[c]) for c in columns] for r in rows]
    ws = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, ws))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(line, ws)) for line in cells]
    if max_rows is not None and len(self.rows) > max_rows:
      lines.append(f"... {len(self.rows) - max_rows} more rows")
    return "\n".join(lines)


def table(root: str | os.PathLike) -> Table:
  """`collect(root)` as a `Table`."""
  return Table.from_rows(collect(root))


def _parse_cell(s: str, kind: str) -> Any:
  if s == "":
    return None
  return {"bool": lambda x: x == "True", "int": int, "float": float}.get(kind, str)(s)


def _csv_kind(values: Sequence[str]) -> str:
  present = [v for v in values if v != ""]
  if not present:
    return "null"
  if all(v in ("True", "False") for v in present):
    return "bool"
  for kind, parse in (("int", int), ("float", float)):
    try:
      [parse(v) for v in present]
      return kind
    except ValueError:
      pass
  return "str"


def read_csv(path: str | os.PathLike, kinds: Mapping[str, str] | None = None) -> Table:
  """A table written by `Table.write_csv`. Column types are `kinds` (column -> null | bool |
  int | float | str | json, e.g. `Table.kinds` of the written table) where given, else
  inferred from the text (run, status and error are always strings), so a string column that
  looks numeric comes back as numbers; `read_parquet` keeps the written types exactly."""
  with open(path, newline="") as f:
    header, *lines = list(csv.reader(f))
  kinds = dict(kinds or {})
  for i, c in enumerate(header):
    if c not in kinds:
      kinds[c] = "str" if c in FIXED_COLUMNS else _csv_kind([x[i] for x in lines])
  return Table(tuple(header), tuple({c: _parse_cell(x[i], kinds[c]) for i, c in
                                     enumerate(header)} for x in lines))


def read_parquet(path: str | os.PathLike) -> Table:
  import pyarrow.parquet as pq
  t = pq.read_table(str(path))
  return Table(tuple(t.column_names), tuple(t.to_pylist()))


# ------------------------------------------------------------------------------ CLI

def varying_config_columns(tab: Table, limit: int = 6) -> list[str]:
  """Config columns whose value differs between rows (the sweep axes), at most `limit`."""
  cols = [c for c in tab.columns if is_config_field(c)
          and len({_hashable(v) for v in tab.column(c)}) > 1]
  return cols[:limit]


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="structattn-results", description="Collect a sweep's run directories into a table.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Run directories written with older config keys are read in the current ones "
      "(README: Configs).\n\nexample:\n  structattn-results runs/lm --out=runs/lm/table --best-lr")
  p.add_argument("dir", help="sweep directory (runs nested at any depth)")
  p.add_argument("--out", default=None, help="write OUT.csv and OUT.parquet")
  p.add_argument("--best-lr", action="store_true",
                 help="keep the best-LR row per --group (by --metric)")
  p.add_argument("--metric", default="final/eval_loss",
                 help="metric to minimise for --best-lr and to print (default final/eval_loss)")
  p.add_argument("--group", default="attention.variant,model.d_model",
                 help="comma-separated fields grouping --best-lr")
  p.add_argument("--lr-key", default="train.lr")
  p.add_argument("--columns", default=None, help="comma-separated columns to print")
  a = p.parse_args(argv)
  try:
    rows = collect(a.dir)
    if not rows:
      raise FileNotFoundError(f"no run directories (with config.json) under {a.dir!r}")
    if a.best_lr:
      rows = best_lr(rows, tuple(s for s in a.group.split(",") if s), a.metric, a.lr_key)
    tab = Table.from_rows(rows)
    if a.columns:
      cols = a.columns.split(",")
    else:
      extra = ["error", a.metric, "params/non_embedding", "compute/paper_macs"]
      extra += ["best_lr/at_edge"] if a.best_lr else []
      cols = ["run", "status", *varying_config_columns(tab)]
      cols += [c for c in extra if c in tab.columns and c not in cols]
    print(tab.format(cols))
    if a.out:
      print(f"wrote {tab.write_csv(f'{a.out}.csv')}")
      print(f"wrote {tab.write_parquet(f'{a.out}.parquet')}")
  except (FileNotFoundError, KeyError, ValueError, ImportError) as e:
    print(f"structattn-results: error: {e.args[0] if e.args else e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
