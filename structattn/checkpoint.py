"""Orbax checkpoints of one run directory: named array items plus one JSON item.

    mgr = Manager(workdir / "checkpoints", keep=3)
    mgr.write(step, {"params": p, "opt_state": o}, meta={...})      # async
    items, meta = mgr.read(step, {"params": p_like, "opt_state": o_like}, shardings=...)
    step, params, opt_state, meta = mgr.restore_latest(p_like, o_like)   # the newest one

Layout of `checkpoints/<step>/`: one orbax item per array tree (`params`, `opt_state`, and
`best` for runs that keep their best-validation parameters) and `meta` (JSON: the data
iterator's position and the run's bookkeeping).  Checkpoints of older versions (`state/`
holding params and optimiser state, `data/` the JSON) are read as well: `read` returns their
arrays under the same names and their JSON as `meta`.

Async saves through `ocp.CheckpointManager`, the last N kept.  A checkpoint is only visible
once fully written, so a run killed mid-save resumes from the previous one.  A checkpoint that
cannot be read raises `CorruptCheckpointError` naming the directory.

Sharded state (docs/scaling-out.md): each process writes the shards of the arrays it holds
(every process calls `write`); `read` restores onto the shardings of the templates it is given
(or explicit `shardings`), so a checkpoint written on one mesh restores on any other: other
device counts, fsdp -> data, several GPUs -> one GPU or the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

META = "meta"  # the JSON item
_LEGACY_ARRAYS, _LEGACY_META = "state", "data"  # item names of older versions


class CorruptCheckpointError(RuntimeError):
  pass


def _abstract(tree, shardings=None):
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
  if shardings is None:
    return target
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      target, shardings)


class Manager:
  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                        create=True)
    self.mgr = ocp.CheckpointManager(self.directory, options=opts)

  # -- the general form: named array trees and one JSON value -------------------------------

  def write(self, step: int, items: Mapping[str, Any], meta: Any, force: bool = False) -> None:
    """Save the array trees `items` (by name) and the JSON value `meta` as checkpoint `step`."""
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    self.mgr.save(step, args=ocp.args.Composite(**args, **{META: ocp.args.JsonSave(meta)}),
                  force=force)

  def read(self, step: int, templates: Mapping[str, Any],
           shardings: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], Any]:
    """(items, meta) of checkpoint `step`: each named tree with the shapes, dtypes and
    shardings of its template (arrays or ShapeDtypeStructs), or on `shardings[name]` when
    given, whatever mesh wrote it."""
    targets = {k: _abstract(v, (shardings or {}).get(k)) for k, v in templates.items()}
    legacy = (self.directory / str(step) / _LEGACY_ARRAYS).is_dir() and not (
        self.directory / str(step) / META).is_dir()
    try:
      if legacy:
        out = self.mgr.restore(step, args=ocp.args.Composite(**{
            _LEGACY_ARRAYS: ocp.args.StandardRestore(targets),
            _LEGACY_META: ocp.args.JsonRestore()}))
        return dict(out[_LEGACY_ARRAYS]), out[_LEGACY_META]
      out = self.mgr.restore(step, args=ocp.args.Composite(
          **{k: ocp.args.StandardRestore(t) for k, t in targets.items()},
          **{META: ocp.args.JsonRestore()}))
    except Exception as e:  # noqa: BLE001  (orbax raises many types for unreadable files)
      raise CorruptCheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: "
          f"{str(e)[:300]}); delete that step's directory to resume from an earlier one, or "
          f"use a fresh --workdir") from e
    return {k: out[k] for k in templates}, out[META]

  def steps(self) -> list[int]:
    return sorted(int(s) for s in self.mgr.all_steps())

  def latest_step(self) -> int | None:
    return self.mgr.latest_step()

  def delete_after(self, step: int) -> None:
    """Remove the checkpoints newer than `step` (a group resumes from a step all members
    reached; a member's newer ones would collide with the steps it saves next)."""
    for s in self.steps():
      if s > step:
        self.mgr.delete(s)

  # -- params and optimiser state (sampling, tools) ----------------------------------------

  def save(self, step: int, params, opt_state, meta: Any, force: bool = False) -> None:
    self.write(step, {"params": params, "opt_state": opt_state}, meta, force=force)

  def restore_latest(self, params, opt_state, shardings=None):
    """(step, params, opt_state, meta) of the newest checkpoint, or None; on `shardings` =
    (param shardings, opt_state shardings) when given."""
    step = self.latest_step()
    if step is None:
      return None
    sh = None if shardings is None else {"params": shardings[0], "opt_state": shardings[1]}
    items, meta = self.read(step, {"params": params, "opt_state": opt_state}, sh)
    return step, items["params"], items["opt_state"], meta

  def wait(self) -> None:
    self.mgr.wait_until_finished()

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()
