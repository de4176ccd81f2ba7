"""ArchSpec: the architecture space of the paper, with exact parameter, FLOP and byte accounting.

Conventions (the paper's):
  N (`params_nonembed`) = attention + MLP + RMSNorm weights; the embedding table and LM head are
  excluded. Attention per layer = d_model * d_head * (2 * n_heads + 2 * n_kv_heads) (no biases), MLP
  (SwiGLU) per layer = 3 * d_model * d_ff, r = MLP / attention, GQA = n_heads / n_kv_heads.
  Head size is a free dimension: n_heads * d_head need not equal d_model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

ROPE_SCALINGS = ("llama3", "none")


# ArchSpec fields that a parameter budget does not decide: a sweep takes them from the config's
# model, a search from its baseline.
FIXED_FIELDS = ("vocab_size", "tie_embeddings", "rope_theta", "rope_scaling", "norm_eps",
                "max_seq_len")


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """A LLaMA-3.2-style decoder: the knobs the paper studies plus what a model needs to run."""

  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_head: int
  d_ff: int
  vocab_size: int = 128256
  tie_embeddings: bool = True
  rope_theta: float = 500000.0
  rope_scaling: str = "llama3"
  norm_eps: float = 1e-5
  max_seq_len: int = 131072

  def __post_init__(self):
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_head", "d_ff", "vocab_size",
                 "max_seq_len"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ArchSpec.{name} must be an integer, got {value!r}")
      if value <= 0:
        raise ValueError(f"ArchSpec.{name} must be positive, got {value}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(
          f"ArchSpec.n_heads ({self.n_heads}) must be divisible by ArchSpec.n_kv_heads "
          f"({self.n_kv_heads}): grouped-query attention shares each KV head among an equal "
          "number of query heads")
    if self.d_head % 2:
      raise ValueError(f"ArchSpec.d_head must be even for rotary embeddings, got {self.d_head}")
    if self.rope_scaling not in ROPE_SCALINGS:
      raise ValueError(
          f"ArchSpec.rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
    if not self.rope_theta > 0:
      raise ValueError(f"ArchSpec.rope_theta must be positive, got {self.rope_theta}")
    if not self.norm_eps > 0:
      raise ValueError(f"ArchSpec.norm_eps must be positive, got {self.norm_eps}")
    if not isinstance(self.tie_embeddings, bool):
      raise ValueError(f"ArchSpec.tie_embeddings must be a bool, got {self.tie_embeddings!r}")

  # ----------------------------------------------------------------------------- construction

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
    """Builds a spec from a mapping (e.g. a config's `model` section); unknown keys are an error."""
    d = dict(d)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"unknown ArchSpec field(s) {unknown}; valid fields are {sorted(fields)}")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in d and f.default is dataclasses.MISSING)
    if missing:
      raise ValueError(f"ArchSpec is missing required field(s) {missing}")
    for name in ("rope_theta", "norm_eps"):
      if name in d and isinstance(d[name], int) and not isinstance(d[name], bool):
        d[name] = float(d[name])
    return cls(**d)

  @classmethod
  def from_config(cls, config: Any) -> ArchSpec:
    """The spec in `config.model` (an ml_collections ConfigDict or a dict)."""
    model = config.model if hasattr(config, "model") else config["model"]
    return cls.from_dict(model.to_dict() if hasattr(model, "to_dict") else model)

  @classmethod
  def from_budget(
      cls,
      n_nonembed: float,
      d_over_sqrt_n: float,
      r: float,
      gqa: int,
      n_layers: int,
      d_head: int,
      *,
      d_model_multiple: int = 64,
      d_ff_multiple: int = 256,
      **fixed: Any,
  ) -> tuple[ArchSpec, dict[str, Any]]:
    """The feasible spec nearest to a requested (N, d_model/sqrt(N), r, GQA) at fixed depth.

    d_model is rounded to `d_model_multiple`; the per-layer budget is split into attention and MLP
    by r; the KV-head count is rounded to an integer (query heads = gqa * kv heads) and d_ff to
    `d_ff_multiple`. Among the neighbouring roundings the one closest to the requested N and r (sum
    of squared log errors) wins. Returns the spec and a report of requested vs achieved values.
    Other ArchSpec fields (vocab_size, rope_theta, ...) may be passed through `fixed`.
    """
    checks = {"n_nonembed": n_nonembed, "d_over_sqrt_n": d_over_sqrt_n, "r": r, "gqa": gqa,
              "n_layers": n_layers, "d_head": d_head, "d_model_multiple": d_model_multiple,
              "d_ff_multiple": d_ff_multiple}
    for name, value in checks.items():
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"from_budget: {name} must be a positive number, got {value!r}")
    for name in ("gqa", "n_layers", "d_head", "d_model_multiple", "d_ff_multiple"):
      if int(checks[name]) != checks[name]:
        raise ValueError(f"from_budget: {name} must be an integer, got {checks[name]!r}")
    gqa, n_layers, d_head = int(gqa), int(n_layers), int(d_head)

    width_units = round(d_over_sqrt_n * math.sqrt(n_nonembed) / d_model_multiple)
    d_model = d_model_multiple * max(1, width_units)
    per_layer = n_nonembed / n_layers - 2 * d_model  # weights left after the two RMSNorms
    attn_budget = per_layer / (1.0 + r)
    mlp_budget = per_layer - attn_budget
    kv_exact = attn_budget / (2 * d_model * d_head * (gqa + 1))
    ff_exact = mlp_budget / (3 * d_model * d_ff_multiple)
    if kv_exact < 0.5 or ff_exact < 0.5:
      raise ValueError(
          f"from_budget: infeasible request - N={n_nonembed:.4g} over {n_layers} layers at "
          f"d_model={d_model} leaves room for {kv_exact:.2f} KV heads and {ff_exact:.2f} x "
          f"{d_ff_multiple} MLP units at r={r}, gqa={gqa}; raise n_nonembed or lower "
          "d_over_sqrt_n / n_layers / d_head")

    best = None
    for kv in {max(1, math.floor(kv_exact)), max(1, math.ceil(kv_exact))}:
      for ff_units in {max(1, math.floor(ff_exact)), max(1, math.ceil(ff_exact))}:
        spec = cls.from_dict(dict(fixed, d_model=d_model, n_layers=n_layers, n_heads=gqa * kv,
                                  n_kv_heads=kv, d_head=d_head, d_ff=ff_units * d_ff_multiple))
        err = (math.log(spec.params_nonembed / n_nonembed) ** 2
               + math.log(spec.mlp_attn_ratio / r) ** 2)
        if best is None or err < best[0]:
          best = (err, spec)
    spec = best[1]
    requested = {"n_nonembed": n_nonembed, "d_over_sqrt_n": d_over_sqrt_n, "r": r, "gqa": gqa}
    achieved = {"n_nonembed": spec.params_nonembed, "d_over_sqrt_n": spec.d_over_sqrt_n,
                "r": spec.mlp_attn_ratio, "gqa": spec.gqa}
    report = {
        "requested": requested,
        "achieved": achieved,
        "rel_error": {k: achieved[k] / requested[k] - 1.0 for k in requested},
    }
    return spec, report

  def replace(self, **changes: Any) -> ArchSpec:
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  def refilled(self, n_nonembed: float, r: float, d_ff_multiple: int, *, r_tolerance: float,
               n_tolerance: float) -> ArchSpec:
    """This spec with d_ff refilled to the budget N where that brings N closer.

    `from_budget` trades N against r. In a sweep N should win: rows of a scale share one L_opt,
    while r enters a fit as each run's realised value. So the refill is taken when r stays within
    `r_tolerance` of the request, or when N is outside `n_tolerance` anyway.
    """
    d_ff = d_ff_for_budget(n_nonembed, self.d_model, self.n_layers, self.d_head, self.n_heads,
                           self.n_kv_heads, d_ff_multiple)
    if d_ff is None or d_ff == self.d_ff:
      return self
    refilled = self.replace(d_ff=d_ff)
    n_error = abs(self.params_nonembed / n_nonembed - 1)
    closer = abs(refilled.params_nonembed / n_nonembed - 1) < n_error
    r_ok = abs(refilled.mlp_attn_ratio / r - 1) <= r_tolerance
    return refilled if closer and (r_ok or n_error > n_tolerance) else self

  # ---------------------------------------------------------------------------- parameters

  @property
  def params_attention(self) -> int:
    """Q, K, V and output projections over all layers."""
    return self.n_layers * self.d_model * self.d_head * (2 * self.n_heads + 2 * self.n_kv_heads)

  @property
  def params_mlp(self) -> int:
    """SwiGLU gate, up and down projections over all layers."""
    return self.n_layers * 3 * self.d_model * self.d_ff

  @property
  def params_norms(self) -> int:
    """Two RMSNorm scales per layer plus the final norm."""
    return (2 * self.n_layers + 1) * self.d_model

  @property
  def params_nonembed(self) -> int:
    """N of the scaling laws: attention + MLP + norms."""
    return self.params_attention + self.params_mlp + self.params_norms

  @property
  def params_embedding(self) -> int:
    """Token embedding plus, when untied, the separate LM head."""
    return self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)

  @property
  def params_total(self) -> int:
    return self.params_nonembed + self.params_embedding

  @property
  def mlp_attn_ratio(self) -> float:
    """r = MLP parameters / attention parameters = 3 d_ff / (2 d_head (n_heads + n_kv_heads))."""
    return self.params_mlp / self.params_attention

  @property
  def d_over_sqrt_n(self) -> float:
    """Normalised width d_model / sqrt(N)."""
    return self.d_model / math.sqrt(self.params_nonembed)

  @property
  def gqa(self) -> int:
    """Query heads per KV head (1 = multi-head attention, n_heads = multi-query)."""
    return self.n_heads // self.n_kv_heads

  # ----------------------------------------------------------------------------- FLOPs, bytes

  @property
  def matmul_params_per_token(self) -> int:
    """Weights every token multiplies by: attention and MLP projections plus the LM head.

    The embedding lookup is a gather (no FLOPs) and norms are elementwise, so neither counts.
    """
    return self.params_attention + self.params_mlp + self.vocab_size * self.d_model

  def attention_flops_per_token(self, context_len: float) -> float:
    """Forward FLOPs of the score (QK^T) and mixing (AV) products for one query at a context.

    Each is 2 * context * n_heads * d_head per layer (a multiply and an add per element).
    """
    return 4.0 * self.n_layers * context_len * self.n_heads * self.d_head

  def train_flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), matmuls only.

    Forward = 2 x matmul weights (incl. the LM head) + causal attention over a sequence of
    `seq_len`, counted at half the full square (average context seq_len / 2). This is the
    numerator of MFU.
    """
    forward = 2.0 * self.matmul_params_per_token + self.attention_flops_per_token(seq_len / 2)
    return 3.0 * forward

  def decode_flops_per_token(self, context_len: int) -> float:
    """Forward FLOPs to generate one token attending to `context_len` cached positions.

    2 x matmul weights (incl. the LM head) + QK^T and AV over the context. (Kaplan et al.'s
    2N + 2 n_layers T d_attn counts only the score product and leaves out the LM head.)
    """
    return 2.0 * self.matmul_params_per_token + self.attention_flops_per_token(context_len)

  def prefill_flops(self, prompt_len: int) -> float:
    """Forward FLOPs of a causal prefill of `prompt_len` tokens for one sequence.

    The LM head runs on the last position only (a serving prefill needs just the next-token
    logits; `generate.generate` does this), the layers on every position.
    """
    head = self.vocab_size * self.d_model
    layers = self.matmul_params_per_token - head
    return (prompt_len * (2.0 * layers + self.attention_flops_per_token(prompt_len / 2))
            + 2.0 * head)

  def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
    """KV-cache bytes one token occupies: K and V for every layer and KV head."""
    return 2 * self.n_layers * self.n_kv_heads * self.d_head * bytes_per_element

  def param_bytes(self, bytes_per_element: int = 2) -> int:
    """Bytes of all parameters (embedding table included)."""
    return self.params_total * bytes_per_element

  # ---------------------------------------------------------------------------------- export

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def summary(self) -> dict[str, Any]:
    """Fields plus the derived quantities every results table carries."""
    return {
        **self.to_dict(),
        "params_total": self.params_total,
        "params_nonembed": self.params_nonembed,
        "mlp_attn_ratio": self.mlp_attn_ratio,
        "d_over_sqrt_n": self.d_over_sqrt_n,
        "gqa": self.gqa,
    }

  def describe(self, seq_len: int | None = None, context_len: int = 4096) -> dict[str, Any]:
    """Fields and derived quantities, as `--mode=describe` prints them."""
    seq_len = seq_len or min(self.max_seq_len, 2048)
    return {
        **self.summary(),
        "params_embedding": self.params_embedding,
        "params_attention": self.params_attention,
        "params_mlp": self.params_mlp,
        "train_flops_per_token": self.train_flops_per_token(seq_len),
        "train_seq_len": seq_len,
        "decode_flops_per_token": self.decode_flops_per_token(context_len),
        "decode_context_len": context_len,
        "kv_bytes_per_token_bf16": self.kv_bytes_per_token(2),
    }


def d_ff_for_budget(n_nonembed: float, d_model: int, n_layers: int, d_head: int, n_heads: int,
                    n_kv_heads: int, multiple: int) -> int | None:
  """The d_ff (a multiple of `multiple`) that brings N closest to `n_nonembed`, or None.

  N = L (attention + 3 d_model d_ff + 2 d_model) + d_model is linear in d_ff, so the nearest
  multiple to the exact fill is the closest N. None when not even one multiple fits.
  """
  attention = d_model * d_head * 2 * (n_heads + n_kv_heads)
  rest = n_nonembed - d_model - n_layers * (attention + 2 * d_model)
  units = round(rest / (3 * d_model * n_layers * multiple))
  return units * multiple if units >= 1 else None


def steps_for_tokens(tokens: float, tokens_per_step: int) -> int:
  """Training steps that cover `tokens` at `tokens_per_step` (rounded up, at least one)."""
  return max(1, math.ceil(tokens / tokens_per_step))


def run_describe(config: Any, workdir: pathlib.Path) -> None:
  """`--mode=describe`: prints the config's ArchSpec with its accounting as JSON."""
  del workdir
  spec = ArchSpec.from_config(config)
  seq_len = config.data.seq_len if "data" in config else None
  print(json.dumps(spec.describe(seq_len=seq_len), indent=2))
