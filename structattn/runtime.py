"""Process start-up: the persistent compilation cache and multi-host `jax.distributed`.

    runtime.initialize_distributed(coordinator_address, num_processes, process_id, mode="auto")
    runtime.enable_compilation_cache()          # DEFAULT_CACHE; None or '' turns it off

Multi-host launches:

    structattn-train ... --coordinator_address=host0:1234 --num_processes=4 --process_id=$i
    srun structattn-train ...            # SLURM: detected from SLURM_* variables
    (TPU pod: every worker runs the same command; detected from the TPU environment)

Call `initialize_distributed` before anything touches the devices.  One process per host
(GPU: it sees all of its host's GPUs; TPU: all local chips).  Every process runs the same
program; only process 0 writes the run directory (`rundir.RunDir`) and prints.  Importing
this module does not import jax.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE = "~/.cache/structattn/jax"
MODES = ("auto", "on", "off")


def enable_compilation_cache(cache_dir: str | None = DEFAULT_CACHE) -> None:
  """Turn on JAX's persistent compilation cache (no-op for None or '')."""
  if not cache_dir:
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir).expanduser()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def detect_cluster(environ=None) -> str | None:
  """The multi-process launcher this process runs under, or None for a single process."""
  env = os.environ if environ is None else environ
  if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "2") or 2) > 1:
    return "env"
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1:
    return "slurm"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
  if len([h for h in hosts.split(",") if h.strip()]) > 1 or env.get(
      "MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           mode: str = "auto") -> bool:
  """Initialise jax.distributed; returns whether it did.

  mode 'off': never; 'on': always (jax auto-detects the cluster); 'auto' (default): when
  explicit coordinator flags are given or a multi-process launcher is detected."""
  if mode not in MODES:
    raise ValueError(f"--distributed={mode!r} is invalid: allowed values are {MODES}")
  explicit = bool(coordinator_address) or num_processes is not None or process_id is not None
  if mode == "off" or (mode == "auto" and not explicit and detect_cluster() is None):
    return False
  kwargs = {}
  if coordinator_address:
    kwargs["coordinator_address"] = coordinator_address
  if num_processes is not None:
    kwargs["num_processes"] = int(num_processes)
  if process_id is not None:
    kwargs["process_id"] = int(process_id)
  import jax
  jax.distributed.initialize(**kwargs)
  return True


def agree(flag: bool) -> bool:
  """Process 0's value of a host-side decision, on every process (no-op for one process)."""
  import jax
  import numpy as np
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(bool(flag), np.int32)))
