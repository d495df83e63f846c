"""Sample from a trained run with a KV cache (every scoring function, MLR and SWA included).

    structattn-sample --workdir=runs/tiny --prompt="ROMEO:" --max_new_tokens=200

Lengths other than the training length work wherever the positions allow it: with learned
absolute positions the total length is capped at model.seq_len; with `model.pos='none'` the
cache grows to any length (MLR's blocks keep their absolute sizes, the global level stays
global, sliding windows slide).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from structattn import checkpoint as ckpt_lib
from structattn.lm.data import tokenizer_for
from structattn.lm.task import build_model
from structattn.optim import make_optimizer


def load_run(workdir: str):
  """(config, model with the latest checkpoint's params, tokenizer) of a run directory."""
  path = Path(workdir)
  if not (path / "config.json").exists():
    raise FileNotFoundError(f"--workdir={workdir}: no config.json; is this a run directory?")
  from structattn.configs.renames import migrate_dict  # older run directories
  config = ml_collections.ConfigDict(migrate_dict(json.loads((path / "config.json").read_text())))
  tokenizer = tokenizer_for(config)
  _, model = build_model(config, tokenizer.vocab_size)
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params_state)
  tx, _ = make_optimizer(config.train, params_state)
  manager = ckpt_lib.Manager(path / "checkpoints", keep=config.keep_checkpoints)
  restored = manager.restore_latest(params, tx.init(params))
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"--workdir={workdir}: no checkpoint to sample from")
  model = nnx.merge(graphdef, restored[1], rest)
  return config, model, tokenizer


def generate(model, prompt_BT, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0, max_len: int | None = None):
  """Prefill the prompt, then sample token by token from the cache. Returns (B, T + new)."""
  b, t = prompt_BT.shape
  total = t + max_new_tokens
  limit = model.cfg.seq_len if model.pos is not None else None
  if limit is not None and total > limit:
    raise ValueError(f"prompt ({t}) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
                     f"model.seq_len={limit} of a model with learned positions")
  graphdef, state = nnx.split(model)
  caches = model.init_cache(b, max_len or total)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(state, caches, tokens, start):
    m = nnx.merge(graphdef, state)
    return m.decode(tokens, caches, start)

  def pick(logits_BO, key):
    logits = logits_BO.astype(jnp.float32)
    if temperature <= 0:
      return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
      kth = jnp.sort(logits, axis=-1)[:, -top_k][:, None]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1)

  key = jax.random.key(seed)
  logits, caches = step(state, caches, prompt_BT, jnp.int32(0))
  out = [np.asarray(prompt_BT)]
  nxt = pick(logits[:, -1], key)
  for i in range(max_new_tokens):
    out.append(np.asarray(nxt)[:, None])
    if i == max_new_tokens - 1:
      break
    key, sub = jax.random.split(key)
    logits, caches = step(state, caches, nxt[:, None].astype(jnp.int32), jnp.int32(t + i))
    nxt = pick(logits[:, -1], sub)
  return np.concatenate(out, axis=1)


def _define_flags(fv, sys_argv):
  from absl import flags
  del sys_argv
  flags.DEFINE_string("workdir", None, "Run directory with a checkpoint.", flag_values=fv)
  flags.DEFINE_string("prompt", "\n", "Prompt text.", flag_values=fv)
  flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.", flag_values=fv)
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).", flag_values=fv)
  flags.DEFINE_integer("top_k", 0, "Keep the top k logits (0 = all).", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Sampling seed.", flag_values=fv)


def _run_flags(f):
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  _, model, tok = load_run(f.workdir)
  prompt = np.asarray(tok.encode(f.prompt), np.int32)[None]
  ids = generate(model, jnp.asarray(prompt), f.max_new_tokens, temperature=f.temperature,
                 top_k=f.top_k, seed=f.seed)
  print(tok.decode(ids[0]))


def main(argv=None):
  """`structattn-sample`; argv without the program name (default sys.argv[1:])."""
  from structattn import cli
  return cli.absl_main("structattn-sample", __doc__, _define_flags, _run_flags, argv,
                       example="structattn-sample --workdir=runs/tiny --prompt='ROMEO:' "
                       "--max_new_tokens=200", required=("workdir",))


if __name__ == "__main__":
  main()
