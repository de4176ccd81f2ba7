"""The Flax decoder: parameter counts, cached generation, scan/unscan and attention kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from archscale.model import transformer as M
from archscale.model.arch import ArchSpec

# Jitted entry points: compiling once per shape is much cheaper than eager dispatch of each op.
init_params = jax.jit(M.init_params, static_argnums=0)
forward = jax.jit(M.forward, static_argnums=0)
prefill = jax.jit(M.prefill, static_argnums=0, static_argnames=("max_len", "cache_dtype"))
decode_step = jax.jit(M.decode_step, static_argnums=0)


def tiny_spec(**overrides):
  base = dict(d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, d_head=16, d_ff=96,
              vocab_size=97, rope_theta=10000.0, rope_scaling="llama3", max_seq_len=64)
  return ArchSpec(**{**base, **overrides})


def random_specs(count, seed=0):
  rng = np.random.default_rng(seed)
  specs = []
  while len(specs) < count:
    n_kv = int(rng.integers(1, 5))
    gqa = int(rng.choice([1, 2, 3, 4]))
    specs.append(ArchSpec(
        d_model=int(rng.integers(2, 12)) * 8, n_layers=int(rng.integers(1, 4)),
        n_heads=n_kv * gqa, n_kv_heads=n_kv, d_head=int(rng.choice([4, 8, 12, 16])),
        d_ff=int(rng.integers(1, 20)) * 8, vocab_size=int(rng.integers(16, 300)),
        tie_embeddings=bool(rng.integers(0, 2)), max_seq_len=32))
  return specs


SPECS = random_specs(22)


def test_random_specs_cover_the_interesting_cases():
  assert any(s.n_heads * s.d_head != s.d_model for s in SPECS)
  assert any(s.gqa == 1 for s in SPECS)
  assert any(s.n_kv_heads == 1 and s.n_heads > 1 for s in SPECS)  # GQA = n_heads (MQA)
  assert any(s.tie_embeddings for s in SPECS) and any(not s.tie_embeddings for s in SPECS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"d{s.d_model}h{s.n_heads}k{s.n_kv_heads}")
def test_param_count_matches_archspec_exactly(spec):
  shapes = jax.eval_shape(lambda: M.init_params(M.Transformer(spec), jax.random.key(0)))
  assert M.count_params(shapes) == spec.params_total
  nonembed = {k: v for k, v in shapes.items() if k not in ("embedding", "lm_head")}
  assert M.count_params(nonembed) == spec.params_nonembed


def test_param_count_unscanned_matches_too():
  spec = tiny_spec(tie_embeddings=False)
  model = M.Transformer(spec, M.ModelOptions(scan_layers=False))
  assert M.count_params(init_params(model, jax.random.key(0))) == spec.params_total


def test_every_parameter_has_logical_axes():
  spec = tiny_spec(tie_embeddings=False)
  axes = M.logical_axes(M.Transformer(spec))
  shapes = jax.eval_shape(lambda: M.init_params(M.Transformer(spec), jax.random.key(0)))
  flat_axes = jax.tree_util.tree_leaves_with_path(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
  assert len(flat_axes) == len(flat_shapes)
  for (path, names), (_, shape) in zip(flat_axes, flat_shapes, strict=True):
    assert len(names) == len(shape.shape), path
    assert all(n is not None for n in names), path
  assert tuple(axes["layers"]["attn"]["q"]) == ("layers", "embed", "q_heads", "head_dim")
  assert tuple(axes["lm_head"]) == ("embed", "vocab")


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (8, 2), (4, 1)],
                         ids=["mha_gqa1", "gqa4", "mqa"])
@pytest.mark.parametrize("scan", [True, False])
def test_prefill_plus_decode_matches_full_forward(n_heads, n_kv_heads, scan):
  spec = tiny_spec(n_heads=n_heads, n_kv_heads=n_kv_heads, d_model=40)  # n_heads*d_head != d_model
  model = M.Transformer(spec, M.ModelOptions(scan_layers=scan))
  params = init_params(model, jax.random.key(1))
  tokens_BT = jax.random.randint(jax.random.key(2), (3, 14), 0, spec.vocab_size)
  full_BTV = forward(model, params, tokens_BT)

  prompt = 9
  logits_BTV, cache = prefill(model, params, tokens_BT[:, :prompt], max_len=20,
                                cache_dtype=jnp.float32)
  assert int(cache.end) == prompt and cache.max_len == 20
  diffs = [float(jnp.abs(logits_BTV - full_BTV[:, :prompt]).max())]
  for t in range(prompt, tokens_BT.shape[1]):
    logits_BV, cache = decode_step(model, params, cache, tokens_BT[:, t])
    diffs.append(float(jnp.abs(logits_BV - full_BTV[:, t]).max()))
  assert max(diffs) <= 1e-5
  assert int(cache.end) == tokens_BT.shape[1]


def test_decode_reads_the_cache():
  spec = tiny_spec()
  model = M.Transformer(spec)
  params = init_params(model, jax.random.key(1))
  tokens_BT = jax.random.randint(jax.random.key(2), (2, 6), 0, spec.vocab_size)
  _, cache = prefill(model, params, tokens_BT, max_len=8)
  logits_BV, _ = decode_step(model, params, cache, tokens_BT[:, -1])
  corrupted = cache._replace(v_BKSH=tuple(v.at[:, :, 2].add(1.0) for v in cache.v_BKSH))
  logits2_BV, _ = decode_step(model, params, corrupted, tokens_BT[:, -1])
  assert float(jnp.abs(logits_BV - logits2_BV).max()) > 1e-4
  # Positions past `end` are masked: garbage there changes nothing.
  padded = cache._replace(k_BKSH=tuple(k.at[:, :, 7].set(50.0) for k in cache.k_BKSH))
  logits3_BV, _ = decode_step(model, params, padded, tokens_BT[:, -1])
  np.testing.assert_allclose(logits_BV, logits3_BV, atol=1e-6)


def stack_layers(params_unscanned, n_layers):
  """Unscanned params (layers_0, layers_1, ...) -> the scanned layout (layers: stacked)."""
  out = {k: v for k, v in params_unscanned.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                               *[params_unscanned[f"layers_{i}"] for i in range(n_layers)])
  return out


def test_scanned_and_unscanned_agree_for_the_same_weights():
  spec = tiny_spec(tie_embeddings=False)
  unscanned = M.Transformer(spec, M.ModelOptions(scan_layers=False))
  scanned = M.Transformer(spec, M.ModelOptions(scan_layers=True))
  params = init_params(unscanned, jax.random.key(3))
  tokens_BT = jax.random.randint(jax.random.key(4), (2, 10), 0, spec.vocab_size)
  a = forward(unscanned, params, tokens_BT)
  b = forward(scanned, stack_layers(params, spec.n_layers), tokens_BT)
  np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch"])
def test_remat_changes_memory_not_values(remat):
  spec = tiny_spec()
  base = M.Transformer(spec)
  params = init_params(base, jax.random.key(5))
  tokens_BT = jax.random.randint(jax.random.key(6), (2, 8), 0, spec.vocab_size)

  def loss(model, p):
    return jnp.mean(forward(model, p, tokens_BT) ** 2)

  g0 = jax.grad(lambda p: loss(base, p))(params)
  g1 = jax.grad(lambda p: loss(M.Transformer(spec, M.ModelOptions(remat=remat)), p))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g0, g1)


def test_xla_and_dot_product_attention_agree():
  spec = tiny_spec(n_heads=8, n_kv_heads=2)
  xla = M.Transformer(spec, M.ModelOptions(attention="xla"))
  dpa = M.Transformer(spec, M.ModelOptions(attention="dpa"))
  params = init_params(xla, jax.random.key(7))
  tokens_BT = jax.random.randint(jax.random.key(8), (2, 12), 0, spec.vocab_size)
  np.testing.assert_allclose(forward(xla, params, tokens_BT), forward(dpa, params, tokens_BT),
                             atol=1e-5, rtol=1e-5)
  _, cache_x = prefill(xla, params, tokens_BT[:, :6], max_len=12)
  _, cache_d = prefill(dpa, params, tokens_BT[:, :6], max_len=12)
  for t in range(6, 9):
    lx, cache_x = decode_step(xla, params, cache_x, tokens_BT[:, t])
    ld, cache_d = decode_step(dpa, params, cache_d, tokens_BT[:, t])
    np.testing.assert_allclose(lx, ld, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [4, 5])  # 5 does not divide 12: a padded last block
def test_chunked_xla_attention_is_exact(chunk):
  spec = tiny_spec(n_heads=8, n_kv_heads=2)
  base = M.Transformer(spec)
  chunked = M.Transformer(spec, M.ModelOptions(attention_chunk=chunk))
  params = init_params(base, jax.random.key(7))
  tokens_BT = jax.random.randint(jax.random.key(8), (2, 12), 0, spec.vocab_size)
  np.testing.assert_allclose(forward(chunked, params, tokens_BT), forward(base, params, tokens_BT),
                             atol=1e-5, rtol=1e-5)
  loss = lambda model: jax.grad(lambda p: jnp.mean(forward(model, p, tokens_BT) ** 2))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5),
               loss(chunked), loss(base))
  # A prompt prefilled into a cache, then the rest of it fed on top of the cache at once.
  full, _ = prefill(base, params, tokens_BT, max_len=16)
  first, cache = prefill(chunked, params, tokens_BT[:, :4], max_len=16)
  second, _ = jax.jit(lambda p, c, x: chunked.clone(decode=True).apply({"params": p}, x, c))(
      params, cache, tokens_BT[:, 4:])
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, atol=1e-5, rtol=1e-5)


def test_chunked_xla_attention_bounds_the_scores_memory():
  spec = tiny_spec(n_layers=1, n_heads=8, n_kv_heads=2, max_seq_len=1024)
  tokens = jax.ShapeDtypeStruct((2, 1024), jnp.int32)

  def temp_bytes(options):
    model = M.Transformer(spec, options)
    params = jax.eval_shape(lambda: M.init_params(model, jax.random.key(0)))
    compiled = forward.lower(model, params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  scores_bytes = 2 * 8 * 1024 * 1024 * 4
  assert temp_bytes(M.ModelOptions()) >= scores_bytes
  assert temp_bytes(M.ModelOptions(attention_chunk=128)) < scores_bytes / 2


def test_bfloat16_compute_keeps_float32_params_and_logits():
  spec = tiny_spec()
  model = M.Transformer(spec, M.ModelOptions(dtype="bfloat16", param_dtype="float32"))
  params = init_params(model, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  tokens_BT = jnp.zeros((1, 4), jnp.int32)
  logits = forward(model, params, tokens_BT)
  assert logits.dtype == jnp.float32
  ref = forward(M.Transformer(spec), params, tokens_BT)
  assert float(jnp.abs(logits - ref).max()) < 0.05


def test_llama3_rope_scaling_only_changes_low_frequencies():
  plain = M.rope_inv_frequencies(tiny_spec(rope_scaling="none", d_head=64, rope_theta=500000.0))
  scaled = M.rope_inv_frequencies(tiny_spec(rope_scaling="llama3", d_head=64, rope_theta=500000.0))
  wavelen = 2 * np.pi / np.asarray(plain)
  high = wavelen < 8192 / 4
  low = wavelen > 8192
  np.testing.assert_allclose(scaled[high], plain[high])
  np.testing.assert_allclose(scaled[low], plain[low] / 32, rtol=1e-6)
  assert np.all(np.asarray(scaled) <= np.asarray(plain) + 1e-12)


def test_rope_is_relative():
  """Scores depend on position differences only: shifting every position changes nothing."""
  inv_freq = M.rope_inv_frequencies(tiny_spec())
  q = jax.random.normal(jax.random.key(0), (1, 5, 2, 16))
  k = jax.random.normal(jax.random.key(1), (1, 5, 2, 16))
  pos = jnp.arange(5)[None]

  def scores(shift):
    qr, kr = M.apply_rope(q, pos + shift, inv_freq), M.apply_rope(k, pos + shift, inv_freq)
    return jnp.einsum("btnh,bsnh->bnts", qr, kr)

  np.testing.assert_allclose(scores(0), scores(37), atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(dtype="fp8"), "compute.dtype"), (dict(param_dtype="int8"), "compute.param_dtype"),
     (dict(remat="some"), "compute.remat"), (dict(attention="flash"), "compute.attention"),
     (dict(attention_chunk=-1), "compute.attention_chunk")])
def test_invalid_options_raise_naming_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    M.ModelOptions(**kwargs)


def test_sequence_and_cache_limits_are_enforced():
  spec = tiny_spec(max_seq_len=16)
  model = M.Transformer(spec)
  params = init_params(model, jax.random.key(0))
  with pytest.raises(ValueError, match="max_seq_len"):
    forward(model, params, jnp.zeros((1, 17), jnp.int32))
  with pytest.raises(ValueError, match="max_seq_len"):
    M.init_cache(spec, 1, 17)
  with pytest.raises(ValueError, match="shorter than the prompt"):
    prefill(model, params, jnp.zeros((1, 8), jnp.int32), max_len=4)
