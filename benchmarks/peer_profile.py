"""Per-op GPU time of a PyTorch nanoGPT-style peer's training step (torch.profiler).

    python benchmarks/peer_profile.py --peer PATH/peer_nanogpt.py --batch 16 --seq-len 1024

The peer script must define `GPT(vocab, T, layers, width, heads)` returning the loss from
`forward(idx, targets)`; the step is the peer's own (torch.compile, bf16 autocast, fused
AdamW, grad clipping at 1.0).  Prints the top ops by CUDA time per step, grouped into the
same categories as `structattn.profiling.categorize`, and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys


CATEGORIES = (  # (category, regex on the op name), first match wins
    ("attention", r"flash|fmha|sdpa|attention|scaled_dot"),
    ("matmul", r"gemm|matmul|mm\b|addmm|cutlass|sm90_xmma|nvjet|bmm|linear"),
    ("optimizer", r"adam|foreach|multi_tensor|_fused_adamw|clip|norm_\w*grad|lerp"),
    ("norm", r"layer_norm|layernorm|native_layer_norm|rsqrt"),
    ("softmax/xent", r"softmax|log_softmax|nll|cross_entropy|logsumexp"),
    ("copy/cast", r"copy|cast|to_copy|convert|memcpy|memset|fill"),
    ("elementwise", r"triton|elementwise|gelu|add|mul|tanh|fused"),
)


def categorize(name: str) -> str:
  low = name.lower()
  for cat, pattern in CATEGORIES:
    if re.search(pattern, low):
      return cat
  return "other"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--peer", required=True, help="path of the peer's training script")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--seq-len", type=int, default=1024)
  p.add_argument("--layers", type=int, default=12)
  p.add_argument("--width", type=int, default=768)
  p.add_argument("--vocab", type=int, default=50304)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=30)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  import torch
  spec = importlib.util.spec_from_file_location("peer", a.peer)
  peer = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(peer)
  torch.backends.cuda.matmul.allow_tf32 = True
  m = peer.GPT(a.vocab, a.seq_len, a.layers, a.width, a.width // 64).to("cuda")
  opt = torch.optim.AdamW(m.parameters(), lr=6e-4, betas=(0.9, 0.95), fused=True)
  step = torch.compile(m)
  x = torch.randint(0, a.vocab, (a.batch, a.seq_len), device="cuda")
  y = torch.randint(0, a.vocab, (a.batch, a.seq_len), device="cuda")

  def one():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      loss = step(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

  for _ in range(4):
    one()
  torch.cuda.synchronize()
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(a.steps):
      one()
    torch.cuda.synchronize()
  ops = {}
  for e in prof.key_averages():
    t = getattr(e, "device_time_total", None)
    if t is None:
      t = getattr(e, "cuda_time_total", 0.0)
    if t and e.key:
      ops[e.key] = ops.get(e.key, 0.0) + t / 1e3 / a.steps  # ms per step
  # key_averages nests CPU-side ops over their kernels; keep kernel-level rows only.
  kernels = {k: v for k, v in ops.items() if not k.startswith("aten::")
             and not k.startswith("Torch-Compiled") and not k.startswith("CompiledFunction")
             and "Optimizer" not in k and not k.startswith("ProfilerStep")}
  total = sum(kernels.values())
  by_cat = {}
  for k, v in kernels.items():
    by_cat[categorize(k)] = by_cat.get(categorize(k), 0.0) + v
  top = sorted(kernels.items(), key=lambda kv: -kv[1])[:a.top]
  print(f"peer step: {total:.2f} ms of kernel time per step ({a.steps} profiled steps)")
  for cat, v in sorted(by_cat.items(), key=lambda kv: -kv[1]):
    print(f"  {cat:14s} {v:8.3f} ms  {100 * v / total:5.1f}%")
  for k, v in top:
    print(f"  {v:8.3f} ms  {k[:100]}")
  out = dict(total_ms=total, by_category=by_cat, top=top, gpu=torch.cuda.get_device_name(),
             torch=torch.__version__, batch=a.batch, seq_len=a.seq_len, layers=a.layers,
             width=a.width)
  if a.out:
    json.dump(out, open(a.out, "w"), indent=1)


if __name__ == "__main__":
  sys.exit(main())
