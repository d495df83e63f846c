"""The in-context regression task for the shared training loop (config.task = 'icr').

    structattn-train --config=icr:tiny --workdir=runs/icr

Training prompts are drawn on device inside the compiled step: the batch at step t is a pure
function of (seed, t), so many steps run per call (`train.steps_per_call`) and vmapped
members (`train.train_group`) draw their own prompts.  The curriculum is applied by masking:
prompts always have the final N and d, coordinates beyond the current d are zero, and the
loss covers only the first N(t) points.  With causal attention a point never sees later
ones, so this equals training on prompts truncated to N(t) (at the full length's compute).

Held-out metrics (`eval/last_point_se`, `eval/mse`, `eval/se_by_position`) are scored on a
fixed set from its own seed (`eval.seed`), never on a training batch; the baselines (least
squares, ridge, k-NN, averaging, zero) are scored on the same prompts into result.json.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from structattn import flops as flops_lib
from structattn.icr import baselines as baselines_lib
from structattn.icr import task as task_lib
from structattn.icr.model import ICRModel, icr_loss, icr_specs
from structattn.tasks import TaskSetup, mean_and_sem, train_steps


def icr_fields(config: ml_collections.ConfigDict) -> dict:
  """The task section, validated: d_input, n_points (default 2 d), curriculum, noise, pool."""
  ic = config.icr
  d = int(ic.d_input)
  if d <= 0:
    raise ValueError(f"icr.d_input={ic.d_input!r} is invalid: must be a positive integer")
  n = int(ic.get("n_points", 0) or 2 * d)
  d_start = min(int(ic.get("d_start", 4)), d)
  n_start = min(int(ic.get("n_start", 8)), n)
  if d_start <= 0 or n_start <= 0:
    raise ValueError(f"icr.d_start={d_start} and icr.n_start={n_start} must be positive")
  pool = int(ic.get("pool_size", 0) or 0)
  if pool < 0:
    raise ValueError(f"icr.pool_size={pool} is invalid: 0 (fresh prompts) or a positive size")
  return dict(d_input=d, n_points=n, d_start=d_start, n_start=n_start,
              every=int(ic.get("curriculum_every", 2000)),
              end_fraction=float(ic.get("curriculum_end", 0.06)),
              noise_std=float(ic.get("noise_std", 0.0)), pool_size=pool or None)


def model_specs(config: ml_collections.ConfigDict, f: dict):
  """The attention spec of each layer of the model `config` describes (`icr_fields` f)."""
  m = config.model
  return icr_specs(config.attention.to_dict(), int(m.d_model), int(m.num_layers),
                   2 * f["n_points"], m.get("attention_pattern", ""))


def build_model(config: ml_collections.ConfigDict, f: dict) -> ICRModel:
  m = config.model
  specs = model_specs(config, f)
  return ICRModel(f["d_input"], f["n_points"], int(m.d_model), int(m.num_layers),
                  rngs=nnx.Rngs(int(config.seed)), specs=specs,
                  d_mlp=int(m.get("mlp_ratio", 4)) * int(m.d_model))


def batch_fn(seed, step, *, f: dict, batch_size: int, total_steps: int):
  """The training batch at `step` of member `seed`, with the curriculum's point mask."""
  d_active, n_active = task_lib.curriculum_traced(
      step, total_steps, f["d_start"], f["d_input"], f["n_start"], f["n_points"], f["every"],
      f["end_fraction"])
  b = task_lib.sample_batch(seed, step, batch_size, f["n_points"], f["d_input"], d_active,
                            f["noise_std"], f["pool_size"])
  mask_BN = jnp.broadcast_to(jnp.arange(f["n_points"]) < n_active, b["y_BN"].shape)
  return {"x_BNI": b["x_BNI"], "y_BN": b["y_BN"], "mask_BN": mask_BN.astype(jnp.float32)}


def loss(params, graphdef, rest, batch) -> jax.Array:
  """Mean squared error over the active (curriculum) points of every prompt."""
  pred_BN = nnx.merge(graphdef, params, rest)(batch["x_BNI"], batch["y_BN"])
  return icr_loss(pred_BN, batch["y_BN"], batch["mask_BN"])


def eval_metrics(params, graphdef, rest, batch) -> dict:
  pred_BN = nnx.merge(graphdef, params, rest)(batch["x_BNI"], batch["y_BN"])
  return {"se": jnp.square(pred_BN.astype(jnp.float32) - batch["y_BN"])}


def summarize(arrays: dict, prefix: str = "eval") -> dict:
  """Squared error at the last point (mean and SEM over prompts), overall and per position."""
  se_BN = np.asarray(arrays["se"], np.float64)
  last, last_sem = mean_and_sem(se_BN[:, -1])
  return {f"{prefix}/last_point_se": last, f"{prefix}/last_point_se_sem": last_sem,
          f"{prefix}/mse": float(se_BN.mean()),
          f"{prefix}/se_by_position": [round(float(v), 6) for v in se_BN.mean(axis=0)],
          f"{prefix}/prompts": int(se_BN.shape[0])}


@functools.lru_cache(maxsize=16)
def baseline_errors(eval_seed: int, num: int, n_points: int, d: int, noise_std: float) -> dict:
  """Each baseline's last-point and per-position squared error on the held-out prompts."""
  es = task_lib.eval_set(eval_seed, num, n_points, d, noise_std=noise_std)
  x, y = np.asarray(es["x_BNI"]), np.asarray(es["y_BN"])
  out = {}
  for name, fn in (("least_squares", baselines_lib.least_squares),
                   ("ridge", baselines_lib.ridge), ("knn", baselines_lib.knn),
                   ("averaging", baselines_lib.averaging), ("zero", baselines_lib.zero)):
    se_N = baselines_lib.squared_errors(fn(x, y), y)
    out[f"baseline/{name}/last_point_se"] = float(se_N[-1])
    out[f"baseline/{name}/se_by_position"] = [round(float(v), 6) for v in se_N]
  return out


def icr_flops(specs, d_model: int, d_mlp: int, n_points: int) -> tuple[float, float]:
  """(paper MACs, train FLOPs) per prompt: forward non-embedding MACs at the full length 2N
  (read-in/out excluded, as the LM excludes embeddings and head); 6x forward MACs incl.
  read-in/out for the true training FLOPs."""
  t = 2 * n_points
  fl = flops_lib.model_flops(specs, d_model, d_mlp, vocab_size=1, T=t)
  return fl["paper_macs_per_token"] * t, fl["train_flops_per_token"] * t


def build(config: ml_collections.ConfigDict) -> TaskSetup:
  f = icr_fields(config)
  model = build_model(config, f)
  ec = config.eval
  eb = int(ec.get("batch_size", 1024))
  num = int(ec.get("batches", 1)) * eb  # held-out prompts
  es = task_lib.eval_set(int(ec.get("seed", 1234)), num, f["n_points"], f["d_input"],
                         noise_std=f["noise_std"])
  eval_batches = [{k: es[k][i:i + eb] for k in ("x_BNI", "y_BN")} for i in range(0, num, eb)]
  specs = tuple(b.attn.spec for b in model.blocks)
  d_model = int(config.model.d_model)
  d_mlp = int(config.model.get("mlp_ratio", 4)) * d_model
  paper_macs, train_flops = icr_flops(specs, d_model, d_mlp, f["n_points"])
  steps = train_steps(config, paper_macs * int(config.train.batch_size))  # the curriculum's
  params = nnx.state(model, nnx.Param)
  total = sum(int(x.size) for x in jax.tree.leaves(params))
  emb = sum(int(x.size) for x in jax.tree.leaves(nnx.state(model.read_in, nnx.Param)))
  emb += int(model.pos.size)
  info = {"params/total": total, "params/non_embedding": total - emb,
          "compute/paper_macs_per_prompt": paper_macs,
          "compute/train_flops_per_prompt": train_flops,
          "icr/d_input": f["d_input"], "icr/n_points": f["n_points"]}
  if ec.get("baselines", True):
    info.update(baseline_errors(int(ec.get("seed", 1234)), num, f["n_points"], f["d_input"],
                                f["noise_std"]))
  return TaskSetup(
      model=model, loss=loss, eval_metrics=eval_metrics, summarize=summarize,
      eval_batches=eval_batches,
      batch_fn=functools.partial(batch_fn, f=f, batch_size=int(config.train.batch_size),
                                 total_steps=steps),
      units_per_step=int(config.train.batch_size), unit="prompts",
      paper_macs_per_unit=paper_macs, train_flops_per_unit=train_flops,
      final={"eval/last_point_se": "final/eval_last_point_se",
             "eval/last_point_se_sem": "final/eval_last_point_se_sem",
             "eval/mse": "final/eval_mse"},
      info=info)
