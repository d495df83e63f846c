"""The score pattern of a structured attention layer: a leaf module every core imports.

A `Pattern` lists levels coarse to fine, each with a sequence extent (global / block of
size b / causal band of width w) and a feature width.  Because the extents nest, a pair
(i, j) uses exactly the *prefix* q_i[:d] . k_j[:d] of the concatenated features, with d
the cumulative width up to its deepest shared level.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Pattern:
  """Score pattern: per level (seq in global|block|window, size, width), coarse to fine."""
  seqs: tuple[str, ...]
  sizes: tuple[int, ...]
  widths: tuple[int, ...]
  causal: bool = True
  divide: str = "none"  # none | block | levels
  combine: str = "renorm"  # renorm | sum (global|window only)

  @property
  def prefix(self) -> tuple[int, ...]:
    return tuple(int(x) for x in np.cumsum(self.widths))

  def level_divisor(self, l: int) -> float:
    """Score divisor for a pair whose deepest shared level is l (0-based)."""
    if self.divide == "block":
      return float(l + 1)
    if self.divide == "levels":
      return float(len(self.widths))
    return 1.0


def pattern_of(spec) -> Pattern:
  """The score pattern of an `AttentionSpec`."""
  return Pattern(
      seqs=tuple(lv.seq for lv in spec.levels), sizes=tuple(lv.size for lv in spec.levels),
      widths=spec.widths, causal=spec.causal, divide=spec.divide, combine=spec.combine)
