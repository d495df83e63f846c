"""Long-range time-series forecasting (LTSF): data, a PatchTST-style model, the task.

  splits:    datasets, CSV files (`data.csv_dir`, or a packaged dataset) -> standardised splits
  data:      load_splits, Windows, TrainBatches, device_batch_fn, eval_batches
  tfds_data: the `StructattnForecast` TFDS builder (array_record cache of `splits`)
  model:     PatchForecaster (patches, learned positions, non-causal encoder, flatten head;
             a 'gpt' encoder or PatchTST's with BatchNorm and residual attention)
  task:      build(config) -> structattn.tasks.TaskSetup (config.task='forecast')
  table:     the results-table runner (seed groups, worker processes, a time limit)

Imports flow splits <- tfds_data <- data <- task (data imports tfds_data lazily).
Shape letters are the package legend's (`structattn`): B windows, X look-back steps, F
forecast steps, C channels, U univariate series (B*C), T patches (in `data` and `splits`:
a split's rows, the time steps), I the values of one patch; D, H, K, V, M and L mean
what they mean everywhere else.
"""
