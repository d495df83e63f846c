"""Named presets with typed arguments, shared by every config module.

A config module registers its presets as patterns whose `{fields}` are typed by the
builder's annotations and optionally restricted to a set of values:

    PRESETS = Presets("lm", default="tiny")

    @PRESETS.add("paper-{variant}-{width}", variant=PAPER_VARIANTS, width=PAPER_WIDTHS)
    def paper(variant: str, width: int) -> ConfigDict: ...

    def get_config(arg: str = "") -> ConfigDict:
      return PRESETS.build(arg)

`build` matches the name against every pattern (fields never contain '-'), converts each
field to its annotated type, checks it against its allowed values and calls the builder.
An unknown name or an invalid field raises `ValueError` naming the valid presets.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any, Callable, Mapping, Sequence

_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclasses.dataclass(frozen=True)
class Preset:
  pattern: str  # e.g. 'paper-{variant}-{width}'
  fn: Callable[..., Any]
  choices: Mapping[str, tuple]  # field -> allowed values (absent: any value of its type)
  types: Mapping[str, type]
  doc: str  # one line
  check: Callable[..., str | None] | None = None  # extra validation: error text or None

  @property
  def regex(self) -> re.Pattern:
    parts, pos = [], 0
    for m in _FIELD.finditer(self.pattern):
      parts.append(re.escape(self.pattern[pos:m.start()]))
      parts.append(f"(?P<{m.group(1)}>[^-]+)")
      pos = m.end()
    parts.append(re.escape(self.pattern[pos:]))
    return re.compile("".join(parts) + r"\Z")

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(_FIELD.findall(self.pattern))

  def describe(self) -> str:
    """'paper-{variant}-{width}  variant in (mha, swa), width in (256, 512)'."""
    allowed = [f"{f} in ({', '.join(map(str, self.choices[f]))})" for f in self.fields
               if f in self.choices]
    allowed += [f"{f}: {self.types[f].__name__}" for f in self.fields if f not in self.choices]
    return self.pattern + (f"  [{'; '.join(allowed)}]" if allowed else "")

  def parse(self, name: str) -> dict[str, Any] | None:
    """The typed fields of `name`, or None when it does not have this pattern's shape.
    Raises ValueError when it has the shape but a field is invalid."""
    m = self.regex.match(name)
    if m is None:
      return None
    out = {}
    for field, raw in m.groupdict().items():
      typ = self.types[field]
      try:
        value = typ(raw)
      except (TypeError, ValueError):
        raise ValueError(f"{field}={raw!r} is invalid: expected {typ.__name__}") from None
      allowed = self.choices.get(field)
      if allowed is not None and value not in allowed:
        raise ValueError(f"{field}={raw!r} is invalid: allowed values are "
                         f"{', '.join(map(str, allowed))}")
      out[field] = value
    if self.check is not None:
      err = self.check(**out)
      if err:
        raise ValueError(err)
    return out


class Presets:
  """The presets of one config module (see the module docstring)."""

  def __init__(self, task: str, default: str, label: str = ""):
    """`task`: the config name (`--config=<task>:<preset>`); `label`: how errors name the
    task ('ICR'), none by default."""
    self.task, self.default, self.label = task, default, label
    self._presets: list[Preset] = []

  def add(self, pattern: str, *, doc: str = "", check: Callable[..., str | None] | None = None,
          **choices: Sequence[Any]) -> Callable[[Callable], Callable]:
    """Decorator registering `fn` under `pattern`; `choices` restrict fields to values."""
    def register(fn: Callable) -> Callable:
      fields = _FIELD.findall(pattern)
      hints = typing.get_type_hints(fn)
      params = inspect.signature(fn).parameters
      missing = [f for f in fields if f not in params]
      if missing:
        raise TypeError(f"preset {pattern!r}: {fn.__name__} has no argument {missing}")
      types = {f: hints.get(f, str) for f in fields}
      unknown = set(choices) - set(fields)
      if unknown:
        raise TypeError(f"preset {pattern!r}: choices for unknown fields {sorted(unknown)}")
      line = doc or (inspect.getdoc(fn) or "").split("\n")[0]
      self._presets.append(Preset(pattern, fn, {k: tuple(v) for k, v in choices.items()},
                                  types, line, check))
      return fn
    return register

  @property
  def patterns(self) -> tuple[str, ...]:
    return tuple(p.pattern for p in self._presets)

  def choices(self, pattern: str, field: str) -> tuple:
    """The allowed values of one field of one pattern."""
    for p in self._presets:
      if p.pattern == pattern:
        return p.choices[field]
    raise KeyError(pattern)

  def help(self, indent: str = "  ", keep: Callable[[str], bool] | None = None) -> str:
    """One line per preset (those whose pattern `keep` accepts): its pattern, the allowed
    field values and what it is."""
    return "\n".join(f"{indent}{self.task}:{p.describe()}" + (f"\n{indent}    {p.doc}"
                                                               if p.doc else "")
                     for p in self._presets if keep is None or keep(p.pattern))

  def parse(self, name: str) -> tuple[Preset, dict[str, Any]]:
    name = (name or self.default).strip()
    errors = []
    for p in self._presets:
      try:
        fields = p.parse(name)
      except ValueError as e:
        errors.append(f"{p.pattern}: {e}")
        continue
      if fields is not None:
        return p, fields
    why = f" ({'; '.join(errors)})" if errors else ""
    label = f"{self.label} " if self.label else ""
    raise ValueError(f"unknown {label}preset {name!r} for --config={self.task}:PRESET{why}; "
                     f"valid presets are:\n{self.help()}")

  def build(self, name: str = "") -> Any:
    """The config of preset `name` (the default preset when empty)."""
    p, fields = self.parse(name)
    return p.fn(**fields)
