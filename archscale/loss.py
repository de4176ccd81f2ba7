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
                          z_coef: float, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(ce + z_coef * z, ce, z) with logits = x @ head made `chunk` positions at a time.

  Logits are rounded to x's dtype before the float32 softmax, as `model.Transformer` does. Only
  the first output is differentiable (with respect to x and the head); ce and z are metrics.
  Positions are padded up to a multiple of `chunk`; padding carries no weight.
  """
  if chunk < 1:
    raise ValueError(f"train.loss_chunk must be >= 1 to chunk the loss (0 = off), got {chunk}")
  b, t, _ = x_BTD.shape
  chunk = min(chunk, t)
  pad = -t % chunk
  weight_BT = jnp.ones((b, t), jnp.float32)
  if pad:
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    weight_BT = jnp.pad(weight_BT, ((0, 0), (0, pad)))
  return _fused(x_BTD, head_DV, targets_BT, weight_BT, float(z_coef), chunk, b * t)


def _chunks(a, chunk):
  """[B, T, ...] -> [T / chunk, B, chunk, ...], the scan's leading axis first."""
  b, t = a.shape[:2]
  return a.reshape(b, t // chunk, chunk, *a.shape[2:]).swapaxes(0, 1)


def _unchunk(a):
  n, b, c = a.shape[:3]
  return a.swapaxes(0, 1).reshape(b, n * c, *a.shape[3:])


def _chunk_stats(x_BCD, head_DV, targets_BC):
  """Float32 logits of one chunk, their logsumexp and the target logit."""
  logits_BCV = jnp.einsum("bcd,dv->bcv", x_BCD, head_DV).astype(jnp.float32)
  lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
  target_BC = jnp.take_along_axis(logits_BCV, targets_BC[..., None], axis=-1)[..., 0]
  return logits_BCV, lse_BC, target_BC


def _sums(lse_NBC, target_NBC, weight_NBC, z_coef, n_tokens):
  ce = jnp.sum((lse_NBC - target_NBC) * weight_NBC) / n_tokens
  z = jnp.sum(lse_NBC**2 * weight_NBC) / n_tokens
  return ce + z_coef * z, ce, z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(x_BTD, head_DV, targets_BT, weight_BT, z_coef, chunk, n_tokens):
  def body(_, xs):
    x_BCD, targets_BC = xs
    _, lse_BC, target_BC = _chunk_stats(x_BCD, head_DV, targets_BC)
    return None, (lse_BC, target_BC)

  _, (lse, target) = jax.lax.scan(body, None, (_chunks(x_BTD, chunk), _chunks(targets_BT, chunk)))
  return _sums(lse, target, _chunks(weight_BT, chunk), z_coef, n_tokens)


def _fused_fwd(x_BTD, head_DV, targets_BT, weight_BT, z_coef, chunk, n_tokens):
  v = head_DV.shape[1]

  def body(dhead_DV, xs):
    x_BCD, targets_BC, weight_BC = xs
    logits_BCV, lse_BC, target_BC = _chunk_stats(x_BCD, head_DV, targets_BC)
    # d(loss)/d(logits) = w / n * (softmax - onehot + 2 z_coef lse softmax)
    probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
    scale_BC = weight_BC / n_tokens
    dlogits_BCV = probs_BCV * (scale_BC * (1 + 2 * z_coef * lse_BC))[..., None]
    dlogits_BCV -= jax.nn.one_hot(targets_BC, v, dtype=jnp.float32) * scale_BC[..., None]
    dlogits_BCV = dlogits_BCV.astype(x_BCD.dtype)
    dx_BCD = jnp.einsum("bcv,dv->bcd", dlogits_BCV, head_DV)
    dhead_DV += jnp.einsum("bcd,bcv->dv", x_BCD, dlogits_BCV,
                           preferred_element_type=jnp.float32)
    return dhead_DV, (lse_BC, target_BC, dx_BCD)

  xs = (_chunks(x_BTD, chunk), _chunks(targets_BT, chunk), _chunks(weight_BT, chunk))
  dhead_DV, (lse, target, dx) = jax.lax.scan(body, jnp.zeros(head_DV.shape, jnp.float32), xs)
  out = _sums(lse, target, xs[2], z_coef, n_tokens)
  return out, (_unchunk(dx), dhead_DV.astype(head_DV.dtype))


def _fused_bwd(z_coef, chunk, n_tokens, residuals, cotangents):
  del z_coef, chunk, n_tokens
  dx_BTD, dhead_DV = residuals
  g = cotangents[0]  # ce and z are metrics: their cotangents are ignored
  return (g * dx_BTD).astype(dx_BTD.dtype), (g * dhead_DV).astype(dhead_DV.dtype), None, None


_fused.defvjp(_fused_fwd, _fused_bwd)
