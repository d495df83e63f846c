"""End-to-end LM training on CPU: loss falls, kill-and-resume equality, run-dir contract."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from structattn import train as train_lib
from structattn.configs import lm as lm_configs
from tests.helpers import on_corpus, small_lm

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(tmp_corpus, variant="mha", steps=30):
  c = on_corpus(small_lm(variant), tmp_corpus)
  c.train.update(steps=steps, batch_size=8, lr=1e-2, warmup_steps=5)
  c.eval_every = 10
  c.eval.update(batches=2, batch_size=8)
  c.log_every = 5
  c.checkpoint_every = 10
  c.progress = False
  return c


@pytest.mark.parametrize("variant", ["mha", "mlr"])
@pytest.mark.slow
def test_tiny_training_lowers_loss_and_writes_rundir(corpus, tmp_path, variant):
  config = tiny_config(corpus, variant)
  result = train_lib.train(config, str(tmp_path))
  assert result["status"] == "completed"
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 1 and rows[-1]["step"] == 30
  for key in ("step", "tokens", "compute/paper_macs", "compute/train_flops", "lr", "train/loss",
              "grad_norm", "time/step_s", "throughput/tokens_per_s"):
    assert key in rows[-1], key
  assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.5
  assert "eval/loss" in rows[-1] and rows[-1]["eval/loss_sem"] > 0
  res = json.loads((tmp_path / "result.json").read_text())
  for key in ("status", "params/total", "params/non_embedding", "final/train_loss",
              "final/eval_loss", "compute/paper_macs", "compute/train_flops", "tokens",
              "wall_time_s", "device", "versions"):
    assert key in res, key
  assert json.loads((tmp_path / "config.json").read_text())["attention"]["variant"] == variant
  assert any((tmp_path / "tb").iterdir())
  # re-running a finished run does nothing and returns the same result
  again = train_lib.train(config, str(tmp_path))
  assert again["final/eval_loss"] == res["final/eval_loss"]


def _run_cli(workdir, corpus, extra=(), kill_after_step=None):
  cmd = [sys.executable, "-m", "structattn.train", "--config=lm:tiny-mlr",
         f"--workdir={workdir}", f"--config.data.corpus={corpus}",
         f"--config.data.tfds_dir={corpus.parent / 'tfds'}", "--config.model.d_model=32",
         "--config.model.seq_len=64", "--config.model.dtype=float32",
         "--config.attention.num_heads=2", "--config.attention.window=16",
         "--config.train.steps=40", "--config.train.batch_size=8", "--config.eval.batches=2",
         "--config.eval.batch_size=8", "--config.log_every=5", "--config.checkpoint_every=10",
         "--config.progress=False", *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  if kill_after_step is None:
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True)
    return
  proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  ckpt = Path(workdir) / "checkpoints"
  while time.time() < deadline:
    steps = [int(p.name) for p in ckpt.glob("[0-9]*") if p.name.isdigit()] if ckpt.exists() \
        else []
    if steps and max(steps) >= kill_after_step:
      break
    if proc.poll() is not None:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(corpus, tmp_path):
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  _run_cli(full, corpus)
  _run_cli(resumed, corpus, kill_after_step=20)
  killed_at = max(int(p.name) for p in (resumed / "checkpoints").glob("[0-9]*")
                  if p.name.isdigit())
  assert killed_at < 40  # it really was interrupted
  _run_cli(resumed, corpus)
  a = json.loads((full / "result.json").read_text())
  b = json.loads((resumed / "result.json").read_text())
  assert b["status"] == "completed" and b["resumed_from"] >= 10
  assert abs(a["final/train_loss"] - b["final/train_loss"]) <= 1e-6
  assert abs(a["final/eval_loss"] - b["final/eval_loss"]) <= 1e-6
  steps = [json.loads(l)["step"] for l in (resumed / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps))  # no duplicated rows after the resume


@pytest.mark.slow
def test_mlbtc_preset_trains(corpus, tmp_path):
  """The general family from a preset: global BTT plus two nested low-rank block levels."""
  config = tiny_config(corpus, "mlbtc", steps=3)
  result = train_lib.train(config, str(tmp_path))
  assert result["status"] == "completed" and np.isfinite(result["final/train_loss"])
  saved = json.loads((tmp_path / "config.json").read_text())["attention"]
  assert saved["variant"] == "mlbtc" and [lv["kind"] for lv in saved["levels"]] == [
      "btt", "lowrank", "lowrank"]


def test_bad_override_and_unknown_preset(corpus, tmp_path):
  with pytest.raises(ValueError, match="unknown preset"):
    lm_configs.get_config("huge")
  config = tiny_config(corpus)
  config.attention.mlr_ranks = (8, 4)
  config.attention.variant = "mlr"
  with pytest.raises(ValueError, match="attention.mlr_ranks"):
    train_lib.train(config, str(tmp_path))
  config = tiny_config(corpus)
  config.train.grad_accum = 3
  with pytest.raises(ValueError, match="train.grad_accum"):
    train_lib.train(config, str(tmp_path))


@pytest.mark.slow
def test_corrupt_checkpoint_is_reported(corpus, tmp_path):
  from structattn.checkpoint import CorruptCheckpointError
  config = tiny_config(corpus, steps=10)
  train_lib.train(config, str(tmp_path))
  config.train.steps = 20
  for f in (tmp_path / "checkpoints" / "10").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"garbage")
  with pytest.raises(CorruptCheckpointError, match="cannot be read"):
    train_lib.train(config, str(tmp_path))


@pytest.mark.slow
def test_grad_accumulation_matches_one_big_batch(corpus, tmp_path):
  a = tiny_config(corpus, steps=3)
  b = tiny_config(corpus, steps=3)
  b.train.grad_accum = 2
  ra = train_lib.train(a, str(tmp_path / "a"))
  rb = train_lib.train(b, str(tmp_path / "b"))
  np.testing.assert_allclose(ra["final/train_loss"], rb["final/train_loss"], rtol=1e-5)


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_final_checkpoint(corpus, tmp_path):
  config = tiny_config(corpus, steps=40)
  config.train.update(lr=1e38, warmup_steps=0, clip_norm=0.0)  # overflows to inf, then NaN
  config.model.dtype = "float32"
  with pytest.raises(train_lib.NonFiniteLoss, match="non-finite training loss"):
    train_lib.train(config, str(tmp_path))
  res = json.loads((tmp_path / "result.json").read_text())
  assert res["status"].startswith("failed: non-finite training loss")
  assert any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


@pytest.mark.slow
def test_group_members_write_their_own_checkpoints_and_sample(corpus, tmp_path):
  """A vmapped group of two tiny LMs: each member's run directory has its own checkpoints,
  and `structattn-sample --workdir=<member>` samples from that member's parameters."""
  from structattn import sample as sample_lib
  members = [tiny_config(corpus, steps=10) for _ in range(2)]
  members[1].seed, members[1].train.lr = 1, 3e-3
  dirs = [tmp_path / "m0", tmp_path / "m1"]
  results = train_lib.train_group(members, [str(d) for d in dirs])
  assert [r["status"] for r in results] == ["completed", "completed"]
  for d in dirs:
    assert sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit()) == [10]
  (_, m0, _), (config1, m1, _) = (sample_lib.load_run(str(d)) for d in dirs)
  assert config1.seed == 1
  w0, w1 = (np.asarray(m.embed[...]) for m in (m0, m1))
  assert not np.allclose(w0, w1)  # member 1's own parameters, not member 0's
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-m", "structattn.sample", f"--workdir={dirs[1]}",
                        "--prompt=ROMEO:", "--max_new_tokens=8", "--temperature=0"],
                       check=True, env=env, cwd=ROOT, capture_output=True, text=True).stdout
  assert out.startswith("ROMEO:") and len(out.rstrip("\n")) >= len("ROMEO:") + 1


@pytest.mark.slow
def test_fresh_start_truncates_metrics(corpus, tmp_path):
  """A run killed before its first checkpoint restarts from step 0 without duplicate rows."""
  config = tiny_config(corpus, steps=10)
  train_lib.train(config, str(tmp_path))
  first = (tmp_path / "metrics.jsonl").read_text()
  shutil.rmtree(tmp_path / "checkpoints")
  (tmp_path / "result.json").unlink()
  res = train_lib.train(config, str(tmp_path))
  assert res["resumed_from"] == 0
  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [json.loads(l)["step"] for l in first.splitlines()] == [1, 5, 10]


@pytest.mark.slow
def test_checkpoint_of_the_older_layout_resumes(corpus, tmp_path):
  """A single run's checkpoint in the older layout (`state/` with params and optimiser state,
  `data/` the iterator state) resumes, and ends where the uninterrupted run ends."""
  import orbax.checkpoint as ocp
  from structattn import checkpoint as ckpt_lib
  full = train_lib.train(tiny_config(corpus, steps=20), str(tmp_path / "full"))
  new, old = tmp_path / "new", tmp_path / "old"
  train_lib.train(tiny_config(corpus, steps=10), str(new))
  mgr = ckpt_lib.Manager(new / "checkpoints")
  like = {k: jax.tree.map(np.asarray, v) for k, v in _template(mgr, new).items()}
  items, meta = mgr.read(10, like)
  mgr.close()
  old.mkdir()
  for f in ("config.json", "metrics.jsonl"):
    shutil.copy(new / f, old / f)
  legacy = ocp.CheckpointManager(old / "checkpoints")
  legacy.save(10, args=ocp.args.Composite(state=ocp.args.StandardSave(items),
                                          data=ocp.args.JsonSave(meta["data"])))
  legacy.wait_until_finished()
  legacy.close()
  resumed = train_lib.train(tiny_config(corpus, steps=20), str(old))
  assert resumed["resumed_from"] == 10
  assert abs(resumed["final/train_loss"] - full["final/train_loss"]) <= 1e-6
  assert abs(resumed["final/eval_loss"] - full["final/eval_loss"]) <= 1e-6


def _template(mgr, workdir):
  """Arrays shaped like a run directory's params and optimiser state."""
  from flax import nnx
  from structattn import tasks
  from structattn.optim import make_optimizer
  import ml_collections
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  params_state = nnx.split(tasks.build(config).model, nnx.Param, ...)[1]
  params = nnx.to_pure_dict(params_state)
  return {"params": params, "opt_state": make_optimizer(config.train, params_state)[0].init(
      params)}


@pytest.mark.slow
def test_stacked_group_checkpoint_of_the_older_layout_is_refused(corpus, tmp_path):
  """Older versions kept a group's stacked checkpoints in one group directory: resuming from
  one fails naming it rather than silently starting afresh."""
  (tmp_path / "group-m0+m1" / "checkpoints" / "10").mkdir(parents=True)
  members = [tiny_config(corpus, steps=10) for _ in range(2)]
  members[1].seed = 1
  with pytest.raises(train_lib.LegacyCheckpointError, match="group-m0\\+m1"):
    train_lib.train_group(members, [str(tmp_path / "m0"), str(tmp_path / "m1")])


def test_peak_flops_by_device_kind():
  from structattn.hardware import peak_flops

  class Device:
    def __init__(self, kind):
      self.device_kind = kind

  for kind, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                     ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                     ("NVIDIA B200", 2.25e15), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
                     ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12)):
    assert peak_flops(Device(kind)) == peak, kind
  assert peak_flops(Device("cpu")) is None and peak_flops(Device("Tesla T4")) is None
  assert peak_flops(object()) is None
  assert peak_flops(jax.devices("cpu")[0]) is None  # so CPU rows carry no throughput/mfu
