"""Small run configs shared by the tests (helpers, not tests)."""

from structattn.configs import icr as icr_configs
from structattn.configs import lm as lm_configs


def small_lm(variant: str = "mha", *, d_model: int = 32, seq_len: int = 64, heads: int = 2,
             pos: str = "learned"):
  """A 2-layer float32 LM config of `variant` (MLR ranks 8|4|2|2, window 16)."""
  c = lm_configs.get_config(f"tiny-{variant}")
  c.model.update(d_model=d_model, num_layers=2, seq_len=seq_len, dtype="float32", pos=pos)
  c.attention.update(num_heads=heads, mlr_ranks=(8, 4, 2, 2), window=16)
  return c


def on_corpus(c, corpus):
  """`c` reading the text files of `corpus`, its TFDS dataset prepared beside it."""
  c.data.corpus = str(corpus)
  c.data.tfds_dir = str(corpus.parent / "tfds")
  return c


def small_icr(*, seed: int = 0, width: int = 16, d_input: int = 4, **icr):
  """A 1-layer in-context-regression config (MHA with one head)."""
  c = icr_configs.get_config("tiny")
  c.seed = seed
  c.model.update(d_model=width, num_layers=1)
  c.icr.update(d_input=d_input, **icr)
  return c
