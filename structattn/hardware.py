"""Peak accelerator throughput, for model-FLOPs utilisation (MFU).

    peak_flops(jax.devices()[0])   # dense bf16 FLOP/s of one chip, or None when unknown

Keyed by `device.device_kind` (case-insensitive substring match, most specific first).
Dense (no sparsity) bf16 peaks from the vendors' data sheets.
"""

from __future__ import annotations

# (substrings that must all occur in device_kind, dense bf16 FLOP/s per chip); first match wins.
PEAK_BF16: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h100", "pcie"), 756e12),
    (("h100",), 989e12),  # SXM
    (("h200",), 989e12),
    (("a100",), 312e12),
    (("b200",), 2.25e15),
    (("tpu", "v4"), 275e12),
    (("tpu", "v5 lite"), 197e12),  # v5e reports itself as 'TPU v5 lite'
    (("tpu", "v5e"), 197e12),
    (("tpu", "v5p"), 459e12),
    (("tpu", "v5"), 459e12),  # v5p reports itself as 'TPU v5'
    (("tpu", "v6"), 918e12),  # v6e ('TPU v6 lite')
)


def peak_flops(device) -> float | None:
  """Dense bf16 peak FLOP/s of one `device` (a jax Device or anything with `device_kind`),
  or None for an unknown kind (CPU, cards not in `PEAK_BF16`)."""
  kind = str(getattr(device, "device_kind", "") or "").lower()
  if not kind:
    return None
  for parts, peak in PEAK_BF16:
    if all(p in kind for p in parts):
      return peak
  return None
