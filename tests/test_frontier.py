"""The compute-frontier analysis on a synthetic study with known power laws.

Every variant v follows one law in "reference compute" R: L(R) = E + A (R/R0)^-alpha, and logs
compute x = R / K[v], so at compute x it reaches the loss the reference reaches at K[v] x: the
compute multiplier of mlr over a baseline b is K['mlr'] / K[b]. Each width's run follows the law
on its own segment of R and lies above it elsewhere (a larger model is worse early on, a
smaller one saturates), so the lower envelope over widths is the law itself and the run owning
each segment is known. Learning rates away from a variant's best add a fixed penalty.
"""

import json
import math

import numpy as np
import pytest

from structattn import fit, frontier

E, A, ALPHA, R0 = 1.0, 1.0, 0.3, 1e12
K = {"mha": 1.0, "swa": 0.8, "gswa": 1.25, "mlr": 2.0}
WIDTHS = (128, 256, 384, 512, 768)
LRS = (1e-3, 3.16e-3, 1e-2)
BEST_LR = {"mha": 3.16e-3, "swa": 3.16e-3, "gswa": 1e-2, "mlr": 1e-2}
BEST_LR_WIDEST = {"swa": 1e-3}  # swa's best rate moves at the widest width
STEPS, LONG, EVERY, LOG_EVERY = 400, 1000, 50, 10
TOKENS = 32 * 1024
NOISE = 0.002
SEED_OFFSET = {1: 0.01, 2: -0.01}  # seed sd of 0.01 at width 256 (mha, mlr)
SEED_WIDTH = 256


def law(R):
  return E + A * (np.asarray(R, float) / R0) ** -ALPHA


def per_step(w):  # reference MACs per step
  return 72.0 * w * w * TOKENS


def switch(i):  # R where width i hands the frontier to width i + 1
  return math.sqrt(per_step(WIDTHS[i + 1]) * EVERY * per_step(WIDTHS[i]) * STEPS)


def reference_loss(i, R):
  R = np.asarray(R, float)
  pen = np.zeros_like(R)
  if i > 0:
    pen += 0.05 * np.maximum(0.0, np.log(switch(i - 1) / R)) ** 2
  if i < len(WIDTHS) - 1:
    pen += 0.05 * np.maximum(0.0, np.log(R / switch(i))) ** 2
  return law(R) + pen


def best_lr(v, w):
  return BEST_LR_WIDEST.get(v, BEST_LR[v]) if w == WIDTHS[-1] else BEST_LR[v]


def write_run(root, v, w, lr, steps, seed=0, rng=None, flat=False, status="completed"):
  i = WIDTHS.index(w)
  name = f"{v}/w{w}-lr{lr:g}-s{steps}-seed{seed}"
  d = root / name
  d.mkdir(parents=True)
  offset = 0.1 * math.log10(lr / best_lr(v, w)) ** 2 + SEED_OFFSET.get(seed, 0.0)
  rows, last = [], None
  log_steps = sorted({1, *range(LOG_EVERY, steps + 1, LOG_EVERY)})
  if status != "completed":
    log_steps = log_steps[:5]
  for s in log_steps:
    R = per_step(w) * s
    target = float(reference_loss(i, R)) + offset
    train = 4.5 if flat else target + (math.log(96) - target) * math.exp(-s / 8.0)
    row = {"step": s, "tokens": s * TOKENS, "compute/paper_macs": R / K[v],
           "compute/train_flops": 6 * R / K[v], "train/loss": train + rng.normal(0, NOISE)}
    if s % EVERY == 0 or s == steps:
      last = (4.5 if flat else target) + rng.normal(0, NOISE)
      row.update({"eval/loss": last, "eval/loss_sem": 0.003})
    rows.append(row)
  (d / "config.json").write_text(json.dumps(
      {"attention": {"variant": v}, "model": {"d_model": w},
       "train": {"lr": lr, "steps": steps}, "seed": seed}))
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  result = {"status": status, "device": "cpu", "params/non_embedding": 72 * w * w,
            "compute/paper_macs_per_token": 72.0 * w * w / K[v]}
  if status == "completed":
    result.update({"final/eval_loss": last, "final/eval_loss_sem": 0.003})
  (d / "result.json").write_text(json.dumps(result))
  return name


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """The study's stages: grid at the smallest width, the chosen rate at the middle widths, the
  widest with a long run at the chosen rate and short runs at the others, extra seeds; plus a
  run stuck on its plateau and a failed one."""
  root = tmp_path_factory.mktemp("study")
  rng = np.random.default_rng(0)
  names = {}
  for v in K:
    for lr in LRS:
      names[v, WIDTHS[0], lr] = write_run(root, v, WIDTHS[0], lr, STEPS, rng=rng)
    for w in WIDTHS[1:-1]:
      names[v, w, BEST_LR[v]] = write_run(root, v, w, BEST_LR[v], STEPS, rng=rng)
    for lr in LRS:
      steps = LONG if lr == BEST_LR[v] else STEPS
      names[v, WIDTHS[-1], lr] = write_run(root, v, WIDTHS[-1], lr, steps, rng=rng)
  for v in ("mha", "mlr"):
    for s in (1, 2):
      write_run(root, v, SEED_WIDTH, BEST_LR[v], STEPS, seed=s, rng=rng)
  flat = write_run(root, "mha", WIDTHS[0], 3e-2, STEPS, rng=rng, flat=True)
  write_run(root, "mha", WIDTHS[0], 1e-1, STEPS, rng=rng, status="failed: non-finite loss")
  return {"root": root, "names": names, "flat": flat}


@pytest.fixture(scope="module")
def rows(study):
  return frontier.load_rows(study["root"])


@pytest.fixture(scope="module")
def runs(rows):
  return frontier.main_runs(rows)


def true_loss(v, x):
  return law(K[v] * np.asarray(x, float))


def test_main_runs_pick_best_rate_and_longest_run(study, runs):
  assert sorted(runs) == sorted(K)
  names = study["names"]
  for v, cs in runs.items():
    assert [c.row["model.d_model"] for c in cs] == list(WIDTHS)
    for c in cs[:-1]:
      assert c.run == names[v, c.row["model.d_model"], BEST_LR[v]]
    widest = cs[-1]
    assert widest.run == names[v, WIDTHS[-1], best_lr(v, WIDTHS[-1])]
    # the long run at the chosen rate, unless another rate wins at equal tokens (swa)
    assert widest.row["train.steps"] == (STEPS if v in BEST_LR_WIDEST else LONG)
    assert widest.row["frontier/compare_step"] == STEPS


def test_envelope_picks_each_segments_run_and_follows_the_law(runs):
  cs = runs["mha"]
  for i in range(len(WIDTHS)):
    lo = switch(i - 1) if i > 0 else per_step(WIDTHS[0]) * EVERY
    hi = switch(i) if i < len(WIDTHS) - 1 else per_step(WIDTHS[-1]) * LONG
    mid = np.geomspace(lo, hi, 5)[1:-1]
    env = frontier.frontier_curve(cs, mid)
    assert env.run == (cs[i].run,) * 3
    np.testing.assert_allclose(env.y, true_loss("mha", mid), atol=5 * NOISE)
  lo, hi = frontier.coverage(cs)
  out = frontier.frontier_curve(cs, [lo / 2, lo, hi, hi * 2])
  assert np.isnan(out.y[0]) and np.isfinite(out.y[1:]).all()
  assert out.run[0] is None
  # past the last run the frontier holds the least loss reached (it never rises)
  assert out.y[3] == out.y[2] and out.run[3] == out.run[2] == cs[-1].run
  dense = frontier.frontier_curve(cs, np.geomspace(lo, hi, 400)).y
  assert (np.diff(dense) <= 0).all()


def test_frontier_never_rises_where_a_smaller_run_ends():
  # run a ends at 1e3 with loss 1.0; run b starts above it and only falls below at 1e4
  a = fit.Curve("a", np.array([1e1, 1e2, 1e3]), np.array([3.0, 2.0, 1.0]), {})
  b = fit.Curve("b", np.array([1e2, 1e3, 1e4, 1e5]), np.array([4.0, 2.5, 0.9, 0.5]), {})
  at = np.array([5e1, 2e3, 5e3, 2e4])
  env = frontier.frontier_curve([a, b], at)
  assert env.run == ("a", "a", "a", "b")
  np.testing.assert_allclose(env.y[:3], [frontier.interp_log(a, [5e1])[0], 1.0, 1.0])
  assert env.y[3] < 0.9
  # the curves themselves, without the running best, for statistics along one run
  raw = frontier.run_matrix([a, b], at, pareto=False)
  assert np.isnan(raw[0, 1:]).all() and raw[1, 1] > 1.0


def test_shared_points_inside_every_range(runs):
  at = frontier.shared_points(runs, n=8)
  assert at.shape == (8,)
  np.testing.assert_allclose(np.diff(np.log(at)), np.diff(np.log(at))[0])
  for cs in runs.values():
    lo, hi = frontier.coverage(cs)
    assert lo <= at[0] and at[-1] <= hi
  # swa logs the most compute per step; its widest frontier run is a short one
  assert at[-1] == pytest.approx(per_step(WIDTHS[-1]) * STEPS / K["swa"], rel=1e-5)
  assert at[0] == pytest.approx(per_step(WIDTHS[0]) * EVERY / K["swa"], rel=1e-5)


@pytest.fixture(scope="module")
def comparison(rows, runs):
  at = frontier.shared_points(runs, n=8)
  return frontier.compare(runs, at, seeds=frontier.seed_spread(rows), n_boot=200, seed=1)


def test_compare_sign_rival_and_interval(comparison):
  at = comparison["at"]
  assert comparison["best_rival"] == ["gswa"] * len(at)
  true = true_loss("mlr", at) - true_loss("gswa", at)
  diff = comparison["diff"]
  assert (diff < 0).all()
  np.testing.assert_allclose(diff, true, atol=4 * NOISE)
  for p, (lo, hi) in enumerate(comparison["diff_ci"]):
    assert lo <= diff[p] <= hi
    # over runs only: the eval noise of the owning points (a few NOISE) is not in it
    assert lo - 4 * NOISE <= true[p] <= hi + 4 * NOISE
    tlo, thi = comparison["total_ci"][p]
    assert tlo <= true[p] <= thi and tlo <= lo and hi <= thi
  for v in K:
    np.testing.assert_allclose(comparison["loss"][v], true_loss(v, at), atol=5 * NOISE)
  assert set(comparison["rivals"]) == {"mha", "swa", "gswa"}
  assert (np.asarray(comparison["rivals"]["swa"]["diff"]) <
          np.asarray(comparison["rivals"]["gswa"]["diff"])).all()


def test_seed_spread(rows, comparison):
  spread = frontier.seed_spread(rows)
  assert sorted(spread) == ["mha", "mlr"]
  for v in ("mha", "mlr"):
    g, = spread[v]["groups"]
    assert g["seeds"] == [0, 1, 2] and g["width"] == SEED_WIDTH
    assert 0.007 < spread[v]["sd"] < 0.014
    lo, hi = spread[v]["sd_ci"]
    assert spread[v]["df"] == 2 and lo < 0.01 < hi and hi / lo > 5
  sds = comparison["seed_sd"]
  assert not sds["mha"]["pooled"] and sds["swa"]["pooled"] and sds["gswa"]["pooled"]
  pooled = math.sqrt((spread["mha"]["sd"] ** 2 + spread["mlr"]["sd"] ** 2) / 2)
  assert sds["swa"]["sd"] == pytest.approx(pooled)
  se = comparison["rivals"]["mha"]["se_seed"]
  assert se == pytest.approx(math.hypot(sds["mlr"]["sd"], sds["mha"]["sd"]))
  assert comparison["se_seed"][0] == pytest.approx(comparison["rivals"]["gswa"]["se_seed"])


def test_verdict(comparison):
  v = frontier.verdict(comparison)
  # mlr needs 2.5x less compute than swa: below it at most points; a bootstrap
  # replicate without the run that owns a segment falls back to a smaller run's best loss,
  # which can make a point indistinguishable, never above
  assert v["per_rival"]["swa"].count("below") > len(comparison["at"]) // 2
  assert "above" not in v["per_rival"]["swa"]
  assert v["counts"]["mha"]["above"] == 0
  assert f"mlr is below swa at {v['per_rival']['swa'].count('below')}/8" in v["text"]
  # the rule on a hand-made comparison: interval below, straddling, above 0
  hand = {"at": [1.0, 2.0, 3.0], "target": "mlr",
          "rivals": {"mha": {"diff": [-0.1, 0.0, 0.1], "se_seed": 0.01,
                             "diff_ci": [(-0.2, -0.05), (-0.1, 0.1), (0.05, 0.2)]}}}
  assert frontier.verdict(hand)["per_rival"]["mha"] == ["below", "indistinguishable", "above"]
  hand["rivals"]["mha"]["se_seed"] = 0.1  # the seed spread alone makes -0.1 uncertain
  assert frontier.verdict(hand)["per_rival"]["mha"][0] == "indistinguishable"
  assert frontier.verdict(hand, use_seed=False)["per_rival"]["mha"][0] == "below"
  # one run covering the point and no seeds: no uncertainty at all, so no claim
  hand["rivals"]["mha"].update(se_seed=None, diff_ci=[(-0.1, -0.1), (None, None), (0.1, 0.2)])
  v = frontier.verdict(hand)
  assert v["per_rival"]["mha"] == ["indistinguishable", "indistinguishable", "above"]
  assert v["counts"]["mha"]["no_uncertainty"] == 1 and "without any uncertainty" in v["text"]


def test_compute_multiplier_matches_the_shift(runs):
  at = frontier.shared_points(runs, n=8)
  for b in ("mha", "swa", "gswa"):
    m = frontier.compute_multiplier(runs, at, baseline=b, target="mlr", n_boot=100)
    want = K["mlr"] / K[b]
    ext = np.asarray(m["extrapolated"])
    # C' = want * C lies beyond swa's and gswa's measured range at the top points; mha's
    # range ends at want * C of the top point, where eval noise decides
    end = frontier.coverage(runs[b])[1]
    clear = np.abs(np.log(want * at / end)) > 0.02
    np.testing.assert_array_equal(ext[clear], (want * at > end)[clear])
    assert clear[:-1].all() or b != "mha"
    # loss noise NOISE over a slope dL/dlnC of 0.05-0.2: a few per cent in C'
    np.testing.assert_allclose(np.asarray(m["multiplier"])[~ext], want, rtol=0.1)
    np.testing.assert_allclose(np.asarray(m["multiplier"])[ext], want, rtol=0.15)
    for (lo, hi), y in zip(m["ci"], m["multiplier"]):
      assert lo <= y <= hi
  # with mha's widest run cut short (where the frontier still follows the law) the upper
  # points need its power-law fit
  last = runs["mha"][-1]
  keep = last.x <= 2e14
  cut = fit.Curve(last.run, last.x[keep], last.y[keep], last.row)
  short = dict(runs, mha=[*runs["mha"][:-1], cut])
  m = frontier.compute_multiplier(short, at, "mha", "mlr", n_boot=50)
  ext = np.asarray(m["extrapolated"])
  assert ext[-1] and not ext[0]
  # a fit over two decades extrapolated by up to 7x: a loss error of 0.005 is 20% in C'
  np.testing.assert_allclose(np.asarray(m["multiplier"])[ext], 2.0, rtol=0.3)
  assert np.asarray(m["boot_extrapolated"])[-1] > 0.5


def test_fits_recover_alpha(runs):
  fits = frontier.fit_frontiers(runs, n_boot=60)
  x_min = 1e13
  later = frontier.fit_frontiers(runs, n_boot=0, x_min=x_min)
  assert later["mha"].n_points < fits["mha"].n_points
  assert later["mha"].n_points == (frontier.frontier_points(runs["mha"]).x >= x_min).sum()
  for v, f in fits.items():
    assert f.status == "ok", (v, f.message)
    lo, hi = f.alpha_ci
    assert lo <= ALPHA <= hi, (v, f.alpha, f.alpha_ci)
    assert f.alpha == pytest.approx(ALPHA, rel=0.2)


def test_lr_grid_marks_the_best(rows):
  g = frontier.lr_grid(rows)
  cells = {(c["variant"], c["width"]): c for c in g["cells"]}
  for v in K:
    assert cells[v, WIDTHS[0]]["best_lr"] == BEST_LR[v]
    assert cells[v, WIDTHS[-1]]["best_lr"] == best_lr(v, WIDTHS[-1])
    assert cells[v, WIDTHS[-1]]["compare_step"] == STEPS
    assert all(cells[v, WIDTHS[-1]]["exact"].values())
  assert g["transfer"]["mha"]["agree"] is True
  assert g["transfer"]["swa"]["agree"] is False
  assert 3e-2 in cells["mha", WIDTHS[0]]["losses"]  # the extended, stuck run
  table = frontier.lr_grid_table(rows)
  line = next(l for l in table.splitlines() if l.startswith("| mha | 128 |"))
  cols = [c.strip() for c in line.strip("|").split("|")]
  lr_cols = [float(h.strip()[3:]) for h in table.splitlines()[0].strip("|").split("|")[3:]]
  best = cols[3 + lr_cols.index(BEST_LR["mha"])]
  assert best.startswith("**") and sum(c.startswith("**") for c in cols) == 1
  assert "swa: best lr 0.00316 at width 128, 0.001 at width 768: **disagree**" in table
  # the widest mha long run compares at the short runs' last step, not its own end
  long_final = next(r for r in rows if r["run"].startswith("mha/w768-lr0.00316-s1000"))
  assert cells["mha", WIDTHS[-1]]["losses"][BEST_LR["mha"]] > long_final["final/eval_loss"]


def test_plateau_check_flags_a_flat_run(study, rows):
  out = frontier.plateau_check(rows, fraction=0.1)
  by_run = {p["run"]: p for p in out}
  flat = by_run[study["flat"]]
  assert flat["left_plateau"] is False and flat["step_checked"] == 40
  assert sum(not p["left_plateau"] for p in out) == 1
  assert any(p["status"] == "failed" for p in out)
  out = frontier.plateau_check(rows, unigram_entropy=3.0)
  assert out[0]["threshold"] == pytest.approx(2.7)
  assert [p["run"] for p in out if not p["left_plateau"]] == [study["flat"]]
  assert frontier.unigram_entropy("abab") == pytest.approx(math.log(2))
  assert frontier.unigram_entropy({"a": 1, "b": 1, "c": 2}) == pytest.approx(
      -(0.5 * math.log(0.25) + 0.5 * math.log(0.5)))


def test_corpus_unigram_entropy(tmp_path):
  import lzma
  (tmp_path / "a.txt").write_text("aab")
  with lzma.open(tmp_path / "b.txt.xz", "wt") as f:
    f.write("bc")
  want = frontier.unigram_entropy("aabbc")
  assert frontier.corpus_unigram_entropy(tmp_path) == pytest.approx(want)
  assert frontier.corpus_unigram_entropy([tmp_path / "b.txt.xz"]) == pytest.approx(math.log(2))


def test_analyze_writes_figures_and_json(study, tmp_path):
  out = frontier.analyze(study["root"], tmp_path / "out", n_boot=40, seed=0, n_points=6,
                         fit_boot=20)
  json.dumps(out, allow_nan=False)
  assert len(out["at"]) == 6
  assert list(out["multipliers"]) == ["mha", "swa", "gswa"]
  for name in frontier.FIGURES:
    for ext in ("png", "pdf"):
      p = tmp_path / "out" / f"{name}.{ext}"
      assert p.exists() and p.stat().st_size > 1000
  for section in ("shared compute points", "Verdict", "compute multiplier", "Power-law fits",
                  "Learning-rate grid", "Seed spread", "Plateau check"):
    assert section in out["report"]
  saved = json.loads((tmp_path / "out" / "frontier_analysis.json").read_text())
  assert saved["verdict"] == out["verdict"]
  assert (tmp_path / "out" / "frontier_analysis.md").read_text() == out["report"]


# ------------------------------------------------------------------------------ figures

def _drawn(fig):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  FigureCanvasAgg(fig).draw()
  return fig.canvas.get_renderer()


def _legends_clear_of_axes(fig):
  """Every legend (of an axes or the figure) lies outside every visible axes, so it covers no
  data."""
  r = _drawn(fig)
  legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
  assert legends
  for leg in legends:
    lb = leg.get_window_extent(r)
    for ax in fig.axes:
      if ax.get_visible():
        ab = ax.get_window_extent(r)
        assert lb.x0 >= ab.x1 or lb.x1 <= ab.x0 or lb.y0 >= ab.y1 or lb.y1 <= ab.y0, \
            (lb, ab)


def _data_y(ax):
  return np.concatenate([np.asarray(l.get_ydata(), float) for l in ax.lines
                         if l.get_gid() != "clipped" and len(l.get_ydata()) > 2])


def test_loss_by_width_figure_fits_each_panel(runs):
  fig = frontier.plot_loss_by_width(runs)
  axes = [ax for ax in fig.axes if ax.get_visible()]
  assert len(axes) == len(WIDTHS)
  for ax in axes:
    y = np.concatenate([np.asarray(l.get_ydata(), float) for l in ax.lines])
    lo, hi = ax.get_ylim()
    assert lo <= y.min() and y.max() <= hi
    assert hi - lo <= 1.1 * (y.max() - y.min())
  labels = [t.get_text() for t in fig.legends[0].get_texts()]
  assert labels == [f"{v} (lr {BEST_LR[v]:.3g}; {BEST_LR_WIDEST[v]:.3g} at width {WIDTHS[-1]})"
                    if v in BEST_LR_WIDEST else f"{v} (lr {BEST_LR[v]:.3g})" for v in K]
  _legends_clear_of_axes(fig)


def test_frontiers_figure_fits_the_frontiers_and_shows_the_bands(runs, comparison):
  bands = frontier.frontier_bands(runs, None, n_boot=50, seed=0)
  fig = frontier.plot_frontiers(bands, comparison["at"], comparison)
  (ax,) = fig.axes
  y = np.concatenate([b["y"] for b in bands.values()])
  y = y[np.isfinite(y)]
  lo, hi = ax.get_ylim()
  assert lo <= y.min() and y.max() <= hi
  assert hi - lo <= (1 + 2 * 0.25) * 1.1 * (y.max() - y.min())
  # one visible band per variant, wide somewhere (the resampling drops runs)
  fills = [c for c in ax.collections if len(c.get_paths())]
  assert len(fills) == len(bands)
  assert all(0 < c.get_alpha() < 1 for c in fills)
  assert any(np.nanmax(b["hi"] - b["lo"]) > 0.01 for b in bands.values())
  _legends_clear_of_axes(fig)


def _comparison(diff, ci, se=math.nan):
  at = np.geomspace(1e13, 1e14, len(diff))
  return {"at": at, "target": "mlr", "variants": ["mha", "mlr"],
          "rivals": {"mha": {"diff": np.asarray(diff, float), "diff_ci": ci, "se_seed": se}}}


def test_difference_figure_cuts_a_wide_interval_at_the_edge():
  """One interval 20x wider than the differences' spread: the axis fits the differences and
  0 (widened by at most half their span), the cut bar ends in triangles at both edges."""
  diff = [0.10, -0.05, 0.02]
  ci = [(0.06, 0.14), (-2.0, 1.5), (-0.01, 0.05)]
  fig = frontier.plot_difference(_comparison(diff, ci))
  (ax,) = fig.axes
  lo, hi = ax.get_ylim()
  span = max(diff) - min(diff)
  assert lo <= min(diff) and max(diff) <= hi and lo < 0 < hi
  assert hi - lo <= (1 + 2 * 0.5) * 1.1 * span
  tips = [l for l in ax.lines if l.get_gid() == "clipped"]
  assert sorted(l.get_marker() for l in tips) == ["^", "v"]
  assert {float(l.get_ydata()[0]) for l in tips} == {lo, hi}
  (bars,) = ax.containers
  assert bars.has_yerr and len(bars.lines[2][0].get_segments()) == 3
  assert "triangles" in ax.get_title()
  _legends_clear_of_axes(fig)
  # narrow intervals: nothing cut, the intervals inside the range
  ci = [(0.08, 0.12), (-0.07, -0.03), (0.0, 0.04)]
  fig = frontier.plot_difference(_comparison(diff, ci, se=0.01))
  (ax,) = fig.axes
  lo, hi = ax.get_ylim()
  assert lo <= -0.07 and 0.12 <= hi
  assert not [l for l in ax.lines if l.get_gid() == "clipped"]
  assert len([c for c in ax.collections if len(c.get_paths())]) >= 1  # the seed band


def test_multiplier_figure_fits_the_estimates():
  at = np.geomspace(1e13, 1e14, 3)
  m = {"mha": {"baseline": "mha", "target": "mlr", "at": at, "multiplier": [1.2, 0.8, 1.5],
               "ci": [(1.0, 1.4), (0.01, 50.0), (1.2, 1.9)], "extrapolated": [False, False, True]}}
  fig = frontier.plot_multiplier(m)
  (ax,) = fig.axes
  lo, hi = ax.get_ylim()
  assert lo <= 0.8 and 1.9 <= hi
  assert hi / lo <= 1.001 * (1.5 * 3) / (0.8 / 3) * 1.15 ** 2  # cut at 3x, not 0.01-50
  tips = [l for l in ax.lines if l.get_gid() == "clipped"]
  assert sorted(l.get_marker() for l in tips) == ["^", "v"]
  assert len(ax.containers) == 1 and ax.containers[0].has_yerr
  assert "mlr's loss" in ax.get_legend().get_title().get_text()
  _legends_clear_of_axes(fig)


def test_pairs_use_the_range_each_pair_covers(rows, runs):
  # drop gswa's widest run: the all-variant range stops lower, the mlr-mha pair does not
  cut = dict(runs, gswa=runs["gswa"][:-1])
  pairs = frontier.compare_pairs(cut, seeds=frontier.seed_spread(rows), n_points=6, n_boot=100)
  assert sorted(pairs) == ["gswa", "mha", "swa"]
  top_all = frontier.shared_points(cut, n=6)[-1]
  assert pairs["mha"]["compare"]["at"][-1] > 2 * top_all
  assert pairs["gswa"]["compare"]["at"][-1] == pytest.approx(top_all, rel=1e-5)
  mha = pairs["mha"]["compare"]
  np.testing.assert_allclose(mha["rivals"]["mha"]["diff"],
                             true_loss("mlr", mha["at"]) - true_loss("mha", mha["at"]),
                             atol=5 * NOISE)
  assert "above" not in pairs["mha"]["verdict"]["per_rival"]["mha"]
