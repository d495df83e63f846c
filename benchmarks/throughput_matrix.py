"""The training-throughput matrix: speed options alone and together, then XLA flag sets.

    python benchmarks/throughput_matrix.py                        # GPT-2-small, MHA, GPU
    python benchmarks/throughput_matrix.py --flag-sets lhs,cmdbuf,no_triton_gemm
    python benchmarks/throughput_matrix.py --layers 6 --width 256 --batch 32

One process (benchmarks/train_throughput.py) times the speed options (--options, default
baseline, fused_opt, fused_xent, bf16_residual, all) in alternating rounds; then one process
per XLA flag set times the `--flag-options` set (default all) with those flags (XLA reads
XLA_FLAGS when it starts, so flags need their own process).  Prints one table and writes one
JSON (default benchmarks/results/throughput-matrix-<date>.json) with every row.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Flag sets, each valid in jax 0.10's XLA (unknown flags abort XLA at start-up).
FLAG_SETS = {
    # The latency-hiding scheduler: reorders independent kernels and async work.
    "lhs": "--xla_gpu_enable_latency_hiding_scheduler=true",
    # CUDA-graph command buffers (on by default for FUSION, CUBLAS, CUBLASLT, CUSTOM_CALL,
    # CUDNN, DYNAMIC_SLICE_FUSION with graphs of >= 5 kernels): also loops and conditionals,
    # and graphs of any size, so fewer launches stay outside a graph.
    "cmdbuf": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CUSTOM_CALL,"
              "DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1",
    # cuBLAS for every matmul instead of the autotuner's Triton GEMMs.
    "no_triton_gemm": "--xla_gpu_enable_triton_gemm=false",
}

SHAPE_ARGS = ("layers", "width", "seq_len", "batch", "vocab", "dtype")


def _child(args, options, tag, flags, out):
  cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"),
         "--variants", args.variant, "--options", options, "--tag", tag,
         "--warmup", str(args.warmup), "--iters", str(args.iters), "--rounds", str(args.rounds),
         "--pipelined", str(args.pipelined), "--out", str(out)]
  for name in SHAPE_ARGS:
    value = getattr(args, name)
    if value not in (None, ""):
      cmd += [f"--{name.replace('_', '-')}", str(value)]
  if flags:
    cmd.append(f"--xla-flags={flags}")
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH", "")) if x)
  print("+ " + " ".join(cmd), flush=True)
  proc = subprocess.run(cmd, env=env, cwd=ROOT)
  if proc.returncode or not Path(out).exists():
    return None, [dict(variant=args.variant, options=options, xla=tag,
                       error=f"exit status {proc.returncode}")]
  data = json.loads(Path(out).read_text())
  return data["header"], data["rows"]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="flag sets:\n" + "\n".join(
                                  f"  {k}: {v}" for k, v in FLAG_SETS.items()))
  p.add_argument("--variant", default="mha")
  p.add_argument("--options", default="baseline,fused_opt,fused_xent,bf16_residual,all",
                 help="speed options timed in the first process (train_throughput --help)")
  p.add_argument("--flag-options", default="all",
                 help="speed options timed under each flag set")
  p.add_argument("--flag-sets", default="cmdbuf,no_triton_gemm",
                 help=f"comma-separated names from {sorted(FLAG_SETS)}, or '' for none "
                 f"(default cmdbuf,no_triton_gemm; lhs adds a process)")
  p.add_argument("--layers", type=int, default=None)
  p.add_argument("--width", type=int, default=None)
  p.add_argument("--seq-len", dest="seq_len", type=int, default=None)
  p.add_argument("--batch", type=int, default=None)
  p.add_argument("--vocab", type=int, default=None)
  p.add_argument("--dtype", default=None)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--pipelined", type=int, default=10)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  sets = [s.strip() for s in args.flag_sets.split(",") if s.strip()]
  bad = [s for s in sets if s not in FLAG_SETS]
  if bad:
    raise SystemExit(f"unknown --flag-sets {bad}: allowed {sorted(FLAG_SETS)}")

  rows, headers = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    header, got = _child(args, args.options, "", "", Path(tmp) / "options.json")
    headers["options"] = header
    rows += got
    for name in sets:
      header, got = _child(args, args.flag_options, name, FLAG_SETS[name],
                           Path(tmp) / f"flags-{name}.json")
      headers[name] = header
      rows += got

  sys.path.insert(0, str(ROOT / "benchmarks"))
  from train_throughput import print_table  # noqa: E402  (imports jax: after the children)
  first = next((h for h in headers.values() if h), None) or {}
  cfg = first.get("config", {})
  print_table(rows, f"{first.get('device', '?')}, jax {first.get('jax', '?')}, "
              f"{cfg.get('layers')} layers x {cfg.get('width')}, T={cfg.get('seq_len')}, "
              f"batch {cfg.get('batch')}; xla column: flag set "
              f"({', '.join(f'{k}={v}' for k, v in FLAG_SETS.items() if k in sets) or 'none'})")
  base = next((r for r in rows if r.get("options") == "baseline" and "error" not in r), None)
  if base:
    rel = [f"{r['options']}{'+' + r['xla'] if r.get('xla') else ''} "
           f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}x" for r in rows if "error" not in r]
    print("tokens/s relative to baseline: " + ", ".join(rel))
  date = datetime.datetime.now(datetime.timezone.utc)
  out = Path(args.out or ROOT / "benchmarks" / "results" /
             f"throughput-matrix-{date.strftime('%Y%m%d-%H%M%S')}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(dict(
      header=dict(date=date.isoformat(timespec="seconds"), argv=sys.argv if argv is None
                  else list(argv), flag_sets={k: FLAG_SETS[k] for k in sets},
                  processes=headers), rows=rows), indent=1))
  print(f"wrote {out}")
  return rows


if __name__ == "__main__":
  main()
