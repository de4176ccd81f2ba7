"""Generation on device: batched prefill, then the whole decode loop in one jitted program.

`generate` runs the prefill and a `lax.while_loop` over `model.decode_step` inside one program
(`generate_program`), so the host never waits per token. The KV cache is allocated for the
prompt and the tokens fed back (all generated ones but the last) before the call and donated to
it. One program is compiled per (spec, options, sampler, batch, prompt length, cache length);
`n_new` is a runtime value, so prefill-only calls (n_new=0) reuse the program of full
generations that share the cache length (the decode harness, `archscale.serve.decode_bench`, does).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from archscale.model import kernels
from archscale.model import transformer as model_lib
from archscale.model.arch import ArchSpec


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

  tokens_BO: jax.Array
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


def _generate(params, prompt_BT, cache, rng, n_new, *, spec, prefill_options,
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
  tokens_BO = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first_B)
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
    i, tok_B, cache, tokens_BO, done_B, lengths_B, rng = carry
    logits_BV, cache = model_lib.decode_step(decode_model, params, cache, tok_B)
    rng, step_rng = jax.random.split(rng)
    next_B = sample_logits(logits_BV, step_rng, sampler)
    if sampler.stops_at_eos:
      next_B = jnp.where(done_B, sampler.eos_id, next_B)
      lengths_B = lengths_B + (~done_B).astype(jnp.int32)
      done_B = done_B | (next_B == sampler.eos_id)
    else:
      lengths_B = lengths_B + 1
    tokens_BO = jax.lax.dynamic_update_slice_in_dim(tokens_BO, next_B[:, None], i, axis=1)
    return i + 1, next_B, cache, tokens_BO, done_B, lengths_B, rng

  carry = (jnp.ones((), jnp.int32), first_B, cache, tokens_BO, done_B, lengths_B, rng)
  _, _, cache, tokens_BO, done_B, lengths_B, _ = jax.lax.while_loop(cond, body, carry)
  if sampler.stops_at_eos:  # Rows that stopped early: pad the unwritten tail with eos.
    written_BO = jnp.arange(tokens_BO.shape[1])[None, :] < lengths_B[:, None]
    tokens_BO = jnp.where(written_BO, tokens_BO, sampler.eos_id)
  return tokens_BO, jnp.minimum(lengths_B, n_new), cache


generate_program = jax.jit(_generate,
                           static_argnames=("spec", "prefill_options", "decode_options", "sampler"),
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
  GPU materialises a copy of all weights per step, and a prefill stacks and splits the per-layer
  KV cache (copies of the whole cache). Generation therefore runs unrolled on weights unstacked
  once (the README has the step times measured both ways).
  """
  return dataclasses.replace(
      options, scan_layers=False, remat="none",
      attention=decode_attention if decode_attention is not None else options.attention)


def cache_length(spec: ArchSpec, needed: int, decode_options: model_lib.ModelOptions) -> int:
  """Positions to allocate for `needed`: the Pallas decode kernel takes whole blocks of them."""
  if decode_options.attention == "pallas":
    return kernels.decode_cache_length(needed, spec.max_seq_len)
  return needed


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
  decode_options = decode_model_options(options, decode_attention)
  cache = model_lib.init_cache(spec, b, cache_length(spec, cache_len, decode_options),
                               options.jnp_dtype)
  tokens_BO, lengths_B, cache = generate_program(
      _unstack_jit(params, spec.n_layers), prompt_BT.astype(jnp.int32), cache, rng,
      jnp.int32(n_new), spec=spec, prefill_options=decode_model_options(options),
      decode_options=decode_options, sampler=sampler)
  return Generation(tokens_BO[:, :n_new], lengths_B, cache)
