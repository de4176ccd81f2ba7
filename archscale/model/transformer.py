"""A LLaMA-3.2-style decoder in Flax Linen, sized by an ArchSpec.

RMSNorm, rotary embeddings (with LLaMA-3 frequency scaling), grouped-query attention whose width
n_heads * d_head is independent of d_model, SwiGLU, no biases, tied or untied LM head. Layers run
under `nn.scan` (or a Python loop) with an optional remat policy. Every parameter and activation
carries logical axis names; `archscale.model.sharding` maps them onto a device mesh.

The KV cache is an explicit pytree (`KVCache`) passed in and returned, never a mutable collection:

  model = Transformer(spec, ModelOptions())
  params = init_params(model, jax.random.key(0))
  logits_BTV = forward(model, params, tokens_BT)
  logits_BTV, cache = prefill(model, params, prompt_BT, max_len=1024)  # last_only=True: [B, 1, V]
  logits_BV, cache = decode_step(model, params, cache, next_token_B)

The cache is stored heads-major, [B, K, S, H], so that attention contracts it with batch and
KV heads as its leading dimensions and reads it in place (a [B, S, K, H] cache is transposed into
a copy by XLA on every decode step).

Shape suffixes follow the package legend (`archscale/__init__.py`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from archscale.core.settings import ATTENTION_IMPLS, DTYPES, REMATS, ModelOptions  # noqa: F401
from archscale.model import kernels
from archscale.model.arch import ArchSpec

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

assert set(REMAT_POLICIES) == set(REMATS), "settings.REMATS names every remat policy"

_INIT_STD = 0.02
# LLaMA-3's rotary rescaling for long contexts (the values LLaMA-3.1 / 3.2 ship with).
LLAMA3_ROPE_SCALING = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=8192)


class KVCache(NamedTuple):
  """Keys and values [B, K, S, H] preallocated to `max_len` positions, one buffer per layer;
  `end` = positions filled.

  Separate per-layer buffers (rather than one stacked [L, ...] array) let a decode step update
  each layer's cache in place instead of rebuilding a stacked copy of the whole cache every step.
  """

  k_BKSH: tuple[jax.Array, ...]
  v_BKSH: tuple[jax.Array, ...]
  end: jax.Array  # int32 scalar

  @property
  def max_len(self) -> int:
    return self.k_BKSH[0].shape[2]


def init_cache(spec: ArchSpec, batch_size: int, max_len: int, dtype: Any = jnp.bfloat16) -> KVCache:
  """An empty cache for `batch_size` sequences of up to `max_len` positions."""
  if max_len > spec.max_seq_len:
    raise ValueError(f"cache length {max_len} exceeds model.max_seq_len={spec.max_seq_len}")
  shape = (batch_size, spec.n_kv_heads, max_len, spec.d_head)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(spec.n_layers))
  return KVCache(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(spec.n_layers)),
                 jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------------- pieces


def _param(module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...],
           init: Any, options: ModelOptions) -> jax.Array:
  """A parameter with logical axis names, cast to the compute dtype."""
  value = module.param(name, nn.with_logical_partitioning(init, axes), shape,
                       options.jnp_param_dtype)
  return jnp.asarray(value, options.jnp_dtype)


def _normal(std: float):
  return nn.initializers.truncated_normal(stddev=std)


class RMSNorm(nn.Module):
  """Root-mean-square norm with a learned scale, computed in float32."""

  eps: float
  options: ModelOptions

  @nn.compact
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    scale_D = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                         (x_BTD.shape[-1],), self.options.jnp_param_dtype)
    x32_BTD = x_BTD.astype(jnp.float32)
    y_BTD = x32_BTD * jax.lax.rsqrt(jnp.mean(x32_BTD**2, axis=-1, keepdims=True) + self.eps)
    return (y_BTD * scale_D.astype(jnp.float32)).astype(self.options.jnp_dtype)


def rope_inv_frequencies(spec: ArchSpec) -> jax.Array:
  """Rotary inverse frequencies [H/2], with LLaMA-3's long-context rescaling when asked for.

  llama3 scaling (factor 32, low/high frequency factors 1 and 4, original context 8192) divides
  low frequencies by the factor, keeps high ones, and interpolates smoothly in between.
  """
  inv_freq = 1.0 / (spec.rope_theta ** (jnp.arange(0, spec.d_head, 2, dtype=jnp.float32)
                                        / spec.d_head))
  if spec.rope_scaling == "none":
    return inv_freq
  factor, low_freq_factor, high_freq_factor, original_context = (
      LLAMA3_ROPE_SCALING[k] for k in
      ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"))
  wavelen = 2 * math.pi / inv_freq
  low_freq_wavelen = original_context / low_freq_factor
  high_freq_wavelen = original_context / high_freq_factor
  smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
  interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  in_between = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(in_between, interpolated, scaled)


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates pairs (i, i + H/2) of each head by position-dependent angles (LLaMA convention)."""
  angles_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq
  sin_BT1h = jnp.sin(angles_BTh)[:, :, None, :]
  cos_BT1h = jnp.cos(angles_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h], -1)
  return rotated.astype(x_BTNH.dtype)


def _xla_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS) -> jax.Array:
  """Reference grouped-query attention: softmax(q k^T / sqrt(H)) v, scores in float32."""
  b, t, n, h = q_BTNH.shape
  k = k_BKSH.shape[1]
  q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
  scores_BKGTS = jnp.einsum("btkgh,bksh->bkgts", q_BTKGH, k_BKSH,
                            preferred_element_type=jnp.float32) / math.sqrt(h)
  scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
  probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BKSH.dtype)
  out_BTKGH = jnp.einsum("bkgts,bksh->btkgh", probs_BKGTS, v_BKSH)
  return out_BTKGH.reshape(b, t, n, h)


def _chunked_xla_attention(q_BTNH, k_BKSH, v_BKSH, positions_BT, key_pos_S,
                           chunk: int) -> jax.Array:
  """`_xla_attention` with a causal mask, over blocks of `chunk` queries (see ModelOptions)."""
  b, t, n, h = q_BTNH.shape
  pad = -t % chunk
  if pad:  # padded queries sit at position 0: they see one key, and are dropped below
    q_BTNH = jnp.pad(q_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
    positions_BT = jnp.pad(positions_BT, ((0, 0), (0, pad)))
  blocks = (t + pad) // chunk
  q_CBcNH = q_BTNH.reshape(b, blocks, chunk, n, h).swapaxes(0, 1)
  pos_CBc = positions_BT.reshape(b, blocks, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def block(args):
    q_BcNH, pos_Bc = args
    return _xla_attention(q_BcNH, k_BKSH, v_BKSH, key_pos_S[None, None, :] <= pos_Bc[:, :, None])

  out_CBcNH = jax.lax.map(block, (q_CBcNH, pos_CBc))
  return out_CBcNH.swapaxes(0, 1).reshape(b, blocks * chunk, n, h)[:, :t]


class Attention(nn.Module):
  """Grouped-query self-attention with rotary positions and an optional KV cache."""

  spec: ArchSpec
  options: ModelOptions
  decode: bool = False  # True: attend over the cache; False: over this call's own tokens

  @nn.compact
  def __call__(self, x_BTD, positions_BT, end, cache_k_BKSH=None, cache_v_BKSH=None):
    s, o = self.spec, self.options
    d, n, k, h = s.d_model, s.n_heads, s.n_kv_heads, s.d_head
    init = _normal(_INIT_STD)
    out_init = _normal(_INIT_STD / math.sqrt(2 * s.n_layers))
    wq_DNH = _param(self, "q", (d, n, h), ("embed", "q_heads", "head_dim"), init, o)
    wk_DKH = _param(self, "k", (d, k, h), ("embed", "kv_heads", "head_dim"), init, o)
    wv_DKH = _param(self, "v", (d, k, h), ("embed", "kv_heads", "head_dim"), init, o)
    wo_NHD = _param(self, "o", (n, h, d), ("q_heads", "head_dim", "embed"), out_init, o)

    inv_freq = rope_inv_frequencies(s)
    q_BTNH = apply_rope(jnp.einsum("btd,dnh->btnh", x_BTD, wq_DNH), positions_BT, inv_freq)
    k_BTKH = apply_rope(jnp.einsum("btd,dkh->btkh", x_BTD, wk_DKH), positions_BT, inv_freq)
    v_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, wv_DKH)
    q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "seq", "q_heads", "head_dim"))
    k_BTKH = nn.with_logical_constraint(k_BTKH, ("batch", "seq", "kv_heads", "head_dim"))
    v_BTKH = nn.with_logical_constraint(v_BTKH, ("batch", "seq", "kv_heads", "head_dim"))

    if cache_k_BKSH is not None:  # Write this call's keys and values at positions [end, end+T).
      cache_k_BKSH = jax.lax.dynamic_update_slice_in_dim(
          cache_k_BKSH, k_BTKH.swapaxes(1, 2).astype(cache_k_BKSH.dtype), end, axis=2)
      cache_v_BKSH = jax.lax.dynamic_update_slice_in_dim(
          cache_v_BKSH, v_BTKH.swapaxes(1, 2).astype(cache_v_BKSH.dtype), end, axis=2)

    if self.decode:
      out_BTNH = self._attend_cache(q_BTNH, cache_k_BKSH.astype(q_BTNH.dtype),
                                    cache_v_BKSH.astype(q_BTNH.dtype), positions_BT, end)
    else:
      out_BTNH = self._attend_self(q_BTNH, k_BTKH, v_BTKH, positions_BT)
    out_BTNH = nn.with_logical_constraint(out_BTNH, ("batch", "seq", "q_heads", "head_dim"))
    y_BTD = jnp.einsum("btnh,nhd->btd", out_BTNH, wo_NHD)
    return y_BTD, (cache_k_BKSH, cache_v_BKSH)

  def _attend_self(self, q_BTNH, k_BTKH, v_BTKH, positions_BT):
    """Causal attention over this call's own tokens (training, prefill)."""
    impl = self.options.attention_impl
    if impl in ("dpa", "cudnn"):
      return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True,
                                          implementation="cudnn" if impl == "cudnn" else None)
    if impl == "splash" and kernels.splash_block(q_BTNH.shape[1]) is not None:
      return kernels.splash_attention(
          q_BTNH, k_BTKH, v_BTKH,
          nn.logical_to_mesh_axes(("batch", "seq", "q_heads", "head_dim")),
          nn.logical_to_mesh_axes(("batch", "seq", "kv_heads", "head_dim")))
    return self._xla(q_BTNH, k_BTKH.swapaxes(1, 2), v_BTKH.swapaxes(1, 2), positions_BT,
                     positions_BT[0])

  def _attend_cache(self, q_BTNH, k_BKSH, v_BKSH, positions_BT, end):
    """Attention of T new queries over the cache, filled up to end + T."""
    impl, (b, t) = self.options.attention_impl, q_BTNH.shape[:2]
    if impl == "pallas" and t == 1:
      lengths_B = jnp.full((b,), end + 1, jnp.int32)
      return kernels.decode_attention(q_BTNH[:, 0], k_BKSH, v_BKSH, lengths_B)[:, None]
    if impl in ("dpa", "cudnn") and t == 1:  # these kernels take [B, S, K, H]: a transposed copy
      lengths_B = jnp.full((b,), end + 1, jnp.int32)
      return jax.nn.dot_product_attention(
          q_BTNH, k_BKSH.swapaxes(1, 2), v_BKSH.swapaxes(1, 2), key_value_seq_lengths=lengths_B,
          implementation="cudnn" if impl == "cudnn" else None)
    return self._xla(q_BTNH, k_BKSH, v_BKSH, positions_BT, jnp.arange(k_BKSH.shape[2]))

  def _xla(self, q_BTNH, k_BKSH, v_BKSH, positions_BT, key_pos_S):
    chunk = self.options.attention_chunk
    if chunk and q_BTNH.shape[1] > chunk:
      return _chunked_xla_attention(q_BTNH, k_BKSH, v_BKSH, positions_BT, key_pos_S, chunk)
    mask_BTS = key_pos_S[None, None, :] <= positions_BT[:, :, None]
    return _xla_attention(q_BTNH, k_BKSH, v_BKSH, mask_BTS)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  spec: ArchSpec
  options: ModelOptions

  @nn.compact
  def __call__(self, x_BTD):
    s, o = self.spec, self.options
    init = _normal(_INIT_STD)
    w_gate_DF = _param(self, "gate", (s.d_model, s.d_ff), ("embed", "mlp"), init, o)
    w_up_DF = _param(self, "up", (s.d_model, s.d_ff), ("embed", "mlp"), init, o)
    w_down_FD = _param(self, "down", (s.d_ff, s.d_model), ("mlp", "embed"),
                       _normal(_INIT_STD / math.sqrt(2 * s.n_layers)), o)
    h_BTF = jax.nn.silu(x_BTD @ w_gate_DF) * (x_BTD @ w_up_DF)
    h_BTF = nn.with_logical_constraint(h_BTF, ("batch", "seq", "mlp"))
    return h_BTF @ w_down_FD


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

  spec: ArchSpec
  options: ModelOptions
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD, positions_BT, end, layer_cache):
    cache_k, cache_v = layer_cache if layer_cache is not None else (None, None)
    attn_out_BTD, new_cache = Attention(self.spec, self.options, self.decode, name="attn")(
        RMSNorm(self.spec.norm_eps, self.options, name="attn_norm")(x_BTD),
        positions_BT, end, cache_k, cache_v)
    x_BTD = x_BTD + attn_out_BTD
    x_BTD = x_BTD + MLP(self.spec, self.options, name="mlp")(
        RMSNorm(self.spec.norm_eps, self.options, name="mlp_norm")(x_BTD))
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "embed"))
    return x_BTD, (new_cache if layer_cache is not None else None)


class Transformer(nn.Module):
  """The decoder. Returns float32 logits and, when a cache is given, the updated cache."""

  spec: ArchSpec
  options: ModelOptions = ModelOptions()
  decode: bool = False

  @nn.compact
  def __call__(self, tokens_BT: jax.Array, cache: KVCache | None = None, last_only: bool = False,
               features_only: bool = False):
    """Logits [B, T, V] (or [B, 1, V] for the last position when `last_only`) and the cache.

    With `features_only` (training, no cache) it returns the final normalised hidden states
    [B, T, D] and the head [D, V] in the compute dtype instead of logits, for a loss that applies
    the head itself (`archscale.train.loss.chunked_cross_entropy`).
    """
    s, o = self.spec, self.options
    t = tokens_BT.shape[1]
    if t > s.max_seq_len:
      raise ValueError(f"sequence length {t} exceeds model.max_seq_len={s.max_seq_len}")
    if self.decode and cache is None:
      raise ValueError("a decoding Transformer needs a KV cache")
    end = cache.end if cache is not None else jnp.zeros((), jnp.int32)
    positions_BT = jnp.broadcast_to(end + jnp.arange(t, dtype=jnp.int32), tokens_BT.shape)

    embedding_VD = self.param(
        "embedding", nn.with_logical_partitioning(_normal(_INIT_STD), ("vocab", "embed")),
        (s.vocab_size, s.d_model), o.jnp_param_dtype)
    # The lookup reads the table whole along embed, as any FSDP weight is gathered for use: a
    # table split over embed would leave its gradient split over embed too, and moving the
    # batch-split cotangent there takes a full replication of it.
    table_VD = nn.with_logical_constraint(embedding_VD, ("vocab", None))
    x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(o.jnp_dtype)
    x_BTD = nn.with_logical_constraint(x_BTD, ("batch", "seq", "embed"))

    block = Block
    if o.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[o.remat], prevent_cse=not o.scan_layers)
    new_k = new_v = None
    if o.scan_layers:
      stacked = None if cache is None else (jnp.stack(cache.k_BKSH), jnp.stack(cache.v_BKSH))
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, 0), length=s.n_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTD, stacked = stack(s, o, self.decode, name="layers")(x_BTD, positions_BT, end, stacked)
      if cache is not None:
        new_k, new_v = tuple(stacked[0]), tuple(stacked[1])
    else:
      outs = []
      for i in range(s.n_layers):
        layer_cache = None if cache is None else (cache.k_BKSH[i], cache.v_BKSH[i])
        x_BTD, out = block(s, o, self.decode, name=f"layers_{i}")(
            x_BTD, positions_BT, end, layer_cache)
        outs.append(out)
      if cache is not None:
        new_k, new_v = tuple(k for k, _ in outs), tuple(v for _, v in outs)

    if last_only:  # e.g. a prefill needs only the next-token logits, not [B, T, V] of them
      x_BTD = x_BTD[:, -1:]
    x_BTD = RMSNorm(s.norm_eps, o, name="final_norm")(x_BTD)
    if s.tie_embeddings:
      head_VD = embedding_VD.astype(o.jnp_dtype)
      if features_only:
        return x_BTD, head_VD.T
      logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, head_VD)
    else:
      head_DV = _param(self, "lm_head", (s.d_model, s.vocab_size), ("embed", "vocab"),
                       _normal(_INIT_STD), o)
      if features_only:
        return x_BTD, head_DV
      logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, head_DV)
    # Rounded to the compute dtype before the float32 cast (as autocast does): a float32 product
    # would make the vocab-sized matmuls of the backward pass run in float32.
    logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32),
                                            ("batch", "seq", "vocab"))
    if cache is None:
      return logits_BTV, None
    return logits_BTV, KVCache(new_k, new_v, end + t)


# ------------------------------------------------------------------------------- functional API


def init_params(model: Transformer, rng: jax.Array) -> dict:
  """Initialised parameters (plain arrays, logical-axis boxes removed)."""
  return nn.unbox(init_boxed(model, rng))


def init_boxed(model: Transformer, rng: jax.Array) -> dict:
  """Initialised parameters still wrapped in `nn.LogicallyPartitioned` (for sharding)."""
  tokens_BT = jnp.zeros((1, 1), jnp.int32)
  return model.init(rng, tokens_BT)["params"]


def logical_axes(model: Transformer) -> dict:
  """A pytree like the params holding each parameter's logical axis names (a PartitionSpec)."""
  boxed = jax.eval_shape(lambda: init_boxed(model, jax.random.key(0)))
  return nn.get_partition_spec(boxed)


def count_params(params: Any) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


def forward(model: Transformer, params: dict, tokens_BT: jax.Array) -> jax.Array:
  """Logits [B, T, V] of a full causal forward pass (training and evaluation)."""
  logits_BTV, _ = model.apply({"params": params}, tokens_BT)
  return logits_BTV


def features(model: Transformer, params: dict, tokens_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Final normalised hidden states [B, T, D] and the LM head [D, V] (logits = their product)."""
  return model.apply({"params": params}, tokens_BT, features_only=True)


def prefill(model: Transformer, params: dict, tokens_BT: jax.Array, max_len: int | None = None,
            cache_dtype: Any = None, last_only: bool = False) -> tuple[jax.Array, KVCache]:
  """Runs the prompt into a fresh cache with room for `max_len` positions.

  Returns logits [B, T, V] (or [B, 1, V], the next-token logits only, when `last_only`) and the
  cache.
  """
  b, t = tokens_BT.shape
  max_len = max_len or model.spec.max_seq_len
  if max_len < t:
    raise ValueError(f"max_len={max_len} is shorter than the prompt ({t} tokens)")
  cache = init_cache(model.spec, b, max_len, cache_dtype or model.options.jnp_dtype)
  return model.clone(decode=False).apply({"params": params}, tokens_BT, cache, last_only)


def decode_step(model: Transformer, params: dict, cache: KVCache,
                tokens_B: jax.Array) -> tuple[jax.Array, KVCache]:
  """Feeds one token per sequence; returns next-token logits [B, V] and the updated cache.

  With `scan_layers=True` each step stacks and splits the per-layer caches around `nn.scan`; fast
  generation decodes unrolled (`archscale.serve.generate` does, unstacking the weights once).
  """
  logits_B1V, cache = model.clone(decode=True).apply(
      {"params": params}, tokens_B[:, None], cache)
  return logits_B1V[:, 0], cache
