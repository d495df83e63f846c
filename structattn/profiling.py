"""Where the time goes: time per op on the device, from a `jax.profiler` trace.

    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      ...run n steps...
    rows = op_times(load_trace(log_dir), steps=n)   # [{thread, name, ms_per_step, calls}]

`load_trace` reads the newest `perfetto_trace.json.gz` under `log_dir`; `op_times` sums the
complete ('X') events of the device's process (`/device:GPU:0` by default; on CPU pass
`process="/host:CPU"`) by name, in milliseconds per step.
"""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path


def load_trace(log_dir) -> list[dict]:
  """The trace events of the newest perfetto trace written under log_dir."""
  files = sorted(Path(log_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
  if not files:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir} (trace with "
                            "jax.profiler.trace(log_dir, create_perfetto_trace=True))")
  with gzip.open(files[-1], "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def op_times(events: list[dict], steps: int = 1, process: str = "/device:GPU:0",
             thread_prefix: str | None = None, top: int | None = None) -> list[dict]:
  """Total duration per (thread, event name) in the process whose name starts with `process`
  (and threads whose name starts with `thread_prefix`, if given), in ms per step, largest
  first (`top` rows, plus one 'other' row for the rest).  A GPU process has one thread per
  stream plus derived lines (e.g. 'XLA Ops'); pick one with thread_prefix to avoid counting a
  kernel twice."""
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
          and str(e.get("args", {}).get("name", "")).startswith(process)}
  if not pids:
    names = sorted({str(e.get("args", {}).get("name")) for e in events
                    if e.get("ph") == "M" and e.get("name") == "process_name"})
    raise ValueError(f"no process named {process!r} in the trace; it has {names}")
  threads = {(e["pid"], e.get("tid")): str(e.get("args", {}).get("name", ""))
             for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
  total, calls = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in pids:
      thread = threads.get((e["pid"], e.get("tid")), str(e.get("tid")))
      if thread_prefix is None or thread.startswith(thread_prefix):
        total[thread, e["name"]] += float(e.get("dur", 0.0))
        calls[thread, e["name"]] += 1
  rows = [dict(thread=t, name=n, ms_per_step=us / 1e3 / steps, calls=calls[t, n] / steps)
          for (t, n), us in total.most_common()]
  if top is not None and len(rows) > top:
    rest = rows[top:]
    rows = rows[:top] + [dict(thread="*", name="other", ms_per_step=sum(r["ms_per_step"] for r in rest),
                              calls=sum(r["calls"] for r in rest))]
  return rows
