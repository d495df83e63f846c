"""Run configs (big_vision style), loadable by name from the installed package or by path.

    structattn-train --config=lm:tiny --workdir=runs/tiny
    structattn-train --config=icr:paper-mha-32-128 --workdir=runs/icr --config.train.steps=100
    structattn-train --config=path/to/my_config.py:preset --workdir=runs/mine

A config spec is `NAME[:PRESET]` with NAME one of `CONFIGS` (a module of this package), or
`PATH.py[:PRESET]` for any file with a `get_config(arg)` function.  Paths of the form
`configs/lm.py` (the layout of older checkouts) that do not exist resolve to the package
module of the same name, so old commands keep working.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import ml_collections

from structattn.configs.renames import migrate, migrate_dict  # noqa: F401  (older keys)

CONFIGS = ("lm", "icr", "forecast")
CONFIG_DIR = Path(__file__).resolve().parent


def module(name: str) -> ModuleType:
  """The config module of a package config name ('lm', 'icr', 'forecast')."""
  if name not in CONFIGS:
    raise ValueError(f"unknown config {name!r}: valid names are {', '.join(CONFIGS)} (or a path "
                     f"to a .py file with get_config)")
  return importlib.import_module(f"{__name__}.{name}")


def _module_for(spec: str) -> ModuleType:
  if spec in CONFIGS:
    return module(spec)
  path = Path(spec).expanduser()
  if path.suffix != ".py":
    raise ValueError(f"unknown config {spec!r}: valid names are {', '.join(CONFIGS)} (e.g. "
                     f"--config=lm:tiny), or a path to a .py file with get_config")
  if path.is_file():
    if path.resolve().parent == CONFIG_DIR and path.stem in CONFIGS:
      return module(path.stem)  # the package's own file: one module object
    name = f"structattn_user_config_{abs(hash(str(path.resolve())))}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = mod
    mod_spec.loader.exec_module(mod)
    return mod
  if path.parent.name == "configs" and path.stem in CONFIGS:
    return module(path.stem)  # an older checkout's configs/<name>.py
  raise FileNotFoundError(f"config file {spec!r} not found; package configs load by name: "
                          f"{', '.join(f'{c}:PRESET' for c in CONFIGS)}")


def load(spec: str) -> ml_collections.ConfigDict:
  """The config of `NAME[:PRESET]` or `PATH.py[:PRESET]` (see the module docstring)."""
  name, sep, preset = spec.partition(":")
  mod = _module_for(name.strip())
  return mod.get_config(preset) if sep else mod.get_config()


def presets_help(keep=None) -> str:
  """Every package preset (or those whose pattern `keep` accepts, e.g. the sweeps) with its
  allowed values and one line on what it is."""
  return "\n".join(t for t in (module(n).PRESETS.help(keep=keep) for n in CONFIGS) if t)


def override_error(config, path: str) -> str | None:
  """Why `--config.<path>=...` names no field of `config` (None when it does)."""
  node, walked = config, "config"
  for key in path.split("."):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if key not in keys:
      return (f"--{walked}.{key}: {walked} has no field {key!r}; valid fields are "
              f"{', '.join(sorted(keys)) or '(none: it is a value, not a section)'}")
    node, walked = node[key], f"{walked}.{key}"
  return None


def define_flag(name: str = "config", example: str = "lm:tiny", lock_config: bool = True,
                flag_values=None, sys_argv=None):
  """An absl flag like ml_collections' `DEFINE_config_file` that also loads package configs
  by name (`--config=lm:tiny`); `--config.a.b=v` overrides work as usual, and one that names
  no field fails with the valid field names."""
  from absl import flags
  from ml_collections.config_flags import config_flags

  class _Parser(config_flags.ConfigFileFlagParser):
    def parse(self, argument):
      try:
        config = load(argument)
      except (ValueError, FileNotFoundError, KeyError) as e:
        raise ValueError(str(e)) from None
      if self._lock_config:
        config.lock()
      return config

  class _Flag(config_flags._ConfigFlag):  # the override machinery of DEFINE_config_file
    def _parse(self, argument):
      try:
        return super()._parse(argument)
      except (AttributeError, KeyError) as e:
        config = load(argument)
        for path in self._GetOverrides(self._GetArgv()):
          err = override_error(config, path)
          if err:
            raise flags.IllegalFlagValueError(err) from None
        raise flags.IllegalFlagValueError(str(e)) from None

  flag_values = flags.FLAGS if flag_values is None else flag_values
  caller = sys._getframe(1).f_globals.get("__name__", "")
  flag = _Flag(parser=_Parser(name=name, lock_config=lock_config),
               serializer=flags.ArgumentSerializer(), name=name, default=None,
               help_string=f"Config NAME:PRESET or PATH.py:PRESET, e.g. --config={example} "
               "(the presets are listed in --help); override fields with --config.a.b=value.",
               flag_values=flag_values, sys_argv=sys_argv)
  # Listed under the calling module, so its --help shows the presets.
  return flags.DEFINE_flag(flag, flag_values,
                           module_name=sys.argv[0] if caller == "__main__" else caller)
