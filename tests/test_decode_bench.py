"""The decode_bench harness on CPU: rows, failures, config errors, prefill blocks."""

import json

import jax
import jax.numpy as jnp
import pytest

from archscale.core import config_lib, settings
from archscale.model import transformer as M
from archscale.model.arch import ArchSpec
from archscale.serve import decode_bench as DB

SPEC = ArchSpec.from_dict(config_lib.ARCHS["demo"]).replace(tie_embeddings=False)


def test_harness_prefill_blocks_keep_scores_in_budget():
  llama = ArchSpec.from_dict(config_lib.ARCHS["llama3_2_1b"])
  assert DB.prefill_attention_chunk(llama, 1, 1024) == 0  # 128 MB of scores: one block
  for batch in (1, 16, 64):
    chunk = DB.prefill_attention_chunk(llama, batch, 4096)
    assert 16 <= chunk < 4096 and chunk & (chunk - 1) == 0
    assert batch * 32 * chunk * 4096 * 4 <= DB.PREFILL_SCORES_BYTES < 2 * (batch * 32 * chunk
                                                                          * 4096 * 4)


def _bench_config(**bench):
  config = config_lib.make_config("demo")
  config.bench.update(dict(archs="demo", batch_sizes=(1, 2), input_len=8, output_len=4,
                           repeats=1, dtype="float32"))
  config.bench.update(bench)
  return config


REQUIRED = ("arch", "batch_size", "input_len", "output_len", "prefill_s", "step_ms_median",
            "output_tokens_per_s", "hbm_gbps", "roofline_fraction")


def test_decode_bench_end_to_end(tmp_path):
  rows = DB.run_decode_bench(_bench_config(profile=True), tmp_path)
  written = json.loads((tmp_path / "decode_bench.json").read_text())
  assert written == json.loads(json.dumps(rows))
  assert [r["batch_size"] for r in written] == [1, 2]
  for row in written:
    assert set(REQUIRED) <= set(row) and "error" not in row
    assert row["arch"] == "demo" and row["input_len"] == 8 and row["output_len"] == 4
    assert row["roofline_fraction"] is None  # CPU has no entry in the accelerator table
    for key in ("prefill_s", "step_ms_median", "step_ms_p90", "output_tokens_per_s",
                "total_tokens_per_s", "hbm_gbps", "compile_s"):
      assert row[key] > 0, key
    assert row["step_ms_p90"] >= row["step_ms_median"]
    assert row["total_tokens_per_s"] == pytest.approx(row["output_tokens_per_s"] * 12 / 4)
  assert (tmp_path / "decode_bench.png").stat().st_size > 0
  assert json.loads((tmp_path / "decode_bench_provenance.json").read_text())["platform"] == "cpu"
  assert not (tmp_path / "calibration.json").exists()
  assert not (tmp_path / "decode_bench.partial.json").exists()
  for batch in (1, 2):  # bench.profile: one trace per point, of its timed decode bursts
    assert len(list((tmp_path / "profile" / f"demo-b{batch}").rglob("*.xplane.pb"))) == 1


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(monkeypatch):
  calls = []

  def fake_bench_batch(spec, params, prefill_options, decode_options, sampler, batch, *args):
    calls.append(batch)
    if batch == 2:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 byte")
    return {"prefill_s": 0.1, "step_ms_median": 2.0, "step_ms_p90": 2.5,
            "output_tokens_per_s": batch * 4 / 0.2}

  monkeypatch.setattr(DB, "_bench_batch", fake_bench_batch)
  monkeypatch.setattr(M, "init_params", lambda model, rng: {"layers_0": {"w": jnp.zeros(3)}})
  specs = {"demo": SPEC, "demo_mqa": SPEC.replace(n_kv_heads=1)}
  bench = settings.BenchConfig(batch_sizes=[4, 1, 2], input_len=8, output_len=4, repeats=1,
                               dtype="float32", accelerator="h100-sxm")
  rows = DB.bench_archs(specs, bench)
  assert calls == [1, 2, 1, 2]  # batch 4 is not tried once batch 2 failed
  assert [(r["arch"], r["batch_size"], "error" in r) for r in rows] == [
      ("demo", 1, False), ("demo", 2, True), ("demo", 4, True),
      ("demo_mqa", 1, False), ("demo_mqa", 2, True), ("demo_mqa", 4, True)]
  assert "out of memory" in rows[1]["error"] and "skipped" in rows[2]["error"]
  floor = rows[0]["predicted_step_ms"]
  assert rows[0]["roofline_fraction"] == pytest.approx(floor / 2.0)
  assert rows[0]["hbm_gbps"] > 0


def test_a_failed_batch_is_recorded_and_rows_are_handed_over_per_architecture(monkeypatch):
  def fake_bench_batch(spec, params, prefill_options, decode_options, sampler, batch, *args):
    if batch == 1 and spec.n_kv_heads == 1:
      raise ValueError("cuDNN does not support this\nsecond line")
    return {"prefill_s": 0.1, "step_ms_median": 2.0, "step_ms_p90": 2.5,
            "output_tokens_per_s": batch * 4 / 0.2}

  monkeypatch.setattr(DB, "_bench_batch", fake_bench_batch)
  monkeypatch.setattr(M, "init_params", lambda model, rng: {"layers_0": {"w": jnp.zeros(3)}})
  specs = {"demo": SPEC, "demo_mqa": SPEC.replace(n_kv_heads=1)}
  handed = []
  bench = settings.BenchConfig(batch_sizes=[1, 2], input_len=8, output_len=4, repeats=1,
                               dtype="float32")
  rows = DB.bench_archs(specs, bench,
                        on_rows=lambda rows: handed.append([r["arch"] for r in rows]))
  assert handed == [["demo", "demo"], ["demo", "demo", "demo_mqa", "demo_mqa"]]
  assert rows[2]["error"] == "ValueError: cuDNN does not support this"
  assert "error" not in rows[3]  # a failure that is not out of memory does not stop the batches


@pytest.mark.parametrize("field,value,match", [
    ("archs", "demo,nonexistent", "bench.archs"),
    ("batch_sizes", (1, 0), "bench.batch_sizes"),
    ("input_len", 510, "bench.input_len"),
    ("output_len", 1, "bench.output_len"),
    ("repeats", 0, "bench.repeats"),
    ("dtype", "int8", "bench.dtype"),
    ("attention", "flash", "bench.attention"),
    ("decode_attention", "flash", "bench.decode_attention"),
    ("batch_sizes", (1, "x"), "bench.batch_sizes"),
])
def test_bench_config_errors_name_the_field(tmp_path, field, value, match):
  with pytest.raises(ValueError, match=match):
    DB.run_decode_bench(_bench_config(**{field: value}), tmp_path)
  assert not (tmp_path / "decode_bench.json").exists()


def test_auto_kernels_per_platform():
  assert DB.resolve_attention("auto", "auto", "gpu", "bfloat16") == ("cudnn", "xla")
  assert DB.resolve_attention("auto", "auto", "gpu", "float32") == ("xla", "xla")
  assert DB.resolve_attention("auto", "auto", "tpu", "bfloat16") == ("splash", "xla")
  assert DB.resolve_attention("xla", "pallas", "gpu", "bfloat16") == ("xla", "pallas")
