"""Generation (greedy equals a naive loop, eos, sampling) and the decode_bench harness on CPU."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from archscale import config_lib
from archscale import decode as D
from archscale import model as M
from archscale.arch import ArchSpec

# Untied head and enlarged weights: greedy continuations vary from token to token, so a wrong
# cache position, mask or sampling step changes the output.
SPEC = ArchSpec.from_dict(config_lib.ARCHS["demo"]).replace(tie_embeddings=False)
N_NEW = 12


@pytest.fixture(scope="module")
def setup():
  model = M.Transformer(SPEC, M.ModelOptions())
  params = jax.jit(lambda rng: M.init_params(model, rng))(jax.random.key(0))
  params = jax.tree.map(lambda x: x * 20 if x.ndim >= 2 else x, params)
  prompt_BT = jax.random.randint(jax.random.key(1), (3, 7), 0, SPEC.vocab_size)
  return model, params, prompt_BT


def naive_greedy(model, params, prompt_BT, n_new):
  """Reruns the full causal forward for every new token (no cache).

  The sequence lives in a buffer of the positions it feeds (the last token is only predicted),
  so one compiled forward serves every step; causality makes the logits at position t
  independent of the (zero) tokens after it.
  """
  b, t = prompt_BT.shape
  forward = jax.jit(lambda p, x: M.forward(model, p, x))
  tokens_BS = jnp.zeros((b, t + n_new - 1), jnp.int32).at[:, :t].set(prompt_BT)
  new = []
  for i in range(n_new):
    new.append(jnp.argmax(forward(params, tokens_BS)[:, t + i - 1], axis=-1).astype(jnp.int32))
    if t + i < tokens_BS.shape[1]:
      tokens_BS = tokens_BS.at[:, t + i].set(new[-1])
  return np.stack(new, axis=1)


def test_greedy_generate_equals_full_forward_loop(setup):
  model, params, prompt_BT = setup
  out = D.generate(params, SPEC, prompt_BT, N_NEW)
  expected = naive_greedy(model, params, prompt_BT, N_NEW)
  assert len(np.unique(expected)) > N_NEW  # the check can tell positions apart
  np.testing.assert_array_equal(np.asarray(out.tokens_BN), expected)
  np.testing.assert_array_equal(np.asarray(out.lengths_B), [N_NEW] * 3)
  assert int(out.cache.end) == out.cache.max_len == prompt_BT.shape[1] + N_NEW - 1


def test_generation_may_fill_the_context_exactly(setup):
  model, params, _ = setup
  prompt_BT = jax.random.randint(jax.random.key(2), (1, SPEC.max_seq_len - N_NEW + 1), 0,
                                 SPEC.vocab_size)
  out = D.generate(params, SPEC, prompt_BT, N_NEW)  # feeds positions up to max_seq_len - 1
  np.testing.assert_array_equal(np.asarray(out.tokens_BN),
                                naive_greedy(model, params, prompt_BT, N_NEW))
  with pytest.raises(ValueError, match="max_seq_len"):
    D.generate(params, SPEC, prompt_BT, N_NEW + 1)


def test_unrolled_model_generates_the_same(setup):
  _, params, prompt_BT = setup
  options = M.ModelOptions(scan_layers=False)
  flat = D.unstack_layers(params, SPEC.n_layers)
  assert "layers" not in flat and "layers_1" in flat
  out = D.generate(flat, SPEC, prompt_BT, N_NEW, options=options)
  ref = D.generate(params, SPEC, prompt_BT, N_NEW)
  np.testing.assert_array_equal(np.asarray(out.tokens_BN), np.asarray(ref.tokens_BN))


def test_generation_makes_no_copy_of_the_kv_cache(setup):
  _, params, _ = setup
  batch, prompt, max_len = 16, 8, SPEC.max_seq_len  # the cache dominates the program's memory
  options = M.ModelOptions(scan_layers=True)  # training's layout; generation unrolls it
  cache = M.init_cache(SPEC, batch, max_len, jnp.float32)
  cache_bytes = sum(x.nbytes for x in cache.k_BSKH + cache.v_BSKH)
  program = D._generate_jit.lower(
      D.unstack_layers(params, SPEC.n_layers), jnp.zeros((batch, prompt), jnp.int32), cache,
      jax.random.key(0), jnp.int32(8), spec=SPEC, prefill_options=D.decode_model_options(options),
      decode_options=D.decode_model_options(options), sampler=D.Sampler()).compile()
  memory = program.memory_analysis()
  assert memory.alias_size_in_bytes >= cache_bytes  # the donated cache is updated in place
  assert memory.temp_size_in_bytes < cache_bytes  # a scanned prefill took 2.1x: stack + split


def test_chunked_prefill_attention_generates_the_same(setup):
  _, params, prompt_BT = setup
  out = D.generate(params, SPEC, prompt_BT, N_NEW, options=M.ModelOptions(attention_chunk=3))
  ref = D.generate(params, SPEC, prompt_BT, N_NEW)
  np.testing.assert_array_equal(np.asarray(out.tokens_BN), np.asarray(ref.tokens_BN))


def test_harness_prefill_blocks_keep_scores_in_budget():
  llama = ArchSpec.from_dict(config_lib.ARCHS["llama3_2_1b"])
  assert D.prefill_attention_chunk(llama, 1, 1024) == 0  # 128 MB of scores: one block
  for batch in (1, 16, 64):
    chunk = D.prefill_attention_chunk(llama, batch, 4096)
    assert 16 <= chunk < 4096 and chunk & (chunk - 1) == 0
    assert batch * 32 * chunk * 4096 * 4 <= D.PREFILL_SCORES_BYTES < 2 * (batch * 32 * chunk
                                                                          * 4096 * 4)


def test_one_program_per_shape(setup):
  _, params, prompt_BT = setup
  D.generate(params, SPEC, prompt_BT, N_NEW)
  before = D._generate_jit._cache_size()
  D.generate(params, SPEC, prompt_BT + 1, N_NEW)
  D.generate(params, SPEC, prompt_BT, N_NEW, rng=jax.random.key(3))
  assert D._generate_jit._cache_size() == before
  empty = D.generate(params, SPEC, prompt_BT, 0)
  assert empty.tokens_BN.shape == (3, 0) and int(empty.cache.end) == prompt_BT.shape[1]


def test_eos_stops_rows_unless_ignored(setup):
  _, params, prompt_BT = setup
  greedy = np.asarray(D.generate(params, SPEC, prompt_BT, N_NEW).tokens_BN)
  eos = int(greedy[0, 4])
  out = D.generate(params, SPEC, prompt_BT, N_NEW, D.Sampler(eos_id=eos))
  tokens, lengths = np.asarray(out.tokens_BN), np.asarray(out.lengths_B)
  for row in range(3):
    hits = np.flatnonzero(greedy[row] == eos)
    length = hits[0] + 1 if hits.size else N_NEW
    assert lengths[row] == length
    np.testing.assert_array_equal(tokens[row, :length], greedy[row, :length])
    assert (tokens[row, length:] == eos).all()
  assert lengths[0] == np.flatnonzero(greedy[0] == eos)[0] + 1 <= 5
  ignored = D.generate(params, SPEC, prompt_BT, N_NEW, D.Sampler(eos_id=eos, ignore_eos=True))
  np.testing.assert_array_equal(np.asarray(ignored.tokens_BN), greedy)
  np.testing.assert_array_equal(np.asarray(ignored.lengths_B), [N_NEW] * 3)


def test_sampling_respects_temperature_top_k_and_top_p(setup):
  _, params, prompt_BT = setup
  greedy = D.generate(params, SPEC, prompt_BT, N_NEW).tokens_BN
  top1 = D.generate(params, SPEC, prompt_BT, N_NEW, D.Sampler(temperature=1.0, top_k=1),
                    rng=jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(top1.tokens_BN), np.asarray(greedy))
  hot = D.Sampler(temperature=2.0)
  a = D.generate(params, SPEC, prompt_BT, N_NEW, hot, rng=jax.random.key(7)).tokens_BN
  b = D.generate(params, SPEC, prompt_BT, N_NEW, hot, rng=jax.random.key(7)).tokens_BN
  c = D.generate(params, SPEC, prompt_BT, N_NEW, hot, rng=jax.random.key(8)).tokens_BN
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))

  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits_BV = jnp.tile(jnp.log(jnp.asarray(probs))[None], (2000, 1))
  rng = jax.random.key(0)
  draw = lambda s: np.asarray(D.sample_logits(logits_BV, rng, s))
  assert set(draw(D.Sampler(temperature=1.0, top_k=3))) == {0, 1, 2}
  nucleus = draw(D.Sampler(temperature=1.0, top_p=0.7))
  assert set(nucleus) == {0, 1}
  assert abs((nucleus == 0).mean() - 0.625) < 0.05  # renormalised 0.5 / 0.8
  assert set(draw(D.Sampler(temperature=1.0, top_p=0.5))) == {0}
  full = draw(D.Sampler(temperature=1.0))
  assert abs((full == 3).mean() - 0.05) < 0.02
  cold = draw(D.Sampler(temperature=0.05))
  assert (cold == 0).mean() > 0.99


def test_invalid_requests_raise():
  with pytest.raises(ValueError, match="temperature"):
    D.Sampler(temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    D.Sampler(top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    D.Sampler(top_k=-2)
  params = {}
  with pytest.raises(ValueError, match="max_seq_len"):
    D.generate(params, SPEC, jnp.zeros((1, 500), jnp.int32), 100)
  with pytest.raises(ValueError, match="integer"):
    D.generate(params, SPEC, jnp.zeros((1, 5)), 3)


def _bench_config(**bench):
  config = config_lib.make_config("demo")
  config.bench.update(dict(archs="demo", batch_sizes=(1, 2), input_len=8, output_len=4,
                           repeats=1, dtype="float32"))
  config.bench.update(bench)
  return config


REQUIRED = ("arch", "batch_size", "input_len", "output_len", "prefill_s", "step_ms_median",
            "output_tokens_per_s", "hbm_gbps", "roofline_fraction")


def test_decode_bench_end_to_end(tmp_path):
  rows = D.run_decode_bench(_bench_config(), tmp_path)
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


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(monkeypatch):
  calls = []

  def fake_bench_batch(spec, params, prefill_options, decode_options, sampler, batch, *args):
    calls.append(batch)
    if batch == 2:
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 1 byte")
    return {"prefill_s": 0.1, "step_ms_median": 2.0, "step_ms_p90": 2.5,
            "output_tokens_per_s": batch * 4 / 0.2}

  monkeypatch.setattr(D, "_bench_batch", fake_bench_batch)
  monkeypatch.setattr(M, "init_params", lambda model, rng: {"layers_0": {"w": jnp.zeros(3)}})
  specs = {"demo": SPEC, "demo_mqa": SPEC.replace(n_kv_heads=1)}
  rows = D.run_sweep(specs, [4, 1, 2], 8, 4, 1, dtype="float32", accelerator="h100-sxm")
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

  monkeypatch.setattr(D, "_bench_batch", fake_bench_batch)
  monkeypatch.setattr(M, "init_params", lambda model, rng: {"layers_0": {"w": jnp.zeros(3)}})
  specs = {"demo": SPEC, "demo_mqa": SPEC.replace(n_kv_heads=1)}
  handed = []
  rows = D.run_sweep(specs, [1, 2], 8, 4, 1, dtype="float32",
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
])
def test_bench_config_errors_name_the_field(tmp_path, field, value, match):
  with pytest.raises(ValueError, match=match):
    D.run_decode_bench(_bench_config(**{field: value}), tmp_path)
  assert not (tmp_path / "decode_bench.json").exists()
