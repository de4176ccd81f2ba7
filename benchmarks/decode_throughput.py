"""Decode throughput: archscale's on-device generation against HF transformers and the cost model.

Experiments (`--experiment`):
  peer        LLaMA-3.2-1B, bf16, 1024 prompt / 256 output tokens, batches 1, 16, 64. archscale's
              harness rows (roofline fraction per batch) and, timed in the same run, HF
              `LlamaForCausalLM.generate` with a static cache on the same dimensions and random
              weights (greedy, min_new_tokens = max_new_tokens). Checks: roofline fraction >= 0.6
              and >= 3x HF output tokens/s at every batch size.
  arch_ratio  Surefire-1B against LLaMA-3.2-1B at 4096 / 1024, batches 1..64, mean of 5 runs (the
              paper's protocol): measured throughput ratio against the cost model's ratio (the
              roofline floor, and the model calibrated on this run's rows). --repeats=1 for a
              quicker pass (an estimated 10 minutes on an H100, about half of the default).

Prints one JSON document (and writes it to --out; the rows measured so far are saved to
OUT.partial.json after each architecture). The HF side runs in a child process before JAX claims
the GPU, so the two frameworks share neither memory nor CUDA libraries.

  python3 benchmarks/decode_throughput.py --experiment=peer
  python3 benchmarks/decode_throughput.py --experiment=arch_ratio
  python3 benchmarks/decode_throughput.py --quick        # CPU smoke run on tiny architectures
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXPERIMENTS = {
    "peer": dict(archs="llama3_2_1b", batch_sizes="1,16,64", input_len=1024, output_len=256,
                 repeats=5),
    "arch_ratio": dict(archs="llama3_2_1b,surefire_1b", batch_sizes="1,2,4,8,16,32,64",
                       input_len=4096, output_len=1024, repeats=5),
}
QUICK = dict(batch_sizes="1,2", input_len=24, output_len=8, repeats=1, dtype="float32")
# Tiny stand-ins for --quick: the demo architecture and a multi-query variant of it.
QUICK_ARCHS = {"peer": "demo", "arch_ratio": "demo,demo_mqa"}
MIN_ROOFLINE_FRACTION = 0.6
MIN_SPEEDUP_VS_HF = 3.0


def arch_table() -> dict[str, dict]:
  """The named architectures plus a multi-query variant of the demo for --quick."""
  from archscale.core.config_lib import ARCHS

  table = dict(ARCHS)
  table["demo_mqa"] = dict(table["demo"], n_kv_heads=1)
  return table


# ---------------------------------------------------------------------------------- HF peer


def hf_worker(args: argparse.Namespace) -> None:
  """Child process: times HF `generate` (static cache, greedy, fixed length); prints JSON rows."""
  try:
    import torch
    import transformers
  except ImportError as err:
    print(json.dumps({"error": f"HF peer unavailable: {err}"}))
    return
  import hf_peer

  from archscale.model.arch import ArchSpec

  fields = arch_table()[args.archs]
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
  max_len = args.input_len + args.output_len
  config = hf_peer.llama_config(
      ArchSpec.from_dict(fields), max(max_len, 8192), pad_token_id=0, bos_token_id=1,
      eos_token_id=2)
  torch.manual_seed(0)
  torch.set_default_dtype(dtype)
  with torch.device(device):
    model = transformers.LlamaForCausalLM(config).eval()
  rows = []
  for batch in [int(b) for b in args.batch_sizes.split(",")]:
    row = {"arch": args.archs, "batch_size": batch, "input_len": args.input_len,
           "output_len": args.output_len, "framework": f"transformers {transformers.__version__}",
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    ids = torch.randint(3, fields["vocab_size"], (batch, args.input_len), device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                  min_new_tokens=args.output_len, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
    try:
      with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)  # Warm-up (and any compilation).
        if device == "cuda":
          torch.cuda.synchronize()
        row["warmup_s"] = time.perf_counter() - t0
        if out.shape[1] != max_len:
          raise RuntimeError(f"HF generated {out.shape[1] - args.input_len} tokens, not "
                             f"{args.output_len}")
        runs = []
        for _ in range(args.repeats):
          t0 = time.perf_counter()
          model.generate(ids, **kwargs)
          if device == "cuda":
            torch.cuda.synchronize()
          runs.append(time.perf_counter() - t0)
      row["total_s"] = sum(runs) / len(runs)
      row["total_s_runs"] = runs
      row["output_tokens_per_s"] = batch * args.output_len / row["total_s"]
    except Exception as err:  # e.g. out of memory, also when torch.compile wraps it
      oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
      kind = "out of memory" if oom else type(err).__name__
      row["error"] = f"{kind}: {(str(err).splitlines() or [''])[0][:300]}"
    rows.append(row)
    if device == "cuda":
      torch.cuda.empty_cache()
  print(json.dumps(rows))


def run_hf_peer(args: argparse.Namespace) -> dict[str, Any]:
  """Runs `hf_worker` in a child process; its rows, or an `error` saying why there are none."""
  cmd = [sys.executable, __file__, "--hf_worker", f"--archs={args.archs}",
         f"--batch_sizes={args.batch_sizes}", f"--input_len={args.input_len}",
         f"--output_len={args.output_len}", f"--repeats={args.repeats}", f"--dtype={args.dtype}"]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=1800)
  except subprocess.TimeoutExpired:
    return {"error": "HF worker timed out after 1800 s"}
  for line in reversed(proc.stdout.splitlines() if proc.returncode == 0 else []):
    try:  # the rows are its last JSON line
      result = json.loads(line)
    except ValueError:
      continue
    if isinstance(result, (list, dict)):
      return result if isinstance(result, dict) else {"rows": result}
  return {"error": f"HF worker failed (exit {proc.returncode}): {proc.stderr[-2000:]}"}


# ------------------------------------------------------------------------------------- main


def _by_batch(rows: list[dict], arch: str) -> dict[int, dict]:
  return {r["batch_size"]: r for r in rows if r["arch"] == arch and not r.get("error")}


def summarise_peer(rows: list[dict], hf: dict[str, Any], arch: str) -> dict[str, Any]:
  """Per batch: archscale vs HF tokens/s, speedup, roofline fraction, and the two checks."""
  ours, theirs = _by_batch(rows, arch), _by_batch(hf.get("rows", []), arch)
  table = []
  for batch, row in sorted(ours.items()):
    peer = theirs.get(batch)
    speedup = row["output_tokens_per_s"] / peer["output_tokens_per_s"] if peer else None
    table.append({
        "batch_size": batch,
        "archscale_output_tokens_per_s": row["output_tokens_per_s"],
        "hf_output_tokens_per_s": peer["output_tokens_per_s"] if peer else None,
        "speedup_vs_hf": speedup,
        "roofline_fraction": row["roofline_fraction"],
        "floor_output_tokens_per_s": row["predicted_output_tokens_per_s"],
        "step_ms_median": row["step_ms_median"],
        "hbm_gbps": row["hbm_gbps"],
        "roofline_ok": (row["roofline_fraction"] >= MIN_ROOFLINE_FRACTION
                        if row["roofline_fraction"] is not None else None),
        "speedup_ok": speedup >= MIN_SPEEDUP_VS_HF if speedup is not None else None,
    })
  return {"per_batch": table,
          "all_roofline_ok": _all(t["roofline_ok"] for t in table),
          "all_speedup_ok": _all(t["speedup_ok"] for t in table)}


def _all(values) -> bool | None:
  values = list(values)
  return None if not values or any(v is None for v in values) else all(values)


def summarise_ratio(rows: list[dict], specs: dict, accelerator: str | None,
                    dtype_bytes: int) -> dict[str, Any]:
  """Measured throughput ratio of the second architecture over the first, against the model."""
  from archscale.serve import costmodel

  base, other = list(specs)[:2]
  calibration = None
  ok = [r for r in rows if not r.get("error")]
  if accelerator is not None and ok:
    calibration = costmodel.fit_calibration(ok, accelerator, specs, dtype_bytes)
  a, b = _by_batch(rows, base), _by_batch(rows, other)
  table = []
  for batch in sorted(set(a) & set(b)):
    ra, rb = a[batch], b[batch]
    entry = {"batch_size": batch,
             f"{base}_output_tokens_per_s": ra["output_tokens_per_s"],
             f"{other}_output_tokens_per_s": rb["output_tokens_per_s"],
             "measured_ratio": rb["output_tokens_per_s"] / ra["output_tokens_per_s"]}
    if accelerator is not None:
      lens = (batch, ra["input_len"], ra["output_len"])
      for label, cal in (("floor", None), ("calibrated", calibration)):
        if label == "calibrated" and cal is None:
          continue
        ta = costmodel.throughput(specs[base], accelerator, *lens, dtype_bytes, calibration=cal)
        tb = costmodel.throughput(specs[other], accelerator, *lens, dtype_bytes, calibration=cal)
        entry[f"{label}_model_ratio"] = tb["output_tokens_per_s"] / ta["output_tokens_per_s"]
        entry[f"{label}_model_{base}_output_tokens_per_s"] = ta["output_tokens_per_s"]
    table.append(entry)
  return {"per_batch": table, "calibration": calibration}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="peer")
  parser.add_argument("--quick", action="store_true",
                      help="CPU smoke run: tiny architectures, short sequences, one repeat")
  parser.add_argument("--archs", help="comma-separated architecture names (config_lib.ARCHS)")
  parser.add_argument("--batch_sizes", help="comma-separated, e.g. 1,16,64")
  parser.add_argument("--input_len", type=int)
  parser.add_argument("--output_len", type=int)
  parser.add_argument("--repeats", type=int)
  parser.add_argument("--dtype", default=None, help="bfloat16 (default) or float32")
  parser.add_argument("--attention", default="auto", help="prefill kernel: auto|xla|dpa|cudnn")
  parser.add_argument("--decode_attention", default="auto",
                      help="decode kernel: auto|xla|cudnn|pallas")
  parser.add_argument("--accelerator", default="auto",
                      help="cost-model table entry; auto = from the device kind")
  parser.add_argument("--no_hf", action="store_true", help="skip the HF transformers peer")
  parser.add_argument("--out", help="also write the JSON here")
  parser.add_argument("--plot", help="throughput-vs-batch plot (PNG) path")
  parser.add_argument("--hf_worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  defaults = dict(EXPERIMENTS[args.experiment], dtype="bfloat16")
  if args.quick:
    defaults.update(QUICK, archs=QUICK_ARCHS[args.experiment])
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.hf_worker:
    hf_worker(args)
    return {}
  table = arch_table()
  names = [n.strip() for n in args.archs.split(",") if n.strip()]
  unknown = [n for n in names if n not in table]
  if unknown:
    raise ValueError(f"--archs: unknown architecture(s) {unknown}; choose from {sorted(table)}")

  hf = {"skipped": "--no_hf"} if args.no_hf or args.experiment != "peer" else run_hf_peer(args)

  import jax
  import jax.numpy as jnp

  from archscale.core import io, settings
  from archscale.model.arch import ArchSpec
  from archscale.serve import decode_bench

  specs = {n: ArchSpec.from_dict(table[n]) for n in names}
  partial = f"{args.out.removesuffix('.json')}.partial.json" if args.out else None
  save_partial = lambda rows: io.write_json_atomic(partial, {"hf": hf, "rows": rows})
  t0 = time.perf_counter()
  bench = settings.BenchConfig(
      archs=args.archs, batch_sizes=args.batch_sizes, input_len=args.input_len,
      output_len=args.output_len, repeats=args.repeats, dtype=args.dtype,
      attention=args.attention, decode_attention=args.decode_attention,
      accelerator=args.accelerator)
  rows = decode_bench.bench_archs(specs, bench, on_rows=save_partial if partial else None)
  accelerator = rows[0]["accelerator"] if rows else None
  result: dict[str, Any] = {
      "experiment": args.experiment, "quick": args.quick,
      "settings": {k: getattr(args, k) for k in ("archs", "batch_sizes", "input_len",
                                                 "output_len", "repeats", "dtype", "attention",
                                                 "decode_attention", "accelerator")},
      "device_kind": jax.devices()[0].device_kind, "accelerator": accelerator,
      "sweep_s": time.perf_counter() - t0, "rows": rows, "hf": hf,
  }
  if args.experiment == "peer":
    result["summary"] = summarise_peer(rows, hf, names[0])
  elif len(specs) >= 2:
    result["summary"] = summarise_ratio(rows, specs, accelerator,
                                        jnp.dtype(args.dtype).itemsize)
  result["provenance"] = io.provenance()
  if args.plot:
    decode_bench.plot_throughput(rows, args.plot)
  text = json.dumps(result, indent=2, default=str)
  if args.out:
    io.write_text_atomic(args.out, text + "\n")
    pathlib.Path(partial).unlink(missing_ok=True)
  print(text)
  return result


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
