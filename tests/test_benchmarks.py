"""The benchmark scripts run as shipped: their CPU smoke modes end in well-formed JSON.

Nothing here is timed; speed is what the scripts themselves report on an accelerator.
"""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def run_script(tmp_path, *args) -> dict:
  out = tmp_path / "out.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, *args, f"--out={out}"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no partial file left
  return json.loads(out.read_text())


def test_decode_benchmark_quick_run(tmp_path):
  result = run_script(tmp_path, REPO / "benchmarks" / "decode_throughput.py", "--quick",
                      "--experiment=arch_ratio")
  assert [(r["arch"], r["batch_size"]) for r in result["rows"]] == [
      ("demo", 1), ("demo", 2), ("demo_mqa", 1), ("demo_mqa", 2)]
  assert all("error" not in r and r["output_tokens_per_s"] > 0 for r in result["rows"])
  ratio = result["summary"]["per_batch"][0]
  assert ratio["measured_ratio"] == (ratio["demo_mqa_output_tokens_per_s"]
                                     / ratio["demo_output_tokens_per_s"])


def test_train_benchmark_runs_with_a_variant(tmp_path):
  result = run_script(tmp_path, REPO / "benchmarks" / "train_throughput.py",
                      f"--config={REPO / 'configs' / 'demo.py'}",
                      "--config.train.global_batch_size=4", "--config.data.seq_len=32",
                      "--steps=2", "--repeats=1", "--warmup=1", "--variants=train.loss_chunk=16")
  base, variant = result["archscale"], result["variants"][0]
  assert base["tokens_per_sec"] > 0 and base["mfu"] is None  # no peak FLOP/s for CPU
  assert variant["variant"] == "train.loss_chunk=16"
  assert abs(variant["loss"] - base["loss"]) < 1e-4  # the fused loss computes the same loss


def test_prepare_data_benchmark_quick_run(tmp_path):
  result = run_script(tmp_path, REPO / "benchmarks" / "prepare_data.py", "--mb=0.5",
                      "--files=2", "--vocab=300", "--train_mb=0.2", "--repeats=1")
  tokens = {result["reference"]["tokens"], *(r["tokens"] for r in result["prepare"].values())}
  assert len(tokens) == 1 and sorted(result["prepare"]) == ["1", "2"]
  ratio = result["reference"]["tokens_per_s"] / result["prepare"]["1"]["tokens_per_s"]
  assert abs(result["ratio_prepare_1_worker_vs_reference"] * ratio - 1) < 0.05
