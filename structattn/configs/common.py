"""Config sections shared by every task: attention, mesh/sharding, and the run cadence.

Every task's config has the same shape: `task`, `seed`, `model`, `attention`, `data` (or the
task's own data section), `train`, `eval`, `mesh`, `sharding` and the top-level cadence keys
`log_every`, `eval_every`, `checkpoint_every`, `keep_checkpoints`, `progress`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from structattn import sharding

# Every key `structattn.attention.spec.from_config` reads, with the LM defaults.  Named
# variants (mha, swa, gswa, mlr, bilinear_mlr, bilinear_btt) read the keys of their own
# family; variant='mlbtc' reads `levels` (a tuple of dicts with seq, size, kind, rank,
# blocks), `norm`, `combine` and `mlr_divide`.
ATTENTION_DEFAULTS: dict[str, Any] = dict(
    variant="mha",
    num_heads=4,
    d_head=0,  # 0: d_model // num_heads
    d_qk=0,  # 0: d_head
    qk_norm=True,
    scale="",  # '' = the variant's default: mup | standard | inverse
    causal=True,
    impl="auto",
    window=512,  # swa / gswa
    gswa_split=(32, 32),
    gswa_combine="sum",
    mlr_ranks=(32, 8, 6, 4, 4, 4, 4, 2),
    mlr_block_sizes=(),  # () = T / 2^(l-1)
    mlr_divide="block",  # mlr / mlbtc: none | block | levels
    bmlr_ranks=(8, 8, 8, 8),
    btt_rank=1,
    btt_rms_cap=True,
    levels=(),  # mlbtc
    norm="per_level",  # mlbtc: joint | per_level | none
    combine="renorm",  # mlbtc with a window level: renorm | sum
)


def attention(variant: str = "mha", **overrides: Any) -> ml_collections.ConfigDict:
  """The attention section: every key the attention spec reads, `overrides` applied."""
  unknown = set(overrides) - set(ATTENTION_DEFAULTS)
  if unknown:
    raise KeyError(f"unknown attention keys {sorted(unknown)}: valid keys are "
                   f"{sorted(ATTENTION_DEFAULTS)}")
  return ml_collections.ConfigDict({**ATTENTION_DEFAULTS, **overrides, "variant": variant})


def add_mesh(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Add the scale-out sections (docs/scaling-out.md): mesh sizes data/fsdp/tensor (-1 = the
  rest of the devices; all 1 = one device, unsharded), `devices` = use only the first n
  devices (0 = all), and the logical axis rules (`structattn.sharding.DEFAULT_RULES`)."""
  c.mesh, c.sharding = sharding.config_sections()
  return c

