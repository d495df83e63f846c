"""Which implementation serves an attention call, and the call itself.

    out_BTHV = attention(q_BTHK, k_BTHK, v_BTHV, pattern, impl)
    served = resolved_impl(spec, jnp.bfloat16, jax.default_backend())   # e.g. for result.json

`impl` (`attention.impl` in a config) is one of
  * 'auto': cuDNN's fused attention where it serves the pattern (dense or causal sliding
    window, bf16/fp16, equal head dims), else the XLA cores (`core.xla_attention`);
  * 'xla': always the XLA cores;
  * 'cudnn': like 'auto' (cuDNN where it serves, else the XLA cores);
  * 'pallas': the fused Pallas-Triton MLR kernel (`pallas_mlr`), global and block levels;
  * 'mosaic': the fused Pallas Mosaic GPU MLR kernel (`mosaic_mlr`), global and block levels;
  * 'reference': the masked-dense oracle (`core.reference_attention`).

An explicitly requested fused kernel never falls back silently: when 'pallas' or 'mosaic'
cannot run (no GPU, window levels, an unsupported dtype, a jax without the kernel's
backend, block sizes or lengths the kernel refuses) or when 'mosaic' would round float32
inputs to bfloat16, `attention` raises a ValueError that names `attention.impl` and says
why.  'auto' and 'cudnn' pick; `resolved_impl` (a pure function of the spec, the compute
dtype and the backend) says what they pick, so a training loop can record it.

Imports flow one way: this module sits above `core` (the XLA cores) and the kernel
modules, which import only the leaf modules `pattern`, `mlr_tiling` and `kernel_config`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from structattn.attention import core
from structattn.attention.pattern import Pattern, pattern_of
from structattn.attention.spec import IMPLS

KERNEL_IMPLS = ("pallas", "mosaic")
KERNEL_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)


def _mosaic_available() -> bool:
  from structattn.attention import mosaic_mlr
  return mosaic_mlr.available()


def _pallas_available() -> bool:
  try:
    from structattn.attention import pallas_mlr  # noqa: F401
  except ImportError:  # pragma: no cover
    return False
  return True


def kernel_unsupported(impl: str, pattern: Pattern, dtype, backend: str) -> str:
  """Why the fused kernel `impl` ('pallas' or 'mosaic') cannot serve a call with this
  pattern, input dtype and backend ('' when it can).  Shape constraints the kernels check
  themselves (nesting block sizes, non-causal lengths) are not covered here."""
  dtype = jnp.dtype(dtype)
  if backend != "gpu":
    return f"the kernel needs a GPU and the backend is {backend!r}"
  if "window" in pattern.seqs:
    return f"the kernel serves global and block levels only, the pattern has {pattern.seqs}"
  if dtype not in KERNEL_DTYPES:
    return f"the kernel needs bfloat16, float16 or float32 inputs, got {dtype}"
  if impl == "mosaic":
    if not _mosaic_available():
      return "this jax has no Pallas Mosaic GPU (jax.experimental.pallas.mosaic_gpu)"
    if dtype == jnp.float32:
      return ("the Mosaic kernel computes in bfloat16 and would round the float32 inputs; "
              "run the model in bfloat16 (model.dtype) or use attention.impl='pallas'")
  elif not _pallas_available():
    return "this jax has no Pallas Triton backend (jax.experimental.pallas.triton)"
  return ""


def pallas_supported(q_BTHK, pattern: Pattern) -> bool:
  """Whether the fused Pallas-Triton MLR kernel can serve this call here."""
  return not kernel_unsupported("pallas", pattern, q_BTHK.dtype, jax.default_backend())


def _cannot_run(impl: str, why: str) -> ValueError:
  return ValueError(f"attention.impl={impl!r} cannot run here: {why}.  impl='auto' picks cuDNN "
                    "or the XLA cores instead (resolved_impl says which)")


def _cudnn_part(pattern: Pattern, dtype, d_qk: int, d_v: int, backend: str) -> bool:
  """Whether cuDNN serves a single-level part, its q/k zero-padded up to v's width."""
  if d_qk > d_v:
    return False
  padded = dataclasses.replace(pattern, widths=(d_v,))
  return not core.cudnn_unsupported(padded, dtype, d_v, d_v, backend)


def _is_sum(pattern: Pattern) -> bool:
  return pattern.combine == "sum" and "window" in pattern.seqs and len(pattern.seqs) == 2


def resolve(impl: str, pattern: Pattern, dtype, d_qk: int, d_v: int, backend: str) -> str:
  """What serves a call: 'cudnn', 'xla', 'pallas', 'mosaic' or 'reference' ('xla+cudnn'
  when the two parts of a global|window sum are served differently).  Raises for a
  fused kernel that cannot run."""
  if impl not in IMPLS:
    raise ValueError(f"attention.impl={impl!r} is invalid: allowed values are {IMPLS}")
  if impl == "reference":
    return "reference"
  if impl in KERNEL_IMPLS:
    why = kernel_unsupported(impl, pattern, dtype, backend)
    if why:
      raise _cannot_run(impl, why)
    return impl
  if impl == "xla":
    return "xla"
  if _is_sum(pattern):
    glob, win = core.sum_parts(pattern)
    served = ["cudnn" if _cudnn_part(p, dtype, w, d_v, backend) else "xla"
              for p, w in ((glob, pattern.widths[0]), (win, pattern.widths[1]))]
    return served[0] if served[0] == served[1] else "+".join(served)
  return "xla" if core.cudnn_unsupported(pattern, dtype, d_qk, d_v, backend) else "cudnn"


def resolved_impl(spec, dtype, backend: str | None = None, impl: str | None = None) -> str:
  """The implementation that serves the attention of `spec` for inputs of `dtype` on
  `backend` (default: jax's default backend): 'cudnn', 'xla', 'pallas', 'mosaic',
  'reference', or 'xla+cudnn' for a global|window sum served part by each.  `impl`
  overrides `spec.impl`.  Pure in its arguments (no compilation); raises the same
  ValueError as `attention` when an explicitly requested kernel cannot run."""
  backend = backend or jax.default_backend()
  return resolve(impl or spec.impl, pattern_of(spec), dtype, spec.d_qk, spec.d_head, backend)


# ---------------------------------------------------------------------------- the call


def _pad_features(x_BTHK, width: int):
  """Zero-pad q/k features to `width` (scores unchanged) so fused kernels can serve them."""
  extra = width - x_BTHK.shape[-1]
  return x_BTHK if extra <= 0 else jnp.pad(x_BTHK, [(0, 0)] * 3 + [(0, extra)])


def _single_level(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern, cudnn: bool):
  """One global or window level, through cuDNN (features zero-padded to v's width)."""
  if cudnn:
    dv = v_BTHV.shape[-1]
    qp, kp = (_pad_features(x, dv) for x in (q_BTHK, k_BTHK))
    return core.cudnn_attention(qp, kp, v_BTHV, dataclasses.replace(pattern, widths=(dv,)))
  return core.xla_attention(q_BTHK, k_BTHK, v_BTHV, pattern)


def _kernel(impl: str, q_BTHK, k_BTHK, v_BTHV, pattern: Pattern):
  if impl == "pallas":
    from structattn.attention.pallas_mlr import mlr_attention_pallas as fn
  else:
    from structattn.attention.mosaic_mlr import mlr_attention_mosaic as fn
  try:
    return fn(q_BTHK, k_BTHK, v_BTHV, pattern)
  except ValueError as e:  # shapes the kernel refuses (block nesting, non-causal lengths)
    raise _cannot_run(impl, str(e)) from e


def attention(q_BTHK, k_BTHK, v_BTHV, pattern: Pattern, impl: str = "auto"):
  """Softmax attention for a pattern; impl in auto | xla | cudnn | pallas | mosaic | reference
  (see the module docstring).  Raises a ValueError naming `attention.impl` when an
  explicitly requested fused kernel cannot run."""
  dtype = jnp.result_type(q_BTHK, k_BTHK, v_BTHV)
  dq, dv = q_BTHK.shape[-1], v_BTHV.shape[-1]
  served = resolve(impl, pattern, dtype, dq, dv, jax.default_backend())
  if served == "reference":
    return core.reference_attention(q_BTHK, k_BTHK, v_BTHV, pattern)
  if served in KERNEL_IMPLS:
    return _kernel(served, q_BTHK, k_BTHK, v_BTHV, pattern)
  if _is_sum(pattern):  # each part on its own: cuDNN can serve either
    a = pattern.widths[0]
    parts = served.split("+") if "+" in served else [served, served]
    glob, win = core.sum_parts(pattern)
    return (_single_level(q_BTHK[..., :a], k_BTHK[..., :a], v_BTHV, glob, parts[0] == "cudnn")
            + _single_level(q_BTHK[..., a:], k_BTHK[..., a:], v_BTHV, win, parts[1] == "cudnn"))
  if served == "cudnn":
    return core.cudnn_attention(q_BTHK, k_BTHK, v_BTHV, pattern)
  return core.xla_attention(q_BTHK, k_BTHK, v_BTHV, pattern)
