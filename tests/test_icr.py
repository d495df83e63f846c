"""In-context regression: sampler, curriculum, eval set, baselines, model (CPU, fast)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from structattn.icr import baselines, task
from structattn.icr.model import ICRModel, icr_loss, loss_fn, predict
from structattn.train import train_step


def icr_train_step(params, opt_state, batch, *, graphdef, rest, tx):
  """One optimiser step of the shared `train_step` with the ICR loss."""
  return train_step(params, opt_state, batch, graphdef=graphdef, rest=rest, tx=tx,
                    loss=loss_fn)


def test_sampler_statistics_and_padding():
  b = task.sample_batch(0, 3, 2048, 16, d_max=12, d_active=5)
  x, y, w = (np.asarray(b[k]) for k in ("x_BNI", "y_BN", "w_BI"))
  assert x.shape == (2048, 16, 12) and y.shape == (2048, 16) and w.shape == (2048, 12)
  assert abs(np.mean(y ** 2) - 1.0) < 0.1
  assert np.all(x[..., 5:] == 0) and np.all(w[:, 5:] == 0)
  assert abs(np.mean(x[..., :5] ** 2) * 5 - 1.0) < 0.05
  np.testing.assert_allclose(y, np.einsum("bnd,bd->bn", x, w), rtol=1e-5, atol=1e-5)
  assert y.dtype == np.float32


def test_sampler_determinism_and_noise():
  a = task.sample_batch(7, 10, 8, 6, 4, 4)
  b = task.sample_batch(7, 10, 8, 6, 4, 4)
  c = task.sample_batch(7, 11, 8, 6, 4, 4)
  d = task.sample_batch(8, 10, 8, 6, 4, 4)
  np.testing.assert_array_equal(a["x_BNI"], b["x_BNI"])
  np.testing.assert_array_equal(a["y_BN"], b["y_BN"])
  assert not np.allclose(a["x_BNI"], c["x_BNI"]) and not np.allclose(a["w_BI"], d["w_BI"])
  n = task.sample_batch(7, 10, 8, 6, 4, 4, noise_std=0.5)
  resid = np.asarray(n["y_BN"]) - np.einsum("bnd,bd->bn", n["x_BNI"], n["w_BI"])
  assert 0.2 < np.std(resid) < 0.8


def test_sampler_jits_with_traced_step_and_d():
  f = jax.jit(functools.partial(task.sample_batch, 0, batch=4, n_points=6, d_max=8))
  np.testing.assert_allclose(f(5, d_active=3)["y_BN"],
                             task.sample_batch(0, 5, 4, 6, 8, 3)["y_BN"], rtol=1e-6)


def test_pool_mode_repeats_prompts():
  ws = np.concatenate([np.asarray(task.sample_batch(1, s, 16, 4, 4, 4, pool_size=3)["w_BI"])
                       for s in range(5)])
  assert len(np.unique(ws.round(6), axis=0)) == 3
  a = task.sample_batch(1, 0, 16, 4, 4, 4, pool_size=3)
  x, w = np.asarray(a["x_BNI"]), np.asarray(a["w_BI"])
  for i in range(16):  # same w => the same whole prompt
    j = np.flatnonzero(np.all(w == w[i], axis=1))
    np.testing.assert_array_equal(x[j], np.broadcast_to(x[i], x[j].shape))


def test_curriculum_schedule():
  total = 500_000
  steps = list(range(0, total, 500))
  sched = [task.curriculum(s, total, d_start=4, d_end=64) for s in steps]
  assert sched[0] == (4, 8)
  assert all(isinstance(v, int) for pair in sched for v in pair)
  ds, ns = zip(*sched)
  assert all(a <= b for a, b in zip(ds, ds[1:])) and all(a <= b for a, b in zip(ns, ns[1:]))
  assert task.curriculum(int(0.06 * total), total, d_end=64) == (64, 128)
  assert task.curriculum(1999, total, d_end=64) == (4, 8)  # raised every 2000 steps
  assert task.curriculum(2000, total, d_end=64)[0] > 4
  # short runs shrink the interval; the end is still reached by 6% of the steps
  assert task.curriculum(60, 1000, d_end=20) == (20, 40)
  assert task.curriculum(0, 1000, d_end=20) == (4, 8)
  assert task.curriculum(10, 10, d_end=4, n_end=8) == (4, 8)


def test_eval_set_is_held_out_and_fixed():
  e1, e2 = task.eval_set(0, 32, 8, 4), task.eval_set(0, 32, 8, 4)
  np.testing.assert_array_equal(e1["x_BNI"], e2["x_BNI"])
  for step in range(3):
    tr = task.sample_batch(0, step, 32, 8, 4, 4)
    assert not np.allclose(tr["w_BI"], e1["w_BI"])
  assert task.eval_set(0, 4, 8, 4, d_max=10)["x_BNI"].shape == (4, 8, 10)


def test_interleave():
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
  y = -jnp.arange(6, dtype=jnp.float32).reshape(2, 3) - 1
  t = np.asarray(task.interleave(x, y))
  assert t.shape == (2, 6, 4)
  np.testing.assert_array_equal(t[:, 0::2], x)
  np.testing.assert_array_equal(t[:, 1::2, 0], y)
  assert np.all(t[:, 1::2, 1:] == 0)


@pytest.fixture(scope="module")
def prompts():
  b = task.eval_set(3, 256, 48, 4, d_max=6)
  return np.asarray(b["x_BNI"]), np.asarray(b["y_BN"])


def test_baselines(prompts):
  x, y = prompts
  err = {name: baselines.squared_errors(fn(x, y), y) for name, fn in [
      ("ls", baselines.least_squares), ("ridge", functools.partial(baselines.ridge, lam=1e-8)),
      ("knn", baselines.knn), ("avg", baselines.averaging), ("zero", baselines.zero)]}
  assert all(e.shape == (48,) for e in err.values())
  assert err["ls"][-10:].max() < 1e-6  # N >= d, noiseless: exact
  assert err["ls"][2] > 0.1  # under-determined early
  assert abs(err["zero"][-1] - 1.0) < 0.2
  np.testing.assert_allclose(err["ridge"], err["ls"], atol=1e-4)
  for name in ("knn", "avg"):
    assert err["ls"][-1] < err[name][-1] < err["zero"][-1], name
  assert np.all(baselines.knn(x, y)[:, 0] == 0)


def test_baselines_small_cases():
  x = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.9, 0.1]]])
  y = np.array([[2.0, 3.0, 5.0, 2.1]])
  np.testing.assert_allclose(baselines.least_squares(x, y)[0, 2:], [5.0, 2.1])
  np.testing.assert_allclose(baselines.least_squares(x, y)[0, 1], 0.0)  # min norm: w = (2, 0)
  np.testing.assert_allclose(baselines.knn(x, y, k=1)[0], [0.0, 2.0, 2.0, 2.0])
  np.testing.assert_allclose(baselines.knn(x, y, k=3)[0, 3], (2 + 3 + 5) / 3)
  np.testing.assert_allclose(baselines.averaging(x, y, d=1)[0, 2], (2 + 3) / 2)


def _tiny_model(seed=0, variant="mha"):
  return ICRModel(d_max=4, n_max=8, d_model=32, num_layers=2,
                  attention={"variant": variant, "num_heads": 4}, rngs=nnx.Rngs(seed))


def test_model_shape_and_causality():
  model = _tiny_model()
  # give the zero-init read-out and output projections weights so the check is not vacuous
  leaves = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), 100))
  nnx.update(model, jax.tree.map(lambda p: p + 0.3 * jax.random.normal(next(keys), p.shape,
                                                                       p.dtype), leaves))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  fwd = jax.jit(lambda x, y: predict(params, {"x_BNI": x, "y_BN": y}, graphdef=graphdef,
                                     rest=rest))
  b = task.sample_batch(0, 0, 3, 8, 4, 4)
  x, y = b["x_BNI"], b["y_BN"]
  pred = np.asarray(fwd(x, y))
  assert pred.shape == (3, 8) and pred.dtype == np.float32
  for i in (0, 3, 7):
    pred2 = np.asarray(fwd(x, y.at[:, i:].add(5.0)))
    np.testing.assert_allclose(pred2[:, :i + 1], pred[:, :i + 1], atol=1e-5)  # incl. pred_i
    if i < 7:
      assert not np.allclose(pred2[:, i + 1:], pred[:, i + 1:])
  assert model(x[:, :5], y[:, :5]).shape == (3, 5)  # shorter prompts (curriculum)
  assert float(icr_loss(jnp.zeros((3, 8)), y)) == pytest.approx(float(np.mean(np.square(y))))


@pytest.mark.slow
def test_tiny_model_beats_zero_predictor():
  model = _tiny_model()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  train_step = functools.partial(icr_train_step, graphdef=graphdef, rest=rest, tx=tx)

  @jax.jit
  def step(params, opt_state, s):
    return train_step(params, opt_state, task.sample_batch(0, s, 256, 8, 4, 4))

  for s in range(200):
    params, opt_state, metrics = step(params, opt_state, s)
  assert np.isfinite(float(metrics["train/loss"]))
  ev = task.eval_set(123, 512, 8, 4)
  pred = predict(params, ev, graphdef=graphdef, rest=rest)
  err = baselines.squared_errors(pred, ev["y_BN"])
  zero = baselines.squared_errors(baselines.zero(ev["x_BNI"], ev["y_BN"]), ev["y_BN"])
  assert err.mean() < 0.85 * zero.mean()  # ~0.72 vs ~0.97 here
  assert err[-1] < 0.85 * zero[-1]
