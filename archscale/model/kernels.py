"""Pallas attention kernels that `ModelOptions.attention` can select, beside the XLA einsum path.

  pallas  one decode step (one query per sequence) with JAX's GPU decode attention: each KV head
          is read once for its whole query group, and only the blocks up to the filled length of
          the cache are loaded (the XLA path reads, and masks, the whole allocated cache).
  splash  training and prefill (causal) with JAX's TPU splash attention, sharded like the rest of
          the model: under a mesh it runs per shard of batch and heads through `shard_map`.

Off their accelerator both run in Pallas interpret mode (slow, exact), which is how the tests
check them against the XLA path on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
from jax.sharding import PartitionSpec

# KV positions per block of the decode kernel, largest first: a power of two at least 16.
DECODE_BLOCKS = (128, 64, 32, 16)
MAX_DECODE_SPLITS = 16
SPLASH_BLOCKS = (512, 256, 128)


def decode_cache_length(needed: int, max_len: int) -> int:
  """Cache positions to allocate for `needed` under the decode kernel: a multiple of 128 (so the
  kernel takes full blocks), at most `max_len`."""
  return min(-(-needed // DECODE_BLOCKS[0]) * DECODE_BLOCKS[0], max_len)


def decode_blocks(cache_len: int) -> tuple[int, int]:
  """(block_k, k_splits) for a cache of `cache_len` positions.

  The kernel splits the cache into `k_splits` parallel parts walked in blocks of `block_k`; both
  must divide the length, and the block must be a power of two for the GPU compiler.
  """
  block_k = next((b for b in DECODE_BLOCKS if cache_len % b == 0), None)
  if block_k is None:
    raise ValueError(f"decode attention 'pallas' needs a KV cache length that is a multiple of "
                     f"16, got {cache_len}; allocate the cache with decode_cache_length()")
  n_blocks = cache_len // block_k
  k_splits = max(d for d in range(1, MAX_DECODE_SPLITS + 1) if n_blocks % d == 0)
  return block_k, k_splits


def _interpret(backend: str) -> bool:
  return jax.default_backend() != backend


def decode_attention(q_BNH: jax.Array, k_BKSH: jax.Array, v_BKSH: jax.Array,
                     lengths_B: jax.Array, interpret: bool | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v over the first `lengths_B` cache positions of each row.

  q [B, N, H] (N = K * G query heads, grouped by KV head); cache [B, K, S, H]. Returns [B, N, H].
  """
  from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode

  block_k, k_splits = decode_blocks(k_BKSH.shape[2])
  interpret = _interpret("gpu") if interpret is None else interpret
  # The kernel takes [B, S, K, H] and swaps to [B, K, S, H] itself: the two swaps cancel.
  return pallas_decode.gqa(q_BNH, k_BKSH.swapaxes(1, 2), v_BKSH.swapaxes(1, 2),
                           kv_seq_len=lengths_B, block_k=block_k, k_splits=k_splits,
                           interpret=interpret)


def splash_block(seq_len: int) -> int | None:
  """The splash block size for `seq_len` positions, or None when no block size divides it."""
  return next((b for b in SPLASH_BLOCKS if seq_len % b == 0), None)


def _splash_kernel(n_heads: int, seq_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  block = splash_block(seq_len)
  mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len))] * n_heads)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _splash_local(q_BTNH, k_BTKH, v_BTKH, interpret):
  """Causal splash attention on one shard: vmapped over the batch, heads leading per row."""
  b, t, n, h = q_BTNH.shape
  kernel = _splash_kernel(n, t, interpret)
  q_BNTH = (q_BTNH / math.sqrt(h)).astype(q_BTNH.dtype).swapaxes(1, 2)
  out_BNTH = jax.vmap(kernel)(q_BNTH, k_BTKH.swapaxes(1, 2), v_BTKH.swapaxes(1, 2))
  return out_BNTH.swapaxes(1, 2)


def splash_attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
                     q_axes: PartitionSpec | None = None, kv_axes: PartitionSpec | None = None,
                     interpret: bool | None = None) -> jax.Array:
  """Causal grouped-query attention with splash; T must be a multiple of 128.

  `q_axes` / `kv_axes`: the mesh axes of the [B, T, N, H] queries and [B, T, K, H] keys and
  values (from the logical rules); with a mesh in context the kernel runs per shard of batch and
  heads, which needs the sequence unsplit.
  """
  interpret = _interpret("tpu") if interpret is None else interpret
  if splash_block(q_BTNH.shape[1]) is None:
    raise ValueError(f"compute.attention='splash' needs a sequence length that is a multiple of "
                     f"128, got {q_BTNH.shape[1]}")
  local = functools.partial(_splash_local, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or q_axes is None:
    return local(q_BTNH, k_BTKH, v_BTKH)
  if q_axes[1] is not None or kv_axes[1] is not None:
    raise ValueError("compute.attention='splash' needs the sequence unsplit (rule 'seq' -> ())")
  return jax.shard_map(local, in_specs=(q_axes, kv_axes, kv_axes), out_specs=q_axes,
                       check_vma=False)(q_BTNH, k_BTKH, v_BTKH)
