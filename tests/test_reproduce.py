"""structattn-reproduce: sweep + analysis + figures end to end at a toy size."""

import json
import math

import numpy as np
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


BASE = {"zero": 0.98, "averaging": 0.58, "ridge": 2.1e-4, "least_squares": 1.3e-14}


def _head_dim_axes(fig):
  return [ax for ax in fig.axes if ax.get_visible()]


def test_icr_head_dim_figure_fits_the_points_and_marks_the_baselines():
  """Points near 0.4-0.8: the log axis spans them (not 1e-14 to 1), zero and averaging lie
  near enough to be drawn as lines, ridge and least squares are labelled at the bottom edge,
  r = d_input is a dashed vertical line and each point has its s.e.m. as error bar."""
  pts = {16: [(4, 0.755, 0.05, 3, 3000), (16, 0.433, 0.03, 3, 3000), (32, 0.409, 0.026, 3, 3000)],
         32: [(4, 0.819, 0.03, 3, 5000), (16, 0.127, 0.01, 3, 8000), (32, 0.105, 0.01, 3, 7000)]}
  fig = reproduce.plot_icr_head_dim(pts, {16: BASE, 32: BASE})
  axes = _head_dim_axes(fig)
  assert len(axes) == 2
  for ax, d in zip(axes, (16, 32)):
    e = np.array([p[1] for p in pts[d]])
    s = np.array([p[2] for p in pts[d]])
    lo, hi = ax.get_ylim()
    assert ax.get_yscale() == "log"
    assert lo <= (e - s).min() and (e + s).max() <= hi
    # not wider than the points' range widened to the nearby zero line (a factor 2 at most)
    # and padded
    assert hi / lo <= 2.5 * (e + s).max() / (e - s).min()
    assert lo > 1e-3  # least squares (1e-14) and ridge (2e-4) do not set the range
    flat = {round(float(l.get_ydata()[0]), 6) for l in ax.lines
            if len(set(np.asarray(l.get_ydata(), float))) == 1 and len(l.get_ydata()) == 2}
    texts = [t.get_text() for t in ax.texts]
    for name, v in (("zero", 0.98), ("averaging", 0.58)):  # within a factor 2: drawn
      assert lo <= v <= hi and round(v, 6) in flat and f"{name} {v:.2g}" in texts
    for name, v in (("ridge", 2.1e-4), ("least squares", 1.3e-14)):
      assert f"\u2193 {name} {v:.2g}" in texts
    # r = d_input: a dashed vertical line at x = d, labelled
    vline = [l for l in ax.lines if l.get_gid() == "r=d_input"]
    assert len(vline) == 1 and list(vline[0].get_xdata()) == [d, d]
    assert vline[0].get_linestyle() == "--"
    assert "r = d_input" in texts
    # error bars: one container, bar lengths 2 * s.e.m.
    (bars,) = ax.containers
    assert bars.has_yerr
    segs = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([sg[1][1] - sg[0][1] for sg in segs], 2 * s, rtol=1e-9)
    assert ax.get_legend() is None  # baselines are labelled in the margin, not in a legend
  assert "3 seeds" in fig.get_suptitle()


def test_icr_head_dim_figure_far_baselines_become_edge_arrows():
  """Points at 0.04-0.15: zero and averaging (4-20x above) are arrows at the top edge."""
  pts = {16: [(4, 0.143, 0.01, 1, 8000), (16, 0.0455, 0.004, 1, 8000),
              (128, 0.0903, 0.006, 1, 8000)]}
  fig = reproduce.plot_icr_head_dim(pts, {16: BASE})
  (ax,) = _head_dim_axes(fig)
  lo, hi = ax.get_ylim()
  assert lo <= 0.0415 and 0.153 <= hi and hi / lo <= 1.3 * 0.153 / 0.0415
  texts = [t.get_text() for t in ax.texts]
  assert "\u2191 zero 0.98" in texts and "\u2191 averaging 0.58" in texts
  tops = {t.get_text(): t.get_position()[1] for t in ax.texts if "\u2191" in t.get_text()}
  assert tops["\u2191 zero 0.98"] > tops["\u2191 averaging 0.58"] > 0.5  # in value order
  assert not [l for l in ax.lines if l.get_gid() is None and len(l.get_ydata()) == 2
              and l.get_ydata()[0] > hi]
  assert "held-out prompts" in fig.get_suptitle()


def _icr_run(root, name, d, heads, seed, se, sem, step=300, width=32):
  run = root / name
  run.mkdir(parents=True)
  (run / "config.json").write_text(json.dumps({
      "icr": {"d_input": d}, "model": {"d_model": width}, "attention": {"num_heads": heads},
      "seed": seed, "train": {"batch_size": 64}}))
  (run / "result.json").write_text(json.dumps(
      {"status": "completed", **{f"baseline/{k}/last_point_se": v for k, v in BASE.items()}}))
  rows = [{"step": step // 2, "eval/last_point_se": 1.0, "eval/last_point_se_sem": 0.1},
          {"step": step, "eval/last_point_se": se, "eval/last_point_se_sem": sem}]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_icr_head_dim_analysis_averages_seeds(tmp_path):
  """Three seeds per head dim: the point is their mean, the error bar their s.e.m. (std
  ddof=1 / sqrt(3)), not one run's eval s.e.m.; a head dim with one seed keeps its eval s.e.m."""
  runs = tmp_path / "runs"
  vals = {8: [0.7, 0.8, 0.75], 2: [0.40, 0.46, 0.43]}  # heads -> per-seed error
  for heads, es in vals.items():
    for seed, e in enumerate(es):
      _icr_run(runs, f"h{heads}-s{seed}", 16, heads, seed, e, 0.001, step=300 - 10 * seed)
  _icr_run(runs, "h1-s0", 16, 1, 0, 0.41, 0.02)
  out = reproduce.reproduce("icr-head-dim", "tiny", str(tmp_path), analyze_only=True)
  d16 = out["by_d_input"]["16"]
  assert d16["head_dim"] == [4, 16, 32] and d16["seeds"] == [3, 3, 1]
  np.testing.assert_allclose(d16["last_point_se"], [0.75, 0.43, 0.41])
  want = [np.std(vals[8], ddof=1) / math.sqrt(3), np.std(vals[2], ddof=1) / math.sqrt(3), 0.02]
  np.testing.assert_allclose(d16["last_point_se_sem"], want, rtol=1e-9)
  assert d16["steps"] == [280, 280, 300] and d16["finding_holds"] is True
  assert "3 seeds" in out["table"] and (tmp_path / "icr_head_dim.png").stat().st_size > 0


def test_icr_head_dim_analysis_without_runs_says_so(tmp_path):
  (tmp_path / "runs").mkdir()
  with pytest.raises(ValueError, match="no evaluated runs"):
    reproduce.reproduce("icr-head-dim", "tiny", str(tmp_path), analyze_only=True)
