"""Next-token cross-entropy, from full logits or fused with the LM head in sequence chunks.

Both return the mean cross-entropy and the mean squared log-partition (for z-loss) over the
tokens of a batch. `cross_entropy` takes logits [B, T, V]; `chunked_cross_entropy` takes the
final hidden states [B, T, D] and the head [D, V] and never holds more than one chunk of
logits [B, C, V]. Its gradient is computed chunk by chunk in the forward pass (the head matmul
runs once, not again in the backward pass) and only scaled in the backward pass.

What full logits cost in practice: XLA fuses the float32 cast and the softmax into their
consumers, so the step holds [B, T, V] logits and their gradient in the compute dtype (2 x 4.2 GB
in bfloat16 for LLaMA-3.2-1B at batch 8 x 2048, V = 128256); chunks hold [B, C, V] of each. Whether
that lowers the step's peak depends on what else is live there: compiled for CPU, the 1B step at
batch 8 x 512 (dots_no_batch remat) needs 15.3 GB of temporaries instead of 16.5 GB.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean cross-entropy, mean logsumexp^2) of float logits against integer targets."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.mean(lse_BT - target_BT), jnp.mean(lse_BT**2)


def chunked_cross_entropy(x_BTD: jax.Array, head_DV: jax.Array, targets_BT: jax.Array,
                          z_coef: float, chunk: int,
                          batch_shards: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(ce + z_coef * z, ce, z) with logits = x @ head made about `chunk` positions at a time.

  Logits are rounded to x's dtype before the float32 softmax, as `model.Transformer` does. Only
  the first output is differentiable (with respect to x and the head); ce and z are metrics.
  `z_coef` is a Python number (a static setting). The sequence is cut into equal chunks of at
  most `chunk` positions, the last padded; padding carries no weight.

  `batch_shards`: how many ways the batch is split over devices. The head's gradient is summed
  per shard across chunks and over shards once at the end, so data parallelism costs one
  reduction of it per step (as with full logits), not one per chunk.
  """
  if chunk < 1:
    raise ValueError(f"train.loss_chunk must be >= 1 to chunk the loss (0 = off), got {chunk}")
  b, t, _ = x_BTD.shape
  if b % batch_shards:
    raise ValueError(f"batch of {b} rows cannot be split into {batch_shards} shards")
  chunk = -(-t // -(-t // chunk))  # equal chunks: ceil(t / number of chunks)
  pad = -t % chunk
  weight_BT = jnp.ones((b, t), jnp.float32)
  if pad:
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    weight_BT = jnp.pad(weight_BT, ((0, 0), (0, pad)))
  return _fused(x_BTD, head_DV, targets_BT, weight_BT, float(z_coef), chunk, b * t,
                batch_shards)


def _chunks(a, chunk, shards):
  """[B, T, ...] -> [T / chunk, M, B / M, chunk, ...]: the scan's axis first, then batch shards."""
  b, t = a.shape[:2]
  a = a.reshape(shards, b // shards, t // chunk, chunk, *a.shape[2:])
  return jnp.moveaxis(a, 2, 0)


def _unchunk(a):
  n, s, b, c = a.shape[:4]
  return jnp.moveaxis(a, 0, 2).reshape(s * b, n * c, *a.shape[4:])


def _chunk_stats(x_MBCD, head_DV, targets_MBC):
  """Float32 logits of one chunk, their logsumexp and the target logit."""
  logits_MBCV = jnp.einsum("mbcd,dv->mbcv", x_MBCD, head_DV).astype(jnp.float32)
  lse_MBC = jax.nn.logsumexp(logits_MBCV, axis=-1)
  target_MBC = jnp.take_along_axis(logits_MBCV, targets_MBC[..., None], axis=-1)[..., 0]
  return logits_MBCV, lse_MBC, target_MBC


def _sums(lse, target, weight, z_coef, n_tokens):
  ce = jnp.sum((lse - target) * weight) / n_tokens
  z = jnp.sum(lse**2 * weight) / n_tokens
  return ce + z_coef * z, ce, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(x_BTD, head_DV, targets_BT, weight_BT, z_coef, chunk, n_tokens, shards):
  def body(_, xs):
    x_MBCD, targets_MBC = xs
    _, lse_MBC, target_MBC = _chunk_stats(x_MBCD, head_DV, targets_MBC)
    return None, (lse_MBC, target_MBC)

  xs = (_chunks(x_BTD, chunk, shards), _chunks(targets_BT, chunk, shards))
  _, (lse, target) = jax.lax.scan(body, None, xs)
  return _sums(lse, target, _chunks(weight_BT, chunk, shards), z_coef, n_tokens)


def _fused_fwd(x_BTD, head_DV, targets_BT, weight_BT, z_coef, chunk, n_tokens, shards):
  v = head_DV.shape[1]

  def body(dhead_MDV, xs):
    x_MBCD, targets_MBC, weight_MBC = xs
    logits_MBCV, lse_MBC, target_MBC = _chunk_stats(x_MBCD, head_DV, targets_MBC)
    # d(loss)/d(logits) = w / n * (softmax - onehot + 2 z_coef lse softmax)
    probs_MBCV = jnp.exp(logits_MBCV - lse_MBC[..., None])
    scale_MBC = weight_MBC / n_tokens
    dlogits_MBCV = probs_MBCV * (scale_MBC * (1 + 2 * z_coef * lse_MBC))[..., None]
    dlogits_MBCV -= jax.nn.one_hot(targets_MBC, v, dtype=jnp.float32) * scale_MBC[..., None]
    dlogits_MBCV = dlogits_MBCV.astype(x_MBCD.dtype)
    dx_MBCD = jnp.einsum("mbcv,dv->mbcd", dlogits_MBCV, head_DV)
    dhead_MDV += jnp.einsum("mbcd,mbcv->mdv", x_MBCD, dlogits_MBCV,
                            preferred_element_type=jnp.float32)
    return dhead_MDV, (lse_MBC, target_MBC, dx_MBCD)

  xs = tuple(_chunks(a, chunk, shards) for a in (x_BTD, targets_BT, weight_BT))
  dhead_MDV = jnp.zeros((shards, *head_DV.shape), jnp.float32)
  dhead_MDV, (lse, target, dx) = jax.lax.scan(body, dhead_MDV, xs)
  out = _sums(lse, target, xs[2], z_coef, n_tokens)
  return out, (_unchunk(dx), jnp.sum(dhead_MDV, axis=0).astype(head_DV.dtype))


def _fused_bwd(z_coef, chunk, n_tokens, shards, residuals, cotangents):
  del z_coef, chunk, n_tokens, shards
  dx_BTD, dhead_DV = residuals
  g = cotangents[0]  # ce and z are metrics: their cotangents are ignored
  return (g * dx_BTD).astype(dx_BTD.dtype), (g * dhead_DV).astype(dhead_DV.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
