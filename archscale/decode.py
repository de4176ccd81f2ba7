"""Generation on device and the decode latency / throughput harness (`--mode=decode_bench`).

`generate` runs a batched prefill and then the whole decode loop inside one jitted program (a
`lax.while_loop` over `model.decode_step`), so the host never waits per token. The KV cache is
allocated for the prompt and the tokens fed back (all generated ones but the last) before the
call and donated to it. One program is compiled per (spec, options, sampler, batch, prompt
length, cache length); `n_new` is a runtime value, so the harness's prefill-only calls (n_new=0)
reuse the program of its full generations, which share the cache length.

The harness measures, per architecture and batch size (random weights, random-token prompts):

  compile_s            ahead-of-time compile of the generation program
  prefill_s            generate(n_new=0) at the same shapes: prefill + sampling the first token
  total_s              generate(n_new=output_len) with end-of-sequence ignored (the protocol),
                       after an untimed warm-up prefill and a pass of chunked decode steps
  output_tokens_per_s  batch * output_len / total_s (mean of `repeats` runs, as the paper does)
  step_ms_median/p90   decode steps timed in chunks of k steps: a jitted `fori_loop` of k
                       `decode_step` calls per dispatch, one host sync per chunk, so dispatch
                       latency is spread over k steps and the GPU runs the chunk back to back;
                       per-step time = chunk time / k, pooled over the generation and the repeats
  step_ms_mean         (total_s - prefill_s) / (output_len - 1), from the end-to-end runs
  hbm_gbps             (weight bytes + KV bytes of the mean context) / step_ms_median
  roofline_fraction    cost model floor of the mean step / step_ms_median (None off the table)
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from archscale import costmodel, io
from archscale import model as model_lib
from archscale.arch import ArchSpec

ATTENTION_CHOICES = ("auto",) + model_lib.ATTENTION_IMPLS


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the next token is chosen: greedy when temperature is 0, else temperature / top-k / top-p.

  eos_id: a row that emits it stops (later positions repeat eos_id) unless ignore_eos is set, in
  which case every row generates exactly n_new tokens (the benchmark protocol).
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = None
  ignore_eos: bool = False

  def __post_init__(self):
    if not (self.temperature >= 0 and math.isfinite(self.temperature)):
      raise ValueError(f"Sampler.temperature must be >= 0 (0 = greedy), got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"Sampler.top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"Sampler.top_p must be in (0, 1] (1 = off), got {self.top_p}")
    if self.eos_id is not None and self.eos_id < 0:
      raise ValueError(f"Sampler.eos_id must be a token id or None, got {self.eos_id}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def stops_at_eos(self) -> bool:
    return self.eos_id is not None and not self.ignore_eos


class Generation(NamedTuple):
  """Generated tokens [B, n_new], tokens per row up to and including eos [B], the final cache."""

  tokens_BN: jax.Array
  lengths_B: jax.Array
  cache: model_lib.KVCache


def sample_logits(logits_BV: jax.Array, rng: jax.Array, sampler: Sampler) -> jax.Array:
  """Next tokens [B] from logits [B, V]: argmax, or a draw after temperature, top-k and top-p."""
  if sampler.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / sampler.temperature
  neg_inf = jnp.finfo(jnp.float32).min
  if sampler.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, min(sampler.top_k, logits_BV.shape[-1]))[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  if sampler.top_p < 1:
    # Keep the smallest prefix of tokens (by probability) whose mass reaches top_p.
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    cutoff_B1 = jnp.min(jnp.where(mass_before_BV < sampler.top_p, sorted_BV, jnp.inf), axis=-1,
                        keepdims=True)
    logits_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def prefill_last_logits(model: model_lib.Transformer, params: dict, tokens_BT: jax.Array,
                        cache: model_lib.KVCache) -> tuple[jax.Array, model_lib.KVCache]:
  """Runs the prompt into an empty `cache`; returns last-position logits [B, V] and the cache.

  Only the last position goes through the LM head: full [B, T, V] float32 logits would cost
  B * T * V * 4 bytes (134 GB for 64 x 4096 x 128256).
  """
  logits_B1V, cache = model.clone(decode=False).apply({"params": params}, tokens_BT, cache,
                                                      last_only=True)
  return logits_B1V[:, 0], cache


def _generate_program(params, prompt_BT, cache, rng, n_new, *, spec, prefill_options,
                      decode_options, sampler):
  """Prefill, then up to n_new - 1 decode steps in a while loop; tokens buffer sized to the cache.

  The cache needs room for the prompt and the n_new - 1 tokens fed back (the last one generated
  is never fed), so a cache of length C allows up to C - t + 1 new tokens.

  `params` are in the unrolled layout (`unstack_layers`), which both phases use. Token i
  (0-based) comes from the prefill (i = 0) or decode step i, which feeds token i - 1.
  """
  b, t = prompt_BT.shape
  max_new = cache.max_len - t + 1
  prefill_model = model_lib.Transformer(spec, prefill_options)
  decode_model = model_lib.Transformer(spec, decode_options)

  logits_BV, cache = prefill_last_logits(prefill_model, params, prompt_BT, cache)
  rng, step_rng = jax.random.split(rng)
  first_B = sample_logits(logits_BV, step_rng, sampler)
  tokens_BN = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first_B)
  if sampler.stops_at_eos:
    done_B = first_B == sampler.eos_id
  else:
    done_B = jnp.zeros((b,), bool)
  lengths_B = jnp.ones((b,), jnp.int32)

  def cond(carry):
    i, _, _, _, done_B, _, _ = carry
    keep_going = i < n_new
    if sampler.stops_at_eos:
      keep_going &= ~jnp.all(done_B)
    return keep_going

  def body(carry):
    i, tok_B, cache, tokens_BN, done_B, lengths_B, rng = carry
    logits_BV, cache = model_lib.decode_step(decode_model, params, cache, tok_B)
    rng, step_rng = jax.random.split(rng)
    next_B = sample_logits(logits_BV, step_rng, sampler)
    if sampler.stops_at_eos:
      next_B = jnp.where(done_B, sampler.eos_id, next_B)
      lengths_B = lengths_B + (~done_B).astype(jnp.int32)
      done_B = done_B | (next_B == sampler.eos_id)
    else:
      lengths_B = lengths_B + 1
    tokens_BN = jax.lax.dynamic_update_slice_in_dim(tokens_BN, next_B[:, None], i, axis=1)
    return i + 1, next_B, cache, tokens_BN, done_B, lengths_B, rng

  carry = (jnp.ones((), jnp.int32), first_B, cache, tokens_BN, done_B, lengths_B, rng)
  _, _, cache, tokens_BN, done_B, lengths_B, _ = jax.lax.while_loop(cond, body, carry)
  if sampler.stops_at_eos:  # Rows that stopped early: pad the unwritten tail with eos.
    written_BN = jnp.arange(tokens_BN.shape[1])[None, :] < lengths_B[:, None]
    tokens_BN = jnp.where(written_BN, tokens_BN, sampler.eos_id)
  return tokens_BN, jnp.minimum(lengths_B, n_new), cache


_generate_jit = jax.jit(_generate_program,
                        static_argnames=("spec", "prefill_options", "decode_options", "sampler"),
                        donate_argnames=("cache",))


def _decode_chunk(params, cache, tokens_B, *, spec, options, n_steps):
  """`n_steps` greedy decode steps in one program (the harness's per-step timing unit)."""
  decode_model = model_lib.Transformer(spec, options)

  def body(_, carry):
    cache, tok_B = carry
    logits_BV, cache = model_lib.decode_step(decode_model, params, cache, tok_B)
    return cache, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  return jax.lax.fori_loop(0, n_steps, body, (cache, tokens_B))


_decode_chunk_jit = jax.jit(_decode_chunk, static_argnames=("spec", "options", "n_steps"),
                            donate_argnames=("cache",))


def unstack_layers(params: dict, n_layers: int) -> dict:
  """Parameters of a scanned model ({"layers": stacked}) as the tree of scan_layers=False."""
  if "layers" not in params:
    return params
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
  return out


_unstack_jit = jax.jit(unstack_layers, static_argnums=1)


def decode_model_options(options: model_lib.ModelOptions,
                         decode_attention: str | None = None) -> model_lib.ModelOptions:
  """Options of generation: layers unrolled, no remat, optionally another attention kernel.

  Under `nn.scan` a decode step slices every layer's weights out of the stacked arrays, which on
  GPU materialises a copy of all weights per step (LLaMA-3.2-1B on an H100 at batch 1: 2.9 ms
  per step scanned, 1.7 ms unrolled), and a prefill stacks and splits the per-layer KV cache
  (copies of the whole cache). Generation therefore runs unrolled on weights unstacked once.
  """
  return dataclasses.replace(
      options, scan_layers=False, remat="none",
      attention=decode_attention if decode_attention is not None else options.attention)


def generate(params: dict, spec: ArchSpec, prompt_tokens: jax.Array, n_new: int,
             sampler: Sampler = Sampler(), *,
             options: model_lib.ModelOptions | None = None, rng: jax.Array | None = None,
             decode_attention: str | None = None) -> Generation:
  """Generates `n_new` tokens after each prompt row [B, T] in one device program.

  `options` (default ModelOptions()) sets numerics and the prefill attention kernel;
  `decode_attention` (default: the same) the kernel of the decode steps, since the best one
  differs between the two phases. Parameters of a scanned model are unstacked on every call (a
  copy of the weights): to generate repeatedly, pass `unstack_layers(params, n_layers)`.
  """
  options = model_lib.ModelOptions() if options is None else options
  prompt_BT = jnp.asarray(prompt_tokens)
  if prompt_BT.ndim != 2 or not jnp.issubdtype(prompt_BT.dtype, jnp.integer):
    raise ValueError(f"prompt_tokens must be an integer array [batch, length], got "
                     f"{prompt_BT.dtype}{list(prompt_BT.shape)}")
  b, t = prompt_BT.shape
  if b < 1 or t < 1:
    raise ValueError(f"prompt_tokens must hold at least one token per row, got shape {(b, t)}")
  if n_new < 0:
    raise ValueError(f"n_new must be >= 0, got {n_new}")
  cache_len = t + max(n_new - 1, 0)  # the prompt and every generated token but the last
  if cache_len > spec.max_seq_len:
    raise ValueError(f"prompt ({t}) + n_new ({n_new}) - 1 positions exceed model.max_seq_len="
                     f"{spec.max_seq_len}; shorten the prompt or generate fewer tokens")
  rng = jax.random.key(0) if rng is None else rng
  cache = model_lib.init_cache(spec, b, cache_len, options.jnp_dtype)
  tokens_BN, lengths_B, cache = _generate_jit(
      _unstack_jit(params, spec.n_layers), prompt_BT.astype(jnp.int32), cache, rng,
      jnp.int32(n_new), spec=spec, prefill_options=decode_model_options(options),
      decode_options=decode_model_options(options, decode_attention), sampler=sampler)
  return Generation(tokens_BN[:, :n_new], lengths_B, cache)


# ------------------------------------------------------------------------------------ harness


def resolve_attention(attention: str, decode_attention: str, platform: str,
                      dtype: str) -> tuple[str, str]:
  """(prefill, decode) attention kernels; "auto" = cuDNN on GPU in 16-bit, else XLA.

  Prefill at long prompts needs a fused kernel (XLA's reference path materialises B*N*T*T
  scores). For decode steps cuDNN (with per-row KV lengths) measured as fast as XLA's einsum at
  batch 1 and 7-20% faster at batch 16-64 on an H100. cuDNN needs 16-bit inputs.
  """
  for name, value in (("bench.attention", attention), ("bench.decode_attention",
                                                       decode_attention)):
    if value not in ATTENTION_CHOICES:
      raise ValueError(f"{name} must be one of {ATTENTION_CHOICES}, got {value!r}")
  fused_ok = platform == "gpu" and dtype in ("bfloat16", "float16")
  prefill = attention if attention != "auto" else ("cudnn" if fused_ok else "xla")
  decode = decode_attention if decode_attention != "auto" else ("cudnn" if fused_ok else "xla")
  return prefill, decode


def _is_oom(err: Exception) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _timed(fn, *args):
  """Runs fn(*args), waits for the result, returns (result, seconds)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def _chunk_steps(output_len: int) -> int:
  """Decode steps per timed chunk: up to 16, with at least 8 chunks when the output allows."""
  return max(1, min(16, (output_len - 1) // 8))


def _device_memory() -> tuple[int | None, int | None]:
  """(bytes_limit, peak_bytes_in_use) of device 0, or Nones where the backend has no stats."""
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get("bytes_limit"), stats.get("peak_bytes_in_use")


def bench_architecture(name: str, spec: ArchSpec, batch_sizes: Sequence[int], input_len: int,
                       output_len: int, repeats: int, options: model_lib.ModelOptions,
                       decode_attention: str | None = None, accelerator: str | None = None,
                       seed: int = 0) -> list[dict[str, Any]]:
  """Harness rows for one architecture over `batch_sizes` (ascending; see the module doc).

  A batch that runs out of device memory gets an `error` row, and so do the larger ones after
  it without being tried; the sweep continues with the next architecture. A batch that fails in
  any other way gets an `error` row naming the exception (logged in full) and the sweep goes on.
  """
  sampler = Sampler(ignore_eos=True)
  dtype_bytes = jnp.dtype(options.jnp_dtype).itemsize
  param_bytes = jnp.dtype(options.jnp_param_dtype).itemsize
  max_len = input_len + output_len
  prefill_options = decode_model_options(options)
  decode_options = decode_model_options(options, decode_attention)
  model = model_lib.Transformer(spec, prefill_options)  # unrolled: one copy of the weights
  params = jax.jit(lambda rng: model_lib.init_params(model, rng))(jax.random.key(seed))
  chunk = _chunk_steps(output_len)
  n_chunks = (output_len - 1) // chunk
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
      row.update(_bench_batch(spec, params, prefill_options, decode_options, sampler, batch,
                              input_len, output_len, repeats, chunk, n_chunks, seed))
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
                 output_len, repeats, chunk, n_chunks, seed) -> dict[str, Any]:
  """Compiles and times one (architecture, batch) point; see the module doc for the method."""
  if prefill_options.attention == "xla":
    prefill_options = dataclasses.replace(
        prefill_options, attention_chunk=prefill_attention_chunk(spec, batch, input_len))
  max_len = input_len + output_len
  keys = jax.random.split(jax.random.key(seed + 1), 2)
  prompt_BT = jax.random.randint(keys[0], (batch, input_len), 0, spec.vocab_size, jnp.int32)
  new_cache = lambda: jax.block_until_ready(
      model_lib.init_cache(spec, batch, max_len, prefill_options.jnp_dtype))
  statics = dict(spec=spec, prefill_options=prefill_options, decode_options=decode_options,
                 sampler=sampler)

  t0 = time.perf_counter()
  program = _generate_jit.lower(params, prompt_BT, new_cache(), keys[1], jnp.int32(0),
                                **statics).compile()
  compile_s = time.perf_counter() - t0
  memory = program.memory_analysis()
  compiled_bytes = None
  if memory is not None:
    compiled_bytes = int(memory.argument_size_in_bytes + memory.output_size_in_bytes
                         + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  run = lambda n_new: _timed(program, params, prompt_BT, new_cache(), keys[1], jnp.int32(n_new))

  # Warm-up that also runs one iteration of the decode loop, so that no first-execution cost
  # lands in a timed generation; it leaves a cache to compile the chunked steps with.
  (tokens_BN, _, cache), _ = run(2)
  chunk_fn = _decode_chunk_jit.lower(params, cache, tokens_BN[:, 0], spec=spec,
                                     options=decode_options, n_steps=chunk).compile()
  del tokens_BN, cache

  prefill_s, total_s, step_s = [], [], []
  for repeat in range(repeats):
    (tokens_BN, _, cache), t = run(0)
    prefill_s.append(t)
    tok_B = tokens_BN[:, 0]
    for i in range(n_chunks):  # The first chunk ever run is a warm-up, not a sample.
      (cache, tok_B), t = _timed(chunk_fn, params, cache, tok_B)
      if repeat or i or n_chunks == 1:
        step_s.append(t / chunk)
    del tokens_BN, cache, tok_B
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
      "step_timing_chunk": chunk,
      "output_tokens_per_s": batch * output_len / total_mean,
      "total_tokens_per_s": batch * max_len / total_mean,
      "peak_memory_bytes": compiled_bytes,
      "device_peak_bytes_in_use": peak,
      "prefill_attention_chunk": prefill_options.attention_chunk or None,
  }


def plot_throughput(rows: Sequence[dict[str, Any]], path: str | pathlib.Path,
                    title: str | None = None) -> None:
  """Output tokens/s against batch size (log-x), one line per architecture; failed rows skipped."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

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
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_batch_sizes(value: Any) -> list[int]:
  """bench.batch_sizes as a sorted list of positive ints (a sequence or "1,16,64")."""
  items = value.split(",") if isinstance(value, str) else list(value)
  try:
    sizes = [int(v) for v in items]
  except (TypeError, ValueError):
    raise ValueError(f"bench.batch_sizes must be positive integers, got {value!r}") from None
  if not sizes or any(b <= 0 for b in sizes):
    raise ValueError(f"bench.batch_sizes must be a non-empty list of positive integers, got "
                     f"{value!r}")
  return sorted(set(sizes))


def validate_bench(specs: dict[str, ArchSpec], batch_sizes: Sequence[int], input_len: int,
                   output_len: int, repeats: int, dtype: str) -> None:
  """Raises ValueError naming the bench field when the sweep cannot run as configured."""
  if not specs:
    raise ValueError("bench.archs is empty; give comma-separated names such as "
                     "'llama3_2_1b,surefire_1b'")
  if not batch_sizes or any(b <= 0 for b in batch_sizes):
    raise ValueError(f"bench.batch_sizes must be positive integers, got {list(batch_sizes)}")
  if input_len < 1:
    raise ValueError(f"bench.input_len must be >= 1, got {input_len}")
  if output_len < 2:
    raise ValueError(f"bench.output_len must be >= 2 (per-step timing needs a decode step), got "
                     f"{output_len}")
  if repeats < 1:
    raise ValueError(f"bench.repeats must be >= 1, got {repeats}")
  if dtype not in model_lib.DTYPES:
    raise ValueError(f"bench.dtype must be one of {sorted(model_lib.DTYPES)}, got {dtype!r}")
  for name, spec in specs.items():
    if input_len + output_len > spec.max_seq_len:
      raise ValueError(f"bench.input_len + bench.output_len = {input_len + output_len} exceeds "
                       f"model.max_seq_len={spec.max_seq_len} of {name}; shorten them")


def run_sweep(specs: dict[str, ArchSpec], batch_sizes: Sequence[int], input_len: int,
              output_len: int, repeats: int, dtype: str = "bfloat16", attention: str = "auto",
              decode_attention: str = "auto", accelerator: str = "auto", seed: int = 0,
              on_rows: Callable[[list[dict[str, Any]]], None] | None = None
              ) -> list[dict[str, Any]]:
  """Validates the settings, then runs `bench_architecture` for every architecture.

  `on_rows(rows)` receives all rows so far after each architecture (e.g. to save them, so an
  interrupted sweep keeps what it measured).
  """
  batch_sizes = parse_batch_sizes(batch_sizes)
  validate_bench(specs, batch_sizes, input_len, output_len, repeats, dtype)
  device = jax.devices()[0]
  prefill_attn, decode_attn = resolve_attention(attention, decode_attention,
                                                 device.platform, dtype)
  if accelerator == "auto":
    acc = costmodel.accelerator_for_device_kind(device.device_kind)
  else:
    acc = costmodel.get_accelerator(accelerator).name if accelerator else None
  options = model_lib.ModelOptions(dtype=dtype, param_dtype=dtype, scan_layers=False,
                                   attention=prefill_attn)
  rows = []
  for name, spec in specs.items():
    for row in bench_architecture(name, spec, batch_sizes, input_len, output_len, repeats,
                                  options, decode_attn, acc, seed):
      rows.append({**row, "device_kind": device.device_kind})
    if on_rows is not None:
      on_rows(rows)
  return rows


def run_decode_bench(config: Any, workdir: pathlib.Path) -> list[dict[str, Any]]:
  """`--mode=decode_bench`: sweep, then decode_bench.json, decode_bench.png, calibration.json."""
  from archscale import config_lib  # Imported lazily: the benchmark script runs without it.

  bench = config.bench
  names = [n.strip() for n in str(bench.archs).split(",") if n.strip()]
  specs = {}
  for name in names:
    try:
      specs[name] = ArchSpec.from_dict(config_lib.arch_config(name))
    except ValueError as err:
      raise ValueError(f"bench.archs: {err}") from None
  workdir = pathlib.Path(workdir)
  # Rows so far go to a partial file, so an interrupted sweep neither loses them nor replaces
  # the table of an earlier complete one.
  partial = workdir / "decode_bench.partial.json"
  rows = run_sweep(specs, bench.batch_sizes, int(bench.input_len), int(bench.output_len),
                   int(bench.repeats), bench.dtype, bench.attention, bench.decode_attention,
                   bench.accelerator, int(config.seed),
                   on_rows=lambda rows: io.write_json_atomic(partial, rows))
  io.write_json_atomic(workdir / "decode_bench.json", rows)
  partial.unlink(missing_ok=True)
  io.write_json_atomic(workdir / "decode_bench_provenance.json", io.provenance(config))
  plot_throughput(rows, workdir / "decode_bench.png")
  acc = rows[0]["accelerator"] if rows else None
  ok = [r for r in rows if not r.get("error")]
  if acc is not None and ok:
    dtype_bytes = jnp.dtype(model_lib.DTYPES[bench.dtype]).itemsize
    calibration = costmodel.fit_calibration(ok, acc, specs, dtype_bytes)
    costmodel.save_calibration(workdir / "calibration.json", calibration)
    logging.info("decode_bench calibration for %s: %s", acc, calibration)
  return rows
