"""Hugging Face LLaMA directories: export a run, import one as archscale parameters.

`python -m archscale.main --config=configs/X.py --mode=export --workdir=DIR` writes DIR/hf/:

  config.json                   LlamaForCausalLM: explicit head_dim, GQA, rope scaling, tying, dtype
  model.safetensors             the weights (above `export.max_shard_mb`: model-0000i-of-0000n
                                .safetensors and model.safetensors.index.json)
  generation_config.json        the EOS id, greedy by default
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
                                the run's tokenizer (adding no BOS, as in training); the byte
                                tokenizer as an equivalent byte-level one (ids 1..255 = those
                                bytes, id 0 = EOS)

The directory loads with `AutoModelForCausalLM` / `AutoTokenizer` (and vLLM, SGLang,
lm-evaluation-harness). The mapping is exact: every archscale weight is a transpose or reshape of
one HF tensor; both rotate the halves (i, i + H/2) of each head, so no permutation is needed.
transformers 5.4 and later refuse a config whose hidden_size is not a multiple of
num_attention_heads even with head_dim set (every Panda and Surefire shape; upstream issue 46082),
so the `hf` extra allows 5.0-5.3, which load them.

Import (`train.init_from`): `spec_from_hf(path)` reads the ArchSpec from config.json and
`load_params(path, spec)` the weights, in archscale's layout (scanned or per-layer);
`place_params` puts them on a train state's shardings. Only numpy, safetensors and tokenizers
are needed here; torch and transformers only to use the result.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil
from typing import Any

import numpy as np

from archscale import model as model_lib
from archscale import settings
from archscale.arch import ArchSpec

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = settings.EXPORT_DTYPES
BYTE_EOS = "<|endoftext|>"


# ------------------------------------------------------------------------------------ config


def llama_config(spec: ArchSpec, dtype: str = "float32",
                 eos_token_id: int | None = None) -> dict[str, Any]:
  """config.json of a LlamaForCausalLM with the spec's shapes (legacy rope keys, as LLaMA-3.2)."""
  if dtype not in DTYPES:
    raise ValueError(f"export.dtype must be one of {DTYPES}, got {dtype!r}")
  rope_scaling = None
  if spec.rope_scaling == "llama3":
    rope_scaling = {"rope_type": "llama3", **model_lib.LLAMA3_ROPE_SCALING}
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": spec.vocab_size, "hidden_size": spec.d_model,
      "intermediate_size": spec.d_ff, "num_hidden_layers": spec.n_layers,
      "num_attention_heads": spec.n_heads, "num_key_value_heads": spec.n_kv_heads,
      "head_dim": spec.d_head, "hidden_act": "silu", "rms_norm_eps": spec.norm_eps,
      "max_position_embeddings": spec.max_seq_len, "rope_theta": spec.rope_theta,
      "rope_scaling": rope_scaling, "tie_word_embeddings": spec.tie_embeddings,
      "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
      "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True,
      "bos_token_id": None, "eos_token_id": eos_token_id, "torch_dtype": dtype,
  }


def spec_from_llama_config(cfg: dict[str, Any], where: str = CONFIG_FILE) -> ArchSpec:
  """The ArchSpec of a LLaMA-architecture config.json; anything archscale cannot run is an error."""
  if cfg.get("model_type") != "llama":
    raise ValueError(f"{where}: model_type is {cfg.get('model_type')!r}; train.init_from takes "
                     "a LLaMA-architecture directory (model_type 'llama')")
  for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
    if cfg.get(key, ok) != ok:
      raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported (archscale's decoder has "
                       f"{key}={ok!r})")
  rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
  theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    scaling = "none"
  elif kind == "llama3" and all(
      math.isclose(float(rope.get(k, math.nan)), v) for k, v in
      model_lib.LLAMA3_ROPE_SCALING.items()):
    scaling = "llama3"
  else:
    raise ValueError(f"{where}: rope scaling {rope} is not supported; archscale runs no scaling "
                     f"or llama3 with {model_lib.LLAMA3_ROPE_SCALING}")
  n_heads = cfg["num_attention_heads"]
  return ArchSpec(
      d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
      n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
      d_head=cfg.get("head_dim") or cfg["hidden_size"] // n_heads, d_ff=cfg["intermediate_size"],
      vocab_size=cfg["vocab_size"], tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      rope_theta=float(theta), rope_scaling=scaling, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      max_seq_len=cfg.get("max_position_embeddings", 2048))


def spec_from_hf(path: str | pathlib.Path) -> ArchSpec:
  """The ArchSpec of an HF LLaMA directory (its config.json)."""
  file = pathlib.Path(path) / CONFIG_FILE
  if not file.is_file():
    raise ValueError(f"train.init_from={str(path)!r} has no {CONFIG_FILE}: give a local Hugging "
                     "Face LLaMA directory")
  return spec_from_llama_config(json.loads(file.read_text()), str(file))


def check_transformers(spec: ArchSpec, version: str | None = None) -> None:
  """Raises early, with the fix, where transformers (`version`: the installed one) cannot load
  `spec`'s shape."""
  if version is None:
    import transformers

    version = transformers.__version__
  major, minor = (int(x) for x in version.split(".")[:2])
  if spec.d_model % spec.n_heads and (major, minor) >= (5, 4):
    raise ValueError(
        f"transformers {version} refuses hidden_size={spec.d_model} with "
        f"num_attention_heads={spec.n_heads} (not a multiple) even with head_dim="
        f"{spec.d_head} (upstream issue 46082); install the hf extra's range: "
        "pip install 'transformers>=5.0,<5.4'")


# ----------------------------------------------------------------------------------- weights


def _layer(params: dict, i: int) -> dict:
  """Layer i's weights, from a scanned ("layers", stacked) or a per-layer ("layers_i") tree."""
  if "layers" in params:
    return {k: {n: np.asarray(w)[i] for n, w in v.items()} for k, v in params["layers"].items()}
  return params[f"layers_{i}"]


def to_hf_state_dict(params: dict, spec: ArchSpec) -> dict[str, np.ndarray]:
  """HF tensor name -> array ([out, in] weights), in the parameters' dtype."""
  d, n, k, h = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_head
  out = {"model.embed_tokens.weight": np.asarray(params["embedding"]),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
  if not spec.tie_embeddings:
    out["lm_head.weight"] = np.asarray(params["lm_head"]).T
  for i in range(spec.n_layers):
    layer, pre = _layer(params, i), f"model.layers.{i}."
    attn, mlp = layer["attn"], layer["mlp"]
    out.update({
        pre + "input_layernorm.weight": np.asarray(layer["attn_norm"]["scale"]),
        pre + "post_attention_layernorm.weight": np.asarray(layer["mlp_norm"]["scale"]),
        pre + "self_attn.q_proj.weight": np.asarray(attn["q"]).reshape(d, n * h).T,
        pre + "self_attn.k_proj.weight": np.asarray(attn["k"]).reshape(d, k * h).T,
        pre + "self_attn.v_proj.weight": np.asarray(attn["v"]).reshape(d, k * h).T,
        pre + "self_attn.o_proj.weight": np.asarray(attn["o"]).reshape(n * h, d).T,
        pre + "mlp.gate_proj.weight": np.asarray(mlp["gate"]).T,
        pre + "mlp.up_proj.weight": np.asarray(mlp["up"]).T,
        pre + "mlp.down_proj.weight": np.asarray(mlp["down"]).T,
    })
  return {name: np.ascontiguousarray(w) for name, w in out.items()}


def from_hf_state_dict(tensors: dict[str, np.ndarray], spec: ArchSpec, *,
                       scan_layers: bool = True, dtype: Any = np.float32) -> dict:
  """archscale parameters from HF tensors (the inverse of `to_hf_state_dict`), cast to `dtype`."""
  d, n, k, h = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_head

  def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
      raise ValueError(f"the weights have no tensor {name!r} (an HF LLaMA checkpoint of this "
                       "config.json has one)")
    if tuple(tensors[name].shape) != shape:
      raise ValueError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}; config.json "
                       f"implies {shape}")
    return np.asarray(tensors[name]).astype(dtype)

  def layer(i: int) -> dict:
    pre = f"model.layers.{i}."
    return {
        "attn_norm": {"scale": get(pre + "input_layernorm.weight", (d,))},
        "mlp_norm": {"scale": get(pre + "post_attention_layernorm.weight", (d,))},
        "attn": {"q": get(pre + "self_attn.q_proj.weight", (n * h, d)).T.reshape(d, n, h),
                 "k": get(pre + "self_attn.k_proj.weight", (k * h, d)).T.reshape(d, k, h),
                 "v": get(pre + "self_attn.v_proj.weight", (k * h, d)).T.reshape(d, k, h),
                 "o": get(pre + "self_attn.o_proj.weight", (d, n * h)).T.reshape(n, h, d)},
        "mlp": {"gate": get(pre + "mlp.gate_proj.weight", (spec.d_ff, d)).T,
                "up": get(pre + "mlp.up_proj.weight", (spec.d_ff, d)).T,
                "down": get(pre + "mlp.down_proj.weight", (d, spec.d_ff)).T},
    }

  params: dict[str, Any] = {
      "embedding": get("model.embed_tokens.weight", (spec.vocab_size, d)),
      "final_norm": {"scale": get("model.norm.weight", (d,))}}
  if not spec.tie_embeddings:
    params["lm_head"] = get("lm_head.weight", (spec.vocab_size, d)).T
  layers = [layer(i) for i in range(spec.n_layers)]
  if scan_layers:
    params["layers"] = {g: {name: np.stack([lay[g][name] for lay in layers])
                            for name in layers[0][g]} for g in layers[0]}
  else:
    params.update({f"layers_{i}": lay for i, lay in enumerate(layers)})
  return _contiguous(params)


def _contiguous(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {key: _contiguous(value) for key, value in tree.items()}
  return np.ascontiguousarray(tree)


def save_weights(tensors: dict[str, np.ndarray], out_dir: pathlib.Path,
                 max_shard_bytes: int = 5 * 10**9) -> list[str]:
  """Writes model.safetensors, or shards of at most `max_shard_bytes` plus the index when larger.

  A tensor larger than the limit gets a shard of its own. Returns the file names written.
  """
  from safetensors.numpy import save_file

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, w in tensors.items():
    if shards[-1] and size + w.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = w
    size += w.nbytes
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], str(out_dir / WEIGHTS_FILE), metadata=meta)
    return [WEIGHTS_FILE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards, strict=True):
    save_file(shard, str(out_dir / name), metadata=meta)
    weight_map.update(dict.fromkeys(shard, name))
  index = {"metadata": {"total_size": sum(w.nbytes for w in tensors.values())},
           "weight_map": weight_map}
  (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  return [*names, INDEX_FILE]


def load_weights(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of an HF directory (single file or sharded with an index), as numpy arrays."""
  from safetensors.numpy import load_file

  path = pathlib.Path(path)
  if (path / INDEX_FILE).is_file():
    files = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
  elif (path / WEIGHTS_FILE).is_file():
    files = [WEIGHTS_FILE]
  else:
    raise ValueError(f"{path} holds neither {WEIGHTS_FILE} nor {INDEX_FILE}; archscale reads "
                     "safetensors checkpoints only")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(load_file(str(path / name)))
  return tensors


def load_params(path: str | pathlib.Path, spec: ArchSpec | None = None, *,
                scan_layers: bool = True, dtype: Any = np.float32) -> dict:
  """archscale parameters (numpy, `dtype`) of an HF LLaMA directory; `spec`: must match it."""
  found = spec_from_hf(path)
  if spec is not None and spec != found:
    diff = {f: (getattr(spec, f), getattr(found, f)) for f in spec.to_dict()
            if getattr(spec, f) != getattr(found, f)}
    raise ValueError(f"model config differs from {path}/config.json in (config, file) {diff}; "
                     "with train.init_from set, take the model section from the directory")
  return from_hf_state_dict(load_weights(path), found, scan_layers=scan_layers, dtype=dtype)


def with_init_from(config: Any) -> Any:
  """`config` with its model section read from `train.init_from`'s config.json (when set)."""
  import ml_collections

  path = str(config.train.get("init_from", "")).strip()
  if not path:
    return config
  config = config.copy_and_resolve_references()
  config.model = ml_collections.ConfigDict(spec_from_hf(path).to_dict())
  return config


def place_params(path: str | pathlib.Path, spec: ArchSpec, abstract: Any) -> Any:
  """An HF directory's weights as arrays with `abstract`'s layout, dtypes and shardings.

  `abstract` is the train state's params of ShapeDtypeStructs (scanned or per-layer); each
  process reads the file and places only its own shards.
  """
  import jax

  params = load_params(path, spec, scan_layers="layers" in abstract)

  def place(x: np.ndarray, a: Any) -> jax.Array:
    x = x.astype(a.dtype)
    return jax.make_array_from_callback(a.shape, a.sharding, lambda index: x[index])

  return jax.tree.map(place, params, abstract)


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
  special = {"eos_token": eos_token}
  (out_dir / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": max_len,
      "clean_up_tokenization_spaces": False}, indent=2) + "\n")
  (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
  return {"eos_token_id": tokenizer.eos_id}


# ------------------------------------------------------------------------------------ export


def export(params: dict, spec: ArchSpec, out_dir: str | pathlib.Path, tokenizer: Any = None, *,
           dtype: str = "float32", max_shard_bytes: int = 5 * 10**9) -> pathlib.Path:
  """Writes an HF LLaMA directory (see the module docstring); replaces `out_dir` when complete.

  `tokenizer` is an `archscale.data.Tokenizer` (None: weights and configs only).
  """
  import ml_dtypes

  if dtype not in DTYPES:
    raise ValueError(f"export.dtype must be one of {DTYPES}, got {dtype!r}")
  if tokenizer is not None and tokenizer.vocab_size > spec.vocab_size:
    raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                     f"{spec.vocab_size}")
  out_dir = pathlib.Path(out_dir)
  tmp = out_dir.with_name(out_dir.name + ".tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
  tensors = {k: v.astype(np_dtype) for k, v in to_hf_state_dict(params, spec).items()}
  save_weights(tensors, tmp, max_shard_bytes)
  ids = {} if tokenizer is None else write_tokenizer(tokenizer, tmp, spec.max_seq_len)
  config = llama_config(spec, dtype, eos_token_id=ids.get("eos_token_id"))
  (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
  generation = {"eos_token_id": ids.get("eos_token_id"), "do_sample": False}
  (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  shutil.rmtree(out_dir, ignore_errors=True)
  tmp.rename(out_dir)
  return out_dir


def run_tokenizer(config: Any, workdir: pathlib.Path) -> Any:
  """The tokenizer a run trained with: its prepared dataset's, else `data.tokenizer`."""
  from archscale import data as data_lib

  path = str(config.data.path).strip()
  if not path and str(config.data.get("source", "")).strip():
    path = str(pathlib.Path(workdir) / "data")  # where --mode=train prepares it
  if path:
    return data_lib.load_tokenizer(path)
  return data_lib.load_tokenizer(config.data.tokenizer, eos_token=config.data.eos_token)


def run_export(config: Any, workdir: pathlib.Path) -> None:
  """`--mode=export`: the run's checkpoint (`export.step`, 0 = latest) as WORKDIR/hf/."""
  import jax

  from archscale import train as train_lib

  workdir = pathlib.Path(workdir)
  e = settings.ExportConfig.from_config(config)
  tokenizer = run_tokenizer(config, workdir)
  config = config.copy_and_resolve_references()
  if not str(config.data.path).strip() and str(config.data.get("source", "")).strip():
    config.data.path = str(workdir / "data")
  state = train_lib.load_checkpoint(workdir, config, e.step or None)
  params = jax.device_get(state["params"])
  out = export(params, ArchSpec.from_config(config), workdir / "hf", tokenizer, dtype=e.dtype,
               max_shard_bytes=int(e.max_shard_mb * 10**6))
  print(json.dumps({"exported": str(out), "step": int(jax.device_get(state["step"])),
                    "dtype": e.dtype}))
