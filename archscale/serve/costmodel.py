"""Roofline cost model of prefill and decode, per accelerator, with fitted efficiency factors.

Every quantity comes from `ArchSpec`'s exact accounting, so the model needs no hardware:

  prefill   compute: batch * spec.prefill_flops(prompt_len)
            memory:  the weights once + the KV cache written for the prompt
  decode    one step feeds one token per sequence at position p (context p + 1):
            compute: batch * spec.decode_flops_per_token(p + 1)
            memory:  the weights once + the KV cache of the current context, for every sequence
  time      max(compute / (peak_flops * compute_eff), memory / (hbm_bandwidth * memory_eff))
            (+ a fixed overhead per forward pass: launch and host latency)

Generating `n` tokens = one prefill (which yields the first token) + `n - 1` decode steps at
contexts prompt_len + 1 ... prompt_len + n - 1. `throughput` sums those steps exactly (no
average-context shortcut), so the max() of the roofline is applied per step.

Uncalibrated, the efficiencies are 1 and the overhead 0: the *floor* a perfect implementation
would reach. `fit_calibration` fits compute_eff, memory_eff and step_overhead_s (per forward
pass) for one accelerator to rows measured by the decode harness; `save_calibration` /
`load_calibration` keep them in a JSON file keyed by accelerator name, so the architecture search
can predict measured throughput without the hardware.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from archscale.core import io
from archscale.core.hardware import (  # noqa: F401 - the table is part of the cost model's API
  ACCELERATORS,
  GB,
  TB,
  Accelerator,
  accelerator_for_device_kind,
  get_accelerator,
)
from archscale.model.arch import ArchSpec

# Fraction of HBM the model may assume is usable for weights + KV cache (the rest: activations,
# runtime workspace, fragmentation).
DEFAULT_MEMORY_FRACTION = 0.9

CALIBRATION_KEYS = ("compute_eff", "memory_eff", "step_overhead_s")


# ------------------------------------------------------------------------------------ bytes


def weight_bytes_per_step(spec: ArchSpec, dtype_bytes: int = 2) -> int:
  """Weight bytes one forward pass reads: every matrix and norm, once.

  With tied embeddings the table is read in full by the LM head (and the input lookup touches
  only a few rows of it), so this is `param_bytes`; untied, the input table is only gathered.
  """
  untied_input = 0 if spec.tie_embeddings else spec.vocab_size * spec.d_model
  return (spec.params_total - untied_input) * dtype_bytes


def kv_cache_bytes(spec: ArchSpec, batch_size: int, context_len: int, dtype_bytes: int = 2) -> int:
  """Bytes of a KV cache holding `context_len` positions for `batch_size` sequences."""
  return batch_size * context_len * spec.kv_bytes_per_token(dtype_bytes)


def memory_needed(spec: ArchSpec, batch_size: int, context_len: int, dtype_bytes: int = 2) -> int:
  """Weights plus a full KV cache (activations are small beside them at decode)."""
  return spec.param_bytes(dtype_bytes) + kv_cache_bytes(spec, batch_size, context_len, dtype_bytes)


def max_batch(spec: ArchSpec, acc: str | Accelerator, context_len: int, dtype_bytes: int = 2,
              memory_fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
  """Largest batch whose weights + KV cache of `context_len` positions fit (0 if none does)."""
  acc = get_accelerator(acc)
  if context_len <= 0:
    raise ValueError(f"context_len must be positive, got {context_len}")
  free = acc.hbm_bytes * memory_fraction - spec.param_bytes(dtype_bytes)
  per_sequence = context_len * spec.kv_bytes_per_token(dtype_bytes)
  return max(0, math.floor(free / per_sequence))


# ------------------------------------------------------------------------------------ times


def _calibration_values(calibration: Mapping[str, Any] | None) -> tuple[float, float, float]:
  if calibration is None:
    return 1.0, 1.0, 0.0
  missing = [k for k in CALIBRATION_KEYS if k not in calibration]
  if missing:
    raise ValueError(f"calibration is missing {missing}; expected keys {CALIBRATION_KEYS}")
  ce, me, overhead = (float(calibration[k]) for k in CALIBRATION_KEYS)
  if not (ce > 0 and me > 0 and overhead >= 0):
    raise ValueError(f"calibration needs positive efficiencies and overhead >= 0, got "
                     f"{dict(calibration)}")
  return ce, me, overhead


def decode_step_terms(spec: ArchSpec, batch_size: int, context_len: Any,
                      dtype_bytes: int = 2) -> tuple[Any, Any]:
  """(FLOPs, bytes) of one decode step attending to `context_len` positions (array-friendly)."""
  context = np.asarray(context_len, dtype=np.float64)
  flops = batch_size * (2.0 * spec.matmul_params_per_token
                        + spec.attention_flops_per_token(1.0) * context)
  kv_read = batch_size * context * spec.kv_bytes_per_token(dtype_bytes)
  return flops, weight_bytes_per_step(spec, dtype_bytes) + kv_read


def prefill_terms(spec: ArchSpec, batch_size: int, prompt_len: int,
                  dtype_bytes: int = 2) -> tuple[float, float]:
  """(FLOPs, bytes) of a batched causal prefill: weights read once, the prompt's KV written."""
  flops = batch_size * spec.prefill_flops(prompt_len)
  return flops, weight_bytes_per_step(spec, dtype_bytes) + kv_cache_bytes(
      spec, batch_size, prompt_len, dtype_bytes)


def decode_step_time(spec: ArchSpec, acc: str | Accelerator, batch_size: int, context_len: Any,
                     dtype_bytes: int = 2, calibration: Mapping[str, Any] | None = None) -> Any:
  """Seconds for one decode step at `context_len` (a scalar or an array of contexts)."""
  acc = get_accelerator(acc)
  ce, me, overhead = _calibration_values(calibration)
  flops, nbytes = decode_step_terms(spec, batch_size, context_len, dtype_bytes)
  t = np.maximum(flops / (acc.peak_flops * ce), nbytes / (acc.hbm_bandwidth * me)) + overhead
  return float(t) if np.ndim(t) == 0 else t


def prefill_time(spec: ArchSpec, acc: str | Accelerator, batch_size: int, prompt_len: int,
                 dtype_bytes: int = 2, calibration: Mapping[str, Any] | None = None) -> float:
  """Seconds for the batched prefill of `prompt_len` tokens (one forward pass)."""
  acc = get_accelerator(acc)
  ce, me, overhead = _calibration_values(calibration)
  flops, nbytes = prefill_terms(spec, batch_size, prompt_len, dtype_bytes)
  return max(flops / (acc.peak_flops * ce), nbytes / (acc.hbm_bandwidth * me)) + overhead


def decode_contexts(input_len: int, output_len: int) -> np.ndarray:
  """Contexts of the `output_len - 1` decode steps after a prefill of `input_len` tokens."""
  return np.arange(input_len + 1, input_len + output_len, dtype=np.float64)


def throughput(spec: ArchSpec, acc: str | Accelerator, batch_size: int, input_len: int,
               output_len: int, dtype_bytes: int = 2,
               calibration: Mapping[str, Any] | None = None,
               memory_fraction: float = DEFAULT_MEMORY_FRACTION) -> dict[str, Any]:
  """Predicted serving performance of one batch: prefill, every decode step, tokens/s.

  `output_tokens_per_s` = batch * output_len / (prefill + all decode steps), the harness's
  definition. `fits` says whether weights + the full KV cache fit in `memory_fraction` of HBM.
  """
  acc = get_accelerator(acc)
  for name, value in (("batch_size", batch_size), ("input_len", input_len),
                      ("output_len", output_len)):
    if value <= 0:
      raise ValueError(f"{name} must be positive, got {value}")
  contexts = decode_contexts(input_len, output_len)
  prefill_s = prefill_time(spec, acc, batch_size, input_len, dtype_bytes, calibration)
  steps_s = decode_step_time(spec, acc, batch_size, contexts, dtype_bytes, calibration)
  decode_s = float(np.sum(steps_s))
  total_s = prefill_s + decode_s
  flops, nbytes = decode_step_terms(spec, batch_size, contexts, dtype_bytes)
  compute_bound = flops / acc.peak_flops > nbytes / acc.hbm_bandwidth
  mean_context = float(contexts.mean()) if contexts.size else float(input_len)
  return {
      "accelerator": acc.name,
      "batch_size": batch_size,
      "input_len": input_len,
      "output_len": output_len,
      "prefill_s": prefill_s,
      "decode_s": decode_s,
      "total_s": total_s,
      "step_s_mean": decode_s / max(1, contexts.size),
      "mean_context": mean_context,
      "output_tokens_per_s": batch_size * output_len / total_s,
      "total_tokens_per_s": batch_size * (input_len + output_len) / total_s,
      "decode_compute_bound_fraction": float(np.mean(compute_bound)) if contexts.size else 0.0,
      "weight_bytes": weight_bytes_per_step(spec, dtype_bytes),
      "kv_cache_bytes": kv_cache_bytes(spec, batch_size, input_len + output_len, dtype_bytes),
      "fits": memory_needed(spec, batch_size, input_len + output_len, dtype_bytes)
      <= acc.hbm_bytes * memory_fraction,
      "calibrated": calibration is not None,
  }


# ------------------------------------------------------------------------------ calibration


def _row_spec(row: Mapping[str, Any], specs: Mapping[str, ArchSpec] | None) -> ArchSpec:
  if "spec" in row:
    spec = row["spec"]
    return spec if isinstance(spec, ArchSpec) else ArchSpec.from_dict(spec)
  if specs is not None and row.get("arch") in specs:
    return specs[row["arch"]]
  raise ValueError(f"row for arch={row.get('arch')!r} carries no `spec` and none was passed in "
                   "`specs`")


def fit_calibration(rows: Iterable[Mapping[str, Any]], acc: str | Accelerator,
                    specs: Mapping[str, ArchSpec] | None = None,
                    dtype_bytes: int = 2) -> dict[str, Any]:
  """Fits compute_eff, memory_eff and step_overhead_s of `acc` to measured harness rows.

  Each usable row (no `error`) gives two observations: `prefill_s` against `prefill_time`, and
  `step_ms_median` against the mean predicted step over the generation's contexts. The fit
  minimises squared log errors (scipy least squares from several starts). A weak prior (weight
  1e-3 on log(eff / 0.7) and on overhead / the median measured step) keeps unidentified factors
  sensible, e.g. compute_eff when no measurement is compute-bound. Rows need `spec` (ArchSpec
  fields) or an `arch` key into `specs`.
  """
  from scipy import optimize  # Imported lazily: only calibration needs scipy.

  acc = get_accelerator(acc)
  obs = []  # (kind, flops, bytes) -> measured seconds
  for row in rows:
    if row.get("error"):
      continue
    spec = _row_spec(row, specs)
    b, t_in, t_out = int(row["batch_size"]), int(row["input_len"]), int(row["output_len"])
    if row.get("prefill_s"):
      flops, nbytes = prefill_terms(spec, b, t_in, dtype_bytes)
      obs.append(("prefill", np.array([flops]), np.array([nbytes]), float(row["prefill_s"])))
    if row.get("step_ms_median") and t_out > 1:
      flops, nbytes = decode_step_terms(spec, b, decode_contexts(t_in, t_out), dtype_bytes)
      obs.append(("step", flops, nbytes, float(row["step_ms_median"]) * 1e-3))
  if not obs:
    raise ValueError("fit_calibration: no usable rows (each needs prefill_s or step_ms_median "
                     "and no error)")
  step_scale = float(np.median([m for kind, _, _, m in obs if kind == "step"] or [1e-3]))

  def residuals(x):
    ce, me, overhead = math.exp(x[0]), math.exp(x[1]), x[2] * step_scale
    out = []
    for _, flops, nbytes, measured in obs:
      t = np.maximum(flops / (acc.peak_flops * ce), nbytes / (acc.hbm_bandwidth * me))
      predicted = float(np.mean(t)) + overhead
      out.append(math.log(predicted / measured))
    prior = 1e-3 * np.array([x[0] - math.log(0.7), x[1] - math.log(0.7), x[2]])
    return np.concatenate([np.array(out), prior])

  best = None
  lower, upper = [math.log(1e-3), math.log(1e-3), 0.0], [math.log(2.0), math.log(2.0), 1e3]
  for ce0 in (0.2, 0.5, 0.9):
    for me0 in (0.3, 0.6, 0.9):
      for o0 in (0.0, 0.2):
        res = optimize.least_squares(residuals, [math.log(ce0), math.log(me0), o0],
                                     bounds=(lower, upper), x_scale=[1.0, 1.0, 0.1],
                                     xtol=1e-12, ftol=1e-12, gtol=1e-12)
        if best is None or res.cost < best.cost:
          best = res
  fit_err = residuals(best.x)[: len(obs)]
  return {
      "accelerator": acc.name,
      "compute_eff": math.exp(best.x[0]),
      "memory_eff": math.exp(best.x[1]),
      "step_overhead_s": float(best.x[2] * step_scale),
      "n_observations": len(obs),
      "rms_log_error": float(np.sqrt(np.mean(fit_err**2))),
  }


def save_calibration(path: str | pathlib.Path, calibration: Mapping[str, Any]) -> None:
  """Adds (or replaces) one accelerator's calibration in a JSON file keyed by accelerator."""
  _calibration_values(calibration)
  name = get_accelerator(calibration["accelerator"]).name
  path = pathlib.Path(path)
  table = json.loads(path.read_text()) if path.exists() else {}
  table[name] = dict(calibration)
  io.write_json_atomic(path, table)


def load_calibration(path: str | pathlib.Path, accelerator: str) -> dict[str, Any] | None:
  """The calibration saved for `accelerator`, or None when the file has none."""
  path = pathlib.Path(path)
  if not path.exists():
    return None
  entry = json.loads(path.read_text()).get(get_accelerator(accelerator).name)
  if entry is not None:
    _calibration_values(entry)
  return entry
