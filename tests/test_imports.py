"""Imports inside the package flow one way: no cycles among structattn's modules."""

import ast
from pathlib import Path

import structattn

PACKAGE = Path(structattn.__file__).resolve().parent

# Cycles being removed by work in progress; each entry is one strongly connected component.
# Empty this list as they go: a cycle not listed here fails the test, and so does a listed
# one that no longer exists (so the list cannot go stale).
ALLOWED_CYCLES: list[tuple[str, ...]] = []


def module_graph(root: Path) -> dict[str, set[str]]:
  """module -> package modules it imports (module-level and function-level imports alike)."""
  pkg = root.name
  mods = {}
  for f in root.rglob("*.py"):
    parts = f.relative_to(root.parent).with_suffix("").parts
    mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
  edges = {m: set() for m in mods}
  for m, f in mods.items():
    is_pkg = f.name == "__init__.py"
    for node in ast.walk(ast.parse(f.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = m.split(".") if is_pkg else m.split(".")[:-1]
          up = up[:len(up) - (node.level - 1)]
          base = ".".join(up + ([base] if base else []))
        targets = [base] + [f"{base}.{a.name}" for a in node.names]
      else:
        continue
      for t in targets:
        while t and t not in mods:
          t = t.rpartition(".")[0]
        if t and t != m and t.startswith(pkg) and not m.startswith(t + "."):
          edges[m].add(t)
  return edges


def cycles(edges: dict[str, set[str]]) -> list[tuple[str, ...]]:
  """Strongly connected components of more than one module (Tarjan, iterative)."""
  index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
  for root in sorted(edges):
    if root in index:
      continue
    work = [(root, iter(sorted(edges[root])))]
    index[root] = low[root] = counter[0]
    counter[0] += 1
    stack.append(root)
    on.add(root)
    while work:
      v, it = work[-1]
      for w in it:
        if w not in index:
          index[w] = low[w] = counter[0]
          counter[0] += 1
          stack.append(w)
          on.add(w)
          work.append((w, iter(sorted(edges[w]))))
          break
        if w in on:
          low[v] = min(low[v], index[w])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[v])
        if low[v] == index[v]:
          comp = []
          while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
              break
          if len(comp) > 1:
            out.append(tuple(sorted(comp)))
  return sorted(out)


def test_cycle_finder_finds_a_planted_cycle():
  edges = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}, "p.e": set()}
  assert cycles(edges) == [("p.a", "p.b", "p.c")]


def test_no_import_cycles_in_the_package():
  found = cycles(module_graph(PACKAGE))
  allowed = {tuple(sorted(c)) for c in ALLOWED_CYCLES}
  new = [c for c in found if c not in allowed]
  assert not new, "import cycles: " + "; ".join(" <-> ".join(c) for c in new)
  gone = sorted(allowed - set(found))
  assert not gone, ("allowed cycles that no longer exist (remove them from ALLOWED_CYCLES): "
                    + "; ".join(" <-> ".join(c) for c in gone))
