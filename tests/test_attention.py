"""Every scoring function against the independent float64 reference; gradients; causality."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.linalg import block_diag

from structattn.attention import Attention, core, from_config, pattern_of
from tests import reference
from tests.attention_cases import (  # noqa: F401  (shared with the decode and sample tests)
    D, PATTERNS, T, VARIANTS, make, randomise, run, x_of)
from tests.attention_cases import random_qkv as _random_qkv


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_layer_matches_float64_reference(name, causal):
  m = make(VARIANTS[name], causal=causal)
  x = x_of(2, T, D)
  want = reference.attention_layer(m, np.asarray(x))
  for impl in ("xla", "reference", "auto"):
    got = run(m, x, impl)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9, err_msg=f"{name} impl={impl}")
  assert np.abs(want).max() > 1e-3  # the check is not vacuous


@pytest.mark.parametrize("seed", range(4))
def test_random_shapes_mlr_and_window(seed):
  rng = np.random.default_rng(seed)
  h = int(rng.integers(1, 4))
  levels = int(rng.integers(1, 5))
  ranks = tuple(int(r) for r in rng.integers(1, 5, size=levels))
  t = 2 ** (levels - 1) * int(rng.integers(2, 6)) * 2
  d = 8 * int(rng.integers(1, 3))
  for cfg in (dict(variant="mlr", num_heads=h, d_head=sum(ranks), mlr_ranks=ranks,
                   mlr_divide=["none", "block", "levels"][seed % 3]),
              dict(variant="swa", num_heads=h, window=int(rng.integers(1, t)), d_head=4),
              dict(variant="gswa", num_heads=h, window=int(rng.integers(1, t)), gswa_split=(2, 3),
                   d_head=5, gswa_combine=["sum", "renorm"][seed % 2])):
    causal = bool(seed % 2 == 0)
    m = make(cfg, d_model=d, seq_len=t, causal=causal, seed=seed)
    x = x_of(1 + seed % 2, t, d, seed)
    np.testing.assert_allclose(run(m, x, "xla"),
                               reference.attention_layer(m, np.asarray(x)), rtol=1e-9, atol=1e-9,
                               err_msg=str(cfg))


CHUNK_CASES = [(n, t) for n in sorted(PATTERNS) for t in
               ([1] if "window" in PATTERNS[n].seqs else [1, 16, 64])]


@pytest.mark.parametrize("name,min_tile", CHUNK_CASES)
def test_chunked_fast_paths_values_and_gradients(name, min_tile):
  """Small chunks exercise the rematerialised query-chunk loop; min_tile moves the split
  between sibling pieces and multi-level diagonal tiles; grads match the oracle."""
  pat = PATTERNS[name]
  q, k, v = _random_qkv(2, 64, 2, sum(pat.widths), 5)
  if "window" in pat.seqs:
    fast = lambda q, k, v: core.windowed_attention(q, k, v, pat, chunk=8)
  else:
    fast = lambda q, k, v: core.blocked_attention(q, k, v, pat, chunk=8, min_tile=min_tile)
  ref = lambda q, k, v: core.reference_attention(q, k, v, pat)
  np.testing.assert_allclose(jax.jit(fast)(q, k, v), jax.jit(ref)(q, k, v), rtol=1e-10, atol=1e-10)
  w = jax.random.normal(jax.random.key(9), v.shape, jnp.float64)
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * w))
  g_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_fast, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)
    assert np.abs(b).max() > 1e-6


def _largest_intermediate(fn, *args) -> int:
  """Element count of the largest value any equation produces, sub-jaxprs included."""
  def walk(jaxpr):
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)  # ClosedJaxpr -> Jaxpr
    best = 0
    for e in jaxpr.eqns:
      best = max([best] + [int(np.prod(v.aval.shape)) for v in e.outvars])
      for p in e.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else (p,)):
          if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
            best = max(best, walk(sub))
    return best
  return walk(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window,chunk", [(16, 512), (40, 16), (200, 16)])
def test_band_scores_at_most_the_keys_that_exist(window, chunk, causal):
  """A window as wide as a key chunk or wider (forecasting: 64 patches, window 16) scores
  each query chunk against the real keys only, never a padded span of several chunks: the
  largest intermediate is at most the dense B*H*T*T scores; values match the oracle."""
  pat = core.Pattern(("window",), (window,), (6,), causal=causal)
  q, k, v = _random_qkv(2, 64, 2, 6, 5)
  fast = lambda q, k, v: core.windowed_attention(q, k, v, pat, chunk=chunk)
  np.testing.assert_allclose(jax.jit(fast)(q, k, v), core.reference_attention(q, k, v, pat),
                             rtol=1e-10, atol=1e-10)
  if window < 63:
    assert _largest_intermediate(fast, q, k, v) <= 2 * 2 * 64 * 64


@pytest.mark.parametrize("name", ["mha", "mlr_block_divide", "gswa_renorm", "bilinear_btt",
                                  "bilinear_mlr", "mlbtc", "swa"])
def test_layer_gradients_match_reference_path(name):
  m = make(VARIANTS[name])
  x = x_of(2, T, D)
  graph, params, rest = nnx.split(m, nnx.Param, ...)

  def loss(params, x, impl):
    mod = nnx.merge(graph, params, rest)
    return jnp.sum(jnp.sin(mod(x, impl=impl)))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
  g_fast = grad(params, x, "xla")
  g_ref = grad(params, x, "reference")
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9)


def test_mlr_padding_for_lengths_not_divisible_by_blocks():
  """Causal MLR at a length that is not a multiple of its blocks (e.g. sampling)."""
  pat = core.Pattern(("global", "block", "block"), (0, 8, 4), (2, 2, 2))
  q, k, v = _random_qkv(1, 21, 2, 6, 3)
  np.testing.assert_allclose(jax.jit(lambda *a: core.blocked_attention(*a, pat))(q, k, v),
                             core.reference_attention(q, k, v, pat), rtol=1e-10, atol=1e-10)
  with pytest.raises(ValueError, match="divisible"):
    core.blocked_attention(q, k, v, core.Pattern(("global", "block"), (0, 8), (3, 3), causal=False))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causality(name):
  """Outputs at positions <= i do not change when inputs after i change."""
  m = make(VARIANTS[name])
  x = x_of(1, T, D)
  cut = 13
  x2 = x.at[:, cut + 1:].set(jax.random.normal(jax.random.key(7), (1, T - cut - 1, D)))
  for impl in ("xla", "reference"):
    y1, y2 = run(m, x, impl), run(m, x2, impl)
    np.testing.assert_allclose(y1[:, :cut + 1], y2[:, :cut + 1], rtol=0, atol=1e-12)
    assert np.abs(y1[:, cut + 1:] - y2[:, cut + 1:]).max() > 1e-6  # the future did change


def test_noncausal_sees_the_future():
  m = make(VARIANTS["mlr"], causal=False)
  x = x_of(1, T, D)
  y1 = run(m, x)
  y2 = run(m, x.at[:, -1].add(1.0))
  assert np.abs(y1[:, 0] - y2[:, 0]).max() > 1e-6


def test_one_level_mlr_equals_mha_with_matching_scale():
  for scale in ("standard", "inverse", "mup"):
    mlr = make(dict(variant="mlr", num_heads=2, mlr_ranks=(8,), scale=scale))
    mha = make(dict(variant="mha", num_heads=2, scale=scale))
    nnx.update(mha, _copy_params(mlr, mha))
    x = x_of(2, T, D)
    np.testing.assert_allclose(run(mlr, x), run(mha, x), rtol=1e-12, atol=1e-12)


def _copy_params(src, dst):
  s = nnx.state(src, nnx.Param)
  d = nnx.state(dst, nnx.Param)
  assert jax.tree.structure(s) == jax.tree.structure(d)
  return s


def test_bilinear_btt_is_a_full_rank_bilinear_form():
  cfg = dict(variant="bilinear_btt", num_heads=2, qk_norm=False, scale="inverse")
  m = make(cfg, d_model=16)
  mats = np.asarray(m.features[0].btt.dense_matrix())  # (H, D, D): k_h = x M_h
  assert mats.shape == (2, 16, 16)
  for h in range(2):
    assert np.linalg.matrix_rank(mats[h]) == 16
  x = x_of(1, T, 16)
  q, k, _ = m.qkv(x)
  s = np.einsum("bihd,bjhd->bhij", np.asarray(q), np.asarray(k))
  xn = np.asarray(x)[0]
  for h in range(2):
    np.testing.assert_allclose(s[0, h], xn @ mats[h].T @ xn.T / 16, rtol=1e-10, atol=1e-10)
  # and the BTT cores reproduce the explicit independent construction
  btt = m.features[0].btt
  w1, w2 = (np.asarray(c) for c in btt.cores())
  np.testing.assert_allclose(reference.btt_matrices(w1, w2, 2, 1, btt.factors), mats, atol=1e-12)


def test_bilinear_mlr_is_a_sum_of_block_diagonals():
  cfg = dict(variant="bilinear_mlr", num_heads=2, bmlr_ranks=(2, 1, 3), qk_norm=False,
             scale="inverse")
  m = make(cfg, d_model=16)
  x = x_of(1, T, 16)
  q, k, _ = m.qkv(x)
  s = np.einsum("bihd,bjhd->bhij", np.asarray(q), np.asarray(k))
  xn = np.asarray(x)[0]
  for h in range(2):
    bil = np.zeros((16, 16))
    for l, (feat, lv) in enumerate(zip(m.features, m.spec.levels)):
      p, r = lv.blocks, lv.rank
      wq = np.asarray(feat.wq.kernel[...])
      wk = np.asarray(feat.wk.kernel[...])
      if wq.ndim == 2:
        wq, wk = wq[None], wk[None]
      blocks = [wq[g].reshape(-1, 2, r)[:, h] @ wk[g].reshape(-1, 2, r)[:, h].T for g in range(p)]
      bil += block_diag(*blocks) / (r * p)
    np.testing.assert_allclose(s[0, h], xn @ bil @ xn.T, rtol=1e-10, atol=1e-10)
    # rank: up to sum_l r_l p_l = 2 + 2 + 12 = 16 (vs r for one low-rank head)
    assert np.linalg.matrix_rank(bil) == 16


def test_custom_feature_structure_plugs_in():
  from structattn.attention import register_feature

  @register_feature("diag_test")
  class Diagonal(nnx.Module):
    """q = x * a, k = x: a diagonal bilinear matrix per head."""

    def __init__(self, level, d_model, num_heads, *, rngs, dtype=jnp.float32):
      self.h = num_heads
      self.a = nnx.Param(jax.random.normal(rngs.params(), (num_heads, d_model)))

    def __call__(self, x):
      q = x[..., None, :] * self.a[...]
      k = jnp.broadcast_to(x[..., None, :], q.shape)
      return q, k

    @classmethod
    def width(cls, level, d_model):
      return d_model

    @classmethod
    def num_params(cls, level, d_model, num_heads):
      return d_model * num_heads

  spec = from_config(dict(variant="mlbtc", num_heads=2, qk_norm=False, scale="inverse",
                          levels=[dict(kind="diag_test")]), d_model=8, seq_len=16)
  m = Attention(spec, rngs=nnx.Rngs(0), dtype=jnp.float64, zero_init_out=False)
  x = x_of(1, 16, 8)
  q, k, _ = m.qkv(x)
  a = np.asarray(m.features[0].a[...])
  s = np.einsum("bihd,bjhd->bhij", np.asarray(q), np.asarray(k))
  xn = np.asarray(x)[0]
  np.testing.assert_allclose(s[0, 1], xn @ np.diag(a[1]) @ xn.T / 8, rtol=1e-10)
  from structattn import flops
  assert flops.attention_params(spec)["qk"] == 16


def test_pallas_impl_is_selectable_and_raises_where_it_cannot_run():
  """impl='pallas' is a valid choice; off GPU (and for float64) it raises a ValueError that
  names attention.impl and the reason instead of taking the XLA path silently; impl='auto'
  takes the XLA path there."""
  from structattn.attention import dispatch
  m = make(VARIANTS["mlr"], causal=True)
  x = x_of(2, T, D)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match=r"attention\.impl='pallas' cannot run here: .*GPU"):
      run(m, x, "pallas")
  with pytest.raises(ValueError, match=r"attention\.impl='pallas'.*float64"):
    dispatch.resolve("pallas", m.pattern, jnp.float64, m.spec.d_qk, m.spec.d_head, "gpu")
  np.testing.assert_allclose(run(m, x, "auto"), reference.attention_layer(m, np.asarray(x)),
                             rtol=1e-9, atol=1e-9)
  q = jnp.zeros((1, 8, 1, 4), jnp.float32)
  pat = core.Pattern(seqs=("global", "block"), sizes=(0, 4), widths=(2, 2), causal=True)
  assert dispatch.pallas_supported(q, pat) == (jax.default_backend() == "gpu")
  pat_w = core.Pattern(seqs=("window",), sizes=(4,), widths=(4,), causal=True)
  assert not dispatch.pallas_supported(q, pat_w)


RESOLVED = [  # (variant config, impl, dtype, backend, implementation that serves it)
    (dict(variant="mha", num_heads=2), "auto", jnp.bfloat16, "gpu", "cudnn"),
    (dict(variant="mha", num_heads=2), "auto", jnp.float32, "gpu", "xla"),
    (dict(variant="mha", num_heads=2), "auto", jnp.bfloat16, "cpu", "xla"),
    (dict(variant="mha", num_heads=2), "cudnn", jnp.bfloat16, "cpu", "xla"),
    (dict(variant="mha", num_heads=2), "xla", jnp.bfloat16, "gpu", "xla"),
    (dict(variant="swa", num_heads=2, window=5), "auto", jnp.bfloat16, "gpu", "cudnn"),
    (dict(variant="swa", num_heads=2, window=5, causal=False), "auto", jnp.bfloat16, "gpu",
     "xla"),
    (dict(variant="gswa", num_heads=2, window=6, gswa_split=(4, 4)), "auto", jnp.bfloat16, "gpu",
     "cudnn"),
    (dict(variant="gswa", num_heads=2, window=6, gswa_split=(4, 4), causal=False), "auto",
     jnp.bfloat16, "gpu", "cudnn+xla"),
    (dict(variant="gswa", num_heads=2, window=6, gswa_split=(3, 5), gswa_combine="renorm"),
     "auto", jnp.bfloat16, "gpu", "xla"),
    (dict(variant="mlr", num_heads=2, mlr_ranks=(4, 2, 2)), "auto", jnp.bfloat16, "gpu", "xla"),
    (dict(variant="mlr", num_heads=2, mlr_ranks=(4, 2, 2)), "pallas", jnp.float32, "gpu",
     "pallas"),
    (dict(variant="mlr", num_heads=2, mlr_ranks=(4, 2, 2)), "reference", jnp.float32, "cpu",
     "reference"),
]


@pytest.mark.parametrize("cfg,impl,dtype,backend,want", RESOLVED)
def test_resolved_impl_names_what_serves_the_layer(cfg, impl, dtype, backend, want):
  """resolved_impl is a pure function of the spec, the compute dtype and the backend; it
  names the implementation that serves the layer (what a training loop records)."""
  from structattn.attention import resolved_impl
  spec = from_config(dict(cfg, impl=impl), d_model=D, seq_len=T)
  assert resolved_impl(spec, dtype, backend) == want
  assert resolved_impl(dataclasses.replace(spec, impl="xla"), dtype, backend, impl=impl) == want


def test_resolved_impl_raises_for_kernels_that_cannot_run():
  from structattn.attention import resolved_impl
  mlr = from_config(dict(variant="mlr", num_heads=2, mlr_ranks=(4, 2, 2)), d_model=D, seq_len=T)
  swa = from_config(dict(variant="swa", num_heads=2, window=5), d_model=D, seq_len=T)
  for spec, impl, dtype, backend, why in [
      (mlr, "pallas", jnp.bfloat16, "cpu", "needs a GPU"),
      (mlr, "mosaic", jnp.bfloat16, "tpu", "needs a GPU"),
      (mlr, "mosaic", jnp.float32, "gpu", "round the float32 inputs"),
      (swa, "pallas", jnp.bfloat16, "gpu", "global and block levels only")]:
    with pytest.raises(ValueError, match=rf"attention\.impl='{impl}' cannot run here: .*{why}"):
      resolved_impl(spec, dtype, backend, impl=impl)
  with pytest.raises(ValueError, match=r"attention\.impl='triton' is invalid"):
    resolved_impl(mlr, jnp.bfloat16, "gpu", impl="triton")


@pytest.mark.parametrize("widths", [(32, 8, 6, 4, 4, 4, 4, 2), (3, 1, 5), (7,)])
def test_per_level_layer_norm_normalises_each_level_segment(widths):
  """Each level's segment has zero mean and unit variance (times its weights), checked in
  numpy float64; widths that do not sum to the feature width are refused."""
  from structattn.attention.layer import per_level_layer_norm
  k = sum(widths)
  kx, kw = jax.random.split(jax.random.key(len(widths)))
  x = jax.random.normal(kx, (2, 5, 3, k), jnp.float64) * 3 + 1
  w = 1 + 0.1 * jax.random.normal(kw, (k,), jnp.float64)
  got = np.asarray(per_level_layer_norm(x, w, widths))
  xn, wn, edges = np.asarray(x), np.asarray(w), np.cumsum((0,) + widths)
  for a, b in zip(edges[:-1], edges[1:]):
    seg = xn[..., a:b]
    want = (seg - seg.mean(-1, keepdims=True)) / np.sqrt(seg.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got[..., a:b], want * wn[a:b], rtol=1e-10, atol=1e-10)
  with pytest.raises(ValueError, match="sum to"):
    per_level_layer_norm(x, w, widths + (1,))


def _attention_imports():
  """{module: attention modules it imports (module- or function-level)} for structattn.attention."""
  import ast
  import pathlib
  import structattn.attention as pkg
  root = pathlib.Path(pkg.__file__).parent
  names = {f.stem for f in root.glob("*.py") if f.stem != "__init__"}
  edges = {}
  for n in names:
    out = set()
    for node in ast.walk(ast.parse((root / f"{n}.py").read_text())):
      if isinstance(node, ast.ImportFrom) and node.module:
        mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      elif isinstance(node, ast.Import):
        mods = [a.name for a in node.names]
      else:
        continue
      out |= {m.split(".")[2] for m in mods
              if m.startswith("structattn.attention.") and m.split(".")[2] in names}
    edges[n] = out - {n}
  return edges


def test_attention_imports_flow_one_way():
  """No import cycle inside structattn.attention; the kernels and the XLA cores import only
  the leaf modules, and only dispatch (and what sits above it) chooses between them."""
  edges = _attention_imports()
  state = {}

  def visit(n, path):
    if state.get(n) == "done":
      return
    assert state.get(n) != "open", f"import cycle: {' -> '.join(path + [n])}"
    state[n] = "open"
    for m in sorted(edges[n]):
      visit(m, path + [n])
    state[n] = "done"

  for n in sorted(edges):
    visit(n, [])
  leaves = {"pattern", "mlr_tiling", "kernel_config", "spec"}
  for kernel in ("pallas_mlr", "mosaic_mlr", "core"):
    assert edges[kernel] <= leaves, (kernel, edges[kernel])
  assert "mosaic_mlr" not in edges["pallas_mlr"] and "pallas_mlr" not in edges["mosaic_mlr"]
  assert {"core", "pallas_mlr", "mosaic_mlr"} <= edges["dispatch"]
