"""The Hugging Face LLaMA format of archscale's parameters: config.json and safetensors weights.

The mapping is exact: every archscale weight is a transpose or reshape of one HF tensor; both
rotate the halves (i, i + H/2) of each head, so no permutation is needed. `llama_config` and
`to_hf_state_dict` write the format (archscale.interop.hf exports whole runs with them);
`spec_from_hf`, `load_params` and `place_params` read it, for `train.init_from`. Only numpy and
safetensors are needed here.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import numpy as np

from archscale.core import io, settings
from archscale.model import transformer as model_lib
from archscale.model.arch import ArchSpec

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = settings.EXPORT_DTYPES


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
    tensors.update(load_file(str(io.contained(path, name, f"{path / INDEX_FILE} weight_map"))))
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
