"""Factorisation rules for structured matrices."""

from __future__ import annotations

import math


def btt_factors(d: int) -> tuple[int, int]:
  """D = a * b with b the smallest divisor of D strictly greater than sqrt(D).

  16 -> (2, 8), 64 -> (4, 16), 256 -> (8, 32), 768 -> (24, 32), 1024 -> (16, 64).
  Raises for D < 4 or D prime (no non-trivial factorisation).
  """
  if d < 4:
    raise ValueError(f"attention.d_model={d!r} is invalid: BTT needs d_model >= 4 with a "
                     "non-trivial factorisation a*b")
  root = math.isqrt(d)
  for b in range(root + 1, d):
    if d % b == 0:
      return d // b, b
  raise ValueError(f"attention.d_model={d!r} is invalid: BTT needs d_model = a*b with "
                   "1 < a <= b < d_model (a prime width cannot be factorised)")
