"""Hugging Face LLaMA directories: export a run, import one as archscale parameters.

`python -m archscale.main --config=configs/X.py --mode=export --workdir=DIR` writes DIR/hf/:

  config.json                   LlamaForCausalLM: explicit head_dim, GQA, rope scaling, tying, dtype
  model.safetensors             the weights (above `export.max_shard_mb`: model-0000i-of-0000n
                                .safetensors and model.safetensors.index.json)
  generation_config.json        the EOS id (also the pad id), greedy, max_length = the context
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                the run's tokenizer (adding no BOS, as in training); the byte
                                tokenizer as an equivalent byte-level one (ids 1..255 = those
                                bytes, id 0 = EOS); pad = EOS, padding on the left, and the
                                EOS token's literal text encoded as text (split_special_tokens),
                                as in training

The directory loads with `AutoModelForCausalLM` / `AutoTokenizer` (and vLLM, SGLang,
lm-evaluation-harness). The mapping is exact: every archscale weight is a transpose or reshape of
one HF tensor; both rotate the halves (i, i + H/2) of each head, so no permutation is needed.
transformers 5.4 and later refuse a config whose hidden_size is not a multiple of
num_attention_heads even with head_dim set (every Panda and Surefire shape; upstream issue 46082),
so the `hf` extra allows 5.0-5.3, which load them.

Import (`train.init_from`) is archscale.model.hf_format's, re-exported here: `spec_from_hf(path)`
reads the ArchSpec from config.json and `load_params(path, spec)` the weights, in archscale's
layout. Only numpy, safetensors and tokenizers are needed here; torch and transformers only to use
the result.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any

import numpy as np
from absl import logging

from archscale.core import config_lib, io, settings
from archscale.model.arch import ArchSpec
from archscale.model.hf_format import (  # noqa: F401 - the import side of the HF interface
  CONFIG_FILE,
  DTYPES,
  INDEX_FILE,
  WEIGHTS_FILE,
  check_transformers,
  llama_config,
  load_params,
  place_params,
  save_weights,
  spec_from_hf,
  spec_from_llama_config,
  to_hf_state_dict,
)

BYTE_EOS = "<|endoftext|>"


# --------------------------------------------------------------------------------- tokenizer


def _byte_chars() -> list[str]:
  """The byte-level alphabet: byte b as a printable character (GPT-2's mapping)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


def byte_tokenizer_json() -> str:
  """tokenizer.json equivalent to archscale's byte tokenizer: ids 1..255 are those UTF-8 bytes.

  Id 0 is the EOS token `BYTE_EOS` (archscale's byte tokenizer drops NUL from text and uses
  id 0 as the document end). No merges, so every byte is one token, exactly as in training.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

  chars = _byte_chars()
  vocab = {BYTE_EOS: 0, **{chars[b]: b for b in range(1, 256)}}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(BYTE_EOS, special=True, normalized=False)])
  return tok.to_str(pretty=True)


def write_tokenizer(tokenizer: Any, out_dir: pathlib.Path, max_len: int) -> dict[str, Any]:
  """tokenizer.json plus the HF configs for an archscale tokenizer; returns the special ids."""
  if tokenizer.kind == "byte":
    (out_dir / "tokenizer.json").write_text(byte_tokenizer_json())
    eos_token = BYTE_EOS
  else:
    # Without the post-processor: archscale trains with no BOS or template tokens, so the HF
    # tokenizer must not add them either.
    raw = json.loads(pathlib.Path(tokenizer.path).read_text(encoding="utf-8"))
    raw["post_processor"] = None
    (out_dir / "tokenizer.json").write_text(json.dumps(raw, ensure_ascii=False))
    eos_token = tokenizer.eos_token
  # Padding with EOS on the left (a decoder generates after the prompt); the EOS token's literal
  # text in a prompt stays text, as archscale's tokenizers encode it in training.
  special = {"eos_token": eos_token, "pad_token": eos_token}
  (out_dir / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len,
      "padding_side": "left", "split_special_tokens": True,
      "clean_up_tokenization_spaces": False}, indent=2) + "\n")
  (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
  return {"eos_token_id": tokenizer.eos_id}


# ------------------------------------------------------------------------------------ export


def export(params: dict, spec: ArchSpec, out_dir: str | pathlib.Path, tokenizer: Any = None, *,
           dtype: str = "float32", max_shard_bytes: int = 5 * 10**9) -> pathlib.Path:
  """Writes an HF LLaMA directory (see the module docstring); replaces `out_dir` when complete.

  `tokenizer` is an `archscale.data.tokenizer.Tokenizer` (None: weights and configs only).
  """
  import ml_dtypes

  if dtype not in DTYPES:
    raise ValueError(f"export.dtype must be one of {DTYPES}, got {dtype!r}")
  if tokenizer is not None and tokenizer.vocab_size > spec.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                     f"{spec.vocab_size}")
  out_dir = pathlib.Path(out_dir)
  for stale in io.dead_temporaries(out_dir):  # left by an export that was killed
    shutil.rmtree(stale, ignore_errors=True)
  tmp = io.temporary_name(out_dir)
  tmp.mkdir(parents=True)
  np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
  tensors = {k: v.astype(np_dtype) for k, v in to_hf_state_dict(params, spec).items()}
  save_weights(tensors, tmp, max_shard_bytes)
  ids = {} if tokenizer is None else write_tokenizer(tokenizer, tmp, spec.max_seq_len)
  config = llama_config(spec, dtype, eos_token_id=ids.get("eos_token_id"))
  (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  generation = {"eos_token_id": ids.get("eos_token_id"), "pad_token_id": ids.get("eos_token_id"),
                "do_sample": False, "max_length": spec.max_seq_len}
  (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  mode = 0o666 & ~_umask()  # safetensors writes 0600; every file follows the umask instead
  for path in tmp.iterdir():
    path.chmod(mode)
  shutil.rmtree(out_dir, ignore_errors=True)
  tmp.rename(out_dir)
  return out_dir


def _umask() -> int:
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def with_trained_arch(config: Any, arch: dict[str, Any], overrides: dict[str, Any]) -> Any:
  """A copy of `config` whose model is the one the run trained (`arch`). A command-line
  `--config.model.X` that disagrees is a ValueError naming it; other differences (a config
  file without the run's overrides) give way to the trained values, with a log line."""
  config = config.copy_and_resolve_references()
  clash = [f"model.{k}={overrides[f'model.{k}']!r} (trained: {v!r})" for k, v in arch.items()
           if f"model.{k}" in overrides and overrides[f"model.{k}"] != v]
  settings.check(not clash, f"the run was trained with another architecture: {'; '.join(clash)}; "
                 "drop those overrides (export reads the run's own)")
  for key, value in arch.items():
    if key in config.model and config.model[key] != value:
      logging.info("export: model.%s=%r as the run was trained (the config says %r)", key, value,
                   config.model[key])
    config.model[key] = tuple(value) if isinstance(value, list) else value
  return config


def run_tokenizer(config: Any, workdir: pathlib.Path) -> Any:
  """The tokenizer a run trained with: its prepared dataset's, else `data.tokenizer`."""
  from archscale.data import tokenizer as tok_lib

  path = str(config.data.path).strip()
  if not path and str(config.data.get("source", "")).strip():
    path = str(io.as_path(workdir, "--workdir") / "data")  # where --mode=train prepares it
  if path:
    return tok_lib.load_tokenizer(path)
  return tok_lib.load_tokenizer(config.data.tokenizer, eos_token=config.data.eos_token)


def run_export(config: Any, workdir: pathlib.Path, out: pathlib.Path | None = None) -> None:
  """`--mode=export`: the run's checkpoint (`export.step`, 0 = latest) as WORKDIR/hf/ (or the
  local folder `out`: a run in a bucket is read from there and exported here)."""
  import jax

  from archscale.train import recipe as recipe_lib
  from archscale.train import trainer as train_lib

  workdir = io.as_path(workdir, "--workdir")
  e = settings.ExportConfig.from_config(config)
  tokenizer = run_tokenizer(config, workdir)
  config = with_trained_arch(
      config, recipe_lib.trained_recipe(workdir, config, e.step or None)["arch"],
      config_lib.command_line_overrides())
  if not str(config.data.path).strip() and str(config.data.get("source", "")).strip():
    config.data.path = str(workdir / "data")
  state = train_lib.load_checkpoint(workdir, config, e.step or None)
  params = jax.device_get(state["params"])
  out = export(params, ArchSpec.from_config(config), out or workdir / "hf", tokenizer,
               dtype=e.dtype, max_shard_bytes=int(e.max_shard_mb * 10**6))
  print(json.dumps({"exported": str(out), "step": int(jax.device_get(state["step"])),
                    "dtype": e.dtype}))
