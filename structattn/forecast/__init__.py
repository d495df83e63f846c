"""Long-range time-series forecasting (LTSF): data, a PatchTST-style model, the task.

  data:      load_splits, Windows, TrainBatches, eval_batches (CSV or TFDS array_record)
  tfds_data: the `StructattnForecast` TFDS builder
  model:     PatchForecaster (patches, learned positions, non-causal blocks, flatten head)
  task:      build(config) -> structattn.tasks.TaskSetup (config.task='forecast')
"""
