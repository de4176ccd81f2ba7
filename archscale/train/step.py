"""The optimiser and the train and eval steps, as pure functions of the state and a batch.

`make_train_step` returns `step(state, tokens_BT1) -> (state, metrics)`: gradient accumulation
over `train.grad_accum` micro-batches, global-norm clipping, AdamW with masked weight decay on a
warm-up + cosine / WSD schedule, and the loss with the LM head optionally fused in
(`train.loss_chunk`, `archscale.train.loss`). `archscale.train.trainer` compiles them for a mesh.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding

from archscale.model import transformer as model_lib
from archscale.train import loss as loss_lib


def learning_rate(train_cfg: Any) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up to `train.lr`, then cosine or WSD decay to `lr * min_lr_ratio`.

  cosine: half a cosine from the end of warm-up to the last step. wsd (warm-up, stable, decay):
  constant until the final `decay_fraction` of steps, then linear decay. constant: flat.
  """
  t = train_cfg
  peak, floor = t.lr, t.lr * t.min_lr_ratio
  steps, warmup = t.steps, t.warmup_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    if t.schedule == "cosine":
      frac = jnp.clip((step - warmup) / max(steps - warmup - 1, 1), 0.0, 1.0)
      decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    elif t.schedule == "wsd":
      decay_steps = max(int(round(t.decay_fraction * steps)), 1)
      start = steps - decay_steps
      frac = jnp.clip((step - start + 1) / decay_steps, 0.0, 1.0)
      decayed = peak + (floor - peak) * frac
    else:
      decayed = jnp.asarray(peak, jnp.float32)
    return jnp.where(step < warmup, warm, decayed)

  return schedule


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: every matrix; RMSNorm scales (named "scale") not."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with decoupled, masked weight decay on the schedule."""
  t = train_cfg
  adamw = optax.adamw(learning_rate(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                      mask=decay_mask)
  if t.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
  return adamw


def loss_fn(model: model_lib.Transformer, params: Any, tokens_BT1: jax.Array, z_loss: float,
            loss_chunk: int = 0,
            batch_shards: int = 1) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Mean next-token cross-entropy plus `z_loss * mean(logsumexp^2)`; returns (total, (ce, z)).

  `loss_chunk` > 0 fuses the LM head into the loss, `loss_chunk` positions at a time, so the
  [B, T, V] logits are never materialised (`archscale.train.loss`; `batch_shards` as there).
  """
  inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  if loss_chunk:
    x_BTD, head_DV = model_lib.features(model, params, inputs_BT)
    total, ce, z = loss_lib.chunked_cross_entropy(x_BTD, head_DV, targets_BT, z_loss, loss_chunk,
                                                  batch_shards)
    return total, (ce, z_loss * z)
  ce, z = loss_lib.cross_entropy(model_lib.forward(model, params, inputs_BT), targets_BT)
  z = z_loss * z if z_loss else jnp.zeros((), jnp.float32)
  return ce + z, (ce, z)


def make_train_step(model: model_lib.Transformer, tx: optax.GradientTransformation,
                    train_cfg: Any, micro_sharding: NamedSharding | None = None,
                    batch_shards: int = 1) -> Callable:
  """`step(state, tokens_BT1) -> (state, metrics)`; gradients accumulate over `grad_accum`.

  With accumulation the global batch [B, ...] is viewed as [B/A, A, ...] and micro-batch a takes
  rows a, a + A, ...: every micro-batch stays spread over all data-parallel devices.
  """
  accum, z_coef, schedule = train_cfg.grad_accum, train_cfg.z_loss, learning_rate(train_cfg)
  grad_fn = jax.value_and_grad(
      lambda p, x: loss_fn(model, p, x, z_coef, train_cfg.loss_chunk, batch_shards), has_aux=True)

  def step(state, tokens_BT1):
    params = state["params"]
    if accum == 1:
      (_, (ce, z)), grads = grad_fn(params, tokens_BT1)
    else:
      def body(carry, micro_BT1):
        g_sum, ce_sum, z_sum = carry
        (_, (ce_i, z_i)), g_i = grad_fn(params, micro_BT1)
        return (jax.tree.map(jnp.add, g_sum, g_i), ce_sum + ce_i, z_sum + z_i), None

      zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
               jnp.zeros((), jnp.float32))
      (grads, ce, z), _ = jax.lax.scan(
          body, zeros, split_micro_batches(tokens_BT1, accum, micro_sharding))
      grads = jax.tree.map(lambda g: g / accum, grads)
      ce, z = ce / accum, z / accum
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": ce, "z_loss": z, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "lr": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return step


def split_micro_batches(tokens_BT1: jax.Array, accum: int,
                        micro_sharding: NamedSharding | None) -> jax.Array:
  """[B, T+1] -> [A, B/A, T+1]: micro-batch a takes rows a, a + A, ... (see make_train_step)."""
  b, t1 = tokens_BT1.shape
  micro_ABT1 = tokens_BT1.reshape(b // accum, accum, t1).swapaxes(0, 1)
  if micro_sharding is not None:
    micro_ABT1 = jax.lax.with_sharding_constraint(micro_ABT1, micro_sharding)
  return micro_ABT1


def make_eval_step(model: model_lib.Transformer, train_cfg: Any,
                   micro_sharding: NamedSharding | None = None, batch_shards: int = 1) -> Callable:
  """`eval(params, tokens_BT1) -> mean cross-entropy` (no z-loss).

  Runs over the same `grad_accum` micro-batches as the train step, so evaluation needs no more
  memory than training.
  """
  accum, chunk = train_cfg.grad_accum, train_cfg.loss_chunk
  cross_entropy = lambda params, x_BT1: loss_fn(model, params, x_BT1, 0.0, chunk,
                                                batch_shards)[1][0]

  def evaluate(params, tokens_BT1):
    if accum == 1:
      return cross_entropy(params, tokens_BT1)
    micro_ABT1 = split_micro_batches(tokens_BT1, accum, micro_sharding)
    return jnp.mean(jax.lax.map(lambda x_BT1: cross_entropy(params, x_BT1), micro_ABT1))

  return evaluate
