"""Scale-out on 8 fake CPU devices (conftest): meshes from the config, logical-axis shardings,
sharded training equal to one device, attention local to its shard (compiled HLO), sharded
checkpoints restored on other meshes, the on-device batch (ICR) and vmapped-group paths."""

import functools
import json
import re
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from structattn import distributed
from structattn import sharding
from structattn import train as train_lib
from structattn.models.gpt import GPT, GPTConfig
from structattn.configs import lm as lm_configs
from structattn.optim import make_optimizer
from tests.helpers import on_corpus, small_icr, small_lm

VOCAB = 96
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


def model_config(variant, seq_len=64, d_model=32, heads=2, pos="learned"):
  c = small_lm(variant, d_model=d_model, seq_len=seq_len, heads=heads, pos=pos)
  c.train.update(lr=1e-2, warmup_steps=2, steps=5)
  return c


def build(c):
  model = GPT(GPTConfig.from_config(c, VOCAB), rngs=nnx.Rngs(0))
  graphdef, params_state, rest = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params_state)
  tx, _ = make_optimizer(c.train, params_state)
  return graphdef, params_state, rest, params, tx


def batches(n, batch=8, seq_len=64, seed=0):
  toks = np.random.default_rng(seed).integers(0, VOCAB, (n, batch, seq_len + 1)).astype(np.int32)
  return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in toks]


def step_losses(c, mesh, data, accum=1):
  """Train losses of len(data) steps, unsharded (mesh None) or on a (data, fsdp, tensor) mesh."""
  graphdef, params_state, rest, params, tx = build(c)
  opt_state = tx.init(params)
  fn = functools.partial(train_lib.train_step, graphdef=graphdef, rest=rest, tx=tx, accum=accum)
  if mesh is None:
    step, place = jax.jit(fn, donate_argnums=(0, 1)), lambda b: b
  else:
    layout = sharding.Layout(sharding.make_mesh(mesh))
    params, opt_state, p_sh, o_sh = train_lib.shard_state(layout, params_state, params,
                                                          opt_state)
    step, place = train_lib.ShardedStep(layout, fn, p_sh, o_sh), layout.put_batch
  out = []
  for b in data:
    params, opt_state, m = step(params, opt_state, place(b))
    out.append(float(m["train/loss"]))
  return out, params


# ------------------------------------------------------------------------- mesh and specs


def test_mesh_from_config_and_rules():
  c = lm_configs.get_config("tiny")
  assert sharding.from_config(c) is None  # default: one device, the unsharded path
  c.mesh.update(data=-1, tensor=2)
  layout = sharding.from_config(c)
  assert dict(layout.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in layout.mesh.axis_types)
  c.mesh.update(data=-1, tensor=1, devices=4)
  assert layout_devices(sharding.from_config(c)) == [d.id for d in jax.devices()[:4]]
  c.mesh.update(data=3, devices=0)
  with pytest.raises(ValueError, match="mesh"):
    sharding.from_config(c)
  c.mesh.update(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="only one"):
    sharding.from_config(c)
  c.mesh.update(data=1, fsdp=1, axis_types="explicit")
  c.mesh.tensor = 8
  with pytest.raises(ValueError, match="mesh.axis_types"):
    sharding.from_config(c)
  c.sharding.rules = (("batch", "pipeline"),)
  c.mesh.axis_types = "auto"
  with pytest.raises(ValueError, match="sharding.rules"):
    sharding.from_config(c)
  assert tuple((n, tuple([a] if isinstance(a, str) else a or ())) for n, a in
               lm_configs.base_config().sharding.rules) == sharding.rules_from({})
  # specs: mesh axes of size 1 dropped, an axis used once per array, non-divisors replicated
  layout = sharding.Layout(sharding.make_mesh((2, 2, 2)))
  assert layout.spec(("batch", "seq", "act_embed")) == P(("data", "fsdp"), None, None)
  assert layout.spec(("batch", "embed")) == P(("data", "fsdp"), None)
  assert layout.spec(("vocab", "embed"), (97, 32)) == P(None, "fsdp")
  assert layout.spec(("batch",), (2,)) == P("data")
  assert sharding.Layout(sharding.make_mesh((8, 1, 1))).spec(("embed", "mlp")) == P(None, None)
  assert distributed.detect_cluster({}) is None
  assert distributed.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) == "slurm"
  assert distributed.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
  assert distributed.initialize(mode="auto") is False  # nothing detected: single process


def layout_devices(layout):
  return sorted(d.id for d in layout.mesh.devices.flat)


def test_parameters_and_optimizer_state_follow_logical_axes():
  c = model_config("mha")
  graphdef, params_state, rest, params, tx = build(c)
  layout = sharding.Layout(sharding.make_mesh((2, 2, 2)))
  params, opt_state, p_sh, o_sh = train_lib.shard_state(layout, params_state, params,
                                                        tx.init(params))
  spec = lambda x: x.sharding.spec
  assert spec(params["embed"]) == P("tensor", "fsdp")
  blk = params["blocks"][0]
  assert spec(blk["mlp"]["up"]["kernel"]) == P("fsdp", "tensor")
  assert spec(blk["mlp"]["down"]["kernel"]) == P("tensor", "fsdp")
  assert spec(blk["attn"]["wo"]["kernel"]) == P("tensor", "fsdp")
  assert spec(blk["attn"]["wqkv"]["kernel"]) == P("fsdp", None)
  assert blk["ln1"]["weight"].sharding.is_fully_replicated
  adam = [s for s in jax.tree.leaves(opt_state) if s.shape == params["embed"].shape]
  assert adam and all(spec(s) == P("tensor", "fsdp") for s in adam)  # mu, nu follow params
  assert all(s.sharding.is_fully_replicated for s in jax.tree.leaves(opt_state) if s.ndim == 0)


# ------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("variant", ["mha", "mlr"])
@pytest.mark.slow
def test_sharded_loss_equals_single_device(variant):
  c = model_config(variant)
  data = batches(5)
  ref, ref_params = step_losses(c, None, data)
  for mesh in MESHES:
    got, params = step_losses(c, mesh, data)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0, err_msg=str(mesh))
  np.testing.assert_allclose(np.asarray(params["embed"]), np.asarray(ref_params["embed"]),
                             atol=1e-5)
  if variant == "mha":  # gradient accumulation splits each micro-batch over the batch axes
    got, _ = step_losses(c, (2, 2, 2), data, accum=2)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ attention is local

T = 160  # distinct from every other dimension of the model below


def collectives(hlo_text):
  """(op, [result shapes]) of every collective in compiled HLO text."""
  out = []
  for line in hlo_text.splitlines():
    m = re.search(r"=\s*(.*?)\s(all-gather|all-to-all|all-reduce|reduce-scatter|"
                  r"collective-permute)(-start)?\(", line)
    if m:
      shapes = [tuple(int(d) for d in s.split(",") if d)
                for s in re.findall(r"[a-z]+\d*\[([\d,]*)\]", m.group(1))]
      out.append((m.group(2), shapes))
  return out


@pytest.mark.parametrize("variant", ["mlr", "swa"])
@pytest.mark.slow
def test_attention_stays_local_to_its_shard(variant):
  """Batch over (data, fsdp), heads over tensor, T unsharded: the compiled train step has no
  collective of a TxT tensor, nor of any q/k/v/score-like tensor (rank >= 4 with a T axis);
  the only collectives with a T axis are the (B, T[, D]) tensor-parallel sums."""
  c = model_config(variant, seq_len=T, d_model=64, heads=4, pos="none")
  c.attention.window = 32
  graphdef, params_state, rest, params, tx = build(c)
  layout = sharding.Layout(sharding.make_mesh((2, 2, 2)))
  params, opt_state, p_sh, o_sh = train_lib.shard_state(layout, params_state, params,
                                                        tx.init(params))
  fn = functools.partial(train_lib.train_step, graphdef=graphdef, rest=rest, tx=tx)
  step = train_lib.ShardedStep(layout, fn, p_sh, o_sh)
  batch = layout.put_batch(batches(1, seq_len=T)[0])
  step(params, opt_state, batch)  # builds the jitted step
  hlo = step.jitted.lower(params, opt_state, batch).compile().as_text()
  found = collectives(hlo)
  assert found, "expected the partitioned program to contain collectives"
  for op, shapes in found:
    for s in shapes:
      assert sum(d == T for d in s) < 2, f"{op} of a TxT tensor {s}"
      assert not (T in s and len(s) >= 4), f"{op} of an attention tensor {s}"
      if T in s:
        assert op == "all-reduce" or len(s) <= 3, (op, s)


# ------------------------------------------------------------------------- end to end


def lm_run_config(corpus, steps, mesh=(1, 1, 1), devices=0):
  c = on_corpus(model_config("mlr"), corpus)
  c.train.update(steps=steps, batch_size=8)
  c.eval_every = 1000
  c.eval.update(batches=1, batch_size=8)
  c.log_every, c.checkpoint_every, c.progress = 5, 5, False
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2], devices=devices)
  return c


@pytest.mark.slow
def test_checkpoint_restores_on_another_mesh_and_training_continues(corpus, tmp_path):
  """A run on 8 devices (data 2, fsdp 4), restarted from its step-5 checkpoint on a 4-device
  sub-mesh (data only) and on 8 devices with data parallelism only (fsdp -> data): both end
  where the uninterrupted run ends, which is where an unsharded run ends."""
  unsharded = train_lib.train(lm_run_config(corpus, 10), str(tmp_path / "unsharded"))
  full = train_lib.train(lm_run_config(corpus, 10, (2, 4, 1)), str(tmp_path / "full"))
  assert full["mesh"]["shape"] == {"data": 2, "fsdp": 4, "tensor": 1}
  for key in ("final/train_loss", "final/eval_loss"):
    assert abs(full[key] - unsharded[key]) <= 1e-5, key
  half = tmp_path / "half"  # the run directory as it was after step 5
  shutil.copytree(tmp_path / "full", half)
  shutil.rmtree(half / "checkpoints" / "10")
  (half / "result.json").unlink()
  for name, mesh, devices in (("sub4", (4, 1, 1), 4), ("data8", (8, 1, 1), 0)):
    shutil.copytree(half, tmp_path / name)
    r = train_lib.train(lm_run_config(corpus, 10, mesh, devices), str(tmp_path / name))
    assert r["status"] == "completed" and r["resumed_from"] == 5, name
    assert r["mesh"]["devices"] == (devices or 8)
    assert abs(r["final/train_loss"] - full["final/train_loss"]) <= 1e-5, name
    assert abs(r["final/eval_loss"] - full["final/eval_loss"]) <= 1e-5, name
  rows = [json.loads(l) for l in (tmp_path / "sub4" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 5, 10]


@pytest.mark.slow
def test_batch_fn_path_and_vmapped_group_on_a_mesh(tmp_path):
  """In-context regression (prompts drawn on device) as a vmapped group of two members on a
  (4, 1, 2) mesh equals the same group unsharded."""

  def cfg(seed, lr, mesh):
    c = small_icr(seed=seed)
    c.train.update(steps=8, lr=lr, warmup_steps=2, steps_per_call=4)
    c.eval_every = 8
    c.eval.update(batches=2, batch_size=32)
    c.log_every, c.checkpoint_every, c.progress = 8, 8, False
    c.mesh = ml_collections.ConfigDict(dict(data=mesh[0], fsdp=mesh[1], tensor=mesh[2]))
    return c

  out = {}
  for mesh in ((1, 1, 1), (4, 1, 2)):
    members = [cfg(0, 1e-3, mesh), cfg(1, 3e-3, mesh)]
    dirs = [str(tmp_path / f"{mesh}-{i}") for i in range(2)]
    out[mesh] = train_lib.train_group(members, dirs)
  for a, b in zip(out[(1, 1, 1)], out[(4, 1, 2)]):
    assert b["status"] == "completed" and "mesh" in b and "mesh" not in a
    np.testing.assert_allclose(b["final/eval_last_point_se"], a["final/eval_last_point_se"],
                               rtol=1e-5)


def test_manager_restores_onto_given_shardings(tmp_path):
  """The checkpoint Manager alone: written sharded over 8 devices, read onto explicit
  shardings of a 4-device sub-mesh and onto one CPU device, identical values."""
  from structattn import checkpoint as ckpt_lib
  big = sharding.Layout(sharding.make_mesh((2, 2, 2)))
  x = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
  params = {"w": big.put(x, big.sharding(("batch", "mlp")))}
  opt = {"mu": big.put(x + 1, big.sharding(("batch", "mlp"))), "count": np.int32(3)}
  mgr = ckpt_lib.Manager(tmp_path / "ck")
  mgr.save(1, params, opt, {"step": 1})
  mgr.close()
  small = sharding.Layout(sharding.make_mesh((4, 1, 1), devices=jax.devices()[:4]))
  sh = small.sharding(("batch", None))
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for target, scalar in ((sh, small.replicated), (one, one)):
    step, p, o, data = ckpt_lib.Manager(tmp_path / "ck").restore_latest(
        params, opt, shardings=({"w": target}, {"mu": target, "count": scalar}))
    assert step == 1 and data == {"step": 1}
    assert p["w"].sharding == target and o["mu"].sharding == target
    np.testing.assert_array_equal(np.asarray(p["w"]), x)
    np.testing.assert_array_equal(np.asarray(o["mu"]), x + 1)
    assert int(o["count"]) == 3


@pytest.mark.slow
def test_two_processes_resume_exactly(corpus, tmp_path):
  """The multi-host path on one machine: two processes (jax.distributed with explicit
  coordinator flags, gloo CPU collectives) x 2 devices, mesh data 2 x tensor 2 (tensor within
  a host), each loading its own data shard.  Resumed from its step-3 checkpoint, the run ends
  exactly where the uninterrupted run ends; only process 0 prints and writes."""
  import os
  import socket
  import subprocess
  import sys
  from pathlib import Path
  from structattn.lm import data as lm_data
  root = Path(__file__).resolve().parents[1]
  lm_data.build(lm_run_config(corpus, 1))  # prepare the dataset once, before the launch

  def launch(workdir, steps):
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "structattn.train", f"--config={root}/structattn/configs/lm.py:tiny-mlr",
           f"--workdir={workdir}", f"--config.data.corpus={corpus}",
           f"--config.data.tfds_dir={corpus.parent / 'tfds'}", "--config.model.d_model=32",
           "--config.model.seq_len=64", "--config.model.dtype=float32",
           "--config.attention.num_heads=2", f"--config.train.steps={steps}",
           "--config.train.batch_size=8", "--config.eval.batches=1", "--config.eval.batch_size=8",
           "--config.log_every=3", "--config.checkpoint_every=3", "--config.progress=False",
           "--config.mesh.data=-1", "--config.mesh.tensor=2", "--compilation_cache=",
           f"--coordinator_address=localhost:{port}", "--num_processes=2"]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert "'status': 'completed'" in outs[0] and "'status'" not in outs[1]  # process 0 prints
    return json.loads((Path(workdir) / "result.json").read_text())

  full = launch(tmp_path / "full", 6)
  assert full["mesh"]["shape"] == {"data": 2, "fsdp": 1, "tensor": 2}
  # the state after step 3: the run directory without the step-6 checkpoint and result
  shutil.copytree(tmp_path / "full", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "6")
  (tmp_path / "resumed" / "result.json").unlink()
  resumed = launch(tmp_path / "resumed", 6)
  assert resumed["resumed_from"] == 3
  assert resumed["final/train_loss"] == full["final/train_loss"]
  assert resumed["final/eval_loss"] == full["final/eval_loss"]
