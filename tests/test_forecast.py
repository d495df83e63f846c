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

from configs import forecast as fc_configs
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
    np.testing.assert_array_equal(next(c)["x_BLC"], batches[k]["x_BLC"])
  # Each epoch visits every window once.
  starts = np.concatenate([bt["x_BLC"][:, 0, 0] for bt in batches]) / 3
  assert sorted(starts[:86].astype(int)) == list(range(86))
  assert not np.array_equal(next(fdata.TrainBatches(w, 16, seed=4))["x_BLC"],
                            batches[0]["x_BLC"])
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
  starts = np.concatenate([b["x_BLC"][:, 0, 0] for b in batches]).astype(int) // 3
  assert sorted(starts) == list(range(377))
  np.testing.assert_array_equal(starts, _device_order(7, 0, 377))
  for k, b in enumerate(batches):
    x, y = w.batch(starts[29 * k:29 * (k + 1)])
    np.testing.assert_array_equal(b["x_BLC"], x)
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
    np.testing.assert_array_equal(b["x_BLC"][0], x)
    np.testing.assert_array_equal(b["y_BFC"][0], y)
    assert not np.array_equal(b["x_BLC"][1], x)
    seen += list(idx)
  assert sorted(seen) == list(range(221))


@pytest.mark.parametrize("batch_size", [16, 50, 86])
def test_device_batches_straddle_epochs(batch_size):
  w = fdata.Windows(np.arange(300, dtype=np.float32).reshape(100, 3), 10, 5)  # 86 windows
  fn = jax.jit(fdata.device_batch_fn(w, batch_size))
  steps = -(-3 * 86 // batch_size) + 1  # past three epochs, batches straddling boundaries
  got = np.concatenate([np.asarray(fn(3, k)["x_BLC"][:, 0, 0]) for k in range(steps)])
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
  assert len(bs) == 3 and all(b["x_BLC"].shape == (16, 10, 2) for b in bs)
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
    assert p.data.pipeline == "device" and p.train.steps_per_call == p.eval.every == p.log_every
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
  c.eval.every = 60
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
  e = c.eval.every  # steps per epoch
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
