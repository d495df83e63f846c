"""structattn-fit: scaling-law fits (and their figures) of a sweep directory.

    structattn-fit runs/lm-sweep --out=out/fits --group=attention.variant [--figures]
    structattn-fit runs/lm-sweep --out=out/fits --nd    # also L(N, D): N params, D tokens

Writes OUT/fits.json (`structattn.fit.fit_dir`: L = E + A x^-alpha on each group's compute
frontier), with `--nd` OUT/fits_nd.json (`structattn.fit.fit_nd_dir`: L(N, D) = E + A N^-alpha
+ B D^-beta over every logged point), and with `--figures` the loss-vs-compute figures
(`structattn.figures.make_figures`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from structattn import fit as fit_lib


def _parse_filter(s: str | None) -> dict[str, Any] | None:
  """'attention.variant=mha|mlr,model.d_model=256' -> {field: [values]} (JSON-typed)."""
  if not s:
    return None
  out = {}
  for part in s.split(","):
    k, eq, v = part.partition("=")
    if not eq:
      raise ValueError(f"--filter part {part!r} is invalid: expected field=value[|value...]")

    def parse(t):
      try:
        return json.loads(t)
      except json.JSONDecodeError:
        return t
    out[k.strip()] = [parse(t) for t in v.split("|")]
  return out


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(
      prog="structattn-fit", description="Fit L = E + A x^-alpha to each group's frontier.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="example:\n  structattn-fit runs/lm --out=runs/lm/fit --figures")
  p.add_argument("dir", help="sweep directory")
  p.add_argument("--out", required=True, help="output directory (writes OUT/fits.json)")
  p.add_argument("--x", default="compute/paper_macs")
  p.add_argument("--y", default="eval/loss", help="e.g. eval/loss or eval/last_point_se")
  p.add_argument("--group", default="attention.variant", help="comma-separated fields")
  p.add_argument("--filter", default=None, help="field=v1|v2,field2=v (values JSON-parsed)")
  p.add_argument("--statuses", default=",".join(fit_lib.DEFAULT_STATUSES))
  p.add_argument("--x-min", type=float, default=None)
  p.add_argument("--best-lr-per", default=None, help="e.g. model.d_model")
  p.add_argument("--n-boot", type=int, default=200)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--robust", action="store_true", help="Huber loss instead of squares")
  p.add_argument("--figures", action="store_true", help="also write figures into OUT")
  p.add_argument("--width-key", default="model.d_model")
  p.add_argument("--nd", action="store_true",
                 help="also fit L(N, D) per group (writes OUT/fits_nd.json)")
  p.add_argument("--n-key", default="params/non_embedding", help="--nd: the N field")
  p.add_argument("--d-key", default="tokens", help="--nd: the D metric")
  a = p.parse_args(argv)
  try:
    group = tuple(s for s in a.group.split(",") if s)
    filt, statuses = _parse_filter(a.filter), tuple(a.statuses.split(","))
    res = fit_lib.fit_dir(a.dir, a.x, a.y, group, filt, statuses=statuses, x_min=a.x_min,
                          best_lr_per=tuple(a.best_lr_per.split(",")) if a.best_lr_per
                          else None, n_boot=a.n_boot, seed=a.seed, robust=a.robust)
    print(res.format())
    print(f"wrote {res.write_json(Path(a.out) / 'fits.json')}")
    if a.nd:
      nd = fit_lib.fit_nd_dir(a.dir, a.y, a.n_key, a.d_key, group, filt, statuses=statuses,
                              n_boot=min(a.n_boot, 50), seed=a.seed, robust=a.robust)
      for label, f in nd.items():
        print(f"L(N, D) {label}: {f.status}  E={f.E:.4g} A={f.A:.4g} alpha={f.alpha:.3g} "
              f"B={f.B:.4g} beta={f.beta:.3g}  {f.message}".rstrip())
      path = Path(a.out) / "fits_nd.json"
      path.write_text(json.dumps({"y": a.y, "N": a.n_key, "D": a.d_key, "group": list(group),
                                  "fits": {k: f.to_dict() for k, f in nd.items()}}, indent=1))
      print(f"wrote {path}")
    if a.figures:
      from structattn import figures
      for path in figures.make_figures(a.dir, a.out, fits=res, width_key=a.width_key):
        print(f"wrote {path}")
  except (FileNotFoundError, KeyError, ValueError) as e:
    print(f"structattn-fit: error: {e.args[0] if e.args else e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
