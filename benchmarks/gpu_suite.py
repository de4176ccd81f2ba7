"""The GPU check in one command: training throughput, decode against HF, the architecture ratio.

From a bare GPU machine (jax, flax, torch and transformers installed; grain and ml-collections
possibly not) it installs what is missing from the wheels in `.whl/` (downloaded beforehand on a
networked machine with `tools/device-wheels.sh`, or `../shared/tools/device-wheels.sh`), then
runs, each as a child process with its own time budget, in this order:

  train    benchmarks/train_throughput.py: LLaMA-3.2-1B, seq 2048, batch 8, bf16, cuDNN attention,
           dots_no_batch remat, against HF LlamaForCausalLM + torch.compile timed in the same run;
           variant: the fused head and loss (train.loss_chunk)
  decode   benchmarks/decode_throughput.py --experiment=peer: LLaMA-3.2-1B, 1024 / 256 tokens,
           batches 1 / 16 / 64, against HF generate (static cache) and the roofline
  kernels  the same decode points without the peer, with the Pallas decode kernel
  ratio    benchmarks/decode_throughput.py --experiment=arch_ratio at batches 16 / 64, one
           repeat: Surefire-1B over LLaMA-3.2-1B at 4096 / 1024, measured against the cost model

and writes one JSON (`gpu_suite.json`: every child's result, its wall time, the checks of the
targets) and one log (`gpu_suite.log`: every child's output) into --out (default: $OUT, else
./gpu_suite_out). A child that fails or runs out of time leaves its error in the JSON; the rest
still run (a decode run cut short keeps the rows of the architectures it finished). The suite is
planned for about 8 minutes on an H100 or H200; each part has a hard time limit (`BUDGET_S`).

  python3 benchmarks/gpu_suite.py                  # on the GPU machine
  python3 benchmarks/gpu_suite.py --cpu_smoke      # the same plumbing on CPU with tiny configs
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
SITE = "/tmp/archscale_site"  # where missing wheels are installed
TARGETS = {"train_mfu": 0.55, "train_speedup_vs_hf": 1.25, "decode_roofline_fraction": 0.7,
           "decode_speedup_vs_hf": 4.0}


def _train_args(smoke: bool) -> list[str]:
  if smoke:
    return [f"--config={ROOT / 'configs' / 'demo.py'}", "--config.train.global_batch_size=4",
            "--config.data.seq_len=32", "--steps=2", "--repeats=1", "--warmup=1",
            "--variants=train.loss_chunk=16", "--peer=off"]
  return [f"--config={ROOT / 'configs' / 'llama3_2_1b.py'}", "--config.compute.dtype=bfloat16",
          "--config.compute.attention=cudnn", "--config.compute.remat=dots_no_batch",
          "--config.data.seq_len=2048", "--config.train.global_batch_size=8", "--steps=5",
          "--repeats=3", "--warmup=2", "--variants=train.loss_chunk=1024"]


def _decode_args(smoke: bool) -> dict[str, list[str]]:
  """Arguments of the three decode_throughput.py runs."""
  if smoke:
    return {"decode": ["--experiment=peer", "--quick", "--no_hf"],
            "kernels": ["--experiment=peer", "--quick", "--no_hf", "--decode_attention=pallas",
                        "--batch_sizes=1"],
            "ratio": ["--experiment=arch_ratio", "--quick"]}
  return {"decode": ["--experiment=peer", "--repeats=2"],
          "kernels": ["--experiment=peer", "--repeats=2", "--no_hf",
                      "--decode_attention=pallas"],
          "ratio": ["--experiment=arch_ratio", "--batch_sizes=16,64", "--repeats=1"]}


# Seconds each child may take on the GPU (planned: 7 to 8 minutes together, at most 9).
BUDGET_S = {"train": 180, "decode": 120, "kernels": 60, "ratio": 170}


def install_missing(log) -> dict[str, Any]:
  """Installs the wheels in .whl/ when ml_collections or grain do not import; says what it did."""
  missing = []
  for module in ("ml_collections", "grain"):
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True)
    if probe.returncode:
      missing.append(module)
  if not missing:
    return {"missing": []}
  wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
  if not wheels:
    return {"missing": missing, "error": "no wheels in .whl/: run tools/device-wheels.sh on a "
                                         "machine with network access first"}
  cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
         SITE, *wheels]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  log.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}\n")
  return {"missing": missing, "installed": [pathlib.Path(w).name for w in wheels],
          "pip_exit": proc.returncode}


def run_child(name: str, script: str, args: list[str], out: pathlib.Path, timeout: float,
              env: dict[str, str], log) -> dict[str, Any]:
  """Runs one benchmark script with --out; its JSON (or why there is none) and its wall time."""
  cmd = [sys.executable, str(BENCH / script), *args, f"--out={out}"]
  log.write(f"\n===== {name}: {' '.join(cmd)}\n")
  log.flush()
  start = time.perf_counter()
  # Its own process group, so that a timeout also ends the HF worker it may have started.
  proc = subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
  try:
    code = proc.wait(timeout=max(timeout, 1))
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    code = None
  result: dict[str, Any] = {"wall_s": time.perf_counter() - start, "command": cmd[1:]}
  if code is None:
    result["error"] = f"timed out after {timeout:.0f} s"
  elif code:
    result["error"] = f"exit {code} (see the log)"
  partial = out.with_name(f"{out.stem}.partial.json")  # rows saved before a timeout
  if out.exists():
    result["result"] = json.loads(out.read_text())
  elif partial.exists():
    result["partial_result"] = json.loads(partial.read_text())
  return result


def _get(d: Any, *keys: Any) -> Any:
  for key in keys:
    if not isinstance(d, (dict, list)):
      return None
    try:
      d = d[key]
    except (KeyError, IndexError, TypeError):
      return None
  return d


def checks(children: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """The issue's targets against what was measured (None where it was not)."""
  train = _get(children, "train", "result") or {}
  mfu, speedup = _get(train, "archscale", "mfu"), train.get("speedup_vs_hf")
  out: dict[str, Any] = {
      "targets": TARGETS,
      "train_mfu": mfu, "train_speedup_vs_hf": speedup,
      "train_ok": (None if mfu is None or speedup is None
                   else mfu >= TARGETS["train_mfu"]
                   and speedup >= TARGETS["train_speedup_vs_hf"]),
      "train_loss_chunk": [{"variant": v.get("variant"), "mfu": v.get("mfu"),
                            "speedup_vs_base": v.get("speedup_vs_base")}
                           for v in train.get("variants", [])],
  }
  for name in ("decode", "kernels"):
    table = _get(children, name, "result", "summary", "per_batch") or []
    out[name] = [{k: row.get(k) for k in ("batch_size", "roofline_fraction", "speedup_vs_hf",
                                         "archscale_output_tokens_per_s",
                                         "hf_output_tokens_per_s")} for row in table]
  decode = out["decode"]
  out["decode_ok"] = None if not decode or any(
      r["roofline_fraction"] is None or r["speedup_vs_hf"] is None for r in decode) else all(
          r["roofline_fraction"] >= TARGETS["decode_roofline_fraction"]
          and r["speedup_vs_hf"] >= TARGETS["decode_speedup_vs_hf"] for r in decode)
  out["ratio"] = [{k: row.get(k) for k in ("batch_size", "measured_ratio", "floor_model_ratio",
                                          "calibrated_model_ratio")}
                  for row in _get(children, "ratio", "result", "summary", "per_batch") or []]
  return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_suite_out",
                      help="output folder (default: $OUT, else ./gpu_suite_out)")
  parser.add_argument("--cpu_smoke", action="store_true",
                      help="tiny configs on CPU: checks the plumbing, measures nothing")
  parser.add_argument("--only", default="train,decode,kernels,ratio",
                      help="comma-separated subset of train,decode,kernels,ratio")
  args = parser.parse_args(argv)
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  suite_start = time.perf_counter()
  env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
  if args.cpu_smoke:
    env["JAX_PLATFORMS"] = "cpu"
  selected = [n.strip() for n in args.only.split(",") if n.strip()]
  unknown = sorted(set(selected) - set(BUDGET_S))
  if unknown:
    raise SystemExit(f"--only: unknown part(s) {unknown}; choose from {sorted(BUDGET_S)}")

  with open(out_dir / "gpu_suite.log", "w") as log, tempfile.TemporaryDirectory() as tmp:
    installed = install_missing(log)
    if installed.get("installed"):
      env["PYTHONPATH"] = os.pathsep.join([SITE, str(ROOT), env.get("PYTHONPATH", "")])
    plan = {"train": ("train_throughput.py", _train_args(args.cpu_smoke)),
            **{k: ("decode_throughput.py", v) for k, v in _decode_args(args.cpu_smoke).items()}}
    children = {}
    for name in selected:
      script, child_args = plan[name]
      budget = 600 if args.cpu_smoke else BUDGET_S[name]
      children[name] = run_child(name, script, child_args, pathlib.Path(tmp) / f"{name}.json",
                                 budget, env, log)
  result = {
      "suite": "gpu_suite", "cpu_smoke": args.cpu_smoke, "install": installed,
      "wall_s": time.perf_counter() - suite_start, "children": children,
      "checks": checks(children),
  }
  text = json.dumps(result, indent=2, default=str)
  (out_dir / "gpu_suite.json").write_text(text + "\n")
  print(json.dumps(result["checks"], indent=2, default=str))
  return result


if __name__ == "__main__":
  main()
