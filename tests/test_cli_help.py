"""Every console script of setup.cfg: `--help` lists its presets or figures and ends with a
one-line example; flag errors name the valid choices. The scripts are read from setup.cfg, so a
new entry point without such a help fails here."""

import configparser
import importlib
from pathlib import Path

import pytest

from structattn import configs, reproduce

ROOT = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
  """{script name: 'module:function'} from setup.cfg's [options.entry_points]."""
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  out = {}
  for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines():
    name, target = (t.strip() for t in line.split("=", 1))
    out[name] = target
  return out


SCRIPTS = console_scripts()
PRESETS = [f"{n}:{p}" for n in configs.CONFIGS for p in configs.module(n).PRESETS.patterns]


def entry(name: str):
  mod, fn = SCRIPTS[name].split(":")
  return getattr(importlib.import_module(mod), fn)


def run(name: str, argv, capsys) -> tuple[object, str, str]:
  """(exit code or return value, stdout, stderr) of one entry point called in-process."""
  try:
    code = entry(name)(list(argv))
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def test_setup_cfg_names_the_entry_points():
  assert {"structattn-train", "structattn-sweep", "structattn-reproduce", "structattn-sample",
          "structattn-results", "structattn-fit", "structattn-frontier"} <= set(SCRIPTS)
  for name in SCRIPTS:
    assert callable(entry(name)), name


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_lists_presets_and_ends_with_an_example(name, capsys):
  code, text, _ = run(name, ["--help"], capsys)
  assert code in (0, None)
  assert "example" in text.lower()
  lines = text.rstrip().splitlines()
  assert lines[-2].strip().rstrip(":").lower() == "example", lines[-3:]
  assert lines[-1].strip().startswith(name + " "), lines[-1]
  if "--config" in text:  # an entry point that takes a config lists the presets
    assert sum(p in text for p in PRESETS) >= 1


def test_train_help_lists_its_flags_and_every_preset(capsys):
  _, text, _ = run("structattn-train", ["--help"], capsys)
  for flag in ("--config", "--workdir", "--compilation_cache", "--distributed"):
    assert f"  {flag}" in text
  missing = [p for p in PRESETS if p not in text]
  assert not missing
  assert "lm:tiny" in text and "icr:paper-{variant}-{d_input}-{width}" in text


def test_sweep_help_lists_the_sweep_presets_only(capsys):
  _, text, _ = run("structattn-sweep", ["--help"], capsys)
  sweeps = [p for p in PRESETS if p.split(":", 1)[1].startswith("sweep-")]
  assert sweeps and all(f"  {p}" in text for p in sweeps)
  assert "  lm:tiny-{variant}" not in text and "  icr:paper-" not in text
  assert "  --[no]dry_run" in text and "  --parallel" in text


def test_reproduce_help_lists_figures_scales_and_presets(capsys):
  _, text, _ = run("structattn-reproduce", ["--help"], capsys)
  for figure in reproduce.FIGURES:
    row = next(l for l in text.splitlines() if l.strip().startswith(figure + " "))
    assert reproduce.preset_label(figure) in row
    for scale in reproduce.scales_for(figure):
      if scale not in reproduce.STUDY_SCALES:
        assert scale in row, (figure, scale)
  assert "icr:sweep-compute-<scale>" in text and "structattn.icr_study" in text
  for scale in reproduce.STUDY_SCALES + reproduce.ICR_STUDY_SCALES:
    assert scale in text


def test_help_can_be_asked_twice_in_one_process(capsys):
  """Each absl entry point defines its flags afresh, so one process can call several."""
  for name in ("structattn-train", "structattn-sweep", "structattn-train"):
    code, text, _ = run(name, ["--help"], capsys)
    assert code == 0 and "  --workdir" in text


# ------------------------------------------------------------------------------ errors

def test_train_unknown_preset_names_the_valid_ones(capsys, tmp_path):
  code, out, err = run("structattn-train", ["--config=lm:nope", f"--workdir={tmp_path}"], capsys)
  assert code == 2 and not out
  assert "structattn-train: error:" in err and "unknown preset 'nope'" in err
  assert "lm:tiny" in err and "lm:paper-{variant}-{width}" in err


def test_train_unknown_config_name_names_the_valid_ones(capsys, tmp_path):
  code, _, err = run("structattn-train", ["--config=nope:tiny", f"--workdir={tmp_path}"],
                     capsys)
  assert code == 2 and "unknown config 'nope'" in err and "lm, icr, forecast" in err


def test_train_unknown_override_names_the_valid_fields(capsys, tmp_path):
  code, _, err = run("structattn-train", ["--config=lm:tiny", "--config.model.nope=1",
                                          f"--workdir={tmp_path}"], capsys)
  assert code == 2
  assert "--config.model.nope: config.model has no field 'nope'" in err
  assert "valid fields are" in err and "d_model" in err and "num_layers" in err
  code, _, err = run("structattn-train", ["--config=lm:tiny", "--config.nope.x=1",
                                          f"--workdir={tmp_path}"], capsys)
  assert code == 2 and "config has no field 'nope'" in err and "model" in err


def test_train_unknown_flag_and_missing_flag(capsys, tmp_path):
  code, _, err = run("structattn-train", ["--config=lm:tiny", f"--wrkdir={tmp_path}"], capsys)
  assert code == 2 and "unknown flag --wrkdir (did you mean --workdir?)" in err
  assert "valid flags are --config, --workdir" in err
  code, _, err = run("structattn-train", ["--config=lm:tiny"], capsys)
  assert code == 2 and "--workdir" in err


def test_sweep_unknown_preset_and_override(capsys, tmp_path):
  code, _, err = run("structattn-sweep", ["--config=icr:nope", f"--workdir={tmp_path}"], capsys)
  assert code == 2 and "unknown ICR preset 'nope'" in err
  assert "icr:sweep-head-dim-{scale}" in err and "icr:sweep-compute-{scale}" in err
  code, _, err = run("structattn-sweep", ["--config=icr:sweep-head-dim-tiny", "--config.nope=1",
                                          f"--workdir={tmp_path}"], capsys)
  assert code == 2 and "config has no field 'nope'" in err and "train" in err


def test_sweep_of_a_preset_without_sweep_names_the_sweep_presets():
  from structattn import sweep
  with pytest.raises(ValueError, match="no `sweep` list") as e:
    sweep.points(configs.load("icr:tiny"))
  for p in ("lm:sweep-scaling-{scale}", "icr:sweep-head-dim-{scale}",
            "forecast:sweep-table-{scale}"):
    assert p in str(e.value)


def test_reproduce_unknown_scale_figure_and_override(capsys, tmp_path):
  code, _, err = run("structattn-reproduce", ["icr-head-dim", "--scale=nope"], capsys)
  assert code == 2 and "invalid choice: 'nope'" in err
  assert all(f"'{s}'" in err for s in reproduce.SCALES + reproduce.STUDY_SCALES)
  code, _, err = run("structattn-reproduce", ["nope"], capsys)
  assert code == 2 and all(f in err for f in reproduce.FIGURES)
  code, _, err = run("structattn-reproduce", ["icr-compute", "--scale=short",
                                              f"--workdir={tmp_path}"], capsys)
  assert code == 1 and "--scale='short' is invalid for icr-compute" in err
  assert "'tiny', 'paper'" in err
  code, _, err = run("structattn-reproduce", ["icr-head-dim", "--set", "model.nope=1",
                                              f"--workdir={tmp_path}"], capsys)
  assert code == 1 and "model.nope" in err and "d_model" in err
  assert not (tmp_path / "runs").exists()  # nothing ran


def test_unknown_flag_scan_keeps_values_and_overrides():
  from absl import flags

  from structattn import cli, train
  fv = flags.FlagValues()
  argv = ["--config=lm:tiny", "--config.mesh.data", "-1", "--workdir", "-odd-dir",
          "--config.progress=False", "--compilation_cache=", "--verbosity=1", "--noprogres"]
  train._define_flags(fv, ["structattn-train", *argv])
  assert cli._unknown_flags(argv, fv) == ["noprogres"]
  assert cli._unknown_flags(["--workdir=x", "--", "--anything"], fv) == []
