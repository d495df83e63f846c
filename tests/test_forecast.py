"""Forecasting: LTSF splits and scaling, no look-ahead, TFDS == CSV, resumable host batches,
on-device batches (every window once per epoch, epoch boundaries, exact resume), non-causal
attention, config errors, and a tiny model that beats repeat-last on ETTh1."""

import functools
import json
import os
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from structattn.configs import forecast as fc_configs
from structattn import tasks as tasks_lib
from structattn.results import flatten
from structattn import train as train_lib
from structattn.forecast import data as fdata

# The benchmark CSVs beside the repository (CI clones it with shared/ next to it); passed
# explicitly as data.csv_dir: the product has no default directory.
SHARED = Path(__file__).resolve().parents[2] / "shared/data/timeseries"
needs_data = pytest.mark.skipif(not (SHARED / "ETTh1.csv").is_file(),
                                reason=f"LTSF CSVs not found at {SHARED}")


def raw(name):
  info = fdata.DATASETS[name]
  return fdata.read_csv(fdata.csv_path(name, SHARED), info.date)[1]


def get_config(name, dataset="etth1"):
  """A preset on a benchmark dataset from SHARED (the tiny presets default to vic_elec)."""
  c = fc_configs.get_config(name)
  if name.startswith("tiny"):
    c.data.dataset = dataset
  c.data.csv_dir = str(SHARED)
  return c


# ------------------------------------------------------------------------------ splits


@needs_data
def test_ett_splits_and_train_only_statistics():
  s = fdata.load_splits("etth1", SHARED, seq_len=512, source="csv")
  assert s.borders == {"train": (0, 8640), "val": (8640 - 512, 11520),
                       "test": (11520 - 512, 14400)}
  assert s.train.shape == (8640, 7) and s.val.shape == (2880 + 512, 7)
  assert s.test.shape == (2880 + 512, 7) and s.train.dtype == np.float32
  values = raw("etth1")
  mean, std = values[:8640].mean(0), values[:8640].std(0)
  np.testing.assert_allclose(s.mean, mean, rtol=1e-12)
  np.testing.assert_allclose(s.std, std, rtol=1e-12)
  # Train split has zero mean / unit std; val and test do not (train statistics only).
  np.testing.assert_allclose(s.train.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(s.train.std(0), 1, atol=1e-4)
  assert np.abs(s.test.mean(0)).max() > 0.1
  np.testing.assert_allclose(s.test, ((values[11008:14400] - mean) / std).astype(np.float32))
  # The val look-back is the end of train: the splits' forecast rows do not overlap.
  np.testing.assert_array_equal(s.val[:512], s.train[-512:])


@needs_data
@pytest.mark.parametrize("name,n,seq_len", [("exchange", 7588, 96), ("illness", 966, 104)])
def test_ratio_splits(name, n, seq_len):
  s = fdata.load_splits(name, SHARED, seq_len=seq_len, source="csv")
  n_train, n_test = int(0.7 * n), int(0.2 * n)
  n_val = n - n_train - n_test
  assert s.borders == {"train": (0, n_train), "val": (n_train - seq_len, n_train + n_val),
                       "test": (n - n_test - seq_len, n)}
  np.testing.assert_allclose(s.mean, raw(name)[:n_train].mean(0), rtol=1e-12)
  w = fdata.Windows(s.test, seq_len, 24)
  assert len(w) == n_test - 24 + 1


@needs_data
def test_no_look_ahead(tmp_path):
  """Changing values after a window's look-back (test rows, after the train rows) leaves its
  inputs unchanged, and its target is exactly the next `horizon` rows."""
  lines = (SHARED / "ETTh1.csv").read_text().splitlines()
  seq_len, horizon, i = 512, 96, 700
  s0 = fdata.load_splits("etth1", SHARED, seq_len=seq_len, source="csv")
  w0 = fdata.Windows(s0.test, seq_len, horizon)
  first_future = 11008 + i + seq_len  # file row of the window's first target (0-based)
  for r in range(first_future, len(lines) - 1):
    parts = lines[r + 1].split(",")
    lines[r + 1] = ",".join(parts[:1] + [str(float(v) * 3 + 100) for v in parts[1:]])
  (tmp_path / "ETTh1.csv").write_text("\n".join(lines) + "\n")
  s1 = fdata.load_splits("etth1", csv_dir=tmp_path, seq_len=seq_len, source="csv")
  w1 = fdata.Windows(s1.test, seq_len, horizon)
  x0, y0 = w0.batch([i])
  x1, y1 = w1.batch([i])
  np.testing.assert_array_equal(x0, x1)  # inputs: identical
  assert (y1 != y0).all()  # every target value changed
  np.testing.assert_array_equal(s0.mean, s1.mean)
  np.testing.assert_array_equal(x0[0, -1], s0.test[i + seq_len - 1])
  np.testing.assert_array_equal(y0[0], s0.test[i + seq_len:i + seq_len + horizon])


@needs_data
def test_tfds_equals_csv(tmp_path):
  a = fdata.load_splits("illness", SHARED, seq_len=104, source="csv")
  b = fdata.load_splits("illness", SHARED, seq_len=104, source="tfds", tfds_dir=str(tmp_path))
  assert b.source == "tfds" and (tmp_path / "structattn_forecast").is_dir()
  for k in fdata.SPLITS:
    np.testing.assert_array_equal(a[k], b[k])
  np.testing.assert_array_equal(a.mean, b.mean)
  np.testing.assert_array_equal(a.std, b.std)
  assert a.columns == b.columns and a.borders == b.borders


def test_vic_elec_from_package():
  pytest.importorskip("tsdata")
  s = fdata.load_splits("vic_elec", seq_len=512, source="csv")
  assert s.columns == ("Demand", "Temperature")
  assert s.borders["test"][1] == 52608 and s.train.shape == (int(0.7 * 52608), 2)


def test_train_batches_resume_and_epochs():
  w = fdata.Windows(np.arange(300, dtype=np.float32).reshape(100, 3), 10, 5)  # 86 windows
  a = fdata.TrainBatches(w, 16, seed=3)
  batches = [next(a) for _ in range(12)]  # more than two epochs
  b = fdata.TrainBatches(w, 16, seed=3)
  for _ in range(5):
    next(b)
  state = json.loads(json.dumps(b.get_state()))
  c = fdata.TrainBatches(w, 16, seed=3)
  c.set_state(state)
  for k in range(5, 12):
    np.testing.assert_array_equal(next(c)["x_BXC"], batches[k]["x_BXC"])
  # Each epoch visits every window once.
  starts = np.concatenate([bt["x_BXC"][:, 0, 0] for bt in batches]) / 3
  assert sorted(starts[:86].astype(int)) == list(range(86))
  assert not np.array_equal(next(fdata.TrainBatches(w, 16, seed=4))["x_BXC"],
                            batches[0]["x_BXC"])
  with pytest.raises(ValueError, match="another run"):
    fdata.TrainBatches(w, 16, seed=5).set_state(state)


def _device_order(seed, epoch, n):
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  return np.asarray(jax.random.permutation(key, n))


@needs_data
def test_device_batches_visit_every_window_once_and_match_windows():
  # unique values: a window is identified by its first value
  w = fdata.Windows(np.arange(1200, dtype=np.float32).reshape(400, 3), 16, 8)  # 377 windows
  fn = jax.jit(fdata.device_batch_fn(w, 29))  # 13 steps = one epoch
  batches = [jax.device_get(fn(7, k)) for k in range(13)]
  starts = np.concatenate([b["x_BXC"][:, 0, 0] for b in batches]).astype(int) // 3
  assert sorted(starts) == list(range(377))
  np.testing.assert_array_equal(starts, _device_order(7, 0, 377))
  for k, b in enumerate(batches):
    x, y = w.batch(starts[29 * k:29 * (k + 1)])
    np.testing.assert_array_equal(b["x_BXC"], x)
    np.testing.assert_array_equal(b["y_BFC"], y)
    assert b["seed_B2"].dtype == np.uint32
    np.testing.assert_array_equal(b["seed_B2"], np.stack(
        [np.full(29, 7), np.arange(29 * k, 29 * (k + 1))], axis=1))
  # real data (ETTh1 train rows): exactly the host Windows arrays; vmapped seeds draw their own
  s = fdata.load_splits("etth1", SHARED, seq_len=64, source="csv")
  w = fdata.Windows(s.train[:300], 64, 16)  # 221 windows, 13 batches of 17
  fn = jax.jit(jax.vmap(fdata.device_batch_fn(w, 17), in_axes=(0, None)))
  order = _device_order(1, 0, len(w))
  seen = []
  for k in range(13):
    b = jax.device_get(fn(jnp.asarray([1, 2], jnp.int32), k))
    idx = order[17 * k:17 * (k + 1)]
    x, y = w.batch(idx)
    np.testing.assert_array_equal(b["x_BXC"][0], x)
    np.testing.assert_array_equal(b["y_BFC"][0], y)
    assert not np.array_equal(b["x_BXC"][1], x)
    seen += list(idx)
  assert sorted(seen) == list(range(221))


@pytest.mark.parametrize("batch_size", [16, 50, 86])
def test_device_batches_straddle_epochs(batch_size):
  w = fdata.Windows(np.arange(300, dtype=np.float32).reshape(100, 3), 10, 5)  # 86 windows
  fn = jax.jit(fdata.device_batch_fn(w, batch_size))
  steps = -(-3 * 86 // batch_size) + 1  # past three epochs, batches straddling boundaries
  got = np.concatenate([np.asarray(fn(3, k)["x_BXC"][:, 0, 0]) for k in range(steps)])
  got = got.astype(int) // 3
  want = np.concatenate([_device_order(3, e, 86) for e in range(len(got) // 86 + 1)])
  np.testing.assert_array_equal(got, want[:len(got)])
  for e in range(3):
    assert sorted(got[86 * e:86 * (e + 1)]) == list(range(86))
  pos = fn(3, steps - 1)["seed_B2"][:, 1]
  np.testing.assert_array_equal(pos, (steps - 1) * batch_size + np.arange(batch_size))
  with pytest.raises(ValueError, match=r"train.batch_size=87 is invalid .*allowed values "
                                       r"are 1..86"):
    fdata.device_batch_fn(w, 87)


def test_eval_batches_pad_and_mark():
  w = fdata.Windows(np.zeros((50, 2), np.float32), 10, 5)  # 36 windows
  bs = fdata.eval_batches(w, 16)
  assert len(bs) == 3 and all(b["x_BXC"].shape == (16, 10, 2) for b in bs)
  assert sum(float(b["valid_B"].sum()) for b in bs) == 36


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("variant,extra", [
    ("mlr", dict(mlr_ranks=(4, 2, 2), d_qk=8)), ("swa", dict(window=5)), ("mha", {})])
def test_noncausal_attention_matches_oracle(variant, extra):
  from structattn.attention import Attention, from_config
  spec = from_config(dict(variant=variant, num_heads=2, causal=False, **extra), d_model=16,
                     seq_len=32)
  layer = Attention(spec, rngs=nnx.Rngs(0), zero_init_out=False)
  x = jax.random.normal(jax.random.key(1), (2, 32, 16), jnp.float32)
  np.testing.assert_allclose(layer(x, impl="xla"), layer(x, impl="reference"), atol=1e-5)
  # The first position sees a key after it (non-causal) unless the window excludes it.
  y0 = layer(x)[:, 0]
  y1 = layer(x.at[:, 3].add(1.0))[:, 0]
  assert float(jnp.abs(y1 - y0).max()) > 1e-4


def test_causal_attention_config_is_rejected():
  c = fc_configs.get_config("tiny")
  c.attention.causal = True
  with pytest.raises(ValueError, match=r"attention.causal=True .*allowed values are \(False,\)"):
    tasks_lib.build(c)


# ------------------------------------------------------------------------------ errors


def test_missing_file(tmp_path):
  c = fc_configs.get_config("tiny")
  c.data.dataset = "etth1"
  c.data.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"data.dataset='etth1'.*ETTh1.csv.*data.data_dir"):
    train_lib.train(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_pipeline_and_device_batch_size():
  c = fc_configs.get_config("tiny")
  c.data.pipeline = "gpu"
  with pytest.raises(ValueError, match=r"data.pipeline='gpu' is invalid: allowed values are "
                                       r"\('host', 'device'\)"):
    tasks_lib.build(c)
  c = fc_configs.get_config("tiny")
  c.data.source = "csv"
  c.train.batch_size = 10 ** 5
  with pytest.raises(ValueError, match=r"train.batch_size=100000 is invalid with "
                                       r"data.pipeline='device'"):
    tasks_lib.build(c)


@needs_data
def test_missing_column():
  c = get_config("tiny")
  c.data.columns = ("OT", "NOPE")
  with pytest.raises(ValueError, match=r"data.columns=.*'NOPE'.*allowed values are .*'HUFL'"):
    tasks_lib.build(c)


@needs_data
def test_horizon_longer_than_split():
  c = get_config("illness-24")
  c.data.horizon = 120
  with pytest.raises(ValueError, match=r"data.horizon=120 .*allowed values are 1\.\.97"):
    tasks_lib.build(c)
  with pytest.raises(ValueError, match="data.dataset='nope' is invalid"):
    fdata.load_splits("nope")


# ------------------------------------------------------------------------------ configs


def test_presets_and_sweeps():
  c = fc_configs.get_config("etth1-336-mlr")
  assert (c.data.seq_len, c.data.horizon, c.attention.variant) == (512, 336, "mlr")
  assert c.attention.causal is False and c.model.patch_len == 16 and c.model.stride == 8
  assert fc_configs.get_config("illness-60").data.seq_len == 104
  for name in ("etth1-96", "illness-24", "exchange-720", "vic_elec-96"):
    p = fc_configs.get_config(name)  # device batches, an epoch per call, validated per epoch
    assert p.data.pipeline == "device" and p.train.steps_per_call == p.eval_every == p.log_every
    assert p.train.steps_per_call * p.train.batch_size >= fc_configs.train_windows(
        p.data.dataset, p.data.seq_len, p.data.horizon)
  with pytest.raises(ValueError, match="unknown preset"):
    fc_configs.get_config("etth1-100")
  for name in ("sweep-table-tiny", "sweep-table-paper"):
    s = fc_configs.get_config(name)
    flat = flatten(s.to_dict())
    assert s.sweep_name and len(s.sweep) >= 12
    for point in s.sweep:
      assert set(point) <= set(flat), set(point) - set(flat)
  paper = fc_configs.get_config("sweep-table-paper")
  assert len(paper.sweep) == 4 * 4 * 3 * 3
  assert {"data.dataset": "illness", "data.horizon": 24, "attention.variant": "mlr",
          "seed": 2}.items() <= next(p for p in paper.sweep if p.get("data.dataset") ==
                                     "illness" and p.get("attention.variant") == "mlr" and
                                     p["seed"] == 2).items()


# ------------------------------------------------------------------------------ training


@needs_data
@pytest.mark.parametrize("pipeline", ["device", "host"])
def test_tiny_model_beats_repeat_last(tmp_path, pipeline):
  c = get_config("tiny-mlr")
  c.data.source = "csv"
  c.data.pipeline = pipeline
  c.train.steps = 120
  c.eval_every = 60
  c.progress = False
  result = train_lib.train(c, str(tmp_path))
  assert result["status"] == "completed"
  saved = json.loads((tmp_path / "result.json").read_text())
  for key in ("test/mse", "test/mae", "final/val_mse", "params/total", "compute/paper_macs"):
    assert key in saved, key
  assert saved["test/windows"] == 2880 - 24 + 1
  assert saved["test/mse"] < 0.8 * saved["baseline/test_mse_repeat_last"]
  assert saved["test/mae"] < saved["baseline/test_mae_repeat_last"]
  assert saved["data/pipeline"] == pipeline
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  assert "eval/mse" in rows[-1] and rows[-1]["eval/mse_sem"] > 0
  assert [r["step"] for r in rows] == [1, 25, 50, 60, 75, 100, 120]  # log steps + eval steps
  assert [r["step"] for r in rows if "eval/mse" in r] == [60, 120]


def _device_run(steps, **train):
  c = get_config("tiny")
  c.data.source = "csv"
  c.progress = False
  c.data.seq_len = 64
  c.model.update(num_layers=1, dropout=0.1)  # dropout keys from the batches' seed_B2
  c.train.update(steps=steps, lr=3e-3, schedule="constant", **train)
  c.eval.update(every=20, select_best=False)
  c.log_every, c.checkpoint_every = 10, 20
  return c


@needs_data
def test_device_pipeline_resume_is_exact(tmp_path):
  """Stopped at a checkpoint and resumed (a fresh setup; batches are a function of (seed,
  step)): the same run as an uninterrupted one, dropout included."""
  full = train_lib.train(_device_run(40), str(tmp_path / "full"))
  train_lib.train(_device_run(20), str(tmp_path / "resumed"))
  resumed = train_lib.train(_device_run(40), str(tmp_path / "resumed"))
  assert resumed["resumed_from"] == 20 and resumed["status"] == "completed"
  rows = {k: [json.loads(l) for l in (tmp_path / k / "metrics.jsonl").read_text().splitlines()]
          for k in ("full", "resumed")}
  assert [r["step"] for r in rows["full"]] == [r["step"] for r in rows["resumed"]]
  for a, b in zip(rows["full"], rows["resumed"]):
    np.testing.assert_allclose(a["train/loss"], b["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(full["test/mse"], resumed["test/mse"], rtol=1e-5)


@needs_data
def test_device_batches_with_grad_accum():
  """train.grad_accum splits a device batch into micro-batches: without dropout the step
  equals one on the whole batch; with dropout each micro-batch has its own key."""
  from structattn.forecast import task as ftask
  from structattn.optim import make_optimizer
  c = _device_run(10)
  c.model.dropout = 0.0
  setup = tasks_lib.build(c)
  graphdef, params_state, rest = nnx.split(setup.model, nnx.Param, ...)
  params = nnx.to_pure_dict(params_state)
  tx, _ = make_optimizer(c.train, params_state)
  batch = setup.batch_fn(jnp.int32(0), jnp.int32(3))
  out = {}
  for accum in (1, 4):
    step = jax.jit(functools.partial(train_lib.train_step, graphdef=graphdef, rest=rest, tx=tx,
                                     accum=accum, loss=setup.loss))
    out[accum] = step(params, tx.init(params), batch)
  np.testing.assert_allclose(out[1][2]["train/loss"], out[4][2]["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(out[1][2]["grad_norm"], out[4][2]["grad_norm"], rtol=1e-4)
  micro = [ftask._key({"seed_B2": batch["seed_B2"][i:i + 8]}) for i in range(0, 32, 8)]
  assert len({tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in micro}) == 4


@needs_data
def test_best_validation_selection_scores_test_with_the_best_parameters(tmp_path):
  """eval.select_best: test metrics come from the parameters of the best validation MSE; the
  choice survives a resume (the best parameters are checkpointed)."""
  c = get_config("tiny")
  c.progress = False
  # a high constant LR: validation MSE is not monotone, and a run extended from 30 to 60
  # steps (below) follows the same schedule as one of 60
  c.train.update(steps=60, lr=3e-2, schedule="constant")
  c.eval.update(every=10)
  c.checkpoint_every = 30
  res = train_lib.train(c, str(tmp_path / "a"))
  rows = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  vals = {r["step"]: r["eval/mse"] for r in rows if "eval/mse" in r}
  best_step = min(vals, key=vals.get)
  assert res["select/metric"] == "eval/mse" and res["select/best_step"] == best_step
  assert res["select/best_value"] == pytest.approx(vals[best_step])
  off = get_config("tiny")
  off.progress = False
  off.train.update(steps=60, lr=3e-2, schedule="constant")
  off.eval.update(every=10, select_best=False)
  last = train_lib.train(off, str(tmp_path / "b"))
  assert "select/best_step" not in last
  if best_step != 60:
    assert res["test/mse"] != pytest.approx(last["test/mse"], rel=1e-6)
  # stopped at the first checkpoint and resumed: the same best parameters
  c2 = get_config("tiny")
  c2.progress = False
  c2.train.update(steps=30, lr=3e-2, schedule="constant")
  c2.eval.update(every=10)
  c2.checkpoint_every = 30
  train_lib.train(c2, str(tmp_path / "c"))
  c2.train.steps = 60
  resumed = train_lib.train(c2, str(tmp_path / "c"))
  assert resumed["select/best_step"] == res["select/best_step"]
  assert resumed["test/mse"] == pytest.approx(res["test/mse"], rel=1e-5)


@needs_data
def test_group_best_validation_equals_a_group_stopped_at_the_best_step(tmp_path):
  """The forecasting table's path (vmapped group, dropout, best-validation selection): each
  member's test metrics equal those of the same group stopped at that member's best step
  (constant LR, so the trajectories agree up to it)."""
  def configs(steps, select):
    out = []
    for seed in (0, 1):
      c = get_config("tiny")
      c.progress, c.seed = False, seed
      c.model.dropout = 0.3
      c.train.update(steps=steps, lr=1e-1, schedule="constant", steps_per_call=10)
      c.eval.update(every=10, select_best=select)
      c.log_every, c.checkpoint_every = 10, 50
      out.append(c)
    return out

  def group(steps, select, name):
    return train_lib.train_group(configs(steps, select),
                                 [str(tmp_path / f"{name}-s{s}") for s in (0, 1)],
                                 group_dir=str(tmp_path / f"group-{name}"))

  res = group(50, True, "select")
  assert min(r["select/best_step"] for r in res) < 50  # a member selects an earlier step
  for best in sorted({r["select/best_step"] for r in res}):
    stopped = group(best, False, f"stop{best}")
    for r, st in zip(res, stopped):
      if r["select/best_step"] == best:
        assert st["final/val_mse"] == pytest.approx(r["select/best_value"], rel=1e-6)
        assert st["test/mse"] == pytest.approx(r["test/mse"], rel=1e-6)
        assert st["test/mae"] == pytest.approx(r["test/mae"], rel=1e-6)


def test_drop_last_metrics_score_only_whole_batches():
  """*_drop_last: the reference code's test protocol (in order, last partial batch dropped),
  over the real windows only (eval padding excluded first)."""
  from structattn.forecast import task as ftask
  arrays = {"se": np.array([1.0, 1.0, 1.0, 1.0, 5.0, 9.0]),
            "ae": np.array([1.0, 1.0, 1.0, 1.0, 2.0, 9.0]),
            "valid": np.array([1, 1, 1, 1, 1, 0])}
  out = ftask.summarize(arrays, "test", drop_last_batch=2)
  assert out["test/windows"] == 5 and out["test/mse"] == pytest.approx(9 / 5)
  assert out["test/windows_drop_last"] == 4
  assert out["test/mse_drop_last"] == 1.0 and out["test/mae_drop_last"] == 1.0
  assert "test/mse_drop_last" not in ftask.summarize(arrays, "test")
  assert "test/mse_drop_last" not in ftask.summarize(arrays, "test", drop_last_batch=8)


def test_step_decay_is_patchtsts_type3_schedule():
  """train.schedule='step_decay' on a dataset preset: lr for epochs 1-4, then x0.9 per
  epoch (PatchTST's lradj 'type3'); a missing decay_every is a clear error."""
  from structattn import optim
  c = fc_configs.get_config("etth1-96-mha")
  c.train.schedule = "step_decay"
  e = c.eval_every  # steps per epoch
  lr = optim.schedule(c.train)
  for epoch, want in ((1, 1.0), (4, 1.0), (5, 0.9), (6, 0.81), (30, 0.9 ** 26)):
    for step in ((epoch - 1) * e, epoch * e - 1):
      assert float(lr(step)) == pytest.approx(1e-4 * want, rel=1e-5), (epoch, step)
  c.train.decay_every = 0
  with pytest.raises(ValueError, match="decay_every"):
    optim.schedule(c.train)


def test_table_reuses_a_finished_group_without_training(tmp_path):
  """`python -m structattn.forecast.table` on a runs dir whose group already completed reads
  the seeds' result.json files instead of training again (so a cut-off table resumes)."""
  import json as json_lib
  import time as time_lib
  from structattn.forecast import table
  runs = tmp_path / "runs"
  for seed, mse in ((0, 0.40), (1, 0.42)):
    d = runs / f"etth1-96-mlr-s{seed}"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json_lib.dumps({
        "status": "completed", "test/mse": mse, "test/mae": mse + 0.03,
        "final/val_mse": 0.7, "final/val_mae": 0.6, "device": "test-card"}))
  job = ("etth1", 96, "mlr", [0, 1], {}, 0, str(runs), time_lib.time() + 60, 0.0)
  row = table.run_group(job)
  assert row["status"] == "completed" and row["device"] == "test-card"
  assert row["test/mse"] == [0.40, 0.42]
  assert abs(row["test/mse_mean"] - 0.41) < 1e-12
  (runs / "etth1-96-mlr-s1" / "result.json").write_text(json_lib.dumps({"status": "failed: x"}))
  assert table.finished_results([str(runs / f"etth1-96-mlr-s{s}") for s in (0, 1)]) is None


def test_table_retries_out_of_memory_groups_with_fewer_workers(monkeypatch):
  """A group that runs out of GPU memory under 0.9/workers is retried after the others with
  half the workers (twice the memory), down to one worker; every group is reported once."""
  from structattn.forecast import table
  from tests import fake_groups
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  jobs = [("small", 1, "mha"), ("big", 1, "mha"), ("small", 2, "mha"), ("small", 3, "mha")]
  rows = []
  table.schedule(jobs, 4, fake_groups.needs_half_the_gpu, time.time() + 120, rows.append)
  by = {(r["dataset"], r["horizon"]): r for r in rows}
  assert len(rows) == 4 and len(by) == 4
  assert all(r["status"] == "completed" for r in rows), rows
  assert by[("small", 1)]["fraction"] == "0.225"  # first pass: 4 workers
  assert by[("big", 1)]["fraction"] is None  # 4 -> 2 (0.45, still too little) -> 1: the whole GPU
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ


def test_table_keeps_a_callers_memory_fraction_and_reports_the_failure(monkeypatch):
  from structattn.forecast import table
  from tests import fake_groups
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.2")
  rows = []
  table.schedule([("big", 1, "mha"), ("small", 1, "mha")], 2, fake_groups.needs_half_the_gpu,
                 time.time() + 120, rows.append)
  by = {r["dataset"]: r for r in rows}
  assert table.out_of_memory(by["big"]) and by["small"]["status"] == "completed"
  assert by["small"]["fraction"] == "0.2" and os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.2"


# ------------------------------------------------------------------------------ PatchTST


def _patchtst_model(name="patchtst-etth1-96", **model):
  from structattn.forecast import task as ftask
  c = fc_configs.get_config(name)
  c.model.update(**model)
  return ftask.build_model(c), c


def test_patchtst_preset_is_patchtst64():
  """PatchTST/64's ETTh1 model: 64 patches, 3 layers of D=16 / 4 heads / d_ff 128 with
  BatchNorm and residual attention; its parameter count is the reference model's (W_P
  16*16+16, W_pos 64*16, per layer Q/K/V/O 4*(16*16+16) + FF 16*128+128+128*16+16 + two
  BatchNorms 2*2*16, head 1024*96+96)."""
  model, c = _patchtst_model()
  assert model.n == 64 and len(model.blocks) == 3 and model.has_batch_norm
  assert model.residual_attention and model.encoder == "patchtst"
  layer = (16 * 16 + 16) * 4 + (16 * 128 + 128 + 128 * 16 + 16) + 2 * 2 * 16
  assert model.param_counts()["total"] == 16 * 16 + 16 + 64 * 16 + 3 * layer + 1024 * 96 + 96
  assert (c.train.lr, c.train.batch_size, c.train.b1, c.train.b2) == (1e-4, 128, 0.95, 0.999)
  assert c.model.dropout == 0.3 and c.data.drop_last and c.eval.select_best
  assert c.train.steps == 100 * c.eval_every and c.eval_every == (8640 - 512 - 96 + 1) // 128
  assert c.attention.scale == "standard" and c.attention.causal is False  # K^-0.5, K = 4
  x = jax.random.normal(jax.random.key(0), (3, 512, 7))
  assert model(x).shape == (3, 96, 7)
  assert model(x, jax.random.key(1), 0.3).shape == (3, 96, 7)
  ill, ci = _patchtst_model("patchtst-illness-60")
  assert ill.n == 42 and ci.data.seq_len == 104 and ci.train.batch_size == 16
  assert ci.train.lr == 2.5e-3 and ci.train.schedule == "constant"
  assert ill(jax.random.normal(jax.random.key(0), (2, 104, 7))).shape == (2, 60, 7)
  with pytest.raises(ValueError, match="unknown preset"):
    fc_configs.get_config("patchtst-etth1-100")
  with pytest.raises(ValueError, match="unknown preset"):
    fc_configs.get_config("patchtst-etth1-96-bilinear_btt")


def test_revin_round_trip():
  """RevIN without affine parameters: an affine change of a series' scale and offset moves
  the forecast by the same map (the model sees the normalised series only)."""
  model, _ = _patchtst_model(norm="layer")
  x = jax.random.normal(jax.random.key(0), (2, 512, 7))
  y = model(x)
  y2 = model(3.0 * x + 5.0)
  np.testing.assert_allclose(y2, 3.0 * y + 5.0, rtol=1e-3, atol=1e-3)
  off, _ = _patchtst_model(norm="layer", revin=False)
  assert float(jnp.abs(off(3.0 * x + 5.0) - (3.0 * off(x) + 5.0)).max()) > 1e-2


def test_residual_attention_changes_the_output_after_the_first_layer():
  x = jax.random.normal(jax.random.key(0), (2, 512, 7))
  on, _ = _patchtst_model(residual_attention=True)
  off, _ = _patchtst_model(residual_attention=False)  # same seed: the same parameters
  assert float(jnp.abs(on(x) - off(x)).max()) > 1e-4
  on1, _ = _patchtst_model(residual_attention=True, num_layers=1)
  off1, _ = _patchtst_model(residual_attention=False, num_layers=1)
  np.testing.assert_allclose(on1(x), off1(x), rtol=1e-6, atol=1e-6)  # nothing to add


def test_residual_scores_accumulate():
  """Layer l's softmax sees the sum of layers 0..l's own scores (PatchTST passes each
  layer's scores, previous ones included, to the next)."""
  model, _ = _patchtst_model(norm="layer")
  h = jax.random.normal(jax.random.key(2), (5, 64, 16))
  b0, b1 = model.blocks[0], model.blocks[1]
  h1, s0 = b0(h)
  _, s1 = b1(h1, s0)
  own1, _ = b1.scores(h1)
  np.testing.assert_allclose(s1, s0 + own1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["mha", "swa", "mlr", "gswa"])
def test_patchtst_dense_scores_match_the_attention_reference(variant):
  """The 'patchtst' layer's dense structured scores give the attention package's oracle
  (reference_attention on the same level-scaled q, k and v)."""
  from structattn.attention.core import reference_attention
  model, c = _patchtst_model(f"patchtst-etth1-96-{variant}", norm="layer")
  layer = model.blocks[0]
  x = jax.random.normal(jax.random.key(3), (4, 64, 16))
  sp = layer.spec
  q = layer.wq(x).reshape(4, 64, sp.num_heads, sp.d_qk) * jnp.asarray(layer.level_scales)
  k = layer.wk(x).reshape(4, 64, sp.num_heads, sp.d_qk)
  v = layer.wv(x).reshape(4, 64, sp.num_heads, sp.d_head)
  want = layer.wo(reference_attention(q, k, v, layer.pattern).reshape(4, 64, -1))
  got, _ = layer.attention(x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if variant == "mlr":
    assert sp.widths == (2, 1, 1) and sp.block_sizes() == (64, 32, 16)


def test_batch_norm_train_and_eval_modes():
  """Train mode normalises with the batch's statistics (a window's forecast depends on the
  other windows) and updates the running ones with PyTorch's momentum 0.1; eval mode uses
  the running ones; set_batch_stats makes eval equal a train-mode pass without dropout."""
  model, _ = _patchtst_model()
  x = jax.random.normal(jax.random.key(0), (4, 512, 7)) * 2.0 + 1.0
  # other windows of another shape (not an affine map of x: RevIN would undo that)
  other = x.at[1:].set(jnp.cumsum(jax.random.normal(jax.random.key(9), (3, 512, 7)), axis=1))
  ev0 = model(x)
  np.testing.assert_allclose(model(other)[0], ev0[0], rtol=1e-5, atol=1e-5)  # eval: per window
  bn = model.blocks[0].norm_attn
  before = np.asarray(bn.mean[...]).copy()
  tr = model(x, train=True)
  tr_other = model(other, train=True)
  assert float(jnp.abs(tr[0] - tr_other[0]).max()) > 1e-3  # train: batch statistics
  after = np.asarray(bn.mean[...])
  assert not np.allclose(before, after)
  model2, _ = _patchtst_model()
  model2(x, train=True)  # one step from zero mean: running = 0.1 * batch mean
  model3, _ = _patchtst_model()
  model3.set_batch_stats(x)
  np.testing.assert_allclose(model2.blocks[0].norm_attn.mean[...],
                             0.1 * model3.blocks[0].norm_attn.mean[...], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(model3(x), model3(x, train=True), rtol=1e-4, atol=1e-4)
  from structattn.forecast import model as fmodel
  assert model3.blocks[0].norm_attn.momentum == fmodel.BN_MOMENTUM  # restored


def test_loss_and_rest_returns_the_updated_batch_statistics():
  from structattn.forecast import task as ftask
  model, _ = _patchtst_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (2, 512, 7))
  batch = {"x_BXC": x, "y_BFC": jnp.zeros((2, 96, 7)),
           "seed_B2": jnp.zeros((2, 2), jnp.uint32)}
  loss, new_rest = jax.jit(ftask.make_loss_and_rest(0.3), static_argnums=1)(
      params, graphdef, rest, batch)
  assert np.isfinite(float(loss))
  old, new = jax.tree.leaves(rest), jax.tree.leaves(new_rest)
  assert len(old) == len(new) == 12 and any(not np.allclose(a, b) for a, b in zip(old, new))
  assert float(loss) == pytest.approx(float(ftask.make_loss(0.3)(params, graphdef, rest, batch)))


def test_patchtst_schedule_per_epoch():
  """PatchTST's lradj='type3' with the never-stepped OneCycleLR: epoch 1 at lr/25 = 4e-6,
  epochs 2-4 at 1e-4 (adjust_learning_rate after epoch e < 3, and e = 3 gives 0.9 ** 0),
  then x0.9 per epoch; Adam's beta1 0.95 for the whole run. illness (lradj 'constant'):
  epoch 1 at 2.5e-3 / 25, then 2.5e-3."""
  from structattn import optim
  c = fc_configs.get_config("patchtst-etth1-96")
  e = c.eval_every
  lr = optim.schedule(c.train)
  want = {1: 4e-6, 2: 1e-4, 3: 1e-4, 4: 1e-4, 5: 9e-5, 6: 8.1e-5, 7: 7.29e-5,
          100: 1e-4 * 0.9 ** 96}
  for epoch, value in want.items():
    for step in ((epoch - 1) * e, epoch * e - 1):
      assert float(lr(step)) == pytest.approx(value, rel=1e-5), (epoch, step)
  assert c.train.b1 == 0.95
  ci = fc_configs.get_config("patchtst-illness-24")
  lri, ei = optim.schedule(ci.train), ci.eval_every
  assert float(lri(0)) == pytest.approx(1e-4) and float(lri(ei - 1)) == pytest.approx(1e-4)
  assert float(lri(ei)) == pytest.approx(2.5e-3) and float(lri(99 * ei)) == pytest.approx(2.5e-3)


def test_device_batches_drop_last_epochs():
  """data.drop_last: floor(N / B) batches per epoch from that epoch's permutation, its last
  N mod B windows unused, the next epoch a fresh permutation."""
  w = fdata.Windows(np.arange(300, dtype=np.float32).reshape(100, 3), 10, 5)  # 86 windows
  fn = jax.jit(fdata.device_batch_fn(w, 16, drop_last=True))
  assert fdata.steps_per_epoch(86, 16, True) == 5 and fdata.steps_per_epoch(86, 16, False) == 6
  for epoch in range(3):
    got = np.concatenate([np.asarray(fn(3, 5 * epoch + k)["x_BXC"][:, 0, 0])
                          for k in range(5)]).astype(int) // 3
    np.testing.assert_array_equal(got, _device_order(3, epoch, 86)[:80])
  pos = np.asarray(fn(3, 6)["seed_B2"][:, 1])
  np.testing.assert_array_equal(pos, 86 + 16 + np.arange(16))


def test_drop_last_needs_device_batches():
  c = fc_configs.get_config("tiny")
  c.data.update(drop_last=True, pipeline="host")
  with pytest.raises(ValueError, match=r"data.drop_last=True is invalid with "
                                       r"data.pipeline='host'"):
    tasks_lib.build(c)


def test_benchmark_dataset_needs_a_csv_dir():
  """No default directory: a benchmark dataset without data.csv_dir is a clear error; the
  packaged dataset needs none."""
  c = fc_configs.get_config("patchtst-etth1-96")
  assert c.data.csv_dir == ""
  with pytest.raises(FileNotFoundError, match=r"data.csv_dir, which is not set.*vic_elec"):
    tasks_lib.build(c)
  assert fc_configs.get_config("tiny").data.dataset == "vic_elec"


@needs_data
def test_patchtst_tiny_end_to_end(tmp_path):
  """The patchtst recipe end to end on ETTh1's OT channel at a short look-back, as the table
  runs it (two seeds vmapped): two epochs, BatchNorm statistics recomputed at every
  evaluation, best-validation test scores, the first epoch at lr / 25."""
  per_epoch = (8640 - 128 - 24 + 1) // 128

  def config(seed):
    c = fc_configs.get_config("patchtst-etth1-96")
    c.seed = seed
    c.data.update(csv_dir=str(SHARED), columns=("OT",), seq_len=128, horizon=24, source="csv")
    c.model.bn_stats_windows = 256
    c.eval.batch_size = 1024
    c.train.update(steps=2 * per_epoch, steps_per_call=per_epoch, initial_steps=per_epoch,
                   decay_start=3 * per_epoch, decay_every=per_epoch)
    c.eval_every = c.log_every = c.checkpoint_every = per_epoch
    c.progress = False
    return c

  results = train_lib.train_group([config(0), config(1)],
                                  [str(tmp_path / f"s{s}") for s in (0, 1)],
                                  group_dir=str(tmp_path / "group"))
  for result in results:
    assert result["status"] == "completed" and result["model/bn_stats_windows"] == 256
    assert result["data/drop_last"] is True and result["model/num_patches"] == 16
    assert result["select/best_step"] in (per_epoch, 2 * per_epoch)
    assert result["test/windows_drop_last"] == (2880 - 24 + 1) // 128 * 128
    for key in ("test/mse", "test/mae", "test/mse_drop_last", "final/val_mse"):
      assert np.isfinite(result[key]), key
    assert result["test/mse"] < 1.5 * result["baseline/test_mse_repeat_last"]
  assert results[0]["test/mse"] != results[1]["test/mse"]  # the seeds' own models
  rows = [json.loads(l) for l in (tmp_path / "s0" / "metrics.jsonl").read_text().splitlines()]
  lrs = {r["step"]: r["lr"] for r in rows}
  assert lrs[1] == pytest.approx(4e-6) and lrs[2 * per_epoch] == pytest.approx(1e-4)


def test_table_patchtst_rows_and_time_limit(tmp_path):
  """The table on the patchtst presets: finished seeds are read back under the preset's run
  names; past --time-limit nothing starts and OUT/rows.json still lists every group."""
  import json as json_lib
  import time as time_lib
  from structattn.forecast import table
  runs = tmp_path / "runs"
  for seed, mse in ((0, 0.37), (1, 0.38)):
    d = runs / f"patchtst-etth1-96-mha-s{seed}"
    d.mkdir(parents=True)
    (d / "result.json").write_text(json_lib.dumps({
        "status": "completed", "test/mse": mse, "test/mae": 0.4, "test/mse_drop_last": mse,
        "test/mae_drop_last": 0.4, "final/val_mse": 0.7, "final/val_mae": 0.6,
        "select/best_step": 620, "select/best_value": 0.7, "device": "test-card"}))
  job = ("etth1", 96, "mha", [0, 1], {}, 0, str(runs), time_lib.time() + 60, 0.0, "patchtst", 0)
  row = table.run_group(job)
  assert row["status"] == "completed" and row["test/mse_drop_last"] == [0.37, 0.38]
  assert row["select/best_step"] == [620, 620] and row["preset"] == "patchtst"
  assert "0.370 / 0.400" in table.markdown([{**row, "steps": 6200}])
  mlr = {**row, "variant": "mlr", "test/mse_drop_last": [0.36, 0.385]}
  (pair,) = table.paired([row, mlr])
  assert pair["diffs"] == pytest.approx([-0.01, 0.005]) and pair["lower_on"] == 1
  assert "mlr" in table.paired_markdown([pair])
  c = table.job_config("etth2", 336, "mlr", 2, {"data.csv_dir": "/x"}, 3, "patchtst", 10)
  assert c.seed == 2 and c.data.csv_dir == "/x" and c.train.steps == 3 * c.eval_every
  assert c.checkpoint_every == 3 * c.eval_every and c.train.b1 == 0.95
  out = tmp_path / "out"
  table.main(["--out", str(out), "--runs", str(tmp_path / "none"), "--preset", "patchtst",
              "--datasets", "etth1", "--horizons", "96,192", "--variants", "mha",
              "--time-limit", "0"])
  rows = json_lib.loads((out / "rows.json").read_text())["rows"]
  assert [(r["horizon"], r["status"].startswith("not run")) for r in rows] == [(96, True),
                                                                                (192, True)]
  # an earlier rows.json's completed groups are kept, not rerun
  prev = tmp_path / "prev.json"
  prev.write_text(json_lib.dumps({"rows": [{**row, "seeds": [0, 1, 2]}]}))
  out2 = tmp_path / "out2"
  table.main(["--out", str(out2), "--runs", str(tmp_path / "none"), "--preset", "patchtst",
              "--datasets", "etth1", "--horizons", "96,192", "--variants", "mha",
              "--time-limit", "0", "--previous", str(prev)])
  rows = json_lib.loads((out2 / "rows.json").read_text())["rows"]
  assert [r["status"] for r in rows][0] == "completed" and rows[0]["from"] == str(prev)
  assert rows[1]["status"].startswith("not run")
