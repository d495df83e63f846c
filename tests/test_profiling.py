"""structattn.profiling: per-op time on the device from a jax.profiler trace."""

import jax
import jax.numpy as jnp
import pytest

from structattn import profiling


def _meta(pid, name, tid=None):
  e = dict(ph="M", pid=pid, name="thread_name" if tid is not None else "process_name",
           args=dict(name=name))
  if tid is not None:
    e["tid"] = tid
  return e


EVENTS = [
    _meta(1, "/host:CPU"), _meta(2, "/device:GPU:0"),
    _meta(2, "Stream #14(Compute)", tid=7), _meta(2, "XLA Ops", tid=8),
    dict(ph="X", pid=2, tid=7, name="gemm", dur=300.0),
    dict(ph="X", pid=2, tid=7, name="gemm", dur=100.0),
    dict(ph="X", pid=2, tid=7, name="fusion_1", dur=50.0),
    dict(ph="X", pid=2, tid=8, name="gemm", dur=400.0),  # derived line: same kernel again
    dict(ph="X", pid=1, tid=3, name="python", dur=9999.0),  # host: ignored
]


def test_op_times_sums_per_thread_and_name_per_step():
  rows = profiling.op_times(EVENTS, steps=2, thread_prefix="Stream")
  assert [(r["name"], r["ms_per_step"], r["calls"]) for r in rows] == [
      ("gemm", 0.2, 1.0), ("fusion_1", 0.025, 0.5)]
  both = profiling.op_times(EVENTS, steps=1)
  assert {(r["thread"], r["name"]) for r in both} == {
      ("Stream #14(Compute)", "gemm"), ("XLA Ops", "gemm"), ("Stream #14(Compute)", "fusion_1")}
  top = profiling.op_times(EVENTS, steps=1, top=1)
  assert top[0]["ms_per_step"] == 0.4 and top[-1]["name"] == "other"
  assert top[-1]["ms_per_step"] == pytest.approx(0.45)


def test_op_times_errors_name_the_problem():
  with pytest.raises(ValueError, match="no process named '/device:TPU:0'.*GPU:0"):
    profiling.op_times(EVENTS, process="/device:TPU:0")
  with pytest.raises(ValueError, match="steps"):
    profiling.op_times(EVENTS, steps=0)


def test_load_trace_reads_a_real_cpu_trace(tmp_path):
  f = jax.jit(lambda x: jnp.sin(x @ x).sum())
  x = jnp.ones((64, 64))
  f(x).block_until_ready()
  with pytest.raises(FileNotFoundError, match="perfetto_trace"):
    profiling.load_trace(tmp_path)
  with jax.profiler.trace(tmp_path, create_perfetto_trace=True):
    for _ in range(2):
      f(x).block_until_ready()
  rows = profiling.op_times(profiling.load_trace(tmp_path), steps=2, process="/host:CPU")
  assert rows and all(r["ms_per_step"] >= 0 for r in rows)
  assert rows == sorted(rows, key=lambda r: -r["ms_per_step"])


def test_train_throughput_profile_flag_records_per_op_times(tmp_path):
  """benchmarks/train_throughput.py --profile: the JSON row carries the traced per-op times."""
  import importlib.util
  import json
  from pathlib import Path
  path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_throughput.py"
  spec = importlib.util.spec_from_file_location("train_throughput_bench", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = tmp_path / "t.json"
  bench.main(["--variants", "mha", "--layers", "1", "--width", "64", "--seq-len", "32",
              "--vocab", "64", "--batch", "2", "--warmup", "1", "--iters", "2",
              "--profile", str(tmp_path / "prof"), "--out", str(out)])
  row = json.loads(out.read_text())["rows"][0]
  assert "error" not in row, row
  ops = row["profile"]
  assert 1 <= len(ops) <= 41 and all(op["ms_per_step"] >= 0 for op in ops)
  assert any(op["calls"] > 0 for op in ops)
