"""Validated attention specifications.

An attention layer is fully described by an `AttentionSpec`: the model width, the head
layout, and a tuple of `Level`s.  Every scoring function of the structured-attention
family is a list of levels (MLBTC): each level has

* a *sequence* extent: global, a block size (pairs in the same block), or a causal band
  (pairs at distance <= w);
* a *feature* structure producing per-head query/key features for that level: low rank
  (a projection, optionally block-diagonal over `blocks` contiguous feature groups) or
  BTT (the key side is a full-rank BTT matrix, the query side the token itself).

The score of a pair is the sum over the levels whose sequence extent contains the pair of
`scale_l * <q_l(i), k_l(j)>`.  Named variants (mha, swa, mlr, bilinear_mlr, bilinear_btt,
...) are presets that build these levels; `variant='mlbtc'` takes the levels from the
config directly.  All validation happens here, before any compute.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from structattn.factors import btt_factors  # noqa: F401  (re-exported)

VARIANTS = ("mha", "swa", "gswa", "mlr", "bilinear_mlr", "bilinear_btt", "mlbtc")
SCALES = ("mup", "standard", "inverse")
IMPLS = ("auto", "xla", "cudnn", "pallas", "mosaic", "reference")
DIVIDES = ("none", "block", "levels")
GSWA_COMBINES = ("sum", "renorm")
FEATURE_KINDS = ("lowrank", "btt")
NORMS = ("joint", "per_level", "none")


# Feature structures by name.  Built-ins are described here so that specs, validation and
# FLOP accounting work without Flax; `structattn.attention.features.register_feature` adds
# user structures (a small NNX module with `width`/`num_params` class methods).
FEATURES: dict[str, Any] = {}


def _err(field: str, value: Any, allowed: str) -> ValueError:
  return ValueError(f"attention.{field}={value!r} is invalid: {allowed}")


def scale_for_width(scale: str, width: int) -> float:
  """Score scale for a query/key width: mup 8/w, standard 1/sqrt(w), inverse 1/w."""
  if scale == "mup":
    return 8.0 / width
  if scale == "standard":
    return 1.0 / math.sqrt(width)
  if scale == "inverse":
    return 1.0 / width
  raise _err("scale", scale, f"allowed values are {SCALES}")


@dataclasses.dataclass(frozen=True)
class Level:
  """One level of a multi-level scoring function.

  seq: 'global', 'block' (pairs with floor(i/size) == floor(j/size)) or 'window'
    (causal band j in [i - size, i], symmetric |i - j| <= size when non-causal).
  size: block size or window; 0 for global.
  kind: 'lowrank' (q = x Wq, k = x Wk, per head width `rank * blocks`) or 'btt'
    (q = x, k = LN(M_h^T x) with a BTT matrix of rank `rank`; width d_model).
  rank: per-block rank (lowrank) or BTT rank s.
  blocks: number of contiguous feature blocks (block-diagonal projections), lowrank only.
  """
  seq: str = "global"
  size: int = 0
  kind: str = "lowrank"
  rank: int = 64
  blocks: int = 1

  def width(self, d_model: int) -> int:
    """Per-head query/key width of this level."""
    if self.kind in FEATURES:
      return FEATURES[self.kind].width(self, d_model)
    return d_model if self.kind == "btt" else self.rank * self.blocks


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """A validated, hashable description of one attention layer."""
  d_model: int
  num_heads: int
  d_head: int  # value / output width per head
  levels: tuple[Level, ...]
  seq_len: int
  causal: bool = True
  qk_norm: bool = True
  norm: str = "joint"  # joint: one LN over the concatenated head features; per_level
  scale: str = "mup"
  divide: str = "none"  # mlr: none | block (by #levels covering the pair) | levels (by L)
  combine: str = "renorm"  # multi-level with a window level: renorm (one softmax) | sum
  impl: str = "auto"
  btt_rms_cap: bool = True
  variant: str = "mlbtc"

  @property
  def widths(self) -> tuple[int, ...]:
    return tuple(lv.width(self.d_model) for lv in self.levels)

  @property
  def d_qk(self) -> int:
    return sum(self.widths)

  @property
  def is_single_global(self) -> bool:
    return len(self.levels) == 1 and self.levels[0].seq == "global"

  @property
  def block_levels(self) -> bool:
    return all(lv.seq in ("global", "block") for lv in self.levels)

  def level_scales(self) -> tuple[float, ...]:
    return tuple(scale_for_width(self.scale, w) for w in self.widths)

  def block_sizes(self, seq_len: int | None = None) -> tuple[int, ...]:
    """Block size per level at length T (global levels span the whole sequence)."""
    t = self.seq_len if seq_len is None else seq_len
    return tuple(t if lv.seq == "global" else lv.size for lv in self.levels)


# ----------------------------------------------------------------------------- presets


def _get(cfg: Mapping[str, Any] | Any, key: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(key, default)
  try:
    return cfg[key]
  except (KeyError, AttributeError, TypeError):
    return getattr(cfg, key, default)


def _ints(field: str, value: Any) -> tuple[int, ...]:
  if isinstance(value, str):
    value = [v for v in value.replace("|", ",").split(",") if v.strip()]
  try:
    out = tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise _err(field, value, "expected a sequence of positive integers such as (32, 8, 8)") from None
  if not out or any(v <= 0 for v in out):
    raise _err(field, value, "expected a non-empty sequence of positive integers")
  return out


def _mlr_levels(ranks: tuple[int, ...], block_sizes: Any, seq_len: int) -> tuple[Level, ...]:
  n = len(ranks)
  if block_sizes is None or (not isinstance(block_sizes, (int, str)) and len(block_sizes) == 0):
    sizes = [0] + [seq_len // 2 ** l for l in range(1, n)]
    for l in range(1, n):
      if seq_len % 2 ** l:
        raise _err("mlr_block_sizes", None,
                   f"default block sizes T/2^(l-1) need seq_len={seq_len} divisible by {2 ** l} "
                   f"for {n} levels; give mlr_block_sizes explicitly")
  else:
    raw = block_sizes.replace("|", ",").split(",") if isinstance(block_sizes, str) else block_sizes
    try:
      sizes = [0 if v in (None, "global", "") else int(v) for v in raw]
    except (TypeError, ValueError):
      raise _err("mlr_block_sizes", block_sizes, "expected integers (0 or None = global)") from None
    if len(sizes) != n:
      raise _err("mlr_block_sizes", block_sizes,
                 f"need one block size per level: {n} levels from mlr_ranks={ranks}")
  levels = []
  for l, (r, b) in enumerate(zip(ranks, sizes)):
    if b == 0 or b == seq_len:
      if l > 0 and b == 0:
        raise _err("mlr_block_sizes", block_sizes, "only level 1 may be global (0/None)")
      levels.append(Level("global", 0, "lowrank", r, 1) if l == 0 else Level("block", b, "lowrank", r, 1))
    else:
      levels.append(Level("block", b, "lowrank", r, 1))
  return tuple(levels)


def _level_from_mapping(i: int, m: Mapping[str, Any] | Any) -> Level:
  seq = _get(m, "seq", "global")
  size = int(_get(m, "size", 0) or 0)
  kind = _get(m, "kind", "lowrank")
  rank = int(_get(m, "rank", 1))
  blocks = int(_get(m, "blocks", 1))
  if seq not in ("global", "block", "window"):
    raise _err(f"levels[{i}].seq", seq, "allowed values are ('global', 'block', 'window')")
  kinds = tuple(dict.fromkeys(FEATURE_KINDS + tuple(FEATURES)))
  if kind not in kinds:
    raise _err(f"levels[{i}].kind", kind, f"allowed values are {kinds}")
  return Level(seq, size if seq != "global" else 0, kind, rank, blocks)


def from_config(cfg: Mapping[str, Any] | Any, d_model: int, seq_len: int) -> AttentionSpec:
  """Build and validate an AttentionSpec from an `attention` config section."""
  variant = _get(cfg, "variant", "mha")
  if variant not in VARIANTS:
    raise _err("variant", variant, f"allowed values are {VARIANTS}")
  if d_model <= 0 or seq_len <= 0:
    raise ValueError(f"model.d_model={d_model} and seq_len={seq_len} must be positive")
  num_heads = int(_get(cfg, "num_heads", 1))
  if num_heads <= 0:
    raise _err("num_heads", num_heads, "must be a positive integer")
  d_head = _get(cfg, "d_head", None) or None
  if d_head is None:
    if d_model % num_heads:
      raise _err("num_heads", num_heads, f"must divide d_model={d_model} when d_head is not set")
    d_head = d_model // num_heads
  d_head = int(d_head)
  d_qk = int(_get(cfg, "d_qk", None) or d_head)
  scale = _get(cfg, "scale", None)
  impl = _get(cfg, "impl", "auto")
  if impl not in IMPLS:
    raise _err("impl", impl, f"allowed values are {IMPLS}")
  divide = _get(cfg, "mlr_divide", "none") if variant == "mlr" else "none"
  if divide not in DIVIDES:
    raise _err("mlr_divide", divide, f"allowed values are {DIVIDES}")
  combine = "renorm"
  norm = "joint"
  window = int(_get(cfg, "window", 512) or 0)

  if variant == "mha":
    levels = (Level("global", 0, "lowrank", d_qk, 1),)
  elif variant == "swa":
    if window <= 0:
      raise _err("window", window, "sliding-window attention needs window >= 1")
    levels = (Level("window", window, "lowrank", d_qk, 1),)
  elif variant == "gswa":
    split = _ints("gswa_split", _get(cfg, "gswa_split", (d_qk // 2, d_qk - d_qk // 2)))
    if len(split) != 2:
      raise _err("gswa_split", split, "expected two widths a|b (global|local)")
    if window <= 0:
      raise _err("window", window, "GSWA needs window >= 1")
    combine = _get(cfg, "gswa_combine", "sum")
    if combine not in GSWA_COMBINES:
      raise _err("gswa_combine", combine, f"allowed values are {GSWA_COMBINES}")
    levels = (Level("global", 0, "lowrank", split[0], 1), Level("window", window, "lowrank", split[1], 1))
  elif variant == "mlr":
    ranks = _ints("mlr_ranks", _get(cfg, "mlr_ranks", (d_qk,)))
    if sum(ranks) != d_qk:
      raise _err("mlr_ranks", ranks, f"ranks must sum to d_qk={d_qk} (the query/key head width); "
                 f"they sum to {sum(ranks)}")
    levels = _mlr_levels(ranks, _get(cfg, "mlr_block_sizes", None), seq_len)
    scale = scale or "inverse"
  elif variant == "bilinear_mlr":
    ranks = _ints("bmlr_ranks", _get(cfg, "bmlr_ranks", (d_qk,)))
    levels = []
    for l, r in enumerate(ranks):
      p = 2 ** l
      if d_model % p:
        raise _err("bmlr_ranks", ranks, f"level {l + 1} splits d_model={d_model} into {p} blocks; "
                   f"d_model must be divisible by 2^(L-1)={2 ** (len(ranks) - 1)}")
      levels.append(Level("global", 0, "lowrank", r, p))
    levels = tuple(levels)
    norm = "per_level"
    scale = scale or "standard"
  elif variant == "bilinear_btt":
    levels = (Level("global", 0, "btt", int(_get(cfg, "btt_rank", 1)), 1),)
    norm = "per_level"
    scale = scale or "standard"
  else:  # mlbtc
    raw = _get(cfg, "levels", None)
    if not raw:
      raise _err("levels", raw, "variant='mlbtc' needs a non-empty list of levels, each a dict "
                 "with seq ('global'|'block'|'window'), size, kind ('lowrank'|'btt'), rank, blocks")
    levels = tuple(_level_from_mapping(i, m) for i, m in enumerate(raw))
    norm = _get(cfg, "norm", "per_level")
    combine = _get(cfg, "combine", "renorm")
    divide = _get(cfg, "mlr_divide", "none")
    if divide not in DIVIDES:
      raise _err("mlr_divide", divide, f"allowed values are {DIVIDES}")
  scale = scale or "mup"
  if scale not in SCALES:
    raise _err("scale", scale, f"allowed values are {SCALES}")
  if norm not in NORMS:
    raise _err("norm", norm, f"allowed values are {NORMS}")
  if combine not in GSWA_COMBINES:
    raise _err("combine", combine, f"allowed values are {GSWA_COMBINES}")

  spec = AttentionSpec(
      d_model=d_model, num_heads=num_heads, d_head=d_head, levels=levels, seq_len=seq_len,
      causal=bool(_get(cfg, "causal", True)), qk_norm=bool(_get(cfg, "qk_norm", True)),
      norm=norm, scale=scale, divide=divide, combine=combine, impl=impl,
      btt_rms_cap=bool(_get(cfg, "btt_rms_cap", True)), variant=variant)
  validate(spec)
  return spec


def validate(spec: AttentionSpec, seq_len: int | None = None) -> None:
  """Check a spec against the structural rules; raises ValueError naming the field."""
  t = spec.seq_len if seq_len is None else seq_len
  name = "mlr_block_sizes" if spec.variant == "mlr" else "levels"
  rank_name = {"mlr": "mlr_ranks", "bilinear_mlr": "bmlr_ranks", "bilinear_btt": "btt_rank"}.get(
      spec.variant, "d_qk")
  for i, lv in enumerate(spec.levels):
    if lv.rank <= 0:
      raise _err(rank_name, lv.rank, f"level {i + 1}: ranks must be positive")
    if lv.kind == "btt":
      btt_factors(spec.d_model)
    if lv.kind == "lowrank" and spec.d_model % lv.blocks:
      raise _err(f"levels[{i}].blocks", lv.blocks, f"must divide d_model={spec.d_model}")
    if lv.seq == "block":
      if lv.size <= 0:
        raise _err(name, lv.size, f"level {i + 1}: block sizes must be positive")
      if t % lv.size:
        raise _err(name, lv.size, f"level {i + 1}: seq_len T={t} must be divisible by every block "
                   f"size; allowed block sizes are the divisors of {t}")
      if lv.size < lv.rank and lv.kind == "lowrank":
        raise _err(rank_name, lv.rank, f"level {i + 1}: rank r={lv.rank} exceeds its block size "
                   f"b={lv.size}; need b_l >= r_l")
    if lv.seq == "global" and lv.kind == "lowrank" and lv.rank > t and spec.variant == "mlr":
      raise _err(rank_name, lv.rank, f"level {i + 1}: rank r={lv.rank} exceeds its block size "
                 f"b=T={t}; need b_l >= r_l")
    if lv.seq == "window" and lv.size <= 0:
      raise _err("window", lv.size, "window must be >= 1")
  blocks = [lv for lv in spec.levels if lv.seq == "block"]
  windows = [lv for lv in spec.levels if lv.seq == "window"]
  if blocks and windows:
    raise _err(name, "mixed", "a scoring function may combine block levels or window levels, not both")
  if len(windows) > 1:
    raise _err("levels", "windows", "at most one window level is supported")
  # Block levels must nest: coarse to fine, each size a multiple of the next.
  seq_order = [0 if lv.seq == "global" else (1 if lv.seq == "block" else 2) for lv in spec.levels]
  if seq_order != sorted(seq_order):
    raise _err(name, [lv.seq for lv in spec.levels], "levels must go from coarse to fine: "
               "global levels first, then blocks (decreasing) or one window")
  sizes = [lv.size for lv in blocks]
  for a, b in zip(sizes, sizes[1:]):
    if a % b:
      raise _err(name, tuple(sizes), f"blocks must nest: each size must be a multiple of the next "
                 f"({a} is not a multiple of {b})")
  if spec.combine == "sum" and not (len(spec.levels) == 2 and windows):
    raise _err("gswa_combine", "sum", "summed softmaxes are defined for global|window GSWA only")
