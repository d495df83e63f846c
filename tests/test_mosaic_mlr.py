"""Mosaic GPU MLR forward and backward (GPU interpret mode on CPU) against the float64
masked-dense oracle, values and gradients, and its backward against the Pallas-Triton one.

The kernel computes in bfloat16 with float32 accumulation; inputs are rounded to bf16
first so the oracle sees the same operands, and tolerances are set for bf16 rounding of
P, the output and the gradients.  GPU interpret mode (`plgpu.InterpretGPUParams`) exists
from jax 0.11; older jax (CI's 0.10) skips these tests.
"""

import collections
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structattn.attention import core, dispatch
from structattn.attention import mosaic_mlr
from tests.kernel_checks import check_against_oracle, lower_cuda, random_qkv

warnings.filterwarnings("ignore", category=DeprecationWarning)

needs_interpret = pytest.mark.skipif(
    not mosaic_mlr.interpret_supported(),
    reason="jax.experimental.pallas.mosaic_gpu has no GPU interpret mode "
           "(InterpretGPUParams) in this jax version")

P = core.Pattern


def _qkv(b, t, h, k, dv, seed):
  return random_qkv(b, t, h, k, dv, seed, round_bf16=True)


def _check(pat, t, k=64, dv=64, b=1, h=1, seed=0, grads=True, tol=2e-2, **kw):
  q, k_, v, w = _qkv(b, t, h, k, dv, seed)
  fast = lambda q, k, v: mlr_attention(q, k, v, pat, **kw)
  check_against_oracle(fast, pat, q, k_, v, w, tol, grads=grads)


def mlr_attention(q, k, v, pat, **kw):
  return mosaic_mlr.mlr_attention_mosaic(q, k, v, pat, interpret=True, **kw)


CASES = {
    # one global level: plain causal flash attention (one 64-column chunk)
    "dense": (P(("global",), (0,), (64,)), 128, dict()),
    # paper-like 8 levels 32|8|6|4|4|4|4|2 at T=256 (blocks 256..2): 4 sub-tile levels
    "mlr8_paper": (P(("global",) + ("block",) * 7, (0, 128, 64, 32, 16, 8, 4, 2),
                     (32, 8, 6, 4, 4, 4, 4, 2), divide="block"), 256, dict()),
    # 3 levels, coarse blocks bigger than the CTA, fine blocks inside a tile, block_k=128
    "mlr3_bk128": (P(("global", "block", "block"), (0, 128, 16), (32, 16, 16), divide="levels"),
                   256, dict(block_k=128)),
    # width 128 (two chunks): prefixes 16 | 48 | 112 | 128 cross the chunk boundary
    "mlr4_d128": (P(("global", "block", "block", "block"), (0, 128, 64, 16), (16, 32, 64, 16),
                    divide="block"), 256, dict(k=128, dv=128)),
    "mlr4_noncausal": (P(("global", "block", "block", "block"), (0, 128, 64, 8), (32, 16, 8, 8),
                         causal=False, divide="block"), 256, dict()),
    # level 0 is a block level: tiles outside it are skipped (pipeline kept in step)
    "local_only": (P(("block", "block"), (128, 16), (32, 32)), 256, dict()),
    # ragged causal length and narrow head dims: padded in time and width
    "ragged": (P(("global", "block"), (0, 16), (16, 8)), 200, dict(k=24, dv=40)),
}


# Every case runs with the default chunk=32 (32-column q/k chunks, 64-byte swizzle:
# prefixes cut at 32 in the d64 8-level config, k=24 padded to one chunk); chunk=64 (the
# 128-byte swizzle option) on the paper configs, a non-causal case and the ragged one
CHUNK64 = ["mlr8_paper", "mlr4_d128", "mlr4_noncausal", "ragged"]


@needs_interpret
@pytest.mark.parametrize("name,chunk", [pytest.param(n, 32, id=n) for n in sorted(CASES)] +
                         [pytest.param(n, 64, id=f"{n}-chunk64") for n in CHUNK64])
def test_matches_reference_values_and_grads(name, chunk):
  pat, t, kw = CASES[name]
  _check(pat, t, chunk=chunk, **kw)


@needs_interpret
def test_mosaic_backward_batch_heads():
  """Mosaic backward with several batch rows and heads (grid axes) and a non-causal
  d128 pattern whose far levels lie on both sides of the near tiles."""
  pat = P(("global", "block", "block"), (0, 128, 16), (48, 48, 32), causal=False,
          divide="levels")
  _check(pat, 256, k=128, dv=64, b=2, h=2, seed=5)


@needs_interpret
@pytest.mark.parametrize("name", ["mlr8_paper", "mlr4_d128", "mlr4_noncausal"])
def test_mosaic_backward_matches_triton_backward(name):
  """The Mosaic dq and dk/dv kernels on the same residuals (o, base-2 lse of the Triton
  forward) as the Pallas-Triton backward: equal up to bf16 rounding of the gradients."""
  import dataclasses
  from structattn.attention import mlr_tiling
  from structattn.attention import pallas_mlr as pm
  from structattn.attention.kernel_config import KernelConfig
  pat, t, kw = CASES[name]
  d = kw.get("k", 64)
  tp, lv = mlr_tiling.levels_and_length(pat, t, d, d, 128)
  lv = dataclasses.replace(lv, wk=d, wv=d)
  ks = jax.random.split(jax.random.key(7), 4)
  q, k, v, do = [(jax.random.normal(x, (1, t, 1, d)) * (0.3 if i == 0 else 1.0)).astype(
      jnp.bfloat16) for i, x in enumerate(ks)]
  pcfg = pm.Static(lv, KernelConfig.for_pallas(d).fit(tp), True)
  o, lse = pm._forward(q, k, v, pcfg)
  want = pm._backward(pcfg, (q, k, v, o, lse), do)
  cfg = mosaic_mlr.Static(lv, KernelConfig.for_mosaic(), interpret=True)
  got = mosaic_mlr._backward(cfg, (q, k, v, o, lse), do)
  for n, a, b in zip("qkv", got, want):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max(), f"d{n}"


@needs_interpret
def test_batch_heads_and_bf16_io():
  """Several batch rows and heads; bf16 in, bf16 out, close to the XLA core."""
  pat = P(("global", "block", "block"), (0, 64, 16), (32, 16, 16), divide="block")
  q, k, v, _ = _qkv(2, 128, 2, 64, 64, 3)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = jax.jit(lambda *a: mlr_attention(*a, pat))(q, k, v)
  want = core.blocked_attention(*(x.astype(jnp.float32) for x in (q, k, v)), pat)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


@needs_interpret
def test_rejects_unsupported():
  q = jnp.zeros((1, 128, 1, 64), jnp.float32)
  with pytest.raises(ValueError, match="global/block"):
    mlr_attention(q, q, q, P(("window",), (4,), (64,)))
  with pytest.raises(ValueError, match="divisible"):
    mlr_attention(q[:, :96], q[:, :96], q[:, :96],
                  P(("global", "block"), (0, 32), (32, 32), causal=False))
  with pytest.raises(ValueError, match="block_k"):
    mlr_attention(q, q, q, P(("global",), (0,), (64,)), block_k=32)


def test_rejects_bad_chunk():
  """chunk (feature-chunk width) must be 32 or 64; checked before any kernel is built."""
  if mosaic_mlr.plgpu is None:
    pytest.skip("no jax.experimental.pallas.mosaic_gpu")
  q = jnp.zeros((1, 128, 1, 64), jnp.float32)
  with pytest.raises(ValueError, match=r"chunk.*\(32, 64\)"):
    mosaic_mlr.mlr_attention_mosaic(q, q, q, P(("global",), (0,), (64,)), chunk=48)


def test_impl_mosaic_raises_where_it_cannot_run(monkeypatch):
  """attention(impl='mosaic') never falls back silently: off GPU, with window levels, with
  float32 inputs (which it would round to bf16) or on a jax without Mosaic GPU it raises a
  ValueError naming attention.impl and the reason; impl='auto' serves the XLA path."""
  pat = P(("global", "block"), (0, 16), (8, 8), divide="block")
  q, k, v, _ = _qkv(1, 64, 2, 16, 16, 4)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match=r"attention\.impl='mosaic' cannot run here: .*GPU"):
      dispatch.attention(q, k, v, pat, impl="mosaic")
  resolve = lambda pat, dtype: dispatch.resolve("mosaic", pat, dtype, 16, 16, "gpu")
  with pytest.raises(ValueError, match=r"attention\.impl='mosaic'.*round the float32"):
    resolve(pat, jnp.float32)
  with pytest.raises(ValueError, match=r"attention\.impl='mosaic'.*global and block levels"):
    resolve(P(("global", "window"), (0, 8), (8, 8)), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"attention\.impl='mosaic'.*float64"):
    resolve(pat, jnp.float64)
  if mosaic_mlr.available():
    assert resolve(pat, jnp.bfloat16) == "mosaic"
  monkeypatch.setattr(mosaic_mlr, "plgpu", None)
  with pytest.raises(ValueError, match=r"attention\.impl='mosaic'.*no Pallas Mosaic GPU"):
    resolve(pat, jnp.bfloat16)
  out = dispatch.attention(q, k, v, pat, impl="auto")
  np.testing.assert_allclose(out, core.blocked_attention(q, k, v, pat), rtol=1e-6, atol=1e-6)


LOWER_CASES = [
    ((32, 8, 6, 4, 4, 4, 4, 2), (0, 512, 256, 128, 64, 32, 16, 8), dict()),
    ((16, 16, 32, 64), (0, 512, 256, 128), dict(block_k=128)),
]


def _lower_cuda(f, *args):
  return lower_cuda(f, *args, skip=pytest.skip)


@needs_interpret
@pytest.mark.parametrize("chunk", [64, 32])
@pytest.mark.parametrize("widths,sizes,kw", LOWER_CASES)
def test_lowers_to_mosaic_gpu_for_cuda(widths, sizes, kw, chunk):
  """The forward lowers through Pallas Mosaic GPU for CUDA without a GPU (paper configs;
  chunk=32: 64-byte swizzled q/k chunks, wgmma K = 32)."""
  pat = P(("global",) + ("block",) * (len(widths) - 1), sizes, widths, divide="block")
  q = jax.ShapeDtypeStruct((1, 1024, 2, sum(widths)), jnp.bfloat16)
  f = lambda q, k, v: mosaic_mlr.mlr_attention_mosaic(q, k, v, pat, chunk=chunk, **kw)
  assert "mosaic_gpu" in _lower_cuda(f, q, q, q)


@needs_interpret
@pytest.mark.parametrize("chunk", [64, 32])
@pytest.mark.parametrize("widths,sizes,kw", LOWER_CASES)
def test_backward_lowers_to_mosaic_gpu_for_cuda(widths, sizes, kw, chunk):
  """The Mosaic backward (dq and dk/dv kernels: three Mosaic GPU calls with the forward)
  lowers for CUDA without a GPU."""
  pat = P(("global",) + ("block",) * (len(widths) - 1), sizes, widths, divide="block")
  q = jax.ShapeDtypeStruct((1, 1024, 2, sum(widths)), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(
      mosaic_mlr.mlr_attention_mosaic(q, k, v, pat, chunk=chunk, **kw).astype(jnp.float32))
  txt = _lower_cuda(jax.grad(loss, argnums=(0, 1, 2)), q, q, q)
  assert txt.count("mosaic_gpu") >= 3 and "triton" not in txt.lower()


def _forward_qk_cols(monkeypatch, pat, t, k, dv, chunk):
  """Trace the Mosaic forward, recording every wgmma: returns, per traced key-tile loop
  body in order (far loops, then the near loop), the q.k columns it contracts (sum of
  wgmma K over its q.k calls).  dv = 128 tells the PV call (B: (bk, 128)) from q.k (B:
  (chunk, bk))."""
  calls = []
  wgmma = mosaic_mlr.plgpu.wgmma

  def record(acc, a, b, *args, **kwargs):
    calls.append((tuple(a.shape), tuple(b.shape)))
    return wgmma(acc, a, b, *args, **kwargs)

  monkeypatch.setattr(mosaic_mlr.plgpu, "wgmma", record)
  q = jax.ShapeDtypeStruct((1, t, 1, k), jnp.bfloat16)
  v = jax.ShapeDtypeStruct((1, t, 1, dv), jnp.bfloat16)
  jax.jit(lambda q, k, v: mosaic_mlr.mlr_attention_mosaic(q, k, v, pat, chunk=chunk)).trace(
      q, q, v)
  monkeypatch.setattr(mosaic_mlr.plgpu, "wgmma", wgmma)
  bodies, cols = [], 0
  for a, b in calls:
    if b[-1] == dv:  # PV: ends a loop body
      bodies.append(cols)
      cols = 0
    else:
      assert a[-1] == b[0] == chunk, (a, b, chunk)
      cols += a[-1]
  return bodies


@needs_interpret
def test_chunk32_far_loops_contract_fewer_qk_columns(monkeypatch):
  """d64 8-level paper config: every prefix rounds up to 64 with chunk=64, so each far loop
  contracts 64 q.k columns; with chunk=32 the coarse level (P_0 = 32) contracts one
  32-column chunk.  Counted on the traced kernel (fails if `chunk` is ignored) and checked
  against `_chunks`, which the kernel uses to pick the chunks of a prefix."""
  widths = (32, 8, 6, 4, 4, 4, 4, 2)
  pat = P(("global",) + ("block",) * 7, (0, 512, 256, 128, 64, 32, 16, 8), widths,
          divide="block")
  far = {c: _forward_qk_cols(monkeypatch, pat, 1024, 64, 128, c)[:-1] for c in (64, 32)}
  assert len(far[64]) == len(far[32]) >= 2
  assert far[64] == [64] * len(far[64])
  prefix = np.cumsum(widths)
  assert set(far[32]) <= {mosaic_mlr._chunks(int(p), 32) * 32 for p in prefix}
  assert min(far[32]) == 32 and mosaic_mlr._chunks(32, 32) == 1
  assert sum(far[32]) < sum(far[64])


@needs_interpret
def test_no_transposes_around_the_kernels():
  """q/k reach the kernels as a free (B, T, H, C, chunk) view of (B, T, H, W) and dq/dk come
  back the same way: the traced forward+backward has reshapes but no transpose outside the
  three Mosaic GPU calls (the transposes cost training time before)."""
  widths = (32, 8, 6, 4, 4, 4, 4, 2)
  pat = P(("global",) + ("block",) * 7, (0, 512, 256, 128, 64, 32, 16, 8), widths,
          divide="block")
  q = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(mosaic_mlr.mlr_attention_mosaic(q, k, v, pat).astype(
      jnp.float32))
  prims = collections.Counter()

  def walk(jaxpr):  # descends into nested jits, not into the kernels' bodies
    for e in jaxpr.eqns:
      prims[e.primitive.name] += 1
      for p in e.params.values():
        inner = getattr(p, "jaxpr", p)
        if e.primitive.name in ("jit", "pjit") and hasattr(inner, "eqns"):
          walk(inner)

  walk(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, q, q).jaxpr)
  assert prims["reshape"] >= 4, prims
  assert prims["transpose"] == 0, prims


@needs_interpret
def test_layers_share_one_lowering_of_each_kernel():
  """Each Mosaic kernel is a jitted function of its static config, so a model with many
  identical attention layers lowers it once (private function + calls): the lowered
  forward+backward of two layers is no bigger than one layer's plus a little glue (without
  the jit it is twice as big, and compile time grows with depth)."""
  pat = P(("global", "block"), (0, 128), (32, 32), divide="block")
  q = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)

  def grad_of_stack(n):
    def loss(q, k, v):
      for _ in range(n):
        q = mosaic_mlr.mlr_attention_mosaic(q, k, v, pat)
      return jnp.sum(q.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))

  one, two = (len(_lower_cuda(grad_of_stack(n), q, q, q)) for n in (1, 2))
  assert two < 1.1 * one, (one, two)
