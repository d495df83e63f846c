"""Static configuration of the fused MLR kernels, validated before any kernel is built.

    cfg = KernelConfig.for_pallas(width=64)                # Pallas-Triton defaults
    cfg = KernelConfig.for_mosaic(block_k=128)             # Mosaic GPU defaults
    out = mlr_attention_pallas(q, k, v, pattern, cfg)      # or mlr_attention_mosaic

A `KernelConfig` holds the tiles of the three kernels (forward, dq, dk/dv) and the
Mosaic GPU layout knobs.  Every field is checked in `__post_init__`; an invalid value
raises a ValueError that names the field and the allowed values.  Each kernel checks the
constraints of its own hardware path on top (`check_pallas`, `check_mosaic`).  Configs
are frozen and hashable: the kernels are jitted on them, so identical layers share one
lowering.
"""

from __future__ import annotations

import dataclasses

from structattn.attention.mlr_tiling import MIN_WIDTH

NUM_WARPS = (1, 2, 4, 8, 16)
MOSAIC_BLOCK_Q = 64  # rows per compute warpgroup: one wgmma M tile
MOSAIC_BLOCK_K = (64, 128)  # forward key tile rows
MOSAIC_BWD_BLOCK = 64  # dq and dk/dv tiles of the Mosaic backward
CHUNKS = (32, 64)  # q/k feature chunk widths of the Mosaic kernels (64- or 128-byte swizzle)


def _invalid(field: str, value, allowed: str) -> ValueError:
  return ValueError(f"{field}={value!r} is invalid: allowed values are {allowed}")


def _is_pow2_tile(n) -> bool:
  return isinstance(n, int) and not isinstance(n, bool) and n >= MIN_WIDTH and not n & (n - 1)


@dataclasses.dataclass(frozen=True)
class KernelTiles:
  """Tiles of one kernel: rows of q and of k per step, and Triton launch parameters
  (None: the Triton defaults, 4 warps and 2 stages; the Mosaic kernels ignore them)."""
  block_q: int
  block_k: int
  num_warps: int | None = None
  num_stages: int | None = None

  def __post_init__(self):
    for name in ("block_q", "block_k"):
      value = getattr(self, name)
      if not _is_pow2_tile(value):
        raise _invalid(f"KernelTiles.{name}", value, f"powers of two >= {MIN_WIDTH}")
    if self.num_warps is not None and self.num_warps not in NUM_WARPS:
      raise _invalid("KernelTiles.num_warps", self.num_warps, f"None or one of {NUM_WARPS}")
    if self.num_stages is not None and (not isinstance(self.num_stages, int)
                                        or self.num_stages < 1):
      raise _invalid("KernelTiles.num_stages", self.num_stages, "None or an integer >= 1")

  def fit(self, t: int) -> "KernelTiles":
    """Shrink the tiles to the largest power of two dividing the (padded) length t."""
    low = t & -t
    return dataclasses.replace(self, block_q=min(self.block_q, low),
                               block_k=min(self.block_k, low))


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static knobs of the fused MLR kernels.

  fwd, dq, dkdv: tiles of the forward, dq and dk/dv kernels.  The Pallas-Triton kernel takes
    any powers of two >= 16; the Mosaic GPU kernel needs fwd.block_q = 64 (one wgmma M tile),
    fwd.block_k in (64, 128), and 64 x 64 backward tiles.
  chunk: Mosaic only, the q/k feature chunk width (32: 64-byte swizzle, so a prefix of 32
    columns contracts one chunk; 64: 128-byte swizzle).  Timings: docs/performance.md.
  slots: Mosaic only, TMA pipeline depth (key/value tiles in flight), >= 1.
  schedule_barrier: Mosaic only, ping-pong the two compute warpgroups (FA3 schedule).
  """
  fwd: KernelTiles
  dq: KernelTiles
  dkdv: KernelTiles
  chunk: int = 32
  slots: int = 2
  schedule_barrier: bool = True

  def __post_init__(self):
    for name in ("fwd", "dq", "dkdv"):
      if not isinstance(getattr(self, name), KernelTiles):
        raise _invalid(f"KernelConfig.{name}", getattr(self, name), "KernelTiles(...)")
    if self.chunk not in CHUNKS:
      raise _invalid("KernelConfig.chunk", self.chunk, str(CHUNKS))
    if not isinstance(self.slots, int) or self.slots < 1:
      raise _invalid("KernelConfig.slots", self.slots, "integers >= 1")
    if not isinstance(self.schedule_barrier, bool):
      raise _invalid("KernelConfig.schedule_barrier", self.schedule_barrier, "True or False")

  # -- defaults ---------------------------------------------------------------------------

  @staticmethod
  def for_pallas(width: int) -> "KernelConfig":
    """Pallas-Triton tiles for a padded q/k/v width: the best of a small H100 search, checked
    for register spills with ptxas (docs/performance.md)."""
    kt = KernelTiles
    if width <= 64:
      return KernelConfig(kt(128, 64, 4, 3), kt(128, 64, 8, 3), kt(64, 64, 8, 3))
    return KernelConfig(kt(64, 64, 4, 3), kt(128, 32, 8, 2), kt(64, 64, 8, 2))

  @staticmethod
  def for_mosaic(block_k: int = 64, chunk: int = 32) -> "KernelConfig":
    """Mosaic GPU tiles: 64-row query tiles, `block_k`-row key tiles in the forward."""
    b = MOSAIC_BWD_BLOCK
    return KernelConfig(KernelTiles(MOSAIC_BLOCK_Q, block_k), KernelTiles(b, b),
                        KernelTiles(b, b), chunk=chunk)

  # -- derived configs --------------------------------------------------------------------

  def with_blocks(self, block_q: int | None = None, block_k: int | None = None) -> "KernelConfig":
    """The same config with the q/k tile sizes of every kernel overridden."""
    if block_q is None and block_k is None:
      return self
    f = lambda kt: dataclasses.replace(kt, block_q=block_q or kt.block_q,
                                       block_k=block_k or kt.block_k)
    return dataclasses.replace(self, fwd=f(self.fwd), dq=f(self.dq), dkdv=f(self.dkdv))

  def fit(self, t: int) -> "KernelConfig":
    """Tiles shrunk to the largest power of two dividing the (padded) length t."""
    return dataclasses.replace(self, fwd=self.fwd.fit(t), dq=self.dq.fit(t),
                               dkdv=self.dkdv.fit(t))

  @property
  def max_tile(self) -> int:
    return max(max(kt.block_q, kt.block_k) for kt in (self.fwd, self.dq, self.dkdv))

  # -- per-kernel constraints -------------------------------------------------------------

  def check_mosaic(self) -> "KernelConfig":
    """Raise unless the Mosaic GPU kernels can run these tiles; returns self."""
    if self.fwd.block_q != MOSAIC_BLOCK_Q:
      raise _invalid("KernelConfig.fwd.block_q", self.fwd.block_q,
                     f"({MOSAIC_BLOCK_Q},) for the Mosaic kernel (one wgmma M tile)")
    if self.fwd.block_k not in MOSAIC_BLOCK_K:
      raise _invalid("KernelConfig.fwd.block_k", self.fwd.block_k,
                     f"{MOSAIC_BLOCK_K} for the Mosaic kernel")
    b = MOSAIC_BWD_BLOCK
    for name in ("dq", "dkdv"):
      kt = getattr(self, name)
      if (kt.block_q, kt.block_k) != (b, b):
        raise _invalid(f"KernelConfig.{name}", (kt.block_q, kt.block_k),
                       f"({b}, {b}) block_q x block_k for the Mosaic backward")
    return self
