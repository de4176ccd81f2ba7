"""The runs of a sweep: a grid of ArchSpecs per scale, each with a stable id and its own config.

For every scale N (with the depth and head size the paper fixes per scale) and every point of the
`sweep.d_over_sqrt_n` x `sweep.r` x `sweep.gqa` grid, `ArchSpec.from_budget` builds the nearest
feasible architecture. Points that cannot be built, land too far from the requested N or r, or
repeat an architecture already planned are dropped with a reason. Each planned run has a stable id
derived from (ArchSpec, tokens, seed, training recipe), and `run_config` gives the config it trains
with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from archscale.core import settings
from archscale.core.settings import SweepConfig
from archscale.model.arch import FIXED_FIELDS, ArchSpec, steps_for_tokens

PLAN = "sweep_plan.json"
RUN_CONFIG = "run_config.py"      # the config a run trains with, in its directory
SWEEP_CONFIG = "sweep_config.py"  # the sweep's config selecting one run (emit, slurm)
_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


@dataclasses.dataclass(frozen=True)
class Scale:
  """One parameter budget of a sweep: N and the depth and head size fixed at that N."""

  n_nonembed: float
  n_layers: int
  d_head: int


@dataclasses.dataclass(frozen=True)
class Run:
  """One planned training run: the architecture, its budget and the grid point it came from."""

  run_id: str
  spec: ArchSpec
  tokens: int
  seed: int
  scale: Scale
  requested: dict[str, float]

  def fields(self) -> dict[str, Any]:
    """What every row of this run records about it: id, spec, budget and grid point."""
    return {"run_id": self.run_id, **self.spec.summary(), "scale": self.scale.n_nonembed,
            "requested": self.requested, "tokens_requested": self.tokens, "seed": self.seed}


def parse_count(text: str | float | int, field: str = "sweep.scales") -> float:
  """A positive count written as 80e6, 80M, 1.2B or 50k (case-insensitive)."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    value = float(text)
  else:
    s = str(text).strip().lower().replace("_", "")
    scale = _SUFFIXES.get(s[-1:], 1.0)
    if s[-1:] in _SUFFIXES:
      s = s[:-1]
    try:
      value = float(s) * scale
    except ValueError:
      raise ValueError(f"{field}: {text!r} is not a count such as 80e6, 80M, 1.2B or 50k") from None
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{field}: {text!r} must be a positive count")
  return value


def parse_scales(value: Any, model: Any) -> list[Scale]:
  """`sweep.scales` ("N:n_layers:d_head,..." or a sequence of triples) as Scales.

  Empty means one scale: the N, depth and head size of the config's model.
  """
  if not value:
    spec = ArchSpec.from_dict(model.to_dict() if hasattr(model, "to_dict") else dict(model))
    return [Scale(float(spec.params_nonembed), spec.n_layers, spec.d_head)]
  items = ([p.split(":") for p in str(value).split(",") if p.strip()]
           if isinstance(value, str) else [tuple(p) for p in value])
  scales = []
  for item in items:
    if len(item) != 3:
      raise ValueError(
          f"sweep.scales: {':'.join(map(str, item))!r} must be N:n_layers:d_head, e.g. "
          "'80M:12:64,145M:12:64'")
    n = parse_count(item[0])
    try:
      n_layers, d_head = int(str(item[1]).strip()), int(str(item[2]).strip())
    except ValueError:
      raise ValueError(f"sweep.scales: n_layers and d_head of {item!r} must be integers") from None
    if n_layers < 1 or d_head < 2 or d_head % 2:
      raise ValueError(f"sweep.scales: {item!r} needs n_layers >= 1 and an even d_head >= 2")
    scales.append(Scale(n, n_layers, d_head))
  return scales


def _grid(s: SweepConfig, name: str, cast: Callable[[Any], Any]) -> list[Any]:
  value = getattr(s, name)
  try:
    out = [cast(v) for v in settings.items(value)]
  except (TypeError, ValueError):
    raise ValueError(f"sweep.{name} must be a list of numbers, got {value!r}") from None
  if not out or any(not (v > 0) for v in out):
    raise ValueError(f"sweep.{name} must be a non-empty list of positive numbers, got {value!r}")
  return out


def _positive_int(value: Any, field: str) -> int:
  if isinstance(value, bool) or int(value) != value or value < 1:
    raise ValueError(f"{field} must be a positive integer, got {value!r}")
  return int(value)


def run_id(spec: ArchSpec, tokens: int, seed: int, recipe: dict[str, Any] | None = None) -> str:
  """A stable, readable id: the main dimensions plus a hash of (spec, tokens, seed, recipe).

  A change of learning rate, batch, sequence length or tokenizer gives new ids, so a rerun trains
  afresh instead of reusing results (or resuming checkpoints) made under other settings.
  """
  key = json.dumps({"arch": spec.to_dict(), "tokens": int(tokens), "seed": int(seed),
                    "recipe": recipe or {}}, sort_keys=True, default=str)
  digest = hashlib.sha256(key.encode()).hexdigest()[:10]
  return (f"L{spec.n_layers}-d{spec.d_model}-h{spec.n_heads}kv{spec.n_kv_heads}-ff{spec.d_ff}"
          f"-{digest}")


def tokens_for(s: SweepConfig, n_nonembed: float) -> int:
  """Tokens per run at this N: `sweep.tokens`, else `sweep.tokens_per_param` x N."""
  if s.tokens:
    return int(parse_count(s.tokens, "sweep.tokens"))
  if not (s.tokens_per_param > 0):
    raise ValueError(
        f"sweep.tokens_per_param must be positive (or set sweep.tokens), got {s.tokens_per_param}")
  return int(round(s.tokens_per_param * n_nonembed))


def _grid_points(s: SweepConfig) -> list[tuple[float, float, int]]:
  """The (d_over_sqrt_n, r, gqa) points of the design."""
  xs = _grid(s, "d_over_sqrt_n", float)
  rs = _grid(s, "r", float)
  gqas = _grid(s, "gqa", lambda v: _positive_int(float(v), "sweep.gqa"))
  if s.design == "grid":
    return [(x, r, g) for x in xs for r in rs for g in gqas]
  # cross: one factor at a time through the middle of each grid, as the U-curves are drawn
  x0, r0, g0 = (sorted(v)[(len(v) - 1) // 2] for v in (xs, rs, gqas))
  return list(dict.fromkeys([(x, r0, g0) for x in xs] + [(x0, r, g0) for r in rs]
                            + [(x0, r0, g) for g in gqas]))


def _build_point(s: SweepConfig, scale: Scale, x: float, r: float, g: int,
                 fixed: dict[str, Any]) -> tuple[ArchSpec | None, dict[str, Any]]:
  """The spec of one grid point at one scale, or (None, why it was dropped)."""
  point = {"n_nonembed": scale.n_nonembed, "n_layers": scale.n_layers, "d_head": scale.d_head,
           "d_over_sqrt_n": x, "r": r, "gqa": g}
  try:
    spec, _ = ArchSpec.from_budget(
        scale.n_nonembed, x, r, g, scale.n_layers, scale.d_head,
        d_model_multiple=int(s.d_model_multiple), d_ff_multiple=int(s.d_ff_multiple), **fixed)
  except ValueError as e:
    return None, {**point, "reason": f"infeasible: {e}"}
  spec = spec.refilled(scale.n_nonembed, r, int(s.d_ff_multiple), r_tolerance=s.r_tolerance,
                       n_tolerance=s.n_tolerance)
  achieved = {"n_nonembed": spec.params_nonembed, "d_over_sqrt_n": spec.d_over_sqrt_n,
              "r": spec.mlp_attn_ratio, "gqa": spec.gqa}
  n_error, r_error = spec.params_nonembed / scale.n_nonembed - 1, spec.mlp_attn_ratio / r - 1
  if abs(n_error) > s.n_tolerance:
    return None, {**point, "reason": (
        f"N off budget by {n_error:+.1%} (sweep.n_tolerance={s.n_tolerance})"),
        "achieved": achieved}
  if abs(r_error) > s.r_tolerance:
    return None, {**point, "reason": (
        f"r off by {r_error:+.1%} after rounding heads and d_ff (sweep.r_tolerance="
        f"{s.r_tolerance})"), "achieved": achieved}
  return spec, point


def plan(config: Any) -> tuple[list[Run], list[dict[str, Any]]]:
  """The runs of the sweep and the grid points dropped (each with a `reason`)."""
  s = SweepConfig.from_config(config)
  scales = parse_scales(s.scales, config.model)
  points = _grid_points(s)
  fixed = {k: config.model[k] for k in FIXED_FIELDS}  # from the config's model, not the grid
  recipe = settings.training_recipe(config)
  runs: list[Run] = []
  dropped: list[dict[str, Any]] = []
  seen: dict[str, dict[str, Any]] = {}
  seeds = seeds_of(s, config.seed)
  for scale in scales:
    tokens = tokens_for(s, scale.n_nonembed)
    for x, r, g in points:
      spec, point = _build_point(s, scale, x, r, g, fixed)
      if spec is None:
        dropped.append(point)
        continue
      rids = [run_id(spec, tokens, seed, recipe) for seed in seeds]
      if rids[0] in seen:
        dropped.append({**point, "reason": f"duplicate of {rids[0]}", "same_as": seen[rids[0]]})
        continue
      requested = {"d_over_sqrt_n": x, "r": r, "gqa": g}
      for rid, seed in zip(rids, seeds, strict=True):
        seen[rid] = requested
        runs.append(Run(rid, spec, tokens, seed, scale, requested))
  return runs, dropped


def seeds_of(s: SweepConfig, default: int) -> list[int]:
  """The seeds every grid point is trained with: `sweep.seeds`, else the config's seed."""
  if s.seeds in ((), [], "", None):
    return [int(default)]
  items = settings.items(s.seeds)
  try:
    seeds = [int(v) for v in items if float(v) == int(float(v)) and int(float(v)) >= 0]
  except (TypeError, ValueError):
    seeds = []
  if len(seeds) != len(items) or len(set(seeds)) != len(seeds):
    raise ValueError(f"sweep.seeds={s.seeds!r} must list distinct non-negative integers, "
                     "e.g. (0, 1, 2)")
  return seeds


def run_config(config: Any, run: Run, data_path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The training config of one run: the sweep's config with the run's model, steps and data."""
  c = config.copy_and_resolve_references()
  c.name = run.run_id
  c.mode = "train"
  c.seed = run.seed
  for key, value in run.spec.to_dict().items():
    c.model[key] = value
  c.train.steps = steps_for_tokens(
      run.tokens, int(config.train.global_batch_size) * int(config.data.seq_len))
  c.data.path = str(data_path)
  c.sweep.only = ""
  if "metrics" in c and not c.metrics.wandb_group:  # the sweep's runs share one W&B group
    c.metrics.wandb_group = str(config.name)
  return c


def frozen_config(config: Any, data_path: str | os.PathLike, only: str = "",
                  launch: str = "local") -> ml_collections.ConfigDict:
  """The sweep's config with the prepared data path fixed, for jobs that must not prepare again."""
  frozen = config.copy_and_resolve_references()
  frozen.sweep.launch = launch
  frozen.sweep.only = only
  frozen.data.path = str(data_path)
  return frozen


def selected(runs: list[Run], only: str) -> list[Run]:
  ids = [str(i) for i in settings.items(only)]
  if not ids:
    return runs
  known = {r.run_id for r in runs}
  unknown = [i for i in ids if i not in known]
  if unknown:
    raise ValueError(f"sweep.only names run ids {unknown} that this sweep does not plan; planned: "
                     f"{sorted(known)}")
  return [r for r in runs if r.run_id in ids]


def plan_json(runs: Sequence[Run], dropped: Sequence[dict[str, Any]]) -> dict[str, Any]:
  return {
      "runs": [{**r.fields(), "tokens": r.tokens} for r in runs],
      "dropped": list(dropped),
  }
