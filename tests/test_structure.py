"""What the compiled programs do, read from XLA on CPU: memory traffic of a decode step, FLOPs of
a training step. Nothing is timed; these pin the structure that speed on an accelerator rests on.

Decode traffic is checked in float32: on CPU, XLA computes bfloat16 dots in float32 and converts
whole operands (the KV cache among them) first, copies that a GPU never makes.
"""

import math
import re

import jax
import jax.numpy as jnp
import pytest

from archscale.core import config_lib
from archscale.model import transformer as M
from archscale.model.arch import ArchSpec
from archscale.train import trainer as train

# 8 layers, batch 64, 2 KV heads of 64: the cache outweighs the weights at a few thousand positions.
DECODE_SPEC = ArchSpec(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_head=64, d_ff=2048,
                       vocab_size=32000, max_seq_len=4096)
BATCH = 64


def _decode_step(cache_len: int):
  """(bytes accessed, optimised HLO text, weight bytes, KV bytes) of one unrolled decode step."""
  model = M.Transformer(DECODE_SPEC, M.ModelOptions(scan_layers=False))
  params = jax.eval_shape(lambda: M.init_params(model, jax.random.key(0)))
  cache = jax.eval_shape(lambda: M.init_cache(DECODE_SPEC, BATCH, cache_len, jnp.float32))
  step = jax.jit(lambda p, c, t: M.decode_step(model, p, c, t), donate_argnums=1)
  compiled = step.lower(params, cache, jax.ShapeDtypeStruct((BATCH,), jnp.int32)).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return cost["bytes accessed"], compiled.as_text(), nbytes(params), nbytes(cache)


@pytest.fixture(scope="module")
def decode_steps():
  return {s: _decode_step(s) for s in (1280, 2560)}


def test_decode_traffic_reads_the_cache_once_and_the_weights_once(decode_steps):
  (small, _, weights, kv_small), (large, _, _, kv_large) = decode_steps[1280], decode_steps[2560]
  # Each allocated KV byte costs at most 1.5 bytes of traffic: one read by the attention plus its
  # float32 scores (a transposed copy of the cache made it 3.3, in bfloat16 6.6).
  per_kv_byte = (large - small) / (kv_large - kv_small)
  assert per_kv_byte < 1.5, per_kv_byte
  # What does not grow with the cache is the weights read once (the tied embedding counted twice,
  # by its lookup and by the head) and activations: a copy of the weights would add 2x more.
  fixed = small - per_kv_byte * kv_small
  assert fixed < 2.2 * weights, fixed / weights


def test_decode_step_copies_neither_the_cache_nor_a_weight_matrix(decode_steps):
  smallest_weight = DECODE_SPEC.d_model * DECODE_SPEC.d_ff  # elements of one MLP matrix
  layer_cache = BATCH * DECODE_SPEC.n_kv_heads * 1280 * DECODE_SPEC.d_head
  assert smallest_weight < layer_cache
  moves = re.findall(r"= \w+\[([\d,]*)\]\{[^}]*\} (copy|transpose|convert|slice|dynamic-slice)\(",
                     decode_steps[1280][1])
  big = [(op, dims) for dims, op in moves
         if math.prod(int(d) for d in dims.split(",") if d) >= smallest_weight]
  assert not big  # e.g. the [B, K, H, S] transpose of a [B, S, K, H] cache


def _train_step_flops(**overrides) -> tuple[float, ArchSpec, int]:
  """Compiled FLOPs of one training step (layers unrolled: cost analysis counts a loop once)."""
  c = config_lib.make_config("demo")
  c.model.update(dict(d_model=256, d_ff=1024, n_layers=2, n_heads=4, n_kv_heads=2, d_head=64,
                      vocab_size=4096))
  c.data.seq_len, c.train.global_batch_size, c.compute.scan_layers = 64, 4, False
  for key, value in overrides.items():
    section, field = key.split(".")
    c[section][field] = value
  setup = train.build(c, with_data=False)
  cost = train.compile_step(setup, c.train).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"], setup.spec, c.data.seq_len * c.train.global_batch_size


@pytest.fixture(scope="module")
def base_flops():
  return _train_step_flops()


def test_training_step_flops_match_the_mfu_numerator(base_flops):
  flops, spec, tokens = base_flops
  counted = spec.train_flops_per_token(64) * tokens
  assert abs(flops / counted - 1) < 0.05, flops / counted
  # XLA's attention computes the full square of scores, the numerator counts the causal half;
  # with that difference added, the rest (norms, softmax, optimizer) is within 3%.
  square = counted + 3 * tokens * (spec.attention_flops_per_token(64)
                                   - spec.attention_flops_per_token(32))
  assert 1 <= flops / square < 1.03, flops / square


def test_fused_loss_and_remat_do_not_recompute_the_logits(base_flops):
  base, spec, tokens = base_flops
  head_forward = 2 * spec.vocab_size * spec.d_model * tokens
  layers_forward = 2 * (spec.matmul_params_per_token - spec.vocab_size * spec.d_model) * tokens
  assert head_forward > 0.1 * base  # a recomputed head would show
  # One chunk, so the loss's loop runs once and cost analysis counts all of it.
  fused, _, _ = _train_step_flops(**{"train.loss_chunk": 64})
  assert abs(fused / base - 1) < 0.02, fused / base
  remat, _, _ = _train_step_flops(**{"compute.remat": "full", "train.loss_chunk": 64})
  assert 0 < remat - fused < 1.05 * layers_forward, (remat - fused) / head_forward
