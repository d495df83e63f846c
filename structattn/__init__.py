"""structattn: structured-matrix attention (BTT, MLR, MLBTC) and scaling-law studies.

Shape suffixes.  An array's name may end in one capital letter per axis, in axis order
(`x_BTD` is batch x positions x model width).  Each letter has one meaning everywhere:

  B  batch: sequences, prompts, forecast windows; the independent problems of a batched
     product (pieces of a blocked attention core)
  G  members of a vmapped group of runs (a leading stacked axis)
  T  sequence positions: tokens, prompt positions, patches, the steps of a time series;
     in attention, the queries
  S  key/value positions, where they differ from the queries' (a KV cache, a key block)
  D  model width (`model.d_model`)
  H  attention heads
  K  query/key width per head (`attention.d_qk`)
  V  value width per head (`attention.d_head`)
  W  one level's query/key width (a slice of K)
  L  levels of a multi-level scoring function
  M  hidden width of an MLP
  I  input features of a linear map (the in-context regression's `icr.d_input`, the
     values of one forecasting patch)
  O  output features of a linear map (the vocabulary, for LM logits)
  P  feature blocks of a block-diagonal or BTT map
  R  rank
  N  points of an in-context regression prompt
  C  channels of a multivariate time series
  U  univariate series of the forecaster: one per channel of each window (B*C)
  X  look-back steps of a forecast window (`data.seq_len`, the forecaster's input x)
  F  forecast steps (the forecasting horizon)

Digits are literal sizes (`x_BT1`).  Names without a suffix say their shape in words.
"""

__version__ = "0.1.0"
