"""Export to and import from Hugging Face LLaMA directories, checked against transformers itself."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from archscale.core import config_lib, exits
from archscale.data import prepare as prepare_lib
from archscale.data import tokenizer as tok_lib
from archscale.interop import hf
from archscale.model import hf_format
from archscale.model import transformer as model_lib
from archscale.model.arch import ArchSpec
from archscale.serve import generate
from archscale.train import recipe as recipe_lib
from archscale.train import trainer as train

_BASE = dict(n_layers=2, d_ff=96, vocab_size=256, max_seq_len=64, norm_eps=1e-5)
# (name, shape fields): GQA, MQA, MHA, width n_heads * d_head != d_model (hidden_size not a
# multiple of the head count, the upstream check), and the paper's Panda-1B (72/18 heads of 64 at
# d_model 2560: GQA 4, 4608 != 2560) and Surefire-1B (36/4: GQA 9) scaled down.
SHAPES = {
    "gqa": dict(d_model=64, n_heads=4, n_kv_heads=2, d_head=16, tie_embeddings=True,
                rope_scaling="llama3", rope_theta=500000.0),
    "mqa": dict(d_model=64, n_heads=4, n_kv_heads=1, d_head=16, tie_embeddings=False,
                rope_scaling="none", rope_theta=10000.0),
    "mha": dict(d_model=48, n_heads=3, n_kv_heads=3, d_head=16, tie_embeddings=True,
                rope_scaling="none", rope_theta=10000.0),
    "wide_heads": dict(d_model=40, n_heads=6, n_kv_heads=2, d_head=8, tie_embeddings=False,
                       rope_scaling="llama3", rope_theta=500000.0),
    "panda_mini": dict(d_model=80, n_heads=12, n_kv_heads=3, d_head=8, tie_embeddings=True,
                       rope_scaling="llama3", rope_theta=500000.0),
    "surefire_mini": dict(d_model=80, n_heads=9, n_kv_heads=1, d_head=8, tie_embeddings=False,
                          rope_scaling="llama3", rope_theta=500000.0),
}


def _spec(name: str) -> ArchSpec:
  return ArchSpec(**_BASE, **SHAPES[name])


def _random_params(spec: ArchSpec, seed: int = 0, scan_layers: bool = True) -> dict:
  """Random parameters with O(1) logits and norm scales away from one, so a wrong mapping shows."""
  model = model_lib.Transformer(spec, model_lib.ModelOptions(scan_layers=scan_layers))
  shapes = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def draw(path, x):
    if "scale" in jax.tree_util.keystr(path):
      return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    return (rng.standard_normal(x.shape) / np.sqrt(spec.d_model)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _hf_model(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", list(SHAPES))
def test_export_matches_transformers_logits_and_greedy_generation(tmp_path, name):
  spec = _spec(name)
  params = _random_params(spec)
  # Untied shapes are written in shards of a few KB, so the sharded layout loads too.
  shard = 10**9 if spec.tie_embeddings else 40_000
  out = hf.export(params, spec, tmp_path / "hf", tok_lib.ByteTokenizer(), max_shard_bytes=shard)
  assert (out / hf.INDEX_FILE).exists() == (not spec.tie_embeddings)
  model = _hf_model(out)
  assert model.config.head_dim == spec.d_head
  assert model.model.layers[0].self_attn.q_proj.weight.shape == (spec.n_heads * spec.d_head,
                                                                 spec.d_model)

  tokens_BT = np.random.default_rng(0).integers(1, 256, (2, 24))
  ours = np.asarray(model_lib.forward(model_lib.Transformer(spec), params, jnp.asarray(tokens_BT)))
  with torch.no_grad():
    theirs = model(torch.from_numpy(tokens_BT)).logits.numpy()
  assert np.abs(ours).max() > 1.0  # the comparison is not between near-zero logits
  assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()

  gen = generate.generate(params, spec, jnp.asarray(tokens_BT[:, :8]), 12,
                        options=model_lib.ModelOptions(scan_layers=False))
  with torch.no_grad():
    hf_gen = model.generate(torch.from_numpy(tokens_BT[:, :8]), max_new_tokens=12,
                            do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=12)
  np.testing.assert_array_equal(np.asarray(gen.tokens_BO), hf_gen[:, 8:].numpy())


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("name", ["wide_heads", "panda_mini"])
def test_round_trip_is_bitwise(tmp_path, name, scan_layers):
  spec = _spec(name)
  params = _random_params(spec, seed=3, scan_layers=scan_layers)
  out = hf.export(params, spec, tmp_path / "hf", max_shard_bytes=30_000)
  assert hf.spec_from_hf(out) == spec
  back = hf.load_params(out, spec, scan_layers=scan_layers)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_import_then_export_reproduces_transformers_files(tmp_path, dtype):
  """A directory transformers wrote (its own config format) comes back tensor for tensor."""
  spec = _spec("surefire_mini")
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
      num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
      num_key_value_heads=spec.n_kv_heads, head_dim=spec.d_head, tie_word_embeddings=False,
      rms_norm_eps=spec.norm_eps, max_position_embeddings=spec.max_seq_len,
      rope_parameters={"rope_type": "llama3", "rope_theta": spec.rope_theta,
                       **model_lib.LLAMA3_ROPE_SCALING})
  original = transformers.LlamaForCausalLM(config).to(getattr(torch, dtype))
  with torch.no_grad():  # transformers initialises norms to ones: make them informative
    for name, p in original.named_parameters():
      if "norm" in name:
        p.add_(torch.randn_like(p) * 0.1)
  original.save_pretrained(tmp_path / "orig")
  assert hf.spec_from_hf(tmp_path / "orig") == spec

  params = hf.load_params(tmp_path / "orig")
  out = hf.export(params, spec, tmp_path / "again", dtype=dtype)
  want, got = load_file(str(tmp_path / "orig" / hf.WEIGHTS_FILE)), hf_format.load_weights(out)
  assert sorted(want) == sorted(got)
  for name, w in want.items():
    assert got[name].dtype == w.dtype, name
    np.testing.assert_array_equal(got[name].view(np.uint8), w.view(np.uint8), err_msg=name)
  if dtype == "bfloat16":
    assert want["model.norm.weight"].dtype == ml_dtypes.bfloat16


def test_byte_tokenizer_loads_in_transformers_with_the_same_ids(tmp_path):
  spec = _spec("gqa")
  out = hf.export(_random_params(spec), spec, tmp_path / "hf", tok_lib.ByteTokenizer())
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = tok_lib.ByteTokenizer()
  for text in ["Hello, world!", "  two  spaces\nnew line", "naïve café — ünïcödé ✓ 日本"]:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == ours.encode(text)
    assert tok.decode(ids) == text
  assert tok.eos_token_id == ours.eos_id == 0
  assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 0
  assert json.loads((out / "config.json").read_text())["eos_token_id"] == 0


def test_an_export_works_in_transformers_pipelines_as_they_are_used(tmp_path):
  """Default generation runs past 20 tokens, batches pad, the EOS token's literal text in a
  prompt is text (as archscale trained on it), and files follow the umask."""
  spec = dataclasses.replace(_spec("gqa"), max_seq_len=64)
  old = os.umask(0o022)
  try:
    out = hf.export(_random_params(spec, seed=1), spec, tmp_path / "hf", tok_lib.ByteTokenizer())
  finally:
    os.umask(old)
  assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}
  tok = transformers.AutoTokenizer.from_pretrained(out)
  text = "a <|endoftext|> b"
  assert tok(text)["input_ids"] == tok_lib.ByteTokenizer().encode(text)
  assert tok.pad_token_id == tok.eos_token_id == 0

  generator = transformers.pipeline("text-generation", model=str(out), dtype=torch.float32)
  prompts = ["the light", "and it was so, and"]
  alone = [generator(p, return_full_text=False)[0]["generated_text"] for p in prompts]
  assert all(len(tok(g)["input_ids"]) > 20 for g in alone), alone
  model = generator.model  # a padded batch generates what each prompt does alone
  with torch.no_grad():
    batched = model.generate(**tok(prompts, return_tensors="pt", padding=True),
                             max_new_tokens=20)[:, -20:]
    for prompt, row in zip(prompts, batched, strict=True):
      one = model.generate(**tok([prompt], return_tensors="pt"), max_new_tokens=20)[0, -20:]
      assert torch.equal(row, one)


def test_hf_tokenizer_is_copied_with_its_eos(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<unk>": 0, "<|end_of_text|>": 1, **{c: i + 2 for i, c in enumerate("abc ")}}
  raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
  raw.save(str(tmp_path / "tokenizer.json"))
  ours = tok_lib.load_tokenizer(str(tmp_path / "tokenizer.json"))
  spec = _spec("mha")
  out = hf.export(_random_params(spec), spec, tmp_path / "hf", ours)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok.eos_token == "<|end_of_text|>" and tok.eos_token_id == ours.eos_id == 1
  assert tok("abc", add_special_tokens=False)["input_ids"] == ours.encode("abc")


def test_config_errors_name_the_field(tmp_path):
  good = hf.llama_config(_spec("gqa"))
  assert hf.spec_from_llama_config(good) == _spec("gqa")
  for change, field in [({"model_type": "mistral"}, "model_type"),
                        ({"hidden_act": "gelu"}, "hidden_act"),
                        ({"attention_bias": True}, "attention_bias"),
                        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
                        ({"rope_scaling": {**good["rope_scaling"], "factor": 8.0}}, "rope")]:
    with pytest.raises(ValueError, match=field):
      hf.spec_from_llama_config({**good, **change})
  with pytest.raises(ValueError, match="init_from"):
    hf.spec_from_hf(tmp_path)
  spec = _spec("gqa")
  out = hf.export(_random_params(spec), spec, tmp_path / "hf")
  with pytest.raises(ValueError, match="n_kv_heads"):
    hf.load_params(out, spec.replace(n_kv_heads=4))
  with pytest.raises(ValueError, match="export.dtype"):
    hf.export(_random_params(spec), spec, tmp_path / "x", dtype="int8")


TABLE_1 = ["llama3_2_1b", "panda_1b", "surefire_1b", "llama3_2_3b", "panda_3b", "surefire_3b"]


@pytest.mark.parametrize("name", TABLE_1)
def test_hf_peer_builds_every_table_1_shape(name):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))
  import hf_peer

  spec = ArchSpec(**config_lib.ARCHS[name])
  config = hf_peer.llama_config(spec, 4096, attn_implementation="sdpa")
  assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (
      spec.d_model, spec.n_heads, spec.d_head)
  assert config.max_position_embeddings == 4096
  with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
  assert sum(p.numel() for p in model.parameters()) == spec.params_total
  assert model.model.layers[0].self_attn.o_proj.weight.shape == (spec.d_model,
                                                                 spec.n_heads * spec.d_head)


def test_newer_transformers_is_refused_with_the_fix():
  panda = ArchSpec(**config_lib.ARCHS["panda_1b"])
  hf.check_transformers(panda)  # the installed release (the hf extra's range) loads it
  hf.check_transformers(ArchSpec(**config_lib.ARCHS["llama3_2_1b"]), "5.24.0")
  with pytest.raises(ValueError, match=r"transformers>=5.0,<5.4"):
    hf.check_transformers(panda, "5.4.0")


def test_export_mode_writes_a_run_checkpoint_that_transformers_reproduces(tmp_path):
  """--mode=export on a trained run: the directory reproduces the checkpoint's logits."""
  text = "\n\n".join(f"verse {i}: and the light was good, and it was so." for i in range(200))
  (tmp_path / "corpus.txt").write_text(text)
  prepare_lib.prepare(str(tmp_path / "corpus.txt"), tmp_path / "data", tokenizer="byte",
                   text_docs="paragraph", eval_fraction=0.05)
  config = config_lib.make_config("demo")
  config.model.update(d_model=40, d_ff=64, n_layers=2, n_heads=6, n_kv_heads=2, d_head=8,
                      max_seq_len=64, tie_embeddings=False)
  config.data.path = str(tmp_path / "data")
  config.data.seq_len = 32
  config.train.update(steps=4, global_batch_size=4, warmup_steps=1, eval_batches=0,
                      checkpoint_every=2, log_every=1)
  config.export.dtype = "float32"
  workdir = tmp_path / "run"
  trained = config.copy_and_resolve_references()
  trained.model.rope_theta = 500.0  # an override the export's config below leaves out
  train.train(trained, workdir)
  hf.run_export(config, workdir)
  assert json.loads((workdir / "hf" / hf.CONFIG_FILE).read_text())["rope_theta"] == 500.0
  config = trained

  spec = ArchSpec.from_config(config)
  params = jax.tree.map(np.asarray, train.load_checkpoint(workdir, config)["params"])
  assert hf.spec_from_hf(workdir / "hf") == spec
  for got, want in zip(jax.tree.leaves(hf.load_params(workdir / "hf", spec)),
                       jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(got, want)
  model = _hf_model(workdir / "hf")
  tok = transformers.AutoTokenizer.from_pretrained(workdir / "hf")
  ids = tok("and the light", add_special_tokens=False)["input_ids"]
  ours = np.asarray(model_lib.forward(model_lib.Transformer(spec), params, jnp.asarray([ids])))
  with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits.numpy()
  assert np.abs(ours - theirs).max() <= 1e-5 * np.abs(theirs).max()

  config.export.step = 2  # a chosen, earlier checkpoint
  hf.run_export(config, workdir)
  early = hf.load_params(workdir / "hf", spec)
  assert not np.array_equal(early["embedding"], params["embedding"])
  config.export.dtype = "int4"
  with pytest.raises(ValueError, match="export.dtype"):
    hf.run_export(config, workdir)


def test_export_refuses_a_model_override_the_run_was_not_trained_with(dataset, tmp_path):
  config = config_lib.make_config("demo")
  config.model.update(d_model=32, d_ff=64, n_layers=1, n_heads=4, n_kv_heads=2, d_head=8,
                      max_seq_len=32)
  config.data.path, config.data.seq_len = str(dataset), 16
  config.train.update(steps=2, global_batch_size=2, warmup_steps=1, eval_batches=0,
                      checkpoint_every=2)
  workdir = tmp_path / "run"
  train.train(config, workdir)
  path = config_lib.write_config_py(tmp_path / "c.py", config, "The run's config.")
  proc = subprocess.run(
      [sys.executable, "-m", "archscale.main", f"--config={path}", "--mode=export",
       f"--workdir={workdir}", "--config.model.rope_theta=20000.0", "--config.model.d_ff=64"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == exits.EXIT_FAILED
  (line,) = [x for x in proc.stderr.splitlines() if "another architecture" in x]
  assert "model.rope_theta=20000.0 (trained: 10000.0)" in line and "d_ff" not in line
  assert "Traceback" not in proc.stderr and not (workdir / "hf").exists()


def test_train_init_from_starts_a_run_from_an_hf_directory(tmp_path):
  spec = _spec("panda_mini")
  source = hf.export(_random_params(spec, seed=5), spec, tmp_path / "src")
  text = "\n\n".join(f"line {i}: the quick brown fox jumps over the lazy dog." for i in range(200))
  (tmp_path / "corpus.txt").write_text(text)
  prepare_lib.prepare(str(tmp_path / "corpus.txt"), tmp_path / "data", tokenizer="byte",
                   text_docs="paragraph", eval_fraction=0.05)
  config = config_lib.make_config("demo")  # its model section (d_model 64, ...) is not spec's
  config.data.path = str(tmp_path / "data")
  config.data.seq_len = 32
  config.train.update(steps=1, global_batch_size=4, lr=1e-9, warmup_steps=0, weight_decay=0.0,
                      eval_batches=0, checkpoint_every=1, init_from=str(source))
  summary = train.train(config, tmp_path / "run")
  assert summary["arch"] == spec.to_dict()
  assert recipe_lib.run_recipe(hf_format.with_init_from(config), spec)["init_from"] == str(source)
  state = train.load_checkpoint(tmp_path / "run", hf_format.with_init_from(config))
  for got, want in zip(jax.tree.leaves(state["params"]),
                       jax.tree.leaves(hf.load_params(source, spec)), strict=True):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6)

  scratch = config_lib.make_config("demo")  # runs from scratch keep recipes without the key
  assert "init_from" not in recipe_lib.run_recipe(scratch, ArchSpec.from_config(scratch))
