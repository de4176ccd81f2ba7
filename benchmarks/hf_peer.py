"""The HF transformers twin of an ArchSpec, for the benchmarks' same-process peer comparisons."""

from typing import Any

from archscale import model as model_lib
from archscale.arch import ArchSpec


def llama_config(spec: ArchSpec, max_position_embeddings: int, **extra: Any) -> Any:
  """A `transformers.LlamaConfig` with the spec's dimensions, head size, tying and rotary setup."""
  import transformers

  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
  if spec.rope_scaling == "llama3":
    rope.update(rope_type="llama3", **model_lib.LLAMA3_ROPE_SCALING)
  if int(transformers.__version__.split(".")[0]) >= 5:
    rope_kwargs = {"rope_parameters": rope}
  else:
    rope_kwargs = {"rope_theta": spec.rope_theta,
                   "rope_scaling": rope if rope["rope_type"] != "default" else None}
  return transformers.LlamaConfig(
      vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
      num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
      num_key_value_heads=spec.n_kv_heads, head_dim=spec.d_head,
      tie_word_embeddings=spec.tie_embeddings, rms_norm_eps=spec.norm_eps,
      max_position_embeddings=max_position_embeddings, attention_bias=False, mlp_bias=False,
      **rope_kwargs, **extra)
