"""The language-model scaling study: which runs, in which order, at which learning rate.

    structattn-reproduce lm-scaling --scale=english --workdir=runs/lm-english \\
        --set data.corpus_dir=PATH --time-limit=540

The paper's LM architecture (6 layers, d_head 64, T=1024, learned positions, QK-LayerNorm,
muP AdamW(0.9, 0.95), clip 1.0, 32 x 1024 tokens per step, linear warm-up then a constant
learning rate) for the variants mha, swa (w=512), gswa (32|32, w=512, summed softmaxes) and mlr
(32|8|6|4|4|4|4|2, block divide), at five widths.  Stages, each planned from the results of
the ones before (`plan`):
  1. grid: every variant at the smallest width at each learning rate of the grid (half a
     decade apart); where a variant's best rate sits on the grid's edge, the next rate beyond
     it is added (up to `max_extensions` times);
  2. widths: the other widths but the widest, at each variant's best rate of stage 1 (muP's
     claim is that the rate transfers across width);
  3. seeds: extra seeds of `seed_variants` at `seed_width`, for the seed-to-seed spread;
  4. widest: the widest width at that rate for `long_steps` steps, and at the rates next to
     it in the stage-1 grid (half a decade below and above) for `steps` steps: a three-point
     grid that tests the transfer (with a constant rate after warm-up, the long run's first
     `steps` steps are exactly the short run, so the grid compares at equal tokens).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from structattn import sweep as sweep_lib
from structattn.configs import lm as lm_configs
from structattn.study import Point

PAPER_MLR_RANKS = (32, 8, 6, 4, 4, 4, 4, 2)


@dataclasses.dataclass(frozen=True)
class StudySpec:
  """A study's grid; `base(variant, width)` returns the run config before the overrides."""
  name: str
  variants: tuple[str, ...]
  widths: tuple[int, ...]
  lrs: tuple[float, ...]  # the grid, ascending
  steps: int  # every run but the widest chosen-rate one
  long_steps: int  # the widest width at its chosen rate
  seed_width: int
  seed_variants: tuple[str, ...]
  extra_seeds: tuple[int, ...]
  d_head: int
  # Per group, before its first step (for time estimates): compilation and the data pipeline
  # took 20-40 s for the 6-layer models on an H200.
  startup_seconds: float = 45.0
  n_boot: int = 1000  # bootstrap resamples of the analysis
  # The loss of a model that predicts from the current character alone (the train split's
  # bigram conditional entropy, nats): where a run waits until attention forms.
  plateau_loss: float | None = None
  max_extensions: int = 2
  lr_ratio: float = math.sqrt(10.0)  # between grid neighbours (extensions use it too)

  def __post_init__(self):
    if list(self.lrs) != sorted(self.lrs) or len(set(self.lrs)) != len(self.lrs):
      raise ValueError(f"study lrs={self.lrs} must be distinct and ascending")
    for w in self.widths:
      if w % self.d_head:
        raise ValueError(f"study width {w} is not a multiple of d_head={self.d_head}")
    if self.seed_width not in self.widths:
      raise ValueError(f"study seed_width={self.seed_width} not in widths={self.widths}")


def _english_base(variant: str, width: int) -> ml_collections.ConfigDict:
  c = lm_configs.paper(variant, width)
  c.data.update(corpus="english", val_fraction=0.03)
  if variant == "mlr":
    c.attention.impl = "mosaic"  # the fused MLR kernel on a GPU (XLA elsewhere)
  # Learned positions start from the sinusoidal table (the paper draws them from
  # N(0, 0.02^2); `--set model.pos_init=normal` restores that).  Measured on the English
  # corpus (docs/results.md): from a random table every variant waits near the bigram loss
  # until attention learns where the neighbouring characters are; the sinusoidal start
  # shortens that wait, a shorter warm-up does not.
  c.model.pos_init = "sinusoidal"
  c.train.update(warmup_steps=150)
  # The speed options of the training step (docs/performance.md: 1.33x the step rate of the
  # default step at 6 layers x 256 on an H200): one flat Adam update, the cross-entropy
  # without a float32 copy of the logits, and the residual stream in the compute dtype.
  c.train.update(fused_optimizer=True, fused_xent=True)
  c.model.residual_dtype = "compute"
  # Every validation sequence (4,416 of 1,024 characters) at each eval: standard error of the
  # mean loss below 0.003 nats.  Evals every 382 steps: 8 points per 100M-token run.
  c.eval.update(batches=0, batch_size=64)
  c.eval_every = 382
  c.log_every = 50
  c.checkpoint_every = 764
  c.keep_checkpoints = 1
  c.progress = False
  return c


def _mini_base(variant: str, width: int) -> ml_collections.ConfigDict:
  c = lm_configs.get_config(f"tiny-{variant}")
  c.model.update(num_layers=2, seq_len=64)
  c.attention.update(mlr_ranks=(8, 4, 2, 2), window=16, gswa_split=(8, 8))
  c.train.update(batch_size=8, warmup_steps=4)
  c.eval.update(batches=2, batch_size=8)
  c.eval_every = 6
  c.log_every, c.checkpoint_every = 3, 12
  c.keep_checkpoints = 1
  c.progress = False
  return c


SPECS = {
    # 100M tokens per run (3,056 steps of 32,768), the widest 250M (7,640 steps).
    "english": StudySpec(
        name="english", variants=("mha", "swa", "gswa", "mlr"),
        widths=(128, 256, 384, 512, 768), lrs=(3.16e-4, 1e-3, 3.16e-3, 1e-2), steps=3056,
        long_steps=7640, seed_width=256, seed_variants=("mha", "mlr"), extra_seeds=(1, 2),
        d_head=64, plateau_loss=2.6614),
    # A CPU miniature of the same stages (tests and pipeline checks).
    "mini": StudySpec(
        name="mini", variants=("mha", "mlr"), widths=(32, 64), lrs=(3e-3, 1e-2), steps=12,
        long_steps=18, seed_width=32, seed_variants=("mha", "mlr"), extra_seeds=(1,),
        d_head=16, max_extensions=0, startup_seconds=5.0, n_boot=50),
}
BASES = {"english": _english_base, "mini": _mini_base}


def spec_for(scale: str) -> StudySpec:
  if scale not in SPECS:
    raise ValueError(f"--scale={scale!r} is invalid for the LM study: allowed values are "
                     f"{sorted(SPECS)}")
  return SPECS[scale]


def point(spec: StudySpec, variant: str, width: int, lr: float, steps: int, seed: int = 0,
          overrides: dict | None = None) -> Point:
  """(name, config) of one run of the study."""
  o = {"attention.variant": variant, "model.d_model": width,
       "attention.num_heads": width // spec.d_head, "train.lr": float(lr),
       "train.steps": int(steps), "seed": int(seed)}
  config = BASES[spec.name](variant, width)
  config = sweep_lib.apply_overrides(config, dict(overrides or {}))
  return sweep_lib.point_name(o), sweep_lib.apply_overrides(config, o)


def final_loss(runs: Path, name: str) -> float | None:
  """A completed run's final eval loss (None while it is not completed)."""
  try:
    result = json.loads((runs / name / "result.json").read_text())
  except (OSError, ValueError):
    return None
  if result.get("status") != "completed":
    return None
  v = result.get("final/eval_loss")
  return float(v) if isinstance(v, (int, float)) and math.isfinite(float(v)) else math.inf


def _grid(spec: StudySpec, runs: Path, variant: str, width: int, steps: int, overrides):
  """The grid's points for one variant and width (extended past an edge that wins), and the
  best rate once every point of it has finished (else None)."""
  lrs = list(spec.lrs)
  for _ in range(spec.max_extensions + 1):
    pts = [point(spec, variant, width, lr, steps, overrides=overrides) for lr in lrs]
    losses = [final_loss(runs, n) for n, _ in pts]
    if any(v is None for v in losses):
      return pts, None
    best = min(range(len(lrs)), key=lambda i: losses[i])
    if len(lrs) - len(spec.lrs) >= spec.max_extensions or 0 < best < len(lrs) - 1:
      return pts, lrs[best]
    lrs = ([lrs[0] / spec.lr_ratio] + lrs) if best == 0 else (lrs + [lrs[-1] * spec.lr_ratio])
    lrs = [float(f"{lr:.3g}") for lr in lrs]
  return pts, None  # not reached


def plan(spec: StudySpec, runs: Path, overrides: dict | None = None) -> list[list[Point]]:
  """The study's stages as far as the finished runs determine them (see module docstring)."""
  runs = Path(runs)
  small, widest = spec.widths[0], spec.widths[-1]
  grid, chosen = [], {}
  for v in spec.variants:
    pts, best = _grid(spec, runs, v, small, spec.steps, overrides)
    grid += pts
    if best is not None:
      chosen[v] = best
  stages = [grid]
  if len(chosen) < len(spec.variants):
    return stages
  stages.append([point(spec, v, w, chosen[v], spec.steps, overrides=overrides)
                 for w in spec.widths[1:-1] for v in spec.variants])
  steps_at = spec.long_steps if spec.seed_width == widest else spec.steps
  stages.append([point(spec, v, spec.seed_width, chosen[v], steps_at, seed=s,
                       overrides=overrides)
                 for v in spec.seed_variants for s in spec.extra_seeds])
  widest_pts = []
  for v in spec.variants:
    widest_pts.append(point(spec, v, widest, chosen[v], spec.long_steps, overrides=overrides))
    widest_pts += [point(spec, v, widest, lr, spec.steps, overrides=overrides)
                   for lr in neighbour_lrs(spec, runs, v, chosen[v], overrides)]
  stages.append(widest_pts)
  return stages


def neighbour_lrs(spec: StudySpec, runs: Path, variant: str, chosen: float,
                  overrides: dict | None = None) -> list[float]:
  """The rates next to `chosen` in the variant's (extended) grid at the smallest width: with
  the chosen rate itself, the widest width's grid, which tests muP's transfer of the rate."""
  pts, _ = _grid(spec, Path(runs), variant, spec.widths[0], spec.steps, overrides)
  lrs = sorted({float(c.train.lr) for _, c in pts})
  i = lrs.index(float(chosen))
  return lrs[max(i - 1, 0):i] + lrs[i + 1:i + 2]


def chosen_lrs(spec: StudySpec, runs: Path, overrides: dict | None = None) -> dict[str, float]:
  """Each variant's best learning rate at the smallest width (once its grid has finished)."""
  out = {}
  for v in spec.variants:
    _, best = _grid(spec, Path(runs), v, spec.widths[0], spec.steps, overrides)
    if best is not None:
      out[v] = best
  return out


def flops_of(config: ml_collections.ConfigDict) -> float:
  """A run's training FLOPs (6 x forward MACs, attention and LM head included)."""
  from structattn import flops as flops_lib
  from structattn.models.gpt import GPTConfig
  vocab = 96
  cfg = GPTConfig.from_config(config, vocab)
  per_token = flops_lib.model_flops(cfg.specs, cfg.d_model, cfg.d_mlp, vocab)
  tokens = float(config.train.steps) * config.train.batch_size * config.model.seq_len
  return per_token["train_flops_per_token"] * tokens


def points(spec: StudySpec, runs: Path, overrides: dict | None = None) -> Sequence[Point]:
  return [p for stage in plan(spec, runs, overrides) for p in stage]


ROW_FIELDS = ("attention.variant", "model.d_model", "attention.num_heads", "train.lr",
              "train.steps", "train.warmup_steps", "train.batch_size", "model.seq_len", "seed",
              "data.corpus", "data.val_fraction", "attention.impl", "model.pos_init",
              "model.residual_dtype", "train.fused_optimizer", "train.fused_xent")
RESULT_FIELDS = ("status", "final/eval_loss", "final/eval_loss_sem", "params/non_embedding",
                 "compute/paper_macs", "compute/paper_macs_per_token", "compute/train_flops",
                 "tokens", "wall_time_s", "device")


def export_rows(runs: Path) -> list[dict]:
  """One compact row per finished run under `runs` (config fields, results, the eval curve
  and the logged train loss; no checkpoints), for `docs/data` and notebooks."""
  from structattn.study import finished_rows
  out = []
  for row, metrics in finished_rows(runs):
    out.append({
        "run": row["run"], **{k: row.get(k) for k in ROW_FIELDS + RESULT_FIELDS},
        "eval": [[m["step"], m.get("compute/paper_macs"), m["eval/loss"], m.get("eval/loss_sem")]
                 for m in metrics if "eval/loss" in m],
        "train": [[m["step"], round(float(m["train/loss"]), 4)] for m in metrics
                  if "train/loss" in m],
        "tokens_per_s": _median([m["throughput/tokens_per_s"] for m in metrics[1:]
                                 if "throughput/tokens_per_s" in m]),
    })
  return out


def _median(values):
  values = sorted(values)
  return values[len(values) // 2] if values else None
