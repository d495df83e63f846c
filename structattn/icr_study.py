"""The in-context regression study: which runs, in which order.

    structattn-reproduce icr-study --scale=gpu --workdir=runs/icr-study \\
        --time-limit=540 --archive=runs/icr-study.tar.gz

The paper's ICR model and task (`icr:paper-<variant>-<d>-<D>`: 6 pre-LN layers, N = 2d,
batch 64, the d/N curriculum, warm-up then a constant rate, AdamW(0.9, 0.95), muP with base
width 64), run through `structattn.study` so that the study proceeds over independent
invocations under a time limit and keeps every finished run.  Two stages (`plan`):
  1. compute, finding (b): at d_input 32, MHA (8 heads), bilinear BTT (8 heads) and bilinear
     MLR (the preset's ranks for the width) at each width; per (variant, width) a grid of
     learning rates half a decade apart around the preset's rate, each at every seed.  The
     members of one (variant, width) differ only in seed and rate, so they train as one
     vmapped group;
  2. head dim, finding (a): at d_input 64, MHA at one width with the number of heads varied so
     that the head dim r = D / heads crosses d_input (the seeds of `icr:sweep-head-dim-paper`).
The compute stage comes first: its groups are the bulk of the study and nothing in the
head-dim stage depends on it, so a short invocation left after it still runs head-dim points
(`run_study` goes on to a later stage when a group does not fit).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from structattn import sweep as sweep_lib
from structattn.configs import icr as icr_configs
from structattn.study import Point

COMPUTE, HEAD_DIM = "compute", "head_dim"  # the stages, in order


@dataclasses.dataclass(frozen=True)
class ICRStudySpec:
  """A study's grid; `base(variant, d_input, width)` returns a run config before overrides."""
  name: str
  # Finding (b): error against compute.
  d_input: int
  variants: tuple[str, ...]
  widths: tuple[int, ...]
  num_heads: int  # MHA and bilinear BTT (bilinear MLR's heads come from its ranks)
  lrs: tuple[float, ...]  # ascending
  seeds: tuple[int, ...]
  steps: int
  # Finding (a): MHA error against head dim.
  head_dim_d_input: int
  head_dim_width: int
  head_dim_heads: tuple[int, ...]  # descending heads: ascending head dim
  head_dim_seeds: tuple[int, ...]
  head_dim_lr: float
  head_dim_steps: int
  eval_every: int
  # Per group, before its first step (for time estimates): compilation and the eval set.
  startup_seconds: float = 60.0

  def __post_init__(self):
    if list(self.lrs) != sorted(self.lrs) or len(set(self.lrs)) != len(self.lrs):
      raise ValueError(f"study lrs={self.lrs} must be distinct and ascending")
    for h in self.head_dim_heads:
      if self.head_dim_width % h:
        raise ValueError(f"study head_dim_heads {h} does not divide head_dim_width="
                         f"{self.head_dim_width}")
    for w in self.widths:
      if w % self.num_heads:
        raise ValueError(f"study width {w} is not a multiple of num_heads={self.num_heads}")

  def head_dims(self) -> tuple[int, ...]:
    return tuple(self.head_dim_width // h for h in self.head_dim_heads)


def _gpu_base(variant: str, d_input: int, width: int, spec: ICRStudySpec
              ) -> ml_collections.ConfigDict:
  c = icr_configs.paper(variant, d_input, width)
  c.eval_every = spec.eval_every
  c.progress = False
  # One checkpoint of a run in flight: the archive keeps no checkpoints, so older ones would
  # only take disk.
  c.keep_checkpoints = 1
  return c


def _mini_base(variant: str, d_input: int, width: int, spec: ICRStudySpec
               ) -> ml_collections.ConfigDict:
  c = icr_configs.with_variant(icr_configs.base_config(), variant)
  c.model.update(d_model=width, num_layers=1)
  c.icr.update(d_input=d_input, d_start=2, n_start=4, curriculum_every=2)
  c.attention.bmlr_ranks = (2, 2)
  c.train.update(batch_size=8, warmup_steps=2, steps_per_call=2)
  c.eval.update(batches=1, batch_size=32)
  c.eval_every = spec.eval_every
  c.log_every, c.checkpoint_every = 2, 10
  c.keep_checkpoints = 1
  c.progress = False
  return c


SPECS = {
    # Finding (b) at the paper's d_input 32 and finding (a) at d_input 64, 50,000 steps each
    # (a tenth of the paper's 500,000, past the curriculum's end at 6% by far).  The rates
    # are half a decade either side of the preset's 1e-3 (tuned at the muP base width 64).
    "gpu": ICRStudySpec(
        name="gpu", d_input=32, variants=icr_configs.VARIANTS, widths=(64, 128, 256, 512),
        num_heads=8, lrs=(3.16e-4, 1e-3, 3.16e-3), seeds=(0, 1), steps=50_000,
        head_dim_d_input=64, head_dim_width=256, head_dim_heads=(64, 32, 16, 8, 4, 2),
        head_dim_seeds=(0,), head_dim_lr=1e-3, head_dim_steps=50_000, eval_every=2500),
    # A CPU miniature of the same stages (tests and pipeline checks): seconds.
    "mini": ICRStudySpec(
        name="mini", d_input=4, variants=icr_configs.VARIANTS, widths=(16,), num_heads=2,
        lrs=(1e-3, 3.16e-3), seeds=(0,), steps=10, head_dim_d_input=4, head_dim_width=16,
        head_dim_heads=(4, 1), head_dim_seeds=(0,), head_dim_lr=1e-3, head_dim_steps=10,
        eval_every=2, startup_seconds=3.0),
}
BASES = {"gpu": _gpu_base, "mini": _mini_base}


def spec_for(scale: str) -> ICRStudySpec:
  if scale not in SPECS:
    raise ValueError(f"--scale={scale!r} is invalid for the ICR study: allowed values are "
                     f"{sorted(SPECS)}")
  return SPECS[scale]


def point(spec: ICRStudySpec, variant: str, d_input: int, width: int, num_heads: int,
          lr: float, steps: int, seed: int = 0, overrides: dict | None = None,
          name_heads: bool = False) -> Point:
  """(name, config) of one run of the study; `name_heads` puts the head count in the name
  (the head-dim stage varies it)."""
  o = {"icr.d_input": int(d_input), "attention.variant": variant, "model.d_model": int(width)}
  if name_heads:
    o["attention.num_heads"] = int(num_heads)
  o.update({"train.lr": float(lr), "train.steps": int(steps), "seed": int(seed)})
  config = BASES[spec.name](variant, int(d_input), int(width), spec)
  config = sweep_lib.apply_overrides(config, dict(overrides or {}))
  config = sweep_lib.apply_overrides(config, {**o, "attention.num_heads": int(num_heads)})
  return sweep_lib.point_name(o), config


def compute_points(spec: ICRStudySpec, overrides: dict | None = None) -> list[Point]:
  """Finding (b): every (variant, width) at every rate and seed, grouped by (variant, width)."""
  return [point(spec, v, spec.d_input, w, spec.num_heads, lr, spec.steps, seed=s,
                overrides=overrides)
          for v, w in itertools.product(spec.variants, spec.widths)
          for lr, s in itertools.product(spec.lrs, spec.seeds)]


def head_dim_points(spec: ICRStudySpec, overrides: dict | None = None) -> list[Point]:
  """Finding (a): MHA at one width and d_input, one point per head count and seed."""
  return [point(spec, "mha", spec.head_dim_d_input, spec.head_dim_width, h, spec.head_dim_lr,
                spec.head_dim_steps, seed=s, overrides=overrides, name_heads=True)
          for h in spec.head_dim_heads for s in spec.head_dim_seeds]


def plan(spec: ICRStudySpec, runs: Path, overrides: dict | None = None) -> list[list[Point]]:
  """The study's stages (see module docstring); neither depends on finished runs."""
  del runs  # the grid is fixed in advance: every rate of it is part of finding (b)'s data
  return [compute_points(spec, overrides), head_dim_points(spec, overrides)]


def stage_names(spec: ICRStudySpec, overrides: dict | None = None) -> dict[str, set[str]]:
  """{stage: names of its runs}, for analysing each finding on its own runs."""
  return {COMPUTE: {n for n, _ in compute_points(spec, overrides)},
          HEAD_DIM: {n for n, _ in head_dim_points(spec, overrides)}}


def flops_of(config: ml_collections.ConfigDict) -> float:
  """A run's training FLOPs (6 x forward MACs per prompt, read-in/out included, at the full
  prompt length 2N; the curriculum's shorter early prompts are not discounted)."""
  from structattn.icr import train as icr_train
  f = icr_train.icr_fields(config)
  d_model = int(config.model.d_model)
  d_mlp = int(config.model.get("mlp_ratio", 4)) * d_model
  specs = icr_train.model_specs(config, f)
  _, per_prompt = icr_train.icr_flops(specs, d_model, d_mlp, f["n_points"])
  return per_prompt * float(config.train.batch_size) * float(config.train.steps)


def points(spec: ICRStudySpec, runs: Path, overrides: dict | None = None) -> Sequence[Point]:
  return [p for stage in plan(spec, runs, overrides) for p in stage]


ROW_FIELDS = ("icr.d_input", "attention.variant", "model.d_model", "attention.num_heads",
              "attention.bmlr_ranks", "model.num_layers", "train.lr", "train.steps",
              "train.batch_size", "seed")
RESULT_FIELDS = ("status", "final/eval_last_point_se", "final/eval_last_point_se_sem",
                 "final/eval_mse", "params/non_embedding", "compute/paper_macs_per_prompt",
                 "compute/train_flops_per_prompt", "wall_time_s", "device")


def export_rows(runs: Path) -> list[dict]:
  """One compact row per finished run under `runs`: config fields, results, the baselines'
  last-point errors and the eval curve [step, forward MACs, last-point SE, its s.e.m.]."""
  from structattn.study import finished_rows
  out = []
  for row, metrics in finished_rows(runs):
    out.append({
        "run": row["run"], **{k: row.get(k) for k in ROW_FIELDS + RESULT_FIELDS},
        "baselines": {k.split("/")[1]: row[k] for k in row
                      if k.startswith("baseline/") and k.endswith("/last_point_se")},
        "eval": [[m["step"], m.get("compute/paper_macs"), m["eval/last_point_se"],
                  m.get("eval/last_point_se_sem")]
                 for m in metrics if _finite(m.get("eval/last_point_se"))],
    })
  return out


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(float(v))
