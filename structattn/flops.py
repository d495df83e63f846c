"""Parameter, MAC and FLOP accounting for one attention layer (pure Python, exact integers).

Conventions (README: FLOP conventions; log both and say which):

* ``'paper'``: forward multiply-accumulates (MACs) of the matmuls only, for one sequence of
  length T, counted *non-causally* as the reference code does: a global level scores all
  T*T pairs, a block level of size b all T*b in-block pairs (both directions), a window
  level w the symmetric band ``|i - j| <= w`` (``T*(2w+1) - w*(w+1)`` pairs, capped at T*T).
  MHA therefore counts the full T x T QK and PV; MLR only its in-block QK products.
* ``'true_fwd'``: the forward MACs a correct kernel really needs: when ``spec.causal`` the
  pairs are counted causally (global ``T(T+1)/2``, block ``(T/b) * b(b+1)/2``, window
  ``sum_i min(i+1, w+1)``, i.e. keys j in [i-w, i]); a non-causal spec counts the same
  exact pairs as the paper convention.
* Training FLOPs (``attention_flops``): ``2`` FLOPs per MAC times ``3`` for forward plus
  backward, applied to the ``'true_fwd'`` MACs.
* Kernel benchmarks (``kernel_flops``): the FlashAttention convention ``4*B*H*T^2*d``
  forward, halved when causal; backward is 2.5x forward.

What is counted: the Q/K/V/O projections (no biases) and the two attention matmuls. Score
MACs are ``H * sum_l pairs_l * width_l``: each level scores the pairs inside its own sequence
extent with its own ``width_l = lv.width(D)`` dims (for nested levels this equals scoring
each pair with the prefix width of its deepest shared level). PV MACs are
``H * d_head * pairs`` of the union of the levels (the coarsest level, since levels nest);
GSWA with ``combine='sum'`` runs two softmaxes with their own PV products, so its PV counts
the global and the window pairs. Softmax, LayerNorm, scaling and masking are not counted.
Block sizes that do not divide T are counted exactly (full blocks plus the remainder block).
"""

from __future__ import annotations

from structattn.attention.spec import FEATURES, AttentionSpec, Level, btt_factors

CONVENTIONS = ("paper", "true_fwd")


def _check_convention(convention: str) -> None:
  if convention not in CONVENTIONS:
    raise ValueError(f"convention={convention!r} is invalid: allowed values are {CONVENTIONS}")


def _seq_len(spec: AttentionSpec, T: int | None) -> int:
  t = spec.seq_len if T is None else T
  if isinstance(t, bool) or not isinstance(t, int) or t <= 0:
    raise ValueError(f"T={t!r} is invalid: the sequence length must be a positive integer")
  return t


# ----------------------------------------------------------------------------- parameters


def level_qk_params(spec: AttentionSpec, lv: Level) -> int:
  """Query plus key projection parameters of one level (no biases).

  lowrank (p blocks, rank r): q and k are block-diagonal maps with p blocks of
    (D/p) x (H*r) each, so ``2 * D * H * r``.
  btt (rank s, D = a*b): only the key side has weights, cores (a, b, H*b*s) and
    (H*b, a, a*s), so ``H * s * D * (a + b)``; the query is the token itself.
  """
  d, h = spec.d_model, spec.num_heads
  feature = FEATURES.get(lv.kind)
  if feature is not None and lv.kind not in ("lowrank", "btt"):
    return feature.num_params(lv, d, h)
  if lv.kind == "btt":
    a, b = btt_factors(d)
    return h * lv.rank * d * (a + b)
  return 2 * d * h * lv.rank


def attention_params(spec: AttentionSpec) -> dict[str, int]:
  """Parameters of one attention layer: keys ``qk``, ``v``, ``o``, ``norm``, ``total``.

  ``v``: D x (H*d_head); ``o``: (H*d_head) x D; ``norm``: LayerNorm weights (no bias) for q
  and k over the per-head width d_qk, shared across heads (``2 * d_qk`` for both 'joint' and
  'per_level' norms; 0 if ``qk_norm`` is off or ``norm='none'``).
  """
  qk = sum(level_qk_params(spec, lv) for lv in spec.levels)
  v = spec.d_model * spec.num_heads * spec.d_head
  o = spec.num_heads * spec.d_head * spec.d_model
  norm = 2 * spec.d_qk if (spec.qk_norm and spec.norm != "none") else 0
  return dict(qk=qk, v=v, o=o, norm=norm, total=qk + v + o + norm)


# ----------------------------------------------------------------------------- pair counts


def _blocks_pairs(T: int, b: int, causal: bool) -> int:
  full, rem = divmod(T, b)
  if causal:
    return full * (b * (b + 1) // 2) + rem * (rem + 1) // 2
  return full * b * b + rem * rem


def _window_pairs(T: int, w: int, causal: bool) -> int:
  w = min(w, T - 1)
  if causal:  # sum_i min(i + 1, w + 1)
    return (w + 1) * (w + 2) // 2 + (T - w - 1) * (w + 1)
  return T * (2 * w + 1) - w * (w + 1)  # sum_i #{j in [0, T): |i - j| <= w}


def level_pairs(lv: Level, T: int, causal: bool) -> int:
  """Number of (query, key) pairs inside one level's sequence extent at length T."""
  if lv.seq == "global":
    return _blocks_pairs(T, T, causal)
  if lv.seq == "block":
    return _blocks_pairs(T, lv.size, causal)
  if lv.seq == "window":
    return _window_pairs(T, lv.size, causal)
  raise ValueError(f"level.seq={lv.seq!r} is invalid: allowed values are ('global', 'block', 'window')")


def pair_counts(spec: AttentionSpec, T: int | None = None,
                convention: str = "paper") -> tuple[int, ...]:
  """Pairs scored by each level (paper: non-causal; true_fwd: causal iff spec.causal)."""
  _check_convention(convention)
  t = _seq_len(spec, T)
  causal = spec.causal and convention == "true_fwd"
  return tuple(level_pairs(lv, t, causal) for lv in spec.levels)


def pv_pairs(spec: AttentionSpec, T: int | None = None, convention: str = "paper") -> int:
  """Pairs whose probabilities multiply V: the union of the levels (the coarsest one, as
  levels nest), or global + window pairs for GSWA with two summed softmaxes."""
  pairs = pair_counts(spec, T, convention)
  if spec.combine == "sum":
    return sum(pairs)
  return max(pairs)


# ----------------------------------------------------------------------------- MACs / FLOPs


def attention_macs(spec: AttentionSpec, T: int | None = None,
                   convention: str = "paper") -> dict[str, int]:
  """Forward MACs of one attention layer for one sequence of length T (default seq_len).

  Keys: ``proj_qk`` (T * qk params: per token a dense/block-diagonal or BTT map costs its
  parameter count), ``proj_v``, ``proj_o``, ``scores`` (``H * sum_l pairs_l * width_l``),
  ``pv`` (``H * d_head * pv_pairs``) and ``total``. See the module docstring for the pair
  counting of the 'paper' and 'true_fwd' conventions.
  """
  _check_convention(convention)
  t = _seq_len(spec, T)
  params = attention_params(spec)
  h = spec.num_heads
  pairs = pair_counts(spec, t, convention)
  out = dict(
      proj_qk=t * params["qk"],
      proj_v=t * params["v"],
      proj_o=t * params["o"],
      scores=h * sum(p * w for p, w in zip(pairs, spec.widths)),
      pv=h * spec.d_head * pv_pairs(spec, t, convention),
  )
  out["total"] = sum(out.values())
  return out


def attention_flops(spec: AttentionSpec, T: int | None = None) -> dict:
  """Summary for logging one attention layer at length T (default seq_len).

  ``paper_macs_per_token``: paper-convention forward MACs / T.
  ``train_flops_per_token``: 6 * true_fwd MACs / T (2 FLOPs per MAC, x3 forward+backward).
  ``params``: total parameters. ``paper`` and ``true_fwd``: the raw ``attention_macs`` dicts.
  """
  t = _seq_len(spec, T)
  paper = attention_macs(spec, t, "paper")
  true = attention_macs(spec, t, "true_fwd")
  return dict(
      paper_macs_per_token=paper["total"] / t,
      train_flops_per_token=6 * true["total"] / t,
      params=attention_params(spec)["total"],
      paper=paper,
      true_fwd=true,
  )


def qk_mac_ratio(spec: AttentionSpec, T: int | None = None, convention: str = "paper") -> float:
  """Score (QK) MACs relative to dense MHA with the same heads and width d_qk at the same T
  and convention (dense: ``H*T^2*d_qk``, or ``H*T(T+1)/2*d_qk`` causal true_fwd)."""
  _check_convention(convention)
  t = _seq_len(spec, T)
  causal = spec.causal and convention == "true_fwd"
  dense = spec.num_heads * _blocks_pairs(t, t, causal) * spec.d_qk
  return attention_macs(spec, t, convention)["scores"] / dense


def kernel_flops(B: int, H: int, T: int, d: int, causal: bool = True,
                 backward: bool = False) -> int:
  """FlashAttention-convention FLOPs of an attention kernel.

  Forward ``4*B*H*T^2*d`` (QK^T and PV, 2 FLOPs per MAC), halved when causal. With
  ``backward=True`` returns forward + backward, backward = 2.5 x forward (3.5 x forward).
  """
  fwd = 4 * B * H * T * T * d
  if causal:
    fwd //= 2
  return fwd * 7 // 2 if backward else fwd


# ----------------------------------------------------------------------------- whole model


def model_flops(specs, d_model: int, d_mlp: int, vocab_size: int, T: int | None = None) -> dict:
  """Per-token compute of a GPT-style stack with one AttentionSpec per layer.

  ``paper_macs_per_token``: the paper convention (forward MACs of the non-embedding matmuls:
  attention and MLP; the LM head and embeddings excluded; attention pairs counted as in
  `attention_macs(..., 'paper')` at full length T).
  ``train_flops_per_token``: true training FLOPs, 6 x forward MACs (2 FLOPs per MAC, x3 for
  forward + backward) of attention (causal pair counts), MLP and the LM head.
  """
  t = specs[0].seq_len if T is None else T
  mlp = 2 * d_model * d_mlp
  paper = sum(attention_macs(s, t, "paper")["total"] for s in specs) / t + len(specs) * mlp
  true = sum(attention_macs(s, t, "true_fwd")["total"] for s in specs) / t + len(specs) * mlp
  true += d_model * vocab_size
  return {"paper_macs_per_token": float(paper), "train_flops_per_token": float(6 * true)}
