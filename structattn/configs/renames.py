"""Older config keys, rewritten to the current ones.

Run directories written before the config keys were unified keep their `config.json`;
`migrate` rewrites such a config (and a config built in code with the older keys) so that
results, sampling and resuming read one shape.  A config already in the current shape is
returned unchanged.

| older key | current key | tasks |
|---|---|---|
| `eval.every` | `eval_every` (top level, beside `log_every` and `checkpoint_every`) | all |
| `data.data_dir` | `data.tfds_dir` (where TFDS datasets are prepared, as in forecasting) | lm |
| `eval.num_prompts` | `eval.batches` (batches of `eval.batch_size`, as in the LM) | icr |
| `model.d_mlp` | `model.mlp_ratio` (MLP width / `model.d_model`, as in LM and ICR) | forecast |
"""

from __future__ import annotations

import copy
import math
from typing import Any

RENAMES = (("eval.every", "eval_every", None), ("data.data_dir", "data.tfds_dir", "lm"),
           ("eval.num_prompts", "eval.batches", "icr"), ("model.d_mlp", "model.mlp_ratio",
                                                         "forecast"))


def _has(d, section: str, key: str) -> bool:
  s = d.get(section) if hasattr(d, "get") else None
  return s is not None and hasattr(s, "keys") and key in s.keys()


def needs_migration(config: Any) -> bool:
  task = config.get("task", "lm")
  return any(_has(config, *old.split(".")) for old, _, t in RENAMES if t in (None, task))


def migrate_dict(d: dict) -> dict:
  """The current-shape copy of a plain config dict (see the module docstring)."""
  d = copy.deepcopy(d)
  task = d.get("task", "lm")
  ev, data, model = d.get("eval") or {}, d.get("data") or {}, d.get("model") or {}
  if "every" in ev:
    d["eval_every"] = ev.pop("every")
  if task == "lm" and "data_dir" in data:
    old = data.pop("data_dir")
    data["tfds_dir"] = old if old or "tfds_dir" not in data else data["tfds_dir"]
  if task == "icr" and "num_prompts" in ev:
    num, size = int(ev.pop("num_prompts")), int(ev.get("batch_size", 1024))
    ev["batches"] = max(1, math.ceil(num / size))
  if task == "forecast" and "d_mlp" in model:
    d_mlp, width = int(model.pop("d_mlp")), int(model.get("d_model", 1))
    model["mlp_ratio"] = d_mlp // width if d_mlp % width == 0 else d_mlp / width
  return d


def migrate(config: Any) -> Any:
  """`config` (a ConfigDict or a dict) in the current shape; itself when already current."""
  if not needs_migration(config):
    return config
  if hasattr(config, "to_dict"):
    import ml_collections
    return ml_collections.ConfigDict(migrate_dict(config.to_dict()))
  return migrate_dict(dict(config))
