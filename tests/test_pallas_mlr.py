"""Fused Pallas MLR kernel (interpret mode, float32) against the masked-dense oracle.

Outputs and gradients (dq, dk, dv) for causal and non-causal nested block levels, tiles
larger than the finest blocks, unequal q/k tiles, several width runs and divide options.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from structattn.attention import core, mlr_tiling
from structattn.attention.kernel_config import KernelConfig, KernelTiles
from structattn.attention.pallas_mlr import mlr_attention_pallas
from tests.kernel_checks import check_against_oracle, random_qkv

warnings.filterwarnings("ignore", category=DeprecationWarning)

P = core.Pattern


def _qkv(b, t, h, k, dv, seed):
  return random_qkv(b, t, h, k, dv, seed)


def _check(pat, t, dv=16, bq=16, bk=16, b=2, h=2, seed=0, config=None, tol=2e-5):
  q, k, v, w = _qkv(b, t, h, sum(pat.widths), dv, seed)
  kw = dict(interpret=True, block_q=bq, block_k=bk)
  fast = lambda q, k, v: mlr_attention_pallas(q, k, v, pat, config, **kw)
  check_against_oracle(fast, pat, q, k, v, w, tol)


CASES = {
    # one global level: plain causal flash attention
    "dense": (P(("global",), (0,), (16,)), 64, dict()),
    # global + blocks 32 (coarse) + 8 (finer than the 16-token tiles), block divide
    "mlr3_block": (P(("global", "block", "block"), (0, 32, 8), (8, 4, 4), divide="block"), 64,
                   dict()),
    # 8-token and 16-token blocks inside 32-wide tiles, 5 levels, K=20 padded to 32
    "mlr5_fine": (P(("global", "block", "block", "block", "block"), (0, 64, 32, 16, 8),
                    (8, 4, 2, 2, 4), divide="block"), 128, dict(bq=32, bk=32, dv=32)),
    "mlr5_fine_noncausal": (P(("global", "block", "block", "block", "block"), (0, 64, 32, 16, 8),
                              (8, 4, 2, 2, 4), causal=False, divide="block"), 128,
                            dict(bq=32, bk=32, dv=32)),
    # unequal q/k tiles
    "tall_q": (P(("global", "block", "block"), (0, 32, 8), (8, 4, 4)), 64, dict(bq=32, bk=16)),
    "wide_k": (P(("global", "block", "block"), (0, 32, 8), (8, 4, 4), causal=False), 64,
               dict(bq=16, bk=32)),
    # three width runs (16 | 32 | 64): three far loops, four gradient bands
    "width_runs": (P(("global", "block", "block"), (0, 64, 32), (16, 16, 32), divide="levels"),
                   128, dict(bq=16, bk=32, dv=24)),
    "width_runs_noncausal": (P(("global", "block", "block"), (0, 64, 32), (16, 16, 32),
                               causal=False), 128, dict(bq=32, bk=16, dv=8)),
    # level 0 is a block level: pairs outside it are never attended
    "local_only": (P(("block", "block"), (32, 8), (8, 8)), 64, dict()),
    # every level finer than the tiles (no coarse level)
    "sub_tile": (P(("block", "block"), (16, 4), (8, 8), causal=False), 64, dict(bq=32, bk=32)),
    # causal length not a multiple of the blocks or tiles: padded
    "ragged_causal": (P(("global", "block", "block"), (0, 16, 8), (8, 4, 4), divide="block"), 40,
                      dict()),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_values_and_grads(name):
  pat, t, kw = CASES[name]
  _check(pat, t, **kw)


@pytest.mark.parametrize("seed", range(3))
def test_random_shapes(seed):
  rng = np.random.default_rng(100 + seed)
  nlev = int(rng.integers(2, 5))
  tile = int(rng.choice([16, 32]))
  t = 128
  sizes = [0] + sorted((int(2 ** rng.integers(2, 7)) for _ in range(nlev - 1)), reverse=True)
  ranks = tuple(int(r) for r in rng.integers(1, 9, size=nlev))
  pat = P(("global",) + ("block",) * (nlev - 1), tuple(sizes), ranks,
          causal=bool(seed % 2 == 0), divide=["none", "block", "levels"][seed])
  config = KernelConfig(KernelTiles(tile, 16), KernelTiles(16, tile), KernelTiles(tile, tile))
  _check(pat, t, dv=int(rng.choice([8, 16, 32])), b=1, h=int(rng.integers(1, 3)), seed=seed,
         config=config, bq=None, bk=None)


def test_matches_blocked_attention_bf16():
  """bf16 inputs, float32 accumulation: close to the XLA core on the same inputs."""
  pat = P(("global", "block", "block"), (0, 32, 8), (16, 8, 8), divide="block")
  q, k, v, _ = _qkv(1, 64, 2, 32, 16, 3)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = jax.jit(lambda *a: mlr_attention_pallas(*a, pat, interpret=True, block_q=32,
                                                block_k=16))(q, k, v)
  want = core.blocked_attention(*(x.astype(jnp.float32) for x in (q, k, v)), pat)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


def test_rejects_unsupported():
  q = jnp.zeros((1, 48, 1, 8), jnp.float32)
  with pytest.raises(ValueError, match="global/block"):
    mlr_attention_pallas(q, q, q, P(("window",), (4,), (8,)), interpret=True)
  with pytest.raises(ValueError, match="divisible"):
    mlr_attention_pallas(q, q, q, P(("global", "block"), (0, 32), (4, 4), causal=False),
                         interpret=True)
  with pytest.raises(ValueError, match="powers of two"):
    mlr_attention_pallas(q, q, q, P(("global",), (0,), (8,)), interpret=True, block_q=24)


def test_lowers_to_triton_for_cuda():
  """The kernels lower to Triton IR for an H100 (cross-platform lowering, no GPU needed)."""
  try:
    from jax._src.pallas.triton import gpu_info
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
  except (ImportError, AttributeError) as e:
    pytest.skip(f"no Triton GPU info in this jax: {e}")
  old = gpu_info.get_gpu_info
  gpu_info.get_gpu_info = lambda: h100
  try:
    pat = P(("global", "block", "block", "block"), (0, 256, 128, 8), (32, 8, 8, 16),
            divide="block")
    q = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
    f = lambda q, k, v: mlr_attention_pallas(q, k, v, pat)
    g = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    for fn, n in ((f, 1), (g, 3)):
      txt = jax.jit(fn).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
      assert txt.count("xla.gpu.triton") == n
  finally:
    gpu_info.get_gpu_info = old


@pytest.mark.parametrize("name,rows_are_queries",
                         [(n, r) for n in ("mlr5_fine", "mlr5_fine_noncausal", "local_only",
                                           "sub_tile", "tall_q", "wide_k") for r in (True, False)])
def test_tile_ranges_cover_each_pair_once(name, rows_are_queries):
  """Far ranges hold only pairs of their level, the near range holds the rest; together
  they visit every attended pair exactly once and stay inside [0, T)."""
  pat, t, kw = CASES[name]
  bq, bk = kw.get("bq", 16), kw.get("bk", 16)
  _, lv = mlr_tiling.levels_and_length(pat, t, sum(pat.widths), 8, max(bq, bk))
  plan = mlr_tiling.Plan(lv, bq, bk)
  rsize, csize = (bq, bk) if rows_are_queries else (bk, bq)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  same = np.stack([(i // b) == (j // b) for b in lv.sizes])  # (L, T, T) query x key
  lam = same.sum(0) - 1  # deepest shared level (nested), -1: not even level 0
  valid = (lam >= 0) & ((j <= i) if pat.causal else True)
  seen = np.zeros((t, t), int)
  for r0 in range(0, t, rsize):
    far, near = mlr_tiling.ranges(plan, jnp.int32(r0), rsize, csize, rows_are_queries)
    for lo, hi, l in far + [(near[0], near[1], None)]:
      lo, hi = int(lo), int(hi)
      assert 0 <= lo and hi <= t and lo % csize == 0 and hi % csize == 0
      if hi <= lo:
        continue
      if rows_are_queries:
        block = (slice(r0, r0 + rsize), slice(lo, hi))
      else:
        block = (slice(lo, hi), slice(r0, r0 + rsize))
      seen[block] += 1
      if l is not None:  # far: one level, all pairs valid, no mask needed
        assert (lam[block] == l).all() and valid[block].all()
  np.testing.assert_array_equal(seen[valid], 1)
  assert seen[~valid].max(initial=0) <= 1


def test_kernel_config_validates_each_field():
  """Every invalid knob is refused when the config is built, naming the field and the
  allowed values; the Mosaic constraints are checked by `check_mosaic`."""
  kt = KernelTiles(64, 64)
  cases = [
      (lambda: KernelTiles(48, 64), r"KernelTiles\.block_q=48 .*powers of two >= 16"),
      (lambda: KernelTiles(64, 8), r"KernelTiles\.block_k=8 .*powers of two >= 16"),
      (lambda: KernelTiles(64, 64, num_warps=3), r"KernelTiles\.num_warps=3 .*\(1, 2, 4, 8, 16\)"),
      (lambda: KernelTiles(64, 64, num_stages=0), r"KernelTiles\.num_stages=0 .*>= 1"),
      (lambda: KernelConfig(kt, kt, kt, chunk=16), r"KernelConfig\.chunk=16 .*\(32, 64\)"),
      (lambda: KernelConfig(kt, kt, kt, slots=0), r"KernelConfig\.slots=0 .*>= 1"),
      (lambda: KernelConfig(kt, kt, (64, 64)), r"KernelConfig\.dkdv=.*KernelTiles"),
      (lambda: KernelConfig.for_mosaic(block_k=32).check_mosaic(),
       r"KernelConfig\.fwd\.block_k=32 .*\(64, 128\)"),
      (lambda: KernelConfig.for_pallas(64).check_mosaic(), r"KernelConfig\.fwd\.block_q=128"),
  ]
  for build, match in cases:
    with pytest.raises(ValueError, match=match):
      build()
  cfg = KernelConfig.for_pallas(64)
  assert hash(cfg) == hash(KernelConfig.for_pallas(64))
  assert cfg.with_blocks(32, 16).dq == KernelTiles(32, 16, 8, 3)
  assert cfg.fit(48).fwd.block_q == 16
  assert KernelConfig.for_mosaic(block_k=128).check_mosaic().fwd == KernelTiles(64, 128)


def _with_h100_triton_info():
  """Context: Triton lowering targets an H100 (no GPU needed); skips without the helper."""
  import contextlib
  try:
    from jax._src.pallas.triton import gpu_info
    h100 = gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H100)
  except (ImportError, AttributeError) as e:
    pytest.skip(f"no Triton GPU info in this jax: {e}")

  @contextlib.contextmanager
  def patched():
    old = gpu_info.get_gpu_info
    gpu_info.get_gpu_info = lambda: h100
    try:
      yield
    finally:
      gpu_info.get_gpu_info = old
  return patched()


def test_layers_share_one_lowering_of_each_kernel():
  """The Triton kernels are jitted on their static config, so identical attention layers
  share one lowering of each (private function + calls): the lowered forward+backward of
  two layers is no bigger than one layer's plus a little glue."""
  from tests.kernel_checks import lower_cuda
  pat = P(("global", "block"), (0, 128), (32, 32), divide="block")
  q = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)

  def grad_of_stack(n):
    def loss(q, k, v):
      for _ in range(n):
        q = mlr_attention_pallas(q, k, v, pat)
      return jnp.sum(q.astype(jnp.float32))
    return jax.grad(loss, argnums=(0, 1, 2))

  with _with_h100_triton_info():
    one, two = (len(lower_cuda(grad_of_stack(n), q, q, q, skip=pytest.skip)) for n in (1, 2))
  assert two < 1.1 * one, (one, two)


def test_dispatch_names_attention_impl_when_the_kernel_refuses_a_shape():
  """A shape the kernel refuses (here a non-causal length the blocks do not divide) comes
  back from the dispatch as an error naming attention.impl, not as an XLA fallback."""
  from structattn.attention import dispatch
  q = jnp.zeros((1, 48, 1, 8), jnp.float32)
  pat = P(("global", "block"), (0, 32), (4, 4), causal=False)
  with pytest.raises(ValueError, match=r"attention\.impl='pallas' cannot run here: .*divisible"):
    dispatch._kernel("pallas", q, q, q, pat)
