"""Long-range time-series forecasting (LTSF): data, a PatchTST-style model, the task.

  splits:    datasets, CSV files (`data.csv_dir`, or a packaged dataset) -> standardised splits
  data:      load_splits, Windows, TrainBatches, device_batch_fn, eval_batches
  tfds_data: the `StructattnForecast` TFDS builder (array_record cache of `splits`)
  model:     PatchForecaster (patches, learned positions, non-causal encoder, flatten head;
             a 'gpt' encoder or PatchTST's with BatchNorm and residual attention)
  task:      build(config) -> structattn.tasks.TaskSetup (config.task='forecast')
  table:     the results-table runner (seed groups, worker processes, a time limit)

Imports flow splits <- tfds_data <- data <- task (data imports tfds_data lazily).
Shape letters as in the package legend (`structattn`: B windows, F forecast steps, C
channels, D, H, K, V, M), with three that mean something else inside this subpackage: L
look-back steps, S series (B*C), N patches (or split rows in `data`); and P patch length.
"""
