"""Meshes, logical axis names and shardings for data / FSDP / tensor parallel training.

    layout = sharding.from_config(config)     # None: one device, the unsharded code path
    p_sh = layout.param_shardings(params_state)          # from the parameters' axis names
    step = jax.jit(layout.traced(train_step), in_shardings=..., out_shardings=...,
                   donate_argnums=(0, 1))

Mesh (`config.mesh`): axes `data`, `fsdp`, `tensor` built with `jax.make_mesh` and axis types
passed explicitly (`AxisType.Auto`: the compiler partitions the program from the annotated
inputs, outputs and activation constraints; jax >= 0.12 would otherwise default to Explicit).
One size may be -1 (the rest of the devices); `mesh.devices=n` uses the first n devices (a
sub-mesh).  A mesh of one device is the unsharded path, exactly as without a mesh.

Logical axes: parameters carry names in their NNX metadata (`nnx.Param(..., out_sharding=
('embed', 'mlp'))`, see `param`), activations are constrained with `constrain(x, names)`;
`config.sharding.rules` maps each name to mesh axes (`DEFAULT_RULES`).  A name maps to nothing
when its mesh axes are absent, of size 1, already used by an earlier dimension of the same
array, or do not divide the dimension (then that dimension is replicated).

`constrain` is the identity unless a layout is active (`Layout.activate()` / `traced`), so
models built here run unchanged without a mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes.  Parameters: embed (model width; FSDP / ZeRO-3 shards it),
# heads / mlp / vocab (tensor parallel), qkv (the fused Q|K|V output, not head-aligned:
# replicated; its head-major view is split over heads at use).  Activations: batch, seq
# (never sharded: attention stays local), act_embed (the model width of activations).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("qkv", None),
    ("seq", None),
    ("act_embed", None),
)


def config_sections():
  """The default `mesh` and `sharding` sections of a run config: one device (unsharded) and
  `DEFAULT_RULES`.  `configs/*.py` use these so every task scales out the same way."""
  import ml_collections
  mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, devices=0, axis_types="auto"))
  return mesh, ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))


# ------------------------------------------------------------------------------ parameters


def param(value, names: Sequence[str | None] | None, **metadata) -> nnx.Param:
  """An `nnx.Param` carrying logical axis names (flax's `out_sharding` metadata, with eager
  sharding off: the training loop places parameters itself)."""
  if names is None:
    return nnx.Param(value, **metadata)
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False, **metadata)


def axis_names(variable) -> tuple[str | None, ...] | None:
  """The logical axis names of an NNX variable (None when unannotated)."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  for key in ("out_sharding", "sharding_names", "sharding"):
    names = meta.get(key)
    if names:
      return tuple(names)
  return None


# ------------------------------------------------------------------------------------ mesh


def _axis_types(kind: str, n: int):
  types = {"auto": jax.sharding.AxisType.Auto}
  if kind not in types:
    raise ValueError(f"mesh.axis_types={kind!r} is invalid: allowed values are ('auto',); "
                     f"the model code relies on compiler-propagated (Auto) shardings")
  return (types[kind],) * n


def mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
  """Resolve one -1 to the rest of the devices; the product must equal num_devices."""
  out = {}
  for a in MESH_AXES:
    v = int(sizes.get(a, 1))
    if v == 0 or v < -1:
      raise ValueError(f"mesh.{a}={v} is invalid: a positive size or -1 (the rest)")
    out[a] = v
  rest = [a for a in MESH_AXES if out[a] == -1]
  if len(rest) > 1:
    raise ValueError(f"only one of mesh.{{data,fsdp,tensor}} may be -1, got {rest}")
  known = math.prod(v for v in out.values() if v != -1)
  if rest:
    if num_devices % known:
      raise ValueError(f"mesh sizes {out} do not divide the {num_devices} devices")
    out[rest[0]] = num_devices // known
  if math.prod(out.values()) != num_devices:
    raise ValueError(f"mesh {out} has {math.prod(out.values())} devices but {num_devices} are "
                     f"used (set one size to -1, or mesh.devices)")
  return out


def make_mesh(shape: Sequence[int], axis_names: Sequence[str] = MESH_AXES, devices=None,
              axis_types: str = "auto") -> jax.sharding.Mesh:
  """`jax.make_mesh` with explicit axis types (Auto) on all devices or the given ones."""
  shape, names = tuple(int(s) for s in shape), tuple(axis_names)
  types = _axis_types(axis_types, len(names))
  if devices is None:
    return jax.make_mesh(shape, names, axis_types=types)
  return jax.make_mesh(shape, names, axis_types=types, devices=list(devices))


def rules_from(config) -> tuple[tuple[str, Any], ...]:
  sec = config.get("sharding") if hasattr(config, "get") else None
  rules = DEFAULT_RULES if sec is None or not sec.get("rules") else sec.get("rules")
  out = []
  for item in rules:
    if len(item) != 2:
      raise ValueError(f"sharding.rules entry {item!r} is invalid: (logical_name, mesh_axes)")
    name, axes = item
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise ValueError(f"sharding.rules maps {name!r} to unknown mesh axes {bad}; allowed "
                       f"{MESH_AXES}")
    out.append((str(name), axes))
  return tuple(out)


def from_config(config, force: bool = False) -> "Layout | None":
  """The run's layout from `config.mesh` / `config.sharding`, or None (one device, no mesh).

  force=True builds a layout even for a one-device mesh (to measure the sharded path)."""
  sec = config.get("mesh") if hasattr(config, "get") else None
  if sec is None:
    if not force:
      return None
    sec = {}
  n = int(sec.get("devices", 0) or 0)
  all_devices = jax.devices()
  if n < 0 or n > len(all_devices):
    raise ValueError(f"mesh.devices={n} is invalid: 0 (all) or at most {len(all_devices)}")
  if n and jax.process_count() > 1:
    raise ValueError("mesh.devices (a sub-mesh) is for single-process runs only")
  devices = all_devices[:n] if n else all_devices
  sizes = {a: sec.get(a, 1) for a in MESH_AXES}
  if all(int(v) == 1 for v in sizes.values()) and not force:
    return None  # the default: one device, unsharded
  shape = mesh_shape(sizes, len(devices))
  if math.prod(shape.values()) == 1 and not force:
    return None
  mesh = make_mesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES,
                   devices=devices if n else None, axis_types=sec.get("axis_types", "auto"))
  return Layout(mesh, rules_from(config))


# ---------------------------------------------------------------------------------- layout

class _Active(threading.local):
  def __init__(self):
    self.stack: list[Layout] = []


_ACTIVE = _Active()  # per thread: programs may be traced concurrently


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
  """A mesh and logical-axis rules: shardings for parameters, optimiser state and batches."""
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, tuple[str, ...]], ...] = dataclasses.field(
      default_factory=lambda: rules_from({}))

  # -- specs ------------------------------------------------------------------------------

  def mesh_axes(self, name: str | None) -> tuple[str, ...]:
    if name is None:
      return ()
    for n, axes in self.rules:
      if n == name:
        return tuple(a for a in axes if self.mesh.shape.get(a, 1) > 1)
    return ()

  def size(self, name: str) -> int:
    """Number of shards a logical axis is split into (1: replicated)."""
    return math.prod(self.mesh.shape[a] for a in self.mesh_axes(name))

  def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None
           ) -> PartitionSpec:
    used, out = set(), []
    for i, name in enumerate(names):
      keep, prod = [], 1
      for a in self.mesh_axes(name):
        if a in used:
          continue
        if shape is not None and shape[i] % (prod * self.mesh.shape[a]):
          break
        keep.append(a)
        prod *= self.mesh.shape[a]
      used.update(keep)
      out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return PartitionSpec(*out)

  def sharding(self, names, shape=None) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(names, shape))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  # -- trees ------------------------------------------------------------------------------

  def param_shardings(self, params_state, lead: int = 0):
    """NamedShardings for `nnx.to_pure_dict(params_state)` (plus `lead` replicated leading
    axes, e.g. the member axis of vmapped groups), from the variables' axis names."""
    def one(v):
      names = axis_names(v) or (None,) * v.ndim
      shape = tuple(v.shape)
      return self.sharding((None,) * lead + tuple(names), (1,) * lead + shape)
    tree = jax.tree.map(one, params_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(tree)

  def shardings_like(self, tree, params, param_sh):
    """Shardings for a tree (the optimiser state) whose leaves mirror parameters: a leaf whose
    path ends with a parameter's path and has its shape gets that parameter's sharding; any
    other leaf (step counts, scalars) is replicated."""
    by_path = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
      by_path[_keys(path)] = (np.shape(x), None)
    for path, s in jax.tree_util.tree_flatten_with_path(
        param_sh, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]:
      k = _keys(path)
      by_path[k] = (by_path[k][0], s)

    def pick(path, x):
      keys = _keys(path)
      for i in range(len(keys)):
        hit = by_path.get(keys[i:])
        if hit is not None and hit[0] == np.shape(x):
          return hit[1]
      return self.replicated
    return jax.tree_util.tree_map_with_path(pick, tree)

  def put(self, tree, shardings):
    """Place host-identical values (every process holds the whole value) on shardings."""
    def one(x, s):
      x = np.asarray(jax.device_get(x))
      return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
    return jax.tree.map(one, tree, shardings)

  def batch_sharding(self, shape, lead: int = 0) -> NamedSharding:
    """Sharding of a batch leaf: dimension `lead` (after `lead` member axes) over 'batch'."""
    names = (None,) * lead + ("batch",) + (None,) * (len(shape) - lead - 1)
    return self.sharding(names, shape)

  def put_batch(self, batch, lead: int = 0):
    """Global batch arrays from this process's slice (`make_array_from_process_local_data`):
    process p holds rows [p*b, (p+1)*b) of dimension `lead` of the global batch."""
    n = jax.process_count()

    def one(x):
      x = np.asarray(x)
      gshape = x.shape[:lead] + (x.shape[lead] * n,) + x.shape[lead + 1:]
      s = self.batch_sharding(gshape, lead)
      if n > 1 and s.spec == PartitionSpec():
        raise ValueError(f"a batch of {gshape[lead]} rows cannot be split over the mesh's batch "
                         f"axes ({self.size('batch')} shards) in a multi-process run")
      return jax.make_array_from_process_local_data(s, x, gshape)
    return jax.tree.map(one, batch)

  def fetch(self, tree):
    """Host numpy values of (possibly multi-process) global arrays."""
    def one(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable and \
          not x.sharding.is_fully_replicated:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
      return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)

  def process_rows(self, global_rows: int) -> tuple[int, int]:
    """The contiguous [start, stop) rows of a global batch this process's devices hold."""
    idx = self.batch_sharding((global_rows,)).addressable_devices_indices_map((global_rows,))
    starts = [sl[0].start or 0 for sl in idx.values()]
    stops = [global_rows if sl[0].stop is None else sl[0].stop for sl in idx.values()]
    return min(starts), max(stops)

  # -- activation constraints -------------------------------------------------------------

  @contextlib.contextmanager
  def activate(self) -> Iterator["Layout"]:
    """Make `constrain` annotate activations with this layout (while tracing)."""
    _ACTIVE.stack.append(self)
    try:
      yield self
    finally:
      _ACTIVE.stack.pop()

  def traced(self, fn):
    """fn with this layout active while it is traced (wrap before jax.jit / jax.vmap)."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
      with self.activate():
        return fn(*args, **kwargs)
    return wrapped

  def describe(self) -> dict[str, Any]:
    return {"shape": dict(self.mesh.shape), "devices": int(self.mesh.size),
            "rules": [[n, list(a)] for n, a in self.rules]}


def _keys(path) -> tuple:
  """The trailing dictionary keys of a pytree path (parameter paths are all dict keys)."""
  out = []
  for k in reversed(path):
    if isinstance(k, jax.tree_util.DictKey):
      out.append(k.key)
    else:
      break
  return tuple(reversed(out))


def active() -> Layout | None:
  return _ACTIVE.stack[-1] if _ACTIVE.stack else None


def constrain(x, names: Sequence[str | None]):
  """with_sharding_constraint by logical names under the active layout; identity otherwise
  (or when the names do not match x's rank, e.g. inside a vmap over extra axes)."""
  layout = active()
  if layout is None or getattr(x, "ndim", None) != len(names):
    return x
  return jax.lax.with_sharding_constraint(x, layout.sharding(names, x.shape))


def shards(name: str) -> int:
  """Number of shards of a logical axis under the active layout (1 without one)."""
  layout = active()
  return 1 if layout is None else layout.size(name)


def local(fn, names: Sequence[str | None]):
  """fn(*arrays) run per shard (`jax.shard_map` over the whole mesh) when a layout is active:
  every argument and the output are split by the same logical `names` (e.g. batch and heads
  for attention cores), so fn sees only local blocks and no collective can enter it.  Without
  a layout (or when nothing is split) it is fn itself."""
  layout = active()
  if layout is None:
    return fn

  def wrapped(*args):
    specs = [layout.spec(names, a.shape) for a in args]
    if all(s == PartitionSpec(*(None,) * len(names)) for s in specs):
      return fn(*args)
    kwargs = dict(mesh=layout.mesh, in_specs=tuple(specs), out_specs=specs[0])
    try:
      mapped = jax.shard_map(fn, check_vma=False, **kwargs)
    except TypeError:  # older spelling
      mapped = jax.shard_map(fn, check_rep=False, **kwargs)
    return mapped(*args)
  return wrapped


def constrain_batch(tree):
  """Constrain every leaf's leading axis to 'batch' (other axes replicated)."""
  return jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1)), tree)
