"""Light stand-ins for forecast.table.run_group, importable by spawned workers (no jax)."""

import os


def needs_half_the_gpu(job):
  """A group called 'big' runs out of memory unless its process may take half the GPU."""
  frac = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
  row = {"dataset": job[0], "horizon": job[1], "variant": job[2], "fraction": frac}
  if job[0] == "big" and frac is not None and float(frac) < 0.5:
    return {**row, "status": "failed: JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while "
            "trying to allocate 19.50GiB"}
  return {**row, "status": "completed"}
