"""The absl entry points' shared front end: `--help` and flag errors, then `absl.app.run`.

    def main(argv=None):
      return cli.absl_main("structattn-sweep", __doc__, _define, _run, argv,
                           example="structattn-sweep --config=icr:sweep-head-dim-tiny ...",
                           presets=lambda p: p.startswith("sweep-"), required=("config",))

Each call defines its flags on a fresh `absl.flags.FlagValues`, so the entry points can be
called one after another in one process (tests) and a console script's `--help` lists its own
flags (absl's lists the flags of the module named by sys.argv[0], which for a console script
is the script's path, not the module that defined them). `main(argv)` takes the arguments
without the program name, like the argparse entry points.

`--help` (also -h, --helpshort, -?) prints the module's docstring, the flags, the config presets
where the entry point takes `--config`, and ends with a one-line example command; it exits 0.
A flag error (an unknown preset, an override naming no config field, a missing required flag,
an unknown flag) prints `PROG: error: ...` naming the valid choices and exits 2.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

HELP = ("--help", "-h", "--helpshort", "-?")
HELP_FULL = ("--helpfull",)


def wants_help(argv: Sequence[str]) -> str | None:
  """'short' or 'full' when argv (without the program name) asks for help before any `--`."""
  for a in argv:
    if a == "--":
      return None
    if a in HELP:
      return "short"
    if a in HELP_FULL:
      return "full"
  return None


def flags_text(fv, required: Sequence[str] = ()) -> str:
  """The flags of `fv` in definition order, one entry each: name, default, help."""
  seen, lines = set(), []
  for fl in (f for fs in fv.flags_by_module_dict().values() for f in fs):
    if fl.name in seen:
      continue
    seen.add(fl.name)
    name = f"--[no]{fl.name}" if fl.boolean else f"--{fl.name}"
    if fl.name in required:
      tail = "  (required)"
    elif fl.default not in (None, "", [], ()):
      tail = f"  (default: {fl.default_as_str})"
    else:
      tail = ""
    lines.append(f"  {name}{tail}")
    lines += textwrap.wrap(fl.help or "", width=92, initial_indent="      ",
                           subsequent_indent="      ")
  return "\n".join(lines)


def presets_text(keep: Callable[[str], bool] | None = None) -> str:
  """The package's config presets (all, or those whose pattern `keep` accepts)."""
  from structattn import configs
  return configs.presets_help(keep)


def help_text(doc: str, fv, example: str, presets: Callable[[str], bool] | bool | None,
              required: Sequence[str] = (), full: bool = False) -> str:
  parts = [doc.strip(), "flags:\n" + flags_text(fv, required)]
  if full:
    from absl import flags
    parts.append("absl flags:\n" + flags.FLAGS.get_help(prefix="  "))
  if presets:
    keep = presets if callable(presets) else None
    parts.append("Config presets (--config=NAME:PRESET; fields in braces take the values "
                 "listed;\noverride any field with --config.a.b=value):\n" + presets_text(keep))
  parts.append(f"Example:\n  {example}")
  return "\n\n".join(parts) + "\n"


def _unknown_flags(argv: Sequence[str], fv) -> list[str]:
  """Flag-like arguments that neither `fv` nor absl's own flags define; `--config.a.b=v`
  overrides of a flag of `fv` count as known (the config flag checks their fields). The
  argument after a value-taking flag written without '=' is its value, not a flag."""
  from absl import flags
  out, takes_value = [], False
  for a in argv:
    if a == "--":
      break
    if takes_value or not a.startswith("-") or a == "-":
      takes_value = False
      continue
    name = a.lstrip("-").split("=", 1)[0]
    base = name.split(".", 1)[0]
    flag = None
    for n in (name, base, name.removeprefix("no"), base.removeprefix("no")):
      for where in (fv, flags.FLAGS):
        if flag is None and n in where:
          flag = where[n]
    if flag is None:
      out.append(name)
    elif "=" not in a:  # '--flag value' (a non-boolean flag or a config override)
      takes_value = "." in name or not flag.boolean
  return out


def _unknown_message(unknown: Sequence[str], fv) -> str:
  import difflib
  names = [f.name for fs in fv.flags_by_module_dict().values() for f in fs if "." not in f.name]
  hints = []
  for u in unknown:
    close = difflib.get_close_matches(u, names, n=1)
    hints.append(f"--{u}" + (f" (did you mean --{close[0]}?)" if close else ""))
  return (f"unknown flag{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; valid flags "
          f"are {', '.join('--' + n for n in names)}")


def fail(prog: str, message: str, code: int = 2):
  sys.stderr.write(f"{prog}: error: {message}\n")
  raise SystemExit(code)


def absl_main(prog: str, doc: str, define: Callable[..., Any], run: Callable[[Any], Any],
              argv: Sequence[str] | None, *, example: str,
              presets: Callable[[str], bool] | bool | None = None,
              required: Sequence[str] = ()) -> Any:
  """Parse `argv` (without the program name; default sys.argv[1:]) with the flags that
  `define(flag_values, sys_argv)` defines, then `absl.app.run` `run(flag_values)`.

  `presets`: list the config presets in --help (True: all; a predicate on the pattern: some);
  `required`: flags that must be given."""
  from absl import app, flags
  argv = list(sys.argv[1:] if argv is None else argv)
  fv = flags.FlagValues()
  define(fv, [prog, *argv])
  for name in required:
    flags.mark_flag_as_required(name, flag_values=fv)
  asked = wants_help(argv)
  if asked:
    sys.stdout.write(help_text(doc, fv, example, presets, required, full=asked == "full"))
    raise SystemExit(0)
  unknown = _unknown_flags(argv, fv)
  if unknown:
    fail(prog, _unknown_message(unknown, fv))
  try:
    rest = fv([prog, *argv], known_only=True)
  except flags.Error as e:
    fail(prog, f"{e}\n(--help lists the flags" + (" and the config presets)" if presets
                                                    else ")"))
  return app.run(lambda _: run(fv), argv=rest)
