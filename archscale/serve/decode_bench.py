"""The decode latency / throughput harness (`--mode=decode_bench`).

It measures, per architecture and batch size (random weights, random-token prompts), with the
generation program of `archscale.serve.generate`:

  compile_s            ahead-of-time compile of the generation program
  prefill_s            generate(n_new=0) at the same shapes: prefill + sampling the first token
  total_s              generate(n_new=output_len) with end-of-sequence ignored (the protocol),
                       after an untimed warm-up prefill and a pass of decode bursts
  output_tokens_per_s  batch * output_len / total_s (mean of `repeats` runs, as the paper does)
  step_ms_median/p90   decode steps timed in bursts of k steps: a jitted `fori_loop` of k
                       `decode_step` calls per dispatch, one host sync per burst, so dispatch
                       latency is spread over k steps and the GPU runs the burst back to back;
                       per-step time = burst time / k, pooled over the generation and the repeats
  step_ms_mean         (total_s - prefill_s) / (output_len - 1), from the end-to-end runs
  hbm_gbps             (weight bytes + KV bytes of the mean context) / step_ms_median
  roofline_fraction    cost model floor of the mean step / step_ms_median (None off the table)
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from archscale.core import figures, io, settings
from archscale.model import transformer as model_lib
from archscale.model.arch import ArchSpec
from archscale.serve import costmodel
from archscale.serve import generate as generate_lib


def _decode_burst(params, cache, tokens_B, *, spec, options, n_steps):
  """`n_steps` greedy decode steps in one program (the harness's per-step timing unit)."""
  decode_model = model_lib.Transformer(spec, options)

  def body(_, carry):
    cache, tok_B = carry
    logits_BV, cache = model_lib.decode_step(decode_model, params, cache, tok_B)
    return cache, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  return jax.lax.fori_loop(0, n_steps, body, (cache, tokens_B))


_decode_burst_jit = jax.jit(_decode_burst, static_argnames=("spec", "options", "n_steps"),
                            donate_argnames=("cache",))


def resolve_attention(attention: str, decode_attention: str, platform: str,
                      dtype: str) -> tuple[str, str]:
  """(prefill, decode) attention kernels. "auto": the prefill runs cuDNN on GPU in 16-bit,
  splash on TPU, else XLA; decode steps run XLA.

  Prefill at long prompts needs a fused kernel (XLA's reference path materialises B*N*T*T
  scores). Decode steps read the heads-major cache in place with XLA, while cuDNN (which takes
  [B, S, K, H]) would need a transposed copy each step; "pallas" reads only the filled part.
  cuDNN needs 16-bit inputs. The README keeps the kernel timings measured so far.
  """
  fused_ok = platform == "gpu" and dtype in ("bfloat16", "float16")
  auto_prefill = "cudnn" if fused_ok else "splash" if platform == "tpu" else "xla"
  prefill = attention if attention != "auto" else auto_prefill
  decode = decode_attention if decode_attention != "auto" else "xla"
  return prefill, decode


def _is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _timed(fn, *args):
  """Runs fn(*args), waits for the result, returns (result, seconds)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def _burst_steps(output_len: int) -> int:
  """Decode steps per timed burst: up to 16, with at least 8 bursts when the output allows."""
  return max(1, min(16, (output_len - 1) // 8))


def _device_memory() -> tuple[int | None, int | None]:
  """(bytes_limit, peak_bytes_in_use) of device 0, or Nones where the backend has no stats."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit"), stats.get("peak_bytes_in_use")


def bench_architecture(name: str, spec: ArchSpec, batch_sizes: Sequence[int], input_len: int,
                       output_len: int, repeats: int, options: model_lib.ModelOptions,
                       decode_attention: str | None = None, accelerator: str | None = None,
                       seed: int = 0, profile_dir: pathlib.Path | None = None
                       ) -> list[dict[str, Any]]:
  """Harness rows for one architecture over `batch_sizes` (ascending; see the module doc).

  A batch that runs out of device memory gets an `error` row, and so do the larger ones after
  it without being tried; the sweep continues with the next architecture. A batch that fails in
  any other way gets an `error` row naming the exception (logged in full) and the sweep goes on.
  """
  sampler = generate_lib.Sampler(ignore_eos=True)
  dtype_bytes = jnp.dtype(options.jnp_dtype).itemsize
  param_bytes = jnp.dtype(options.jnp_param_dtype).itemsize
  max_len = input_len + output_len
  prefill_options = generate_lib.decode_model_options(options)
  decode_options = generate_lib.decode_model_options(options, decode_attention)
  model = model_lib.Transformer(spec, prefill_options)  # unrolled: one copy of the weights
  params = jax.jit(lambda rng: model_lib.init_params(model, rng))(jax.random.key(seed))
  burst = _burst_steps(output_len)
  n_bursts = (output_len - 1) // burst
  contexts = costmodel.decode_contexts(input_len, output_len)
  mean_context = float(contexts.mean())
  weight_bytes = costmodel.weight_bytes_per_step(spec, dtype_bytes)
  bytes_limit, _ = _device_memory()

  rows: list[dict[str, Any]] = []
  failed_at = None
  for batch in sorted(batch_sizes):
    row: dict[str, Any] = {
        "arch": name, "batch_size": batch, "input_len": input_len, "output_len": output_len,
        "dtype": options.dtype, "prefill_attention": options.attention,
        "decode_attention": decode_options.attention, "accelerator": accelerator,
        "kv_cache_bytes": costmodel.kv_cache_bytes(spec, batch, max_len, dtype_bytes),
        "params_total": spec.params_total,
    }
    needed = spec.param_bytes(param_bytes) + row["kv_cache_bytes"]
    if failed_at is not None:
      rows.append({**row, "error": f"out of memory: skipped after batch {failed_at} did not fit"})
      continue
    if bytes_limit is not None and needed > bytes_limit:
      failed_at = batch
      rows.append({**row, "error": f"out of memory: weights + KV cache need {needed / 1e9:.1f} GB, "
                                   f"device limit {bytes_limit / 1e9:.1f} GB"})
      continue
    try:
      trace = None if profile_dir is None else profile_dir / f"{name}-b{batch}"
      row.update(_bench_batch(spec, params, prefill_options, decode_options, sampler, batch,
                              input_len, output_len, repeats, burst, n_bursts, seed, trace))
    except Exception as err:  # One failed point must not cost the rows measured before it.
      first_line = (str(err).splitlines() or [""])[0][:300]
      if isinstance(err, jax.errors.JaxRuntimeError) and _is_oom(err):
        failed_at = batch
        rows.append({**row, "error": f"out of memory: {first_line}"})
      else:
        logging.exception("decode_bench %s batch=%d failed", name, batch)
        rows.append({**row, "error": f"{type(err).__name__}: {first_line}"})
      gc.collect()
      continue
    step_s = row["step_ms_median"] * 1e-3
    row["hbm_gbps"] = (weight_bytes + batch * mean_context * spec.kv_bytes_per_token(dtype_bytes)
                       ) / step_s / 1e9
    if accelerator is not None:
      floor = costmodel.throughput(spec, accelerator, batch, input_len, output_len, dtype_bytes)
      row["predicted_step_ms"] = floor["step_s_mean"] * 1e3
      row["predicted_prefill_s"] = floor["prefill_s"]
      row["predicted_output_tokens_per_s"] = floor["output_tokens_per_s"]
      row["roofline_fraction"] = floor["step_s_mean"] / step_s
    else:
      row["predicted_step_ms"] = row["predicted_prefill_s"] = None
      row["predicted_output_tokens_per_s"] = row["roofline_fraction"] = None
    logging.info("decode_bench %s batch=%d: %.1f output tokens/s, step %.3f ms (p90 %.3f), "
                 "prefill %.3f s, %.0f GB/s, roofline fraction %s", name, batch,
                 row["output_tokens_per_s"], row["step_ms_median"], row["step_ms_p90"],
                 row["prefill_s"], row["hbm_gbps"], row["roofline_fraction"])
    rows.append(row)
  del params
  gc.collect()
  return rows


# Where the prefill runs XLA's attention, queries go in blocks whose float32 scores stay under
# this many bytes (model.ModelOptions.attention_chunk).
PREFILL_SCORES_BYTES = 1 << 30


def prefill_attention_chunk(spec: ArchSpec, batch: int, prompt_len: int) -> int:
  """Queries per block (a power of two, 16 at least) keeping B N C T float32 scores in budget."""
  per_query = batch * spec.n_heads * prompt_len * 4
  chunk = 1 << max(4, int(math.log2(max(PREFILL_SCORES_BYTES // per_query, 1))))
  return 0 if chunk >= prompt_len else chunk


def _bench_batch(spec, params, prefill_options, decode_options, sampler, batch, input_len,
                 output_len, repeats, burst, n_bursts, seed, trace=None) -> dict[str, Any]:
  """Compiles and times one (architecture, batch) point; see the module doc for the method."""
  if prefill_options.attention == "xla":
    prefill_options = dataclasses.replace(
        prefill_options, attention_chunk=prefill_attention_chunk(spec, batch, input_len))
  max_len = input_len + output_len
  keys = jax.random.split(jax.random.key(seed + 1), 2)
  prompt_BT = jax.random.randint(keys[0], (batch, input_len), 0, spec.vocab_size, jnp.int32)
  cache_len = generate_lib.cache_length(spec, max_len, decode_options)
  new_cache = lambda: jax.block_until_ready(
      model_lib.init_cache(spec, batch, cache_len, prefill_options.jnp_dtype))
  statics = dict(spec=spec, prefill_options=prefill_options, decode_options=decode_options,
                 sampler=sampler)

  t0 = time.perf_counter()
  program = generate_lib.generate_program.lower(params, prompt_BT, new_cache(), keys[1],
                                                jnp.int32(0), **statics).compile()
  compile_s = time.perf_counter() - t0
  memory = program.memory_analysis()
  compiled_bytes = None
  if memory is not None:
    compiled_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  run = lambda n_new: _timed(program, params, prompt_BT, new_cache(), keys[1], jnp.int32(n_new))

  # Warm-up that also runs one iteration of the decode loop, so that no first-execution cost
  # lands in a timed generation; it leaves a cache to compile the bursts with.
  (tokens_BO, _, cache), _ = run(2)
  burst_fn = _decode_burst_jit.lower(params, cache, tokens_BO[:, 0], spec=spec,
                                     options=decode_options, n_steps=burst).compile()
  del tokens_BO, cache

  prefill_s, total_s, step_s = [], [], []
  for repeat in range(repeats):
    (tokens_BO, _, cache), t = run(0)
    prefill_s.append(t)
    tok_B = tokens_BO[:, 0]
    with (jax.profiler.trace(str(trace), create_perfetto_trace=True) if trace and repeat == 0
          else contextlib.nullcontext()):
      for i in range(n_bursts):  # The first burst ever run is a warm-up, not a sample.
        (cache, tok_B), t = _timed(burst_fn, params, cache, tok_B)
        if repeat or i or n_bursts == 1:
          step_s.append(t / burst)
    del tokens_BO, cache, tok_B
    total_s.append(run(output_len)[1])

  _, peak = _device_memory()
  total_mean = float(np.mean(total_s))
  prefill_median = float(np.median(prefill_s))
  return {
      "compile_s": compile_s,
      "prefill_s": prefill_median,
      "total_s": total_mean,
      "total_s_runs": total_s,
      "step_ms_median": float(np.median(step_s)) * 1e3,
      "step_ms_p90": float(np.percentile(step_s, 90)) * 1e3,
      "step_ms_mean": (total_mean - prefill_median) / (output_len - 1) * 1e3,
      "step_timing_burst": burst,
      "output_tokens_per_s": batch * output_len / total_mean,
      "total_tokens_per_s": batch * max_len / total_mean,
      "peak_memory_bytes": compiled_bytes,
      "device_peak_bytes_in_use": peak,
      "prefill_attention_chunk": prefill_options.attention_chunk or None,
  }


def _check_lengths(specs: dict[str, ArchSpec], bench: settings.BenchConfig) -> None:
  """Raises ValueError naming the bench field when an architecture cannot hold the lengths."""
  if not specs:
    raise ValueError("bench.archs is empty; give comma-separated names such as "
                     "'llama3_2_1b,surefire_1b'")
  total = bench.input_len + bench.output_len
  for name, spec in specs.items():
    if total > spec.max_seq_len:
      raise ValueError(f"bench.input_len + bench.output_len = {total} exceeds "
                       f"model.max_seq_len={spec.max_seq_len} of {name}; shorten them")


def bench_archs(specs: dict[str, ArchSpec], bench: settings.BenchConfig, seed: int = 0,
                on_rows: Callable[[list[dict[str, Any]]], None] | None = None,
                profile_dir: pathlib.Path | None = None) -> list[dict[str, Any]]:
  """Checks the lengths, then runs `bench_architecture` for every architecture.

  `on_rows(rows)` receives all rows so far after each architecture (e.g. to save them, so an
  interrupted sweep keeps what it measured).
  """
  _check_lengths(specs, bench)
  device = jax.devices()[0]
  prefill_attn, decode_attn = resolve_attention(bench.attention, bench.decode_attention,
                                                 device.platform, bench.dtype)
  if bench.accelerator == "auto":
    acc = costmodel.accelerator_for_device_kind(device.device_kind)
  else:
    acc = costmodel.get_accelerator(bench.accelerator).name if bench.accelerator else None
  options = model_lib.ModelOptions(dtype=bench.dtype, param_dtype=bench.dtype, scan_layers=False,
                                   attention=prefill_attn)
  rows = []
  for name, spec in specs.items():
    for row in bench_architecture(name, spec, bench.batch_sizes, bench.input_len,
                                  bench.output_len, bench.repeats, options, decode_attn, acc,
                                  seed, profile_dir if bench.profile else None):
      rows.append({**row, "device_kind": device.device_kind})
    if on_rows is not None:
      on_rows(rows)
  return rows


def plot_throughput(rows: Sequence[dict[str, Any]], path: str | pathlib.Path,
                      title: str | None = None) -> str:
  """Output tokens/s against batch size (log-x), one line per architecture; failed rows skipped.

  `rows` are the decode harness's (this module's).
  """
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  archs = list(dict.fromkeys(r["arch"] for r in rows))
  for arch in archs:
    ok = sorted((r["batch_size"], r["output_tokens_per_s"]) for r in rows
                if r["arch"] == arch and not r.get("error"))
    if ok:
      ax.plot([b for b, _ in ok], [v for _, v in ok], marker="o", label=arch)
  ax.set_xscale("log", base=2)
  batches = sorted({r["batch_size"] for r in rows})
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.minorticks_off()
  ax.set_xlabel("batch size")
  ax.set_ylabel("output tokens / s")
  if rows:
    r = rows[0]
    ax.set_title(title or f"decode throughput ({r['input_len']} in / {r['output_len']} out)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  return figures.save(fig, path)


def run_decode_bench(config: Any, workdir: pathlib.Path) -> list[dict[str, Any]]:
  """`--mode=decode_bench`: sweep, then decode_bench.json, decode_bench.png, calibration.json."""
  from archscale.core import config_lib  # Lazily: the benchmark script runs without it.

  bench = settings.BenchConfig.from_config(config)
  specs = {}
  for name in bench.arch_names:
    try:
      specs[name] = ArchSpec.from_dict(config_lib.arch_config(name))
    except ValueError as err:
      raise ValueError(f"bench.archs: {err}") from None
  workdir = pathlib.Path(workdir)
  # Rows so far go to a partial file, so an interrupted sweep neither loses them nor replaces
  # the table of an earlier complete one.
  partial = workdir / "decode_bench.partial.json"
  rows = bench_archs(specs, bench, int(config.seed),
                     on_rows=lambda rows: io.write_json_atomic(partial, rows),
                     profile_dir=workdir / "profile")
  io.write_json_atomic(workdir / "decode_bench.json", rows)
  partial.unlink(missing_ok=True)
  io.write_json_atomic(workdir / "decode_bench_provenance.json", io.provenance(config))
  plot_throughput(rows, workdir / "decode_bench.png")
  acc = rows[0]["accelerator"] if rows else None
  ok = [r for r in rows if not r.get("error")]
  if acc is not None and ok:
    dtype_bytes = jnp.dtype(bench.dtype).itemsize
    calibration = costmodel.fit_calibration(ok, acc, specs, dtype_bytes)
    costmodel.save_calibration(workdir / "calibration.json", calibration)
    logging.info("decode_bench calibration for %s: %s", acc, calibration)
  return rows
