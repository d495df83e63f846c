"""Structured attention: specs, feature structures, cores and the attention layer."""

from structattn.attention.core import Pattern, attention
from structattn.attention.features import BTTFeatures, LowRankFeatures, register_feature
from structattn.attention.layer import Attention, pattern_of
from structattn.attention.spec import AttentionSpec, Level, from_config, scale_for_width

__all__ = [
    "Attention", "AttentionSpec", "BTTFeatures", "Level", "LowRankFeatures", "Pattern",
    "attention", "from_config", "pattern_of", "register_feature", "scale_for_width",
]
