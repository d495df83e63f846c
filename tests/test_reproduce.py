"""structattn-reproduce: sweep + analysis + figures end to end at a toy size."""

import json

import pytest

from structattn import reproduce

TOY = {"train.steps": 20, "train.steps_per_call": 10, "train.warmup_steps": 2,
       "model.d_model": 16, "model.num_layers": 1, "eval_every": 10, "eval.batches": 1,
       "eval.batch_size": 64, "log_every": 10, "checkpoint_every": 20, "progress": False}


@pytest.mark.slow
def test_icr_head_dim_end_to_end(tmp_path):
  out = reproduce.reproduce("icr-head-dim", "tiny", str(tmp_path), overrides=TOY, cache_dir=None)
  assert set(out["points"].values()) == {"completed"} and len(out["points"]) == 3
  d16 = out["by_d_input"]["16"]
  assert d16["head_dim"] == [2, 8, 16]  # width 16 with 8, 2, 1 heads
  assert all(0 < e < 5 for e in d16["last_point_se"]) and d16["steps"] == [20, 20, 20]
  assert d16["baselines"]["least_squares"] < 1e-6 and 0.5 < d16["baselines"]["zero"] < 1.5
  for f in ("icr_head_dim.png", "icr_head_dim.pdf", "summary.json", "table.md"):
    assert (tmp_path / f).stat().st_size > 0, f
  assert json.loads((tmp_path / "summary.json").read_text())["figure"] == "icr-head-dim"
  assert "| 16 |" in (tmp_path / "table.md").read_text()
  # re-running trains nothing and redraws the same summary
  again = reproduce.reproduce("icr-head-dim", "tiny", str(tmp_path), overrides=TOY,
                              cache_dir=None)
  assert again["by_d_input"] == out["by_d_input"]


@pytest.mark.slow
def test_icr_compute_analysis_on_partial_runs(tmp_path):
  """Analysis of (b) from run directories, one of them interrupted (status running)."""
  runs = tmp_path / "runs"
  for i, (variant, width, status) in enumerate([("mha", 16, "completed"),
                                                ("bilinear_btt", 16, "running")]):
    d = runs / f"p{i}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({
        "attention": {"variant": variant}, "model": {"d_model": width},
        "train": {"batch_size": 64}, "icr": {"d_input": 8}}))
    (d / "result.json").write_text(json.dumps({"status": status,
                                               "compute/paper_macs_per_prompt": 1e6}))
    rows = [{"step": s, "compute/paper_macs": s * 64e6,
             "eval/last_point_se": (1.0 + i * 0.1) / (1 + s / 100)} for s in (100, 200, 300)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = reproduce.reproduce("icr-compute", "tiny", str(tmp_path), analyze_only=True)
  assert out["structured_below_mha_everywhere"] == {"bilinear_btt": False}
  assert "| bilinear_btt | 16 |" in out["table"] and "| 300 |" in out["table"]
  assert (tmp_path / "icr_compute_combined.png").stat().st_size > 0


def test_reproduce_errors(tmp_path, capsys):
  with pytest.raises(ValueError, match="figure='nope' is invalid"):
    reproduce.reproduce("nope", "tiny", str(tmp_path))
  with pytest.raises(ValueError, match="--scale='huge' is invalid"):
    reproduce.reproduce("icr-head-dim", "huge", str(tmp_path))
  with pytest.raises(ValueError, match="--scale='short' is invalid for icr-compute"):
    reproduce.reproduce("icr-compute", "short", str(tmp_path))
  with pytest.raises(SystemExit):
    reproduce.main(["nope"])


@pytest.mark.parametrize("figure,scale", [
    (f, s) for f in ["icr-head-dim", "icr-compute", "lm-scaling"] for s in reproduce.scales_for(f)
    if s not in reproduce.STUDY_SCALES])
def test_every_sweep_point_has_a_valid_attention_spec(figure, scale):
  """Catch invalid points (e.g. MLR ranks that do not sum to the head width) before a sweep."""
  from structattn import sweep
  from structattn.attention import from_config
  file, preset, _ = reproduce.FIGURES[figure]
  config = reproduce.load_preset(file, f"{preset}-{scale}")
  pts = sweep.points(config)
  assert len(pts) >= 3
  for name, c in pts:
    seq = c.model.seq_len if "seq_len" in c.model else 2 * (c.icr.n_points or 2 * c.icr.d_input)
    spec = from_config(c.attention.to_dict(), d_model=c.model.d_model, seq_len=seq)
    assert spec.d_model == c.model.d_model, name


def test_mlr_frontier_lowest_reads_the_claim_per_compute_point():
  cmp = {"at": {"mha": [2.5, 1.8, 1.4], "swa": [2.5, 1.7, 1.45], "mlr": [2.1, 1.75, 1.41]}}
  res = reproduce.mlr_frontier_lowest(cmp)
  assert res["per_point"] == [True, False, False] and res["at_every_point"] is False
  assert res["margin_to_best_rival"][0] == pytest.approx(0.4)
  cmp["at"]["mlr"] = [2.0, 1.6, 1.3]
  assert reproduce.mlr_frontier_lowest(cmp)["at_every_point"] is True
  assert reproduce.mlr_frontier_lowest({"at": {"mha": [1.0]}}) is None
