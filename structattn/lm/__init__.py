"""The language-modelling task (config.task = 'lm'): a GPT on a tokenised corpus.

  loss:  cross_entropy, loss_fn, eval_step   pure functions of (params, graphdef, rest, batch)
  data:  build(config) -> RunData            the corpus, tokenised and batched per host
  task:  build(config) -> structattn.tasks.TaskSetup

Only the losses are imported here; `structattn.lm.data` / `structattn.lm.task` load the data
stack where they are used.
"""

from structattn.lm.loss import cross_entropy, eval_step, loss_fn

__all__ = ["cross_entropy", "eval_step", "loss_fn"]
