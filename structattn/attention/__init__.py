"""Structured attention: specs, feature structures, cores and the attention layer.

Modules, leaves first: `spec` (validated specs), `pattern` (the score pattern),
`mlr_tiling` and `kernel_config` (the fused kernels' shared tiling plan and configuration),
`core` (XLA cores), `pallas_mlr` / `mosaic_mlr` (fused MLR kernels), `dispatch` (which
implementation serves a call; `resolved_impl`), `features`, `layer` (the `Attention`
module) and `decode` (KV-cache decoding).
"""

from structattn.attention.dispatch import attention, resolved_impl
from structattn.attention.features import BTTFeatures, LowRankFeatures, register_feature
from structattn.attention.layer import Attention
from structattn.attention.pattern import Pattern, pattern_of
from structattn.attention.spec import AttentionSpec, Level, from_config, scale_for_width

__all__ = [
    "Attention", "AttentionSpec", "BTTFeatures", "Level", "LowRankFeatures", "Pattern",
    "attention", "from_config", "pattern_of", "register_feature", "resolved_impl",
    "scale_for_width",
]
