"""ICR through the shared loop: metrics contract, vmapped members equal separate runs,
a tiny model beats the zero predictor; sweeps skip finished points and survive failures."""

import json

import numpy as np
import pytest

from structattn.configs import icr as icr_configs
from structattn import sweep as sweep_lib
from structattn import train as train_lib
from tests.helpers import small_icr


def tiny(steps=40, seed=0, lr=1e-3, d=4, width=16, **icr):
  c = small_icr(seed=seed, width=width, d_input=d, **icr)
  c.train.update(steps=steps, lr=lr, warmup_steps=5, steps_per_call=8)
  c.eval_every = 20
  c.eval.update(batches=2, batch_size=32)
  c.log_every, c.checkpoint_every, c.progress = 10, 20, False
  return c


def rows(path):
  return [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_icr_run_logs_the_contract_and_baselines(tmp_path):
  res = train_lib.train(tiny(), str(tmp_path))
  assert res["status"] == "completed" and res["unit"] == "prompts"
  r = rows(tmp_path)
  assert [x["step"] for x in r] == [1, 10, 20, 30, 40]
  last = r[-1]
  for key in ("compute/paper_macs", "compute/train_flops", "prompts", "train/loss",
              "eval/last_point_se", "eval/last_point_se_sem", "eval/mse", "train/loss_mean"):
    assert key in last, key
  assert len(last["eval/se_by_position"]) == 8  # N = 2 d
  assert last["compute/paper_macs"] == pytest.approx(40 * 64 * res["compute/paper_macs_per_prompt"])
  assert res["baseline/least_squares/last_point_se"] < 1e-6
  assert 0.5 < res["baseline/zero/last_point_se"] < 1.5
  assert res["final/eval_last_point_se"] == last["eval/last_point_se"]


@pytest.mark.slow
def test_eval_interval_need_not_divide_the_log_interval(tmp_path):
  c = tiny(steps=30)
  c.log_every, c.eval.every = 10, 15
  train_lib.train(c, str(tmp_path))
  r = rows(tmp_path)
  assert [x["step"] for x in r] == [1, 10, 15, 20, 30]
  assert [x["step"] for x in r if "eval/mse" in x] == [15, 30]


@pytest.mark.slow
def test_steps_per_call_does_not_change_the_result(tmp_path):
  a, b = tiny(steps=24), tiny(steps=24)
  a.train.steps_per_call, b.train.steps_per_call = 1, 7
  ra = train_lib.train(a, str(tmp_path / "a"))
  rb = train_lib.train(b, str(tmp_path / "b"))
  np.testing.assert_allclose(ra["final/eval_last_point_se"], rb["final/eval_last_point_se"],
                             rtol=1e-5)


@pytest.mark.slow
def test_vmapped_members_equal_separate_runs(tmp_path):
  members = [tiny(seed=s, lr=lr) for s, lr in ((0, 1e-3), (1, 1e-3), (0, 3e-3))]
  group = train_lib.train_group(members, [str(tmp_path / f"m{i}") for i in range(3)])
  for i, c in enumerate(members):
    alone = train_lib.train(c, str(tmp_path / f"alone{i}"))
    g_rows, a_rows = rows(tmp_path / f"m{i}"), rows(tmp_path / f"alone{i}")
    assert [r["step"] for r in g_rows] == [r["step"] for r in a_rows]
    for g, a in zip(g_rows, a_rows):
      np.testing.assert_allclose(g["train/loss"], a["train/loss"], rtol=2e-5, atol=1e-6)
      if "eval/last_point_se" in a:
        np.testing.assert_allclose(g["eval/last_point_se"], a["eval/last_point_se"],
                                   rtol=2e-5, atol=1e-6)
    assert group[i]["status"] == "completed"
    assert json.loads((tmp_path / f"m{i}" / "config.json").read_text())["seed"] == c.seed
  # members differ: different seeds and learning rates give different losses
  assert rows(tmp_path / "m0")[-1]["train/loss"] != rows(tmp_path / "m1")[-1]["train/loss"]
  assert rows(tmp_path / "m0")[-1]["train/loss"] != rows(tmp_path / "m2")[-1]["train/loss"]


def test_group_members_must_share_the_model():
  a, b = tiny(), tiny(width=32)
  with pytest.raises(ValueError, match="model.d_model"):
    train_lib.train_group([a, b], ["x", "y"])


@pytest.mark.slow
def test_tiny_model_beats_the_zero_predictor(tmp_path):
  c = tiny(steps=400, d=4, width=32, lr=3e-3)
  c.model.num_layers = 2
  c.train.update(batch_size=256, parametrization="standard")
  c.eval_every = 400
  c.eval.update(batches=1, batch_size=256)
  res = train_lib.train(c, str(tmp_path))
  assert res["final/eval_last_point_se"] < 0.85 * res["baseline/zero/last_point_se"]
  assert res["final/eval_mse"] < 0.85


@pytest.mark.slow
def test_compute_budget_sets_the_steps(tmp_path):
  c = tiny(steps=0)
  per_step = None
  c.train.compute_budget = 1.0  # placeholder, replaced below
  from structattn import tasks
  setup = tasks.build(tiny())
  per_step = setup.paper_macs_per_unit * setup.units_per_step
  c.train.compute_budget = 12.5 * per_step
  res = train_lib.train(c, str(tmp_path))
  assert res["train/steps"] == 13 and rows(tmp_path)[-1]["step"] == 13


@pytest.mark.slow
def test_sweep_skips_finished_points_and_records_failures(tmp_path):
  base = tiny(steps=10)
  base.sweep = [{"seed": 0}, {"seed": 1}, {"icr.d_input": 4, "icr.n_start": -3}]
  out = sweep_lib.run_sweep(base, str(tmp_path), cache_dir=None)
  assert out["seed=0"] == "completed" and out["seed=1"] == "completed"
  bad = "d_input=4,n_start=-3"
  assert out[bad].startswith("failed: ValueError") and "icr.n_start" in out[bad]
  assert (tmp_path / bad / "error.txt").exists()
  manifest = json.loads((tmp_path / "sweep.json").read_text())
  assert [p["status"].split(":")[0] for p in manifest["points"]] == ["completed", "completed",
                                                                     "failed"]
  mtime = (tmp_path / "seed=0" / "result.json").stat().st_mtime_ns
  again = sweep_lib.run_sweep(base, str(tmp_path), cache_dir=None)  # nothing new to run
  assert (tmp_path / "seed=0" / "result.json").stat().st_mtime_ns == mtime
  assert again["seed=0"] == "completed" and again[bad].startswith("failed")


@pytest.mark.slow
def test_sweep_vmap_groups_and_names(tmp_path):
  base = tiny(steps=10)
  base.sweep = sweep_lib.product(**{"seed": (0, 1), "train.lr": (1e-3, 3e-3)})
  pts = sweep_lib.points(base)
  assert [n for n, _ in pts][:2] == ["seed=0,lr=0.001", "seed=0,lr=0.003"]
  assert sweep_lib.groups(pts, vmap=True) == [[0, 1, 2, 3]]
  out = sweep_lib.run_sweep(base, str(tmp_path), vmap=True, cache_dir=None)
  assert set(out.values()) == {"completed"}
  with pytest.raises(ValueError, match="no config field 'nope'"):
    sweep_lib.apply_overrides(base, {"model.nope": 1})
  assert sweep_lib.zip_(a=(1, 2), b=(3, 4)) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]


def test_icr_presets_and_errors():
  assert len(icr_configs.get_config("sweep-head-dim-paper").sweep) == 8
  assert {p["attention.variant"] for p in icr_configs.get_config("sweep-compute-tiny").sweep} \
      == {"mha", "bilinear_btt", "bilinear_mlr"}
  with pytest.raises(ValueError, match="unknown ICR preset"):
    icr_configs.get_config("huge")
  c = tiny()
  c.icr.d_input = 0
  with pytest.raises(ValueError, match="icr.d_input"):
    train_lib.train(c, "/nonexistent/never-created")


@pytest.mark.slow
def test_group_resumes_from_the_step_every_member_reached(tmp_path):
  """Each member checkpoints into its own directory; a group whose members were killed at
  different checkpoints resumes from the newest step both have and ends where the
  uninterrupted group ends."""
  import shutil
  members = [tiny(steps=40, seed=s, lr=lr) for s, lr in ((0, 1e-3), (1, 3e-3))]
  full = train_lib.train_group(members, [str(tmp_path / f"full{i}") for i in range(2)])
  for i in range(2):
    shutil.copytree(tmp_path / f"full{i}", tmp_path / f"cut{i}")
    (tmp_path / f"cut{i}" / "result.json").unlink()
  shutil.rmtree(tmp_path / "cut1" / "checkpoints" / "40")  # member 1 was killed before 40
  resumed = train_lib.train_group(members, [str(tmp_path / f"cut{i}") for i in range(2)])
  for a, b in zip(full, resumed):
    assert b["resumed_from"] == 20
    assert b["final/eval_last_point_se"] == a["final/eval_last_point_se"]
  for i in range(2):
    assert [r["step"] for r in rows(tmp_path / f"cut{i}")] == [1, 10, 20, 30, 40]
