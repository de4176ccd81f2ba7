"""Pallas attention kernels (interpret mode on CPU) against the XLA path: values, gradients."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from archscale.model import kernels
from archscale.model import transformer as M
from archscale.model.arch import ArchSpec

SPEC = ArchSpec(d_model=48, n_layers=1, n_heads=8, n_kv_heads=2, d_head=16, d_ff=96,
                vocab_size=97, rope_theta=10000.0, rope_scaling="none", max_seq_len=256)


def reference_decode(q_BNH, k_BKSH, v_BKSH, lengths_B):
  b, n, h = q_BNH.shape
  kv = k_BKSH.shape[1]
  q_BKGH = q_BNH.reshape(b, kv, n // kv, h)
  scores_BKGS = jnp.einsum("bkgh,bksh->bkgs", q_BKGH, k_BKSH) / np.sqrt(h)
  mask_BS = jnp.arange(k_BKSH.shape[2])[None] < lengths_B[:, None]
  scores_BKGS = jnp.where(mask_BS[:, None, None], scores_BKGS, -jnp.inf)
  out_BKGH = jnp.einsum("bkgs,bksh->bkgh", jax.nn.softmax(scores_BKGS, -1), v_BKSH)
  return out_BKGH.reshape(b, n, h)


def test_decode_kernel_is_exact_and_reads_only_the_filled_blocks():
  b, n, kv, s, h = 2, 8, 2, 256, 16
  keys = jax.random.split(jax.random.key(0), 3)
  q_BNH = jax.random.normal(keys[0], (b, n, h))
  k_BKSH = jax.random.normal(keys[1], (b, kv, s, h))
  v_BKSH = jax.random.normal(keys[2], (b, kv, s, h))
  lengths_B = jnp.array([1, 100])
  expected = reference_decode(q_BNH, k_BKSH, v_BKSH, lengths_B)
  # Every position past the block holding the last filled one is NaN: a kernel that loaded it
  # (even to mask it) would put NaN into its output (0 * NaN).
  block_k, _ = kernels.decode_blocks(s)
  filled_blocks = -(-int(lengths_B.max()) // block_k) * block_k
  poison = jnp.arange(s)[None, None, :, None] >= filled_blocks
  out = kernels.decode_attention(q_BNH, jnp.where(poison, jnp.nan, k_BKSH),
                                 jnp.where(poison, jnp.nan, v_BKSH), lengths_B, interpret=True)
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-5, rtol=1e-5)
  nan_out = reference_decode(q_BNH, jnp.where(poison, jnp.nan, k_BKSH),
                             jnp.where(poison, jnp.nan, v_BKSH), lengths_B)
  assert np.isnan(np.asarray(nan_out)).any()  # the poison does reach a full read


def test_decode_blocks_divide_the_cache_and_reject_odd_lengths():
  assert kernels.decode_blocks(1280) == (128, 10)
  assert kernels.decode_blocks(5120) == (128, 10)
  assert kernels.decode_blocks(48) == (16, 3)
  assert kernels.decode_cache_length(1279, 131072) == 1280
  assert kernels.decode_cache_length(500, 512) == 512
  with pytest.raises(ValueError, match="multiple of 16"):
    kernels.decode_blocks(1279)


def test_pallas_decode_steps_match_xla():
  xla = M.Transformer(SPEC, M.ModelOptions(scan_layers=False))
  pallas = M.Transformer(SPEC, M.ModelOptions(scan_layers=False, attention="pallas"))
  params = M.init_params(xla, jax.random.key(1))
  tokens_BT = jax.random.randint(jax.random.key(2), (2, 9), 0, SPEC.vocab_size)
  _, cache = M.prefill(xla, params, tokens_BT[:, :6], max_len=32)
  cache_p = cache
  step = jax.jit(M.decode_step, static_argnums=0)
  for i in range(6, 9):
    want, cache = step(xla, params, cache, tokens_BT[:, i])
    got, cache_p = step(pallas, params, cache_p, tokens_BT[:, i])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def _loss(model, params, tokens_BT):
  logits_BTV = M.forward(model, params, tokens_BT)
  return jnp.mean(jax.nn.logsumexp(logits_BTV, -1) - logits_BTV[..., 0])


def test_splash_matches_xla_values_and_gradients():
  xla = M.Transformer(SPEC)
  splash = M.Transformer(SPEC, M.ModelOptions(attention="splash"))
  params = M.init_params(xla, jax.random.key(3))
  tokens_BT = jax.random.randint(jax.random.key(4), (2, 128), 0, SPEC.vocab_size)
  value_and_grad = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)
  want, want_grads = value_and_grad(xla, params, tokens_BT)
  got, got_grads = value_and_grad(splash, params, tokens_BT)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=2e-4)
  # A length splash cannot tile falls back to the XLA path rather than failing.
  short_BT = tokens_BT[:, :40]
  np.testing.assert_allclose(np.asarray(M.forward(splash, params, short_BT)),
                             np.asarray(M.forward(xla, params, short_BT)), atol=1e-6)


def test_splash_runs_per_shard_under_a_mesh():
  """Four CPU devices, batch over data and heads over tensor: the same loss as without a mesh."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, flax.linen as nn, numpy as np
      from archscale.model import transformer as M
      from archscale.model import sharding
      from archscale.model.arch import ArchSpec
      spec = ArchSpec(d_model=48, n_layers=1, n_heads=8, n_kv_heads=2, d_head=16, d_ff=96,
                      vocab_size=97, rope_theta=1e4, rope_scaling="none", max_seq_len=256)
      splash = M.Transformer(spec, M.ModelOptions(attention="splash"))
      xla = M.Transformer(spec)
      params = M.init_params(xla, jax.random.key(0))
      tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, 97)
      mesh = jax.make_mesh((2, 1, 2), sharding.MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * 3)
      rules = [(k, v or None) for k, v in sharding.activation_rules(sharding.LOGICAL_RULES)]
      rules = [(k, v[0] if v and len(v) == 1 else v) for k, v in rules]
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = jax.jit(lambda p, t: M.forward(splash, p, t))(params, tokens)
      want = M.forward(xla, params, tokens)
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
      print("ok")
  """)
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


def test_auto_attention_is_splash_only_on_tpu():
  assert M.ModelOptions().attention == "auto"
  assert M.ModelOptions().attention_impl == ("splash" if jax.default_backend() == "tpu" else "xla")
  assert M.ModelOptions(attention="cudnn").attention_impl == "cudnn"
  with pytest.raises(ValueError, match="compute.attention"):
    M.ModelOptions(attention="flash")
