"""The staged ICR study: its plan at paper scale, and a CPU miniature through reproduce."""

import json

import pytest

from structattn import icr_study, reproduce
from structattn import study as study_lib
from structattn import sweep as sweep_lib


def test_gpu_plan_stages_and_groups(tmp_path):
  spec = icr_study.spec_for("gpu")
  compute, head_dim = icr_study.plan(spec, tmp_path)
  assert len(compute) == 3 * 4 * 3 * 2  # variants x widths x rates x seeds
  groups = [[compute[i] for i in g] for g in sweep_lib.groups(compute, vmap=True)]
  assert len(groups) == 12 and all(len(g) == 6 for g in groups)  # one per (variant, width)
  for g in groups:
    cs = [c for _, c in g]
    assert len({(c.attention.variant, c.model.d_model) for c in cs}) == 1
    assert sorted({c.train.lr for c in cs}) == [3.16e-4, 1e-3, 3.16e-3]
    assert sorted({c.seed for c in cs}) == [0, 1]
  assert {c.model.d_model for _, c in compute} == {64, 128, 256, 512}
  assert {c.attention.variant for _, c in compute} == {"mha", "bilinear_btt", "bilinear_mlr"}
  assert all(c.icr.d_input == 32 and c.train.steps == 50_000 and c.model.num_layers == 6
             and c.attention.num_heads == 8 for _, c in compute)
  # Finding (a): MHA at width 256, d_input 64, head dim 4 to 128; one run per group.
  assert len(sweep_lib.groups(head_dim, vmap=True)) == len(head_dim) == 6
  dims = sorted(c.model.d_model // c.attention.num_heads for _, c in head_dim)
  assert dims == [4, 8, 16, 32, 64, 128]
  assert all(c.icr.d_input == 64 and c.attention.variant == "mha" and c.model.d_model == 256
             for _, c in head_dim)
  names = [n for n, _ in compute + head_dim]
  assert len(set(names)) == len(names)
  # The compute stage dominates: the widest group's FLOPs exceed the head-dim runs'.
  assert icr_study.flops_of(groups[-1][0][1]) > icr_study.flops_of(head_dim[0][1])


@pytest.mark.parametrize("scale", reproduce.ICR_STUDY_SCALES)
def test_every_planned_config_builds(scale, tmp_path):
  from structattn.attention import from_config
  from structattn.icr import train as icr_train
  from structattn.icr.model import icr_specs
  spec = icr_study.spec_for(scale)
  for name, c in icr_study.points(spec, tmp_path):
    f = icr_train.icr_fields(c)
    s = from_config(c.attention.to_dict(), d_model=c.model.d_model, seq_len=2 * f["n_points"])
    assert s.d_model == c.model.d_model, name
    specs = icr_specs(c.attention.to_dict(), c.model.d_model, c.model.num_layers,
                      2 * f["n_points"])
    assert len(specs) == c.model.num_layers
    assert icr_study.flops_of(c) > 0
    assert not study_lib.stale(tmp_path / name, c)


def test_overrides_reach_every_point_and_only_narrows(tmp_path):
  spec = icr_study.spec_for("gpu")
  pts = icr_study.points(spec, tmp_path, {"eval.batches": 1})
  assert all(c.eval.batches == 1 for _, c in pts)
  plan = reproduce.study_plan(spec, only=["num_heads="], planner=icr_study.plan)
  compute, head_dim = plan(tmp_path)
  assert compute == [] and len(head_dim) == 6


def test_estimates_use_the_icr_flops(tmp_path):
  spec = icr_study.spec_for("gpu")
  group = icr_study.compute_points(spec)[:6]
  need = study_lib.estimate_seconds(group, {}, icr_study.flops_of, default_rate=1e13,
                                    startup=0.0)
  assert need == pytest.approx(6 * icr_study.flops_of(group[0][1]) / 1e13)


@pytest.mark.slow
def test_mini_study_end_to_end_twice(tmp_path, capsys):
  work = tmp_path / "study"
  argv = ["icr-study", "--scale=mini", f"--workdir={work}"]
  assert reproduce.main(argv + ["--time-limit=1"]) == 0  # too short for any group
  first = json.loads((work / "summary.json").read_text())
  assert first["study"]["ran"] == [] and first["study"]["skipped_for_time"]
  assert "not yet possible" in first["table"]
  assert reproduce.main(argv) == 0
  second = json.loads((work / "summary.json").read_text())
  spec = icr_study.spec_for("mini")
  total = len(icr_study.points(spec, work / "runs"))
  assert second["study"]["pending"] == [] and len(second["study"]["ran"]) == total
  assert set(second["points"].values()) == {"completed"}
  # Ten steps learn nothing, so the frontiers need not overlap; every variant is in the table.
  assert all(f"| {v} | 16 |" in second["compute"]["table"] for v in spec.variants)
  head = second["head_dim"]["by_d_input"][str(spec.head_dim_d_input)]
  assert head["head_dim"] == sorted(spec.head_dims())
  assert (work / "icr_compute_combined.png").is_file() and (work / "icr_head_dim.png").is_file()
  rows = json.loads((work / "rows.json").read_text())
  assert len(rows) == total and all(r["eval"] and r["baselines"] for r in rows)
  assert reproduce.main(argv) == 0  # everything is done: nothing runs again
  assert json.loads((work / "summary.json").read_text())["study"]["ran"] == []
  capsys.readouterr()
