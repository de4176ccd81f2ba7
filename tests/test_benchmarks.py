"""The benchmark scripts run as shipped: their CPU smoke modes end in well-formed JSON.

Nothing here is timed; speed is what the scripts themselves report on an accelerator.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

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


def test_gpu_suite_cpu_smoke_runs_the_pallas_decode_harness(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, REPO / "benchmarks" / "gpu_suite.py", "--cpu_smoke",
                         "--only=kernels", f"--out={tmp_path}"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_suite.json", "gpu_suite.log"]
  result = json.loads((tmp_path / "gpu_suite.json").read_text())
  child = result["children"]["kernels"]
  assert "error" not in child and child["wall_s"] > 0
  rows = child["result"]["rows"]
  assert [r["batch_size"] for r in rows] == [1]
  assert all(r["decode_attention"] == "pallas" and "error" not in r
             and r["output_tokens_per_s"] > 0 for r in rows)
  assert result["checks"]["kernels"][0]["archscale_output_tokens_per_s"] > 0
  assert "===== kernels" in (tmp_path / "gpu_suite.log").read_text()


def test_gpu_suite_checks_hold_measurements_against_the_targets():
  sys.path.insert(0, str(REPO / "benchmarks"))
  import gpu_suite

  def decode(roofline, speedup):
    return {"result": {"summary": {"per_batch": [
        {"batch_size": b, "roofline_fraction": roofline, "speedup_vs_hf": speedup}
        for b in (1, 16, 64)]}}}

  children = {"train": {"result": {"archscale": {"mfu": 0.56}, "speedup_vs_hf": 1.3}},
              "decode": decode(0.72, 4.1)}
  checks = gpu_suite.checks(children)
  assert checks["train_ok"] is True and checks["decode_ok"] is True
  children["train"]["result"]["speedup_vs_hf"] = 1.2
  children["decode"] = decode(0.69, 5.0)
  checks = gpu_suite.checks(children)
  assert checks["train_ok"] is False and checks["decode_ok"] is False
  missing = gpu_suite.checks({"train": {"error": "timed out after 170 s"}})
  assert missing["train_ok"] is None and missing["decode_ok"] is None and missing["ratio"] == []


def test_step_traffic_measures_what_a_step_moves_against_its_floor():
  sys.path.insert(0, str(REPO / "benchmarks"))
  import step_traffic

  from archscale.model.arch import ArchSpec

  spec = ArchSpec(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_ff=192,
                  vocab_size=512, tie_embeddings=True, max_seq_len=4096)
  short, long = (step_traffic.decode_traffic(spec, 8, n, "float32") for n in (1280, 2560))
  assert short["floor_bytes"] == long["floor_bytes"] and short["bytes_over_floor"] >= 1.0
  # Today's decode step reads the whole allocated cache: twice the allocation, more bytes.
  assert long["bytes"] > short["bytes"] * 1.3
  none, full = (step_traffic.train_traffic(spec, remat, batch=2, seq_len=64)
                for remat in ("none", "full"))
  assert 0.9 < none["flops_over_model"] < 1.5  # the model's FLOPs, counted over every layer
  assert full["flops"] > none["flops"] * 1.15  # full remat runs the forward pass again


def test_seed_noise_reports_the_spread_of_seeds_per_budget(tmp_path):
  out = run_script(tmp_path, str(REPO / "benchmarks" / "seed_noise.py"), "--tokens=1e4,2e4",
                   "--seeds=2")
  budgets = out["budgets"]
  assert [b["tokens"] for b in budgets] == [1e4, 2e4]
  for b in budgets:
    assert len(b["losses"]) == 2 and b["losses"][0] != b["losses"][1]  # seeds differ
    assert b["std"] == pytest.approx(abs(b["losses"][0] - b["losses"][1]) / 2**0.5)
    assert b["wall_s"] > 0
  assert out["std_vs_tokens_loglog_slope"] is not None
