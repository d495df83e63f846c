"""Orbax checkpoints of (params, optimiser state, step, data-iterator state).

Async saves through `ocp.CheckpointManager`, the last N kept.  A checkpoint is only
visible once fully written, so a run killed mid-save resumes from the previous one.  A
checkpoint that cannot be read raises `CorruptCheckpointError` naming the directory.

Sharded state (docs/scaling-out.md): each process writes the shards of the arrays it holds
(every process calls `save`); `restore_latest` reads onto the shardings of the templates it is
given (or explicit `shardings`), so a checkpoint written on one mesh restores on any other:
other device counts, fsdp -> data, several GPUs -> one GPU or the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CorruptCheckpointError(RuntimeError):
  pass


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Manager:
  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                        create=True)
    self.mgr = ocp.CheckpointManager(self.directory, options=opts)

  def save(self, step: int, params, opt_state, data_state: Any, force: bool = False,
           best=None) -> None:
    """Save (params, opt_state, data_state) and, when given, `best` (a second parameter set:
    the best-validation parameters of runs that select on a metric)."""
    state = {"params": params, "opt_state": opt_state}
    if best is not None:
      state["best"] = best
    self.mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)

  def latest_step(self) -> int | None:
    return self.mgr.latest_step()

  def restore_latest(self, params, opt_state, shardings=None, best=None):
    """(step, params, opt_state, data_state) of the newest checkpoint, or None; with `best`
    (a template like params) also the saved best parameters: (step, params, opt_state,
    data_state, best).

    The arrays come back with the shapes, dtypes and shardings of `params` / `opt_state`
    (arrays or ShapeDtypeStructs), or on `shardings` = (param shardings, opt_state shardings)
    when given, whatever mesh wrote them."""
    step = self.mgr.latest_step()
    if step is None:
      return None
    tree = {"params": params, "opt_state": opt_state}
    if best is not None:
      tree["best"] = best
    target = _abstract(tree)
    if shardings is not None:
      shard_tree = {"params": shardings[0], "opt_state": shardings[1]}
      if best is not None:
        shard_tree["best"] = shardings[0]
      target = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shard_tree)
    try:
      out = self.mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001  (orbax raises many types for unreadable files)
      raise CorruptCheckpointError(
          f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: "
          f"{str(e)[:300]}); delete that step's directory to resume from an earlier one, or "
          f"use a fresh --workdir") from e
    state = out["state"]
    if best is not None:
      return step, state["params"], state["opt_state"], out["data"], state["best"]
    return step, state["params"], state["opt_state"], out["data"]

  def wait(self) -> None:
    self.mgr.wait_until_finished()

  def close(self) -> None:
    self.mgr.wait_until_finished()
    self.mgr.close()
