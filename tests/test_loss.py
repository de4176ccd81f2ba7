"""The chunked, head-fused cross-entropy against full logits: values, gradients and memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from archscale.train import loss as loss_lib


def _full(x_BTD, head_DV, targets_BT, z_coef):
  logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, head_DV)
  ce, z = loss_lib.cross_entropy(logits_BTV, targets_BT)
  return ce + z_coef * z, ce, z


def _chunked(chunk):
  return lambda x, h, t, z_coef: loss_lib.chunked_cross_entropy(x, h, t, z_coef, chunk)


def _inputs(dtype, b=3, t=10, d=16, v=37):
  kx, kh, kt = jax.random.split(jax.random.key(0), 3)
  x_BTD = jax.random.normal(kx, (b, t, d)).astype(dtype)
  head_DV = (2 * jax.random.normal(kh, (d, v))).astype(dtype)  # logits of order 10
  targets_BT = jax.random.randint(kt, (b, t), 0, v)
  return x_BTD, head_DV, targets_BT


def _grads(loss, x_BTD, head_DV, targets_BT, z_coef, scale=1.0):
  return jax.jit(jax.grad(lambda x, h: scale * loss(x, h, targets_BT, z_coef)[0],
                          argnums=(0, 1)))(x_BTD, head_DV)


@pytest.mark.parametrize("chunk", [1, 4, 10, 16])  # 4 pads the last chunk; 16 > T
@pytest.mark.parametrize("z_coef", [0.0, 1e-2])
def test_chunked_matches_full_logits_in_float32(chunk, z_coef):
  x_BTD, head_DV, targets_BT = _inputs(jnp.float32)
  want = _full(x_BTD, head_DV, targets_BT, z_coef)
  got = jax.jit(_chunked(chunk), static_argnums=3)(x_BTD, head_DV, targets_BT, z_coef)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # The cotangent of the loss scales both gradients (here 3x).
  g_want = _grads(_full, x_BTD, head_DV, targets_BT, z_coef, scale=3.0)
  g_got = _grads(_chunked(chunk), x_BTD, head_DV, targets_BT, z_coef, scale=3.0)
  for a, b in zip(g_got, g_want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_matches_full_logits_in_bfloat16():
  x_BTD, head_DV, targets_BT = _inputs(jnp.bfloat16)
  want = _full(x_BTD, head_DV, targets_BT, 1e-2)
  got = loss_lib.chunked_cross_entropy(x_BTD, head_DV, targets_BT, 1e-2, 4)
  np.testing.assert_allclose(got, want, rtol=1e-6)  # same bf16 logits, float32 softmax
  g_want = _grads(_full, x_BTD, head_DV, targets_BT, 1e-2)
  g_got = _grads(_chunked(4), x_BTD, head_DV, targets_BT, 1e-2)
  for a, b in zip(g_got, g_want, strict=True):
    assert a.dtype == b.dtype == jnp.bfloat16
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)  # bf16 rounding of dlogits


def test_chunked_loss_never_holds_the_full_logits():
  b, t, d, v, chunk = 2, 512, 64, 4096, 64
  x = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
  head = jax.ShapeDtypeStruct((d, v), jnp.float32)
  targets = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp_bytes(loss):
    step = jax.jit(jax.value_and_grad(lambda x, h, y: loss(x, h, y, 0.0)[0], argnums=(0, 1)))
    return step.lower(x, head, targets).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = b * t * v * 4
  assert temp_bytes(_full) >= logits_bytes
  assert temp_bytes(_chunked(chunk)) < logits_bytes / 2  # chunk logits are 1/8 of them


def test_chunk_must_be_positive():
  x_BTD, head_DV, targets_BT = _inputs(jnp.float32)
  with pytest.raises(ValueError, match=r"train\.loss_chunk"):
    loss_lib.chunked_cross_entropy(x_BTD, head_DV, targets_BT, 0.0, 0)
