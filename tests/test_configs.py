"""Configs: loading by name and path, the shared sections, presets and override errors."""

import pytest
from absl import flags

from structattn import configs
from structattn.attention import from_config
from structattn.configs import common


def _flag_config(argv):
  fv = flags.FlagValues()
  configs.define_flag("config", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def test_load_by_name_path_and_older_checkout_path():
  by_name = configs.load("lm:tiny")
  assert by_name.task == "lm" and configs.load("lm").to_dict() == by_name.to_dict()
  by_path = configs.load(str(configs.CONFIG_DIR / "icr.py") + ":paper-mha-32-128")
  assert by_path.model.d_model == 128 and by_path.icr.d_input == 32
  assert configs.load("configs/forecast.py:tiny").task == "forecast"  # older checkout layout


def test_user_config_file(tmp_path):
  (tmp_path / "mine.py").write_text(
      "from structattn.configs import lm\n"
      "def get_config(arg='8'):\n"
      "  c = lm.get_config('tiny')\n"
      "  c.train.steps = int(arg)\n"
      "  return c\n")
  assert configs.load(f"{tmp_path}/mine.py:5").train.steps == 5


@pytest.mark.parametrize("spec,match", [
    ("lm:huge", r"(?s)unknown preset 'huge'.*lm:tiny-\{variant\}"),
    ("lm:paper-mha-100", r"width='100' is invalid: allowed values are 256, 384, 512, 768"),
    ("forecast:etth1-24", r"horizon=24 is invalid for etth1: allowed values are 96"),
    ("icr:paper-mha-x-128", r"d_input='x' is invalid: expected int"),
    ("nope:tiny", r"unknown config 'nope': valid names are lm, icr, forecast"),
    ("missing/file.py:tiny", r"not found"),
])
def test_bad_specs_name_the_valid_choices(spec, match):
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    configs.load(spec)


def test_every_preset_has_the_shared_sections():
  names = {"lm": ["tiny", "tiny-mlbtc", "paper-mlr-768", "sweep-scaling-short"],
           "icr": ["tiny", "tiny-bilinear_btt", "paper-bilinear_mlr-64-256",
                   "sweep-compute-tiny"],
           "forecast": ["tiny", "tiny-swa", "etth1-96", "illness-24-mlr", "sweep-table-tiny"]}
  for task, presets in names.items():
    for p in presets:
      c = configs.load(f"{task}:{p}")
      assert set(c.attention.keys()) == set(common.ATTENTION_DEFAULTS), (task, p)
      assert set(c.mesh.keys()) == {"data", "fsdp", "tensor", "devices", "axis_types"}
      assert "rules" in c.sharding


def test_mlbtc_from_a_preset_and_from_overrides():
  c = configs.load("lm:tiny-mlbtc")
  spec = from_config(c.attention, d_model=c.model.d_model, seq_len=c.model.seq_len)
  assert [lv.kind for lv in spec.levels] == ["btt", "lowrank", "lowrank"]
  c = _flag_config([
      "prog", "--config=lm:tiny", "--config.attention.variant=mlbtc",
      "--config.attention.levels=({'seq': 'global', 'rank': 8}, "
      "{'seq': 'block', 'size': 32, 'rank': 8})",
      "--config.attention.norm=joint", "--config.attention.mlr_divide=levels"])
  spec = from_config(c.attention, d_model=c.model.d_model, seq_len=c.model.seq_len)
  assert spec.variant == "mlbtc" and spec.norm == "joint" and spec.divide == "levels"
  assert [(lv.seq, lv.size, lv.rank) for lv in spec.levels] == [("global", 0, 8),
                                                                 ("block", 32, 8)]


def test_override_of_a_missing_field_names_the_valid_fields():
  with pytest.raises(flags.IllegalFlagValueError,
                     match=r"config.train has no field 'stepz'; valid fields are .*steps"):
    _flag_config(["prog", "--config=lm:tiny", "--config.train.stepz=3"])
  assert _flag_config(["prog", "--config=icr:tiny", "--config.train.steps=3"]).train.steps == 3


def test_presets_help_lists_every_config():
  text = configs.presets_help()
  for line in ("lm:tiny", "icr:paper-{variant}-{d_input}-{width}", "forecast:sweep-table-{scale}"):
    assert line in text


def test_older_config_keys_migrate():
  from structattn.configs.renames import migrate, migrate_dict
  lm_old = {"task": "lm", "eval": {"every": 50, "batches": 4, "batch_size": 16},
            "data": {"data_dir": "/tmp/tfds", "corpus": "shakespeare"}, "log_every": 10}
  lm_new = migrate_dict(lm_old)
  assert lm_new["eval_every"] == 50 and "every" not in lm_new["eval"]
  assert lm_new["data"] == {"tfds_dir": "/tmp/tfds", "corpus": "shakespeare"}
  assert lm_old["eval"]["every"] == 50  # the input is not modified
  icr = migrate_dict({"task": "icr", "eval": {"every": 500, "num_prompts": 2048,
                                              "batch_size": 1024}})
  assert icr["eval"] == {"batches": 2, "batch_size": 1024} and icr["eval_every"] == 500
  fc = migrate_dict({"task": "forecast", "model": {"d_model": 16, "d_mlp": 128},
                     "data": {"data_dir": "csvs"}, "eval": {"every": 7}})
  assert fc["model"] == {"d_model": 16, "mlp_ratio": 8} and fc["data"] == {"data_dir": "csvs"}
  current = configs.load("forecast:tiny")
  assert migrate(current) is current  # already current: unchanged
  assert migrate_dict(current.to_dict()) == current.to_dict()


def test_older_run_directory_reads_in_results(tmp_path):
  import json
  from structattn import results
  run = tmp_path / "old"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(
      {"task": "icr", "model": {"d_model": 16}, "eval": {"every": 20, "num_prompts": 64,
                                                         "batch_size": 32}}))
  (run / "result.json").write_text(json.dumps({"status": "completed"}))
  row = results.read_run(run, tmp_path)
  assert row["eval_every"] == 20 and row["eval.batches"] == 2 and "eval.every" not in row


@pytest.mark.slow
@pytest.mark.parametrize("module,expect", [
    ("structattn.train", "lm:paper-{variant}-{width}"),
    ("structattn.sweep", "icr:sweep-head-dim-{scale}"),
    ("structattn.reproduce", "icr:sweep-head-dim-<scale>"),
    ("structattn.results", "structattn-results runs/lm"),
    ("structattn.fit_cli", "structattn-fit runs/lm"),
    ("structattn.sample", "structattn-sample --workdir"),
    ("structattn.frontier", "structattn-frontier runs/"),
])
def test_every_entry_point_helps_from_any_directory(module, expect, tmp_path):
  """--help from a directory without a checkout: presets and a one-line example."""
  import os
  import subprocess
  import sys
  from pathlib import Path
  root = Path(configs.__file__).resolve().parents[2]
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert expect in out.stdout and "xample" in out.stdout
