"""Generation: greedy equals a naive loop, in-place cache, eos, sampling, request checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from archscale.core import config_lib
from archscale.model import transformer as M
from archscale.model.arch import ArchSpec
from archscale.serve import generate as G

# Untied head and enlarged weights: greedy continuations vary from token to token, so a wrong
# cache position, mask or sampling step changes the output.
SPEC = ArchSpec.from_dict(config_lib.ARCHS["demo"]).replace(tie_embeddings=False)
N_NEW = 12



@pytest.fixture(scope="module")
def setup():
  model = M.Transformer(SPEC, M.ModelOptions())
  params = jax.jit(lambda rng: M.init_params(model, rng))(jax.random.key(0))
  params = jax.tree.map(lambda x: x * 20 if x.ndim >= 2 else x, params)
  prompt_BT = jax.random.randint(jax.random.key(1), (3, 7), 0, SPEC.vocab_size)
  return model, params, prompt_BT


def naive_greedy(model, params, prompt_BT, n_new):
  """Reruns the full causal forward for every new token (no cache).

  The sequence lives in a buffer of the positions it feeds (the last token is only predicted),
  so one compiled forward serves every step; causality makes the logits at position t
  independent of the (zero) tokens after it.
  """
  b, t = prompt_BT.shape
  forward = jax.jit(lambda p, x: M.forward(model, p, x))
  tokens_BS = jnp.zeros((b, t + n_new - 1), jnp.int32).at[:, :t].set(prompt_BT)
  new = []
  for i in range(n_new):
    new.append(jnp.argmax(forward(params, tokens_BS)[:, t + i - 1], axis=-1).astype(jnp.int32))
    if t + i < tokens_BS.shape[1]:
      tokens_BS = tokens_BS.at[:, t + i].set(new[-1])
  return np.stack(new, axis=1)


def test_greedy_generate_equals_full_forward_loop(setup):
  model, params, prompt_BT = setup
  out = G.generate(params, SPEC, prompt_BT, N_NEW)
  expected = naive_greedy(model, params, prompt_BT, N_NEW)
  assert len(np.unique(expected)) > N_NEW  # the check can tell positions apart
  np.testing.assert_array_equal(np.asarray(out.tokens_BO), expected)
  np.testing.assert_array_equal(np.asarray(out.lengths_B), [N_NEW] * 3)
  assert int(out.cache.end) == out.cache.max_len == prompt_BT.shape[1] + N_NEW - 1


def test_generation_may_fill_the_context_exactly(setup):
  model, params, _ = setup
  prompt_BT = jax.random.randint(jax.random.key(2), (1, SPEC.max_seq_len - N_NEW + 1), 0,
                                 SPEC.vocab_size)
  out = G.generate(params, SPEC, prompt_BT, N_NEW)  # feeds positions up to max_seq_len - 1
  np.testing.assert_array_equal(np.asarray(out.tokens_BO),
                                naive_greedy(model, params, prompt_BT, N_NEW))
  with pytest.raises(ValueError, match="max_seq_len"):
    G.generate(params, SPEC, prompt_BT, N_NEW + 1)


def test_unrolled_model_generates_the_same(setup):
  _, params, prompt_BT = setup
  options = M.ModelOptions(scan_layers=False)
  flat = G.unstack_layers(params, SPEC.n_layers)
  assert "layers" not in flat and "layers_1" in flat
  out = G.generate(flat, SPEC, prompt_BT, N_NEW, options=options)
  ref = G.generate(params, SPEC, prompt_BT, N_NEW)
  np.testing.assert_array_equal(np.asarray(out.tokens_BO), np.asarray(ref.tokens_BO))


def test_generation_makes_no_copy_of_the_kv_cache(setup):
  _, params, _ = setup
  batch, prompt, max_len = 16, 8, SPEC.max_seq_len  # the cache dominates the program's memory
  options = M.ModelOptions(scan_layers=True)  # training's layout; generation unrolls it
  cache = M.init_cache(SPEC, batch, max_len, jnp.float32)
  cache_bytes = sum(x.nbytes for x in cache.k_BKSH + cache.v_BKSH)
  program = G.generate_program.lower(
      G.unstack_layers(params, SPEC.n_layers), jnp.zeros((batch, prompt), jnp.int32), cache,
      jax.random.key(0), jnp.int32(8), spec=SPEC, prefill_options=G.decode_model_options(options),
      decode_options=G.decode_model_options(options), sampler=G.Sampler()).compile()
  memory = program.memory_analysis()
  assert memory.alias_size_in_bytes >= cache_bytes  # the donated cache is updated in place
  assert memory.temp_size_in_bytes < cache_bytes  # a scanned prefill took 2.1x: stack + split


def test_chunked_prefill_attention_generates_the_same(setup):
  _, params, prompt_BT = setup
  out = G.generate(params, SPEC, prompt_BT, N_NEW, options=M.ModelOptions(attention_chunk=3))
  ref = G.generate(params, SPEC, prompt_BT, N_NEW)
  np.testing.assert_array_equal(np.asarray(out.tokens_BO), np.asarray(ref.tokens_BO))


def test_one_program_per_shape(setup):
  _, params, prompt_BT = setup
  G.generate(params, SPEC, prompt_BT, N_NEW)
  before = G.generate_program._cache_size()
  G.generate(params, SPEC, prompt_BT + 1, N_NEW)
  G.generate(params, SPEC, prompt_BT, N_NEW, rng=jax.random.key(3))
  assert G.generate_program._cache_size() == before
  empty = G.generate(params, SPEC, prompt_BT, 0)
  assert empty.tokens_BO.shape == (3, 0) and int(empty.cache.end) == prompt_BT.shape[1]


def test_eos_stops_rows_unless_ignored(setup):
  _, params, prompt_BT = setup
  greedy = np.asarray(G.generate(params, SPEC, prompt_BT, N_NEW).tokens_BO)
  eos = int(greedy[0, 4])
  out = G.generate(params, SPEC, prompt_BT, N_NEW, G.Sampler(eos_id=eos))
  tokens, lengths = np.asarray(out.tokens_BO), np.asarray(out.lengths_B)
  for row in range(3):
    hits = np.flatnonzero(greedy[row] == eos)
    length = hits[0] + 1 if hits.size else N_NEW
    assert lengths[row] == length
    np.testing.assert_array_equal(tokens[row, :length], greedy[row, :length])
    assert (tokens[row, length:] == eos).all()
  assert lengths[0] == np.flatnonzero(greedy[0] == eos)[0] + 1 <= 5
  ignored = G.generate(params, SPEC, prompt_BT, N_NEW, G.Sampler(eos_id=eos, ignore_eos=True))
  np.testing.assert_array_equal(np.asarray(ignored.tokens_BO), greedy)
  np.testing.assert_array_equal(np.asarray(ignored.lengths_B), [N_NEW] * 3)


def test_sampling_respects_temperature_top_k_and_top_p(setup):
  _, params, prompt_BT = setup
  greedy = G.generate(params, SPEC, prompt_BT, N_NEW).tokens_BO
  top1 = G.generate(params, SPEC, prompt_BT, N_NEW, G.Sampler(temperature=1.0, top_k=1),
                    rng=jax.random.key(7))
  np.testing.assert_array_equal(np.asarray(top1.tokens_BO), np.asarray(greedy))
  hot = G.Sampler(temperature=2.0)
  a = G.generate(params, SPEC, prompt_BT, N_NEW, hot, rng=jax.random.key(7)).tokens_BO
  b = G.generate(params, SPEC, prompt_BT, N_NEW, hot, rng=jax.random.key(7)).tokens_BO
  c = G.generate(params, SPEC, prompt_BT, N_NEW, hot, rng=jax.random.key(8)).tokens_BO
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))

  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits_BV = jnp.tile(jnp.log(jnp.asarray(probs))[None], (2000, 1))
  rng = jax.random.key(0)
  draw = lambda s: np.asarray(G.sample_logits(logits_BV, rng, s))
  assert set(draw(G.Sampler(temperature=1.0, top_k=3))) == {0, 1, 2}
  nucleus = draw(G.Sampler(temperature=1.0, top_p=0.7))
  assert set(nucleus) == {0, 1}
  assert abs((nucleus == 0).mean() - 0.625) < 0.05  # renormalised 0.5 / 0.8
  assert set(draw(G.Sampler(temperature=1.0, top_p=0.5))) == {0}
  full = draw(G.Sampler(temperature=1.0))
  assert abs((full == 3).mean() - 0.05) < 0.02
  cold = draw(G.Sampler(temperature=0.05))
  assert (cold == 0).mean() > 0.99


def test_invalid_requests_raise():
  with pytest.raises(ValueError, match="temperature"):
    G.Sampler(temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    G.Sampler(top_p=0.0)
  with pytest.raises(ValueError, match="top_k"):
    G.Sampler(top_k=-2)
  params = {}
  with pytest.raises(ValueError, match="max_seq_len"):
    G.generate(params, SPEC, jnp.zeros((1, 500), jnp.int32), 100)
  with pytest.raises(ValueError, match="integer"):
    G.generate(params, SPEC, jnp.zeros((1, 5)), 3)
