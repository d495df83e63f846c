"""Every shape suffix in the package uses the letters of the legend in `structattn.__doc__`."""

from __future__ import annotations

import pathlib
import re

import structattn

PACKAGE = pathlib.Path(structattn.__file__).parent
# An entry: two spaces, one capital letter, two spaces, its meaning (continuations are
# indented further and carry no letter).
ENTRY = re.compile(r"^  ([A-Z])  \S", re.MULTILINE)
# A lowercase-start identifier ending in `_<capitals and digits>` with at least one capital
# (`x_BTD`, `seed_B2`); ALL_CAPS constants and digit-only endings (`x_1`) do not match.
SUFFIXED = re.compile(r"\b[a-z][A-Za-z0-9_]*?_([A-Z0-9]*[A-Z][A-Z0-9]*)\b")


def legend_letters() -> list[str]:
  return ENTRY.findall(structattn.__doc__)


def test_legend_defines_each_letter_once():
  letters = legend_letters()
  assert len(letters) >= 10, f"no legend parsed from structattn.__doc__: {letters}"
  twice = sorted({c for c in letters if letters.count(c) > 1})
  assert not twice, f"legend letters with more than one entry: {twice}"


def test_suffix_pattern():
  found = [m.group(0) for m in SUFFIXED.finditer(
      "x_BTD seed_B2 x_prev_BN DATA_DIR x_1 Foo_BT jax_enable_x64 q_BTHK[..., :d]")]
  assert found == ["x_BTD", "seed_B2", "x_prev_BN", "q_BTHK"]


def test_every_suffix_uses_legend_letters():
  legend = set(legend_letters())
  bad = []
  for path in sorted(PACKAGE.rglob("*.py")):
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
      for m in SUFFIXED.finditer(line):
        unknown = sorted(set(c for c in m.group(1) if c.isalpha()) - legend)
        if unknown:
          bad.append(f"{path.relative_to(PACKAGE.parent)}:{lineno}: {m.group(0)} "
                     f"(letters {''.join(unknown)} are not in the legend)")
  assert not bad, "shape suffixes outside the legend:\n" + "\n".join(bad)
