"""The run-directory contract (read by the sweep, results and fit tools).

    DIR/config.json      the full resolved config
    DIR/metrics.jsonl    one JSON object per logged step
    DIR/result.json      status (running | completed | failed: reason), final metrics, versions
    DIR/tb/              TensorBoard event files
    DIR/checkpoints/     orbax checkpoints (the last N)
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import jax


def _clean(x: Any) -> Any:
  """JSON-safe values: numpy/jax scalars to Python, NaN/Inf to strings."""
  if isinstance(x, dict):
    return {str(k): _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if hasattr(x, "item") and getattr(x, "shape", None) == ():
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  return x


def versions() -> dict[str, str]:
  out = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "numpy"):
    try:
      mod = __import__(name, fromlist=["__version__"])
      out[name] = getattr(mod, "__version__", "?")
    except Exception:  # noqa: BLE001  (optional package)
      pass
  return out


def device_description() -> str:
  d = jax.devices()[0]
  return f"{jax.device_count()}x {getattr(d, 'device_kind', d.platform)} ({jax.default_backend()})"


class RunDir:
  """Writes the files of one run; only process 0 writes."""

  def __init__(self, workdir: str | os.PathLike):
    self.path = Path(workdir)
    self.writer = jax.process_index() == 0
    if self.writer:
      self.path.mkdir(parents=True, exist_ok=True)
    self._tb = None

  def write_json(self, name: str, obj: Any) -> None:
    if not self.writer:
      return
    tmp = self.path / (name + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=1, sort_keys=True))
    os.replace(tmp, self.path / name)

  def read_json(self, name: str) -> Any:
    p = self.path / name
    return json.loads(p.read_text()) if p.exists() else None

  def log(self, metrics: dict[str, Any]) -> None:
    if not self.writer:
      return
    with open(self.path / "metrics.jsonl", "a") as f:
      f.write(json.dumps(_clean(metrics)) + "\n")
    tb = self.tensorboard()
    if tb is not None:
      step = int(metrics.get("step", 0))
      for k, v in metrics.items():
        if k != "step" and isinstance(v, (int, float)) and math.isfinite(float(v)):
          tb.add_scalar(k, float(v), step)
      tb.flush()

  def truncate_metrics(self, after_step: int) -> None:
    """On resume, drop logged rows past the restored checkpoint (they will be re-logged)."""
    p = self.path / "metrics.jsonl"
    if not self.writer or not p.exists():
      return
    keep = [line for line in p.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= after_step]
    p.write_text("".join(line + "\n" for line in keep))

  def tensorboard(self):
    if self._tb is None and self.writer:
      try:
        from tensorboardX import SummaryWriter
      except ImportError:  # optional: runs still log metrics.jsonl
        return None
      self._tb = SummaryWriter(str(self.path / "tb"))
    return self._tb

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
