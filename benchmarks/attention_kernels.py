"""Attention kernels side by side: the XLA reference vs jax.nn.dot_product_attention (cuDNN on GPU).

Runs a full forward pass and a few cached decode steps of one architecture with each kernel, in the
same process, and prints one JSON object: relative error of each kernel's logits against the XLA
reference and median forward times. On CPU the cuDNN kernel is skipped.

  python benchmarks/attention_kernels.py --arch=llama3_2_1b --batch=4 --seq=2048 --dtype=bfloat16
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from archscale.core import config_lib
from archscale.model import transformer as M
from archscale.model.arch import ArchSpec


def rel_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--arch", default="llama3_2_1b")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--decode_steps", type=int, default=4)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--layers", type=int, default=0, help="override n_layers (0: keep)")
  args = parser.parse_args()

  fields = config_lib.arch_config(args.arch)
  if args.layers:
    fields["n_layers"] = args.layers
  spec = ArchSpec.from_dict(fields)
  impls = ["xla", "dpa"] + (["cudnn"] if jax.devices()[0].platform == "gpu" else [])
  tokens_BT = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, spec.vocab_size)
  prompt = args.seq - args.decode_steps

  params = None
  results = {}
  for impl in impls:
    model = M.Transformer(spec, M.ModelOptions(dtype=args.dtype, param_dtype=args.dtype,
                                               attention=impl))
    if params is None:
      params = jax.jit(lambda m=model: M.init_params(m, jax.random.key(0)))()
    fwd = jax.jit(lambda p, t, m=model: M.forward(m, p, t))
    start = time.perf_counter()
    logits = jax.block_until_ready(fwd(params, tokens_BT))
    compile_s = time.perf_counter() - start
    seconds = median_seconds(lambda f=fwd, p=params: f(p, tokens_BT), args.repeats)

    pre = jax.jit(lambda p, t, m=model: M.prefill(m, p, t, max_len=args.seq))
    step = jax.jit(lambda p, c, t, m=model: M.decode_step(m, p, c, t))
    _, cache = pre(params, tokens_BT[:, :prompt])
    decoded = []
    for t in range(prompt, args.seq):
      logits_BV, cache = step(params, cache, tokens_BT[:, t])
      decoded.append(logits_BV)
    results[impl] = dict(logits=logits, decoded=jnp.stack(decoded, 1), compile_s=compile_s,
                         forward_s=seconds)

  ref = results["xla"]
  out = {
      "arch": args.arch, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
      "n_layers": spec.n_layers, "device_kind": jax.devices()[0].device_kind,
      "kernels": {
          impl: {
              "forward_rel_error_vs_xla": rel_error(r["logits"], ref["logits"]),
              "decode_rel_error_vs_xla": rel_error(r["decoded"], ref["decoded"]),
              "forward_s_median": r["forward_s"],
              "compile_s": r["compile_s"],
              "speedup_vs_xla": ref["forward_s"] / r["forward_s"],
          } for impl, r in results.items()
      },
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
