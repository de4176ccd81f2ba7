"""The HF transformers twin of an ArchSpec, for the benchmarks' same-process peer comparisons."""

from typing import Any

from archscale.interop import hf
from archscale.model.arch import ArchSpec


def llama_config(spec: ArchSpec, max_position_embeddings: int, **extra: Any) -> Any:
  """A `transformers.LlamaConfig` built from the config.json `--mode=export` writes for `spec`.

  Every Table 1 shape loads, Panda and Surefire (hidden_size not a multiple of the head count)
  included, in the transformers versions of the `hf` extra; `extra` (e.g. attn_implementation)
  goes to `LlamaConfig.from_dict`.
  """
  import transformers

  hf.check_transformers(spec)
  fields = {**hf.llama_config(spec), "max_position_embeddings": max_position_embeddings}
  return transformers.LlamaConfig.from_dict(fields, **extra)
