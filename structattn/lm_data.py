"""The LM task's data under its former name: see `structattn.lm.data`."""

from structattn.lm.data import RunData, build, tokenizer_for

__all__ = ["RunData", "build", "tokenizer_for"]
