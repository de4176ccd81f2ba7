"""Algorithm 1 (`--mode=search`): the fastest architecture that meets a loss target at a budget.

Given a budget (N non-embedding parameters, D tokens) at the depth and head size the paper fixes
per scale, a fitted conditional law and a serving scenario, the search

  1. loads the law (`search.law`, a fit.json; hand-written ones with only `form` and `params` are
     fine), or fits one from a results table when none is given;
  2. enumerates every feasible architecture: d_model over multiples of `search.d_model_multiple`
     in a range around the law's optimum and the baseline; for each, every integer KV-head count
     with n_heads = GQA x n_kv_heads; d_ff is the multiple of `search.d_ff_multiple` that brings N
     closest to the budget. Candidates off the budget by more than `search.n_tolerance` or with r
     outside `search.r_range` (where the law was fitted) are dropped, and counted;
  3. predicts every candidate's loss from its *realised* N, d_model/sqrt(N) and r, keeps those at
     or below the target, and ranks them by throughput (the cost model for a named accelerator,
     calibrated when a calibration exists, or the decode harness on this machine);
  4. walks GQA around each kept candidate (fastest first; `search.top_k` limits how many): the
     query heads stay, the KV heads step through the divisors of n_heads, and d_ff is refilled to
     keep N on budget, so r (and the loss) move with GQA. Each direction stops early at the first
     variant whose predicted loss exceeds the target, whose r leaves the law's range, or after
     `search.patience` steps without a throughput gain;
  5. reports the Pareto frontier (lower loss, higher throughput), Panda (lowest predicted loss
     of the enumeration: the law has no GQA term, so GQA variants cannot improve on it except by
     rounding) and Surefire (highest throughput among all candidates meeting the target and
     fitting in memory), and writes each as a config file.

Losses are absolute when the law carries Chinchilla parameters. A law without them predicts the
calibration L / L_opt(N, D) ("factor", multiplicative form) or L - L_opt ("offset", additive), and
so does everything here: a numeric `search.target` is then read in those units.

Outputs in WORKDIR: search.json (keys below), pareto.png, panda.py, surefire.py.
  candidates  every evaluated architecture, fastest first: ArchSpec fields, params_nonembed,
              params_total, mlp_attn_ratio, d_over_sqrt_n, gqa, predicted_loss, throughput
              (output tokens/s), fits (weights + KV cache fit the accelerator), meets_target,
              origin ("grid" or "gqa")
  pareto      the frontier, by increasing predicted loss
  panda, surefire, baseline (when the target names one): the same fields
  budget, scenario, target, law, loss_units, stats (enumeration, drops, GQA walks), provenance
  measured    when a results table is reachable (`search.results`, else `fit.results`): its path,
              and for panda, surefire and baseline the finished runs of the same architecture
              (`ARCH_KEYS`): run_id, tokens, loss and the run's downstream `eval` (null when it
              was not evaluated); an empty list when no run has that architecture
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from absl import logging

from archscale.core import config_lib, io
from archscale.core.settings import SearchConfig
from archscale.model import arch
from archscale.model.arch import FIXED_FIELDS, ArchSpec, steps_for_tokens
from archscale.serve import throughput
from archscale.study import plots

SEARCH_JSON = "search.json"
# The fields that make two architectures the same, for matching picks to trained runs.
ARCH_KEYS = ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "d_head", "vocab_size")
PARETO_PNG = "pareto.png"
# Sections of a search config copied into panda.py / surefire.py when they differ from defaults.
_CONFIG_SECTIONS = ("compute", "data", "train", "mesh", "distributed", "bench")
_MAX_D_MODELS = 512
# Why a GQA walk direction ended.
STOPS = {
    "loss": "a variant's predicted loss exceeded the target",
    "infeasible": "the next variant was infeasible (r outside search.r_range, or N off budget)",
    "patience": "search.patience steps without a throughput gain",
    "gqa_max": "the next GQA exceeds search.gqa_max",
    "support": "the next variant leaves the rows' support (its GQA or r; search.extrapolate)",
    "exhausted": "no divisor of n_heads left in that direction",
}


# ------------------------------------------------------------------------------- the space


@dataclasses.dataclass(frozen=True)
class Budget:
  """What every candidate shares: N, D, depth, head size and the non-searched ArchSpec fields."""

  n_nonembed: float
  tokens: float
  n_layers: int
  d_head: int
  fixed: tuple[tuple[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Space:
  """Rounding and feasibility rules of the enumeration."""

  d_model_multiple: int = 64
  d_ff_multiple: int = 256
  r_range: tuple[float, float] = (0.5, 5.0)
  n_tolerance: float = 0.05
  # The fit rows' range per axis (`diagnostics.SUPPORT_AXES`; x and r widened by
  # search.support_margin; None: unknown, no limit), and whether candidates outside the shape
  # axes are kept (marked extrapolated) rather than dropped.
  support: dict[str, tuple[float, float] | None] | None = None
  extrapolate: bool = False


# Axes the law cannot be trusted beyond: a candidate outside the rows on one of them is dropped
# unless search.extrapolate is set. N and D (the law models them) are only marked.
SHAPE_AXES = ("d_over_sqrt_n", "r", "gqa")
OUTSIDE = "outside the rows' support (search.support_margin, search.extrapolate)"


def axis_values(spec: ArchSpec, tokens: float) -> dict[str, float]:
  """The spec's coordinates on the support's axes."""
  return {"d_over_sqrt_n": spec.d_over_sqrt_n, "r": spec.mlp_attn_ratio, "gqa": spec.gqa,
          "n_params": spec.params_nonembed, "tokens": tokens}


def outside_axes(space: Space, spec: ArchSpec, tokens: float, n_slack: float = 0.0) -> list[str]:
  """The axes on which the spec (trained on `tokens`) lies outside the law's support. N counts
  as outside only beyond `n_slack` (the budget's tolerance) of the rows' range."""
  out = []
  for axis, v in axis_values(spec, tokens).items():
    limits = (space.support or {}).get(axis)
    slack = 1e-9 + (n_slack if axis == "n_params" else 0.0)
    if limits is not None and not limits[0] * (1 - slack) <= v <= limits[1] * (1 + slack):
      out.append(axis)
  return out


def fill_d_ff(budget: Budget, space: Space, d_model: int, n_heads: int,
              n_kv_heads: int) -> int | None:
  """The d_ff (a multiple of `space.d_ff_multiple`) that brings N closest to the budget."""
  return arch.d_ff_for_budget(budget.n_nonembed, d_model, budget.n_layers, budget.d_head,
                               n_heads, n_kv_heads, space.d_ff_multiple)


def make_spec(budget: Budget, space: Space, d_model: int, n_heads: int,
              n_kv_heads: int) -> tuple[ArchSpec | None, str | None]:
  """A feasible spec with these widths and heads, or (None, why not).

  Feasible: integer heads with GQA dividing them (n_heads a multiple of n_kv_heads), d_ff a
  positive multiple, N within the tolerance of the budget, r within the law's range.
  """
  if n_kv_heads < 1 or n_heads < 1 or n_heads % n_kv_heads:
    return None, "heads: n_heads must be a positive multiple of n_kv_heads"
  d_ff = fill_d_ff(budget, space, d_model, n_heads, n_kv_heads)
  if d_ff is None:
    return None, "attention alone exceeds the budget"
  spec = ArchSpec.from_dict(dict(budget.fixed, d_model=d_model, n_layers=budget.n_layers,
                                 n_heads=n_heads, n_kv_heads=n_kv_heads, d_head=budget.d_head,
                                 d_ff=d_ff))
  if abs(spec.params_nonembed / budget.n_nonembed - 1) > space.n_tolerance:
    return None, "N off budget (search.n_tolerance)"
  lo, hi = space.r_range
  if not lo <= spec.mlp_attn_ratio <= hi:
    return None, "r outside search.r_range"
  if not space.extrapolate and set(SHAPE_AXES) & set(outside_axes(space, spec, budget.tokens)):
    return None, OUTSIDE
  return spec, None


def d_model_grid(n_nonembed: float, centers: Sequence[float], width_range: Sequence[float],
                 multiple: int) -> list[int]:
  """Multiples of `multiple` from width_range[0] x min(centers) to width_range[1] x max(centers).

  `centers` are values of d_model/sqrt(N) (the law's optimum, the baseline's); at least the
  multiple nearest each center is included.
  """
  root = math.sqrt(n_nonembed)
  lo = max(1, math.ceil(width_range[0] * min(centers) * root / multiple))
  hi = max(lo, math.floor(width_range[1] * max(centers) * root / multiple))
  units = set(range(lo, hi + 1)) | {max(1, round(c * root / multiple)) for c in centers}
  if len(units) > _MAX_D_MODELS:
    raise ValueError(
        f"search: {len(units)} d_model values between {lo * multiple} and {hi * multiple}; raise "
        "search.d_model_multiple or narrow search.width_range")
  return [u * multiple for u in sorted(units)]


def enumerate_specs(budget: Budget, space: Space, d_models: Iterable[int],
                    gqa: int) -> tuple[list[ArchSpec], collections.Counter]:
  """Every feasible spec over `d_models` x integer KV heads at this GQA, and drop counts."""
  specs, dropped = [], collections.Counter()
  for d_model in d_models:
    kv = 1
    while True:
      spec, reason = make_spec(budget, space, d_model, gqa * kv, kv)
      if reason == "attention alone exceeds the budget":
        if kv == 1:
          dropped[reason] += 1
        break
      if spec is None:
        dropped[reason] += 1
      else:
        specs.append(spec)
      kv += 1
  return specs, dropped


# --------------------------------------------------------------------------- candidates


@dataclasses.dataclass
class Candidate:
  """One evaluated architecture."""

  spec: ArchSpec
  predicted_loss: float
  origin: str
  throughput: float | None = None
  fits: bool | None = None
  meets_target: bool = False
  extrapolated_axes: list[str] = dataclasses.field(default_factory=list)  # outside the support

  @property
  def extrapolated(self) -> bool:
    return bool(self.extrapolated_axes)

  def to_json(self) -> dict[str, Any]:
    return {
        **self.spec.summary(),
        "predicted_loss": self.predicted_loss,
        "throughput": self.throughput,
        "fits": self.fits,
        "meets_target": self.meets_target,
        "extrapolated": self.extrapolated,
        "extrapolated_axes": self.extrapolated_axes,
        "origin": self.origin,
    }


def predict_losses(law: Any, specs: Sequence[ArchSpec], tokens: float) -> np.ndarray:
  """The law's loss (or calibration) for every spec at its realised N, d_model/sqrt(N) and r."""
  if not specs:
    return np.zeros((0,))
  n = np.array([s.params_nonembed for s in specs], np.float64)
  x = np.array([s.d_over_sqrt_n for s in specs], np.float64)
  r = np.array([s.mlp_attn_ratio for s in specs], np.float64)
  out = np.asarray(law.predict(n, np.full_like(n, float(tokens)), x, r), np.float64)
  return np.broadcast_to(out, n.shape).copy()


def loss_units(law: Any) -> str:
  """"loss" when the law predicts absolute losses, else "factor" (L / L_opt) or "offset"."""
  output = getattr(law, "output", "loss")
  return output if output in ("factor", "offset") else "loss"


class Evaluator:
  """Predicted loss and throughput of specs, each computed once."""

  def __init__(self, law: Any, tokens: float, target: float,
               throughput: Callable[[ArchSpec], tuple[float | None, bool]],
               space: Space | None = None):
    self.law, self.tokens, self.target, self._throughput = law, tokens, target, throughput
    self.space = space or Space()
    self.cache: dict[ArchSpec, Candidate] = {}
    self.throughput_calls = 0

  def add(self, specs: Sequence[ArchSpec], origin: str) -> list[Candidate]:
    """Candidates for `specs` (loss predicted; throughput not yet)."""
    new = [s for s in dict.fromkeys(specs) if s not in self.cache]
    for spec, loss in zip(new, predict_losses(self.law, new, self.tokens), strict=True):
      loss = float(loss)
      self.cache[spec] = Candidate(spec, loss, origin,
                                   meets_target=bool(math.isfinite(loss) and loss <= self.target),
                                   extrapolated_axes=outside_axes(self.space, spec, self.tokens,
                                                                  self.space.n_tolerance))
    return [self.cache[s] for s in specs]

  def rate(self, cand: Candidate) -> Candidate:
    """Fills in the candidate's throughput (once)."""
    if cand.fits is None:
      self.throughput_calls += 1
      cand.throughput, cand.fits = self._throughput(cand.spec)
    return cand

  def __call__(self, spec: ArchSpec, origin: str) -> Candidate:
    return self.rate(self.add([spec], origin)[0])


def _speed(c: Candidate) -> float:
  return c.throughput if (c.fits and c.throughput) else 0.0


def gqa_walk(start: Candidate, budget: Budget, space: Space, evaluator: Evaluator,
             patience: int, gqa_max: int = 0) -> tuple[list[Candidate], dict[str, str]]:
  """Local search over GQA around `start`, early-stopped in each direction.

  Query heads stay fixed; KV heads step through the divisors of n_heads (up: more sharing, a
  smaller KV cache; down: less), d_ff refilled to keep N on budget. A direction stops at the
  first variant whose predicted loss exceeds the target (it is evaluated and kept, but not
  stepped past), at the first infeasible one (r leaves the law's range), past `gqa_max` (0: no
  cap), or after `patience` consecutive steps without beating the walk's best throughput.
  Returns the variants evaluated and, per direction, why it stopped (`STOPS` names the kinds).
  """
  spec = start.spec
  divisors = [g for g in range(1, spec.n_heads + 1) if spec.n_heads % g == 0]
  directions = {"up": [g for g in divisors if g > spec.gqa],
                "down": [g for g in reversed(divisors) if g < spec.gqa]}
  visited: list[Candidate] = []
  stops: dict[str, str] = {}
  for name, steps in directions.items():
    best, stale, stop = _speed(evaluator.rate(start)), 0, "exhausted"
    for g in steps:
      if gqa_max and g > gqa_max:
        stop = "gqa_max"
        break
      variant, reason = make_spec(budget, space, spec.d_model, spec.n_heads, spec.n_heads // g)
      if variant is None:
        stop = "support" if reason == OUTSIDE else "infeasible"
        break
      cand = evaluator(variant, "gqa")
      visited.append(cand)
      if not cand.meets_target:
        stop = "loss"
        break
      if _speed(cand) > best:
        best, stale = _speed(cand), 0
      else:
        stale += 1
        if stale >= patience:
          stop = "patience"
          break
    stops[name] = stop
  return visited, stops


def pareto_front(cands: Iterable[Candidate]) -> list[Candidate]:
  """Candidates no other beats on both predicted loss (lower) and throughput (higher)."""
  pool = sorted((c for c in cands if _speed(c) > 0 and math.isfinite(c.predicted_loss)),
                key=lambda c: (c.predicted_loss, -_speed(c)))
  front, best = [], 0.0
  for c in pool:
    if _speed(c) > best:
      front.append(c)
      best = _speed(c)
  return front


@dataclasses.dataclass
class SearchResult:
  """Everything Algorithm 1 found; `to_json` is search.json without inputs and provenance."""

  candidates: list[Candidate]
  pareto: list[Candidate]
  panda: Candidate | None
  surefire: Candidate | None
  baseline: Candidate | None
  target: float
  stats: dict[str, Any]

  def to_json(self) -> dict[str, Any]:
    one = lambda c: None if c is None else c.to_json()
    ranked = sorted(self.candidates, key=lambda c: (-_speed(c), c.predicted_loss))
    return {
        "candidates": [c.to_json() for c in ranked],
        "pareto": [c.to_json() for c in self.pareto],
        "panda": one(self.panda),
        "surefire": one(self.surefire),
        "baseline": one(self.baseline),
        "target": self.target,
        "stats": self.stats,
    }


def search(law: Any, budget: Budget, space: Space, target: float,
           throughput: Callable[[ArchSpec], tuple[float | None, bool]], d_models: Sequence[int],
           gqa: int, patience: int = 2, top_k: int = 0, gqa_max: int = 0,
           baseline: ArchSpec | None = None,
           rate_all: bool = True, max_rated: int = 0, check_target: bool = False,
           progress: Callable[[str], None] | None = None) -> SearchResult:
  """Algorithm 1 on an enumerated space (no files): see the module docstring for the steps.

  `throughput(spec) -> (output tokens/s or None, fits)`. With `rate_all` every candidate gets a
  throughput (cheap sources such as the cost model); otherwise only those meeting the target,
  Panda and the baseline (a measured source), and `max_rated` > 0 caps how many may be rated.
  `check_target` refuses a target outside the losses predicted over the enumeration (a number
  given in the wrong units), before any throughput is measured.
  """
  say = progress or (lambda msg: logging.info("%s", msg))
  start_time = time.time()
  specs, dropped = enumerate_specs(budget, space, d_models, gqa)
  ev = Evaluator(law, budget.tokens, target, throughput, space)
  grid = ev.add(specs, "grid")
  if check_target:
    _check_target(target, [c.predicted_loss for c in grid], loss_units(law))
  meeting = [c for c in grid if c.meets_target]
  say(f"search: {len(grid)} feasible architectures over {len(d_models)} d_model values at GQA "
      f"{gqa} ({sum(dropped.values())} dropped); {len(meeting)} meet the target {target:.5g}")
  to_rate = grid if rate_all else meeting
  if max_rated and len(to_rate) > max_rated:
    raise ValueError(
        f"search: {len(to_rate)} candidates would be measured, more than search.max_measure="
        f"{max_rated}; raise search.d_model_multiple, narrow search.width_range or set "
        "search.throughput to model:<accelerator>")
  for c in to_rate:
    ev.rate(c)
  base = ev(baseline, "baseline") if baseline is not None else None

  walks, stop_counts, n_walked, cut_short = [], collections.Counter(), 0, False
  ranked = sorted(meeting, key=lambda c: -_speed(c))
  for c in ranked[:top_k] if top_k else ranked:
    if max_rated and ev.throughput_calls >= max_rated:
      cut_short = True  # A measured source: no more timings than search.max_measure allows.
      break
    visited, stops = gqa_walk(c, budget, space, ev, patience, gqa_max)
    walks.extend(visited)
    n_walked += 1
    stop_counts.update(stops.values())
  # Panda comes from the (d_model, r) enumeration: GQA variants differ from it only by rounding,
  # which the law (it has no GQA term) cannot rank meaningfully. Exact ties go to the faster.
  finite = [c for c in grid if math.isfinite(c.predicted_loss)]
  panda = None
  if finite:
    best = min(c.predicted_loss for c in finite)
    panda = max((c for c in finite if c.predicted_loss == best), key=lambda c: _speed(ev.rate(c)))
  cands = [c for c in ev.cache.values() if c.origin != "baseline"]
  if not rate_all:
    cands = [c for c in cands if c.fits is not None or c.meets_target]
  ok = [c for c in cands if c.meets_target and c.fits]
  surefire = max(ok, key=lambda c: (_speed(c), -c.predicted_loss), default=None)
  rated = [c for c in cands if c.fits is not None]
  stats = {
      "d_models": [min(d_models), max(d_models), len(d_models)] if d_models else [],
      "enumerated": len(grid),
      "dropped": dict(dropped),
      "meeting_target": sum(c.meets_target for c in cands),
      "gqa_walks": n_walked,
      "gqa_variants": len({c.spec for c in walks}),
      "gqa_stops": dict(stop_counts),
      "throughput_evaluations": ev.throughput_calls,
      "gqa_walks_cut_short": cut_short,
      "not_fitting": sum(1 for c in rated if not c.fits),
      "seconds": time.time() - start_time,
  }
  if surefire is None:
    say("search: no feasible candidate meets the target; Surefire is empty (raise the target, "
        "widen search.width_range or check search.r_range)")
  return SearchResult(cands, pareto_front(rated), panda, surefire, base, target, stats)


def _check_target(target: float, losses: Sequence[float], units: str) -> None:
  finite = [v for v in losses if math.isfinite(v)]
  if finite and not min(finite) <= target <= max(finite):
    lo, hi = min(finite), max(finite)
    raise ValueError(
        f"search.target={target:.5g} is outside the {units.replace('ss', 'sse')}s the law "
        "predicts over the searched "
        f"architectures ({lo:.5g} to {hi:.5g}), so every candidate would "
        f"{'meet' if target > hi else 'miss'} it: give a target in that range, in the law's "
        f"units ({units}), or 'baseline:<architecture>'")


# ------------------------------------------------------------------------------ the mode


def parse_target(value: Any) -> tuple[float | None, str | None]:
  """`search.target` as (number, None) or (None, baseline name)."""
  text = str(value).strip()
  if text.startswith("baseline:") and text[len("baseline:"):].strip():
    return None, text[len("baseline:"):].strip()
  try:
    loss = float(value) if isinstance(value, (int, float)) else float(text)
  except ValueError:
    loss = None
  if isinstance(value, bool) or loss is None or not math.isfinite(loss):
    raise ValueError(
        f"search.target={value!r} must be a loss (a number) or 'baseline:<architecture or config "
        "file>', e.g. 'baseline:llama3_2_1b'")
  return loss, None


def _baseline_spec(name: str) -> ArchSpec:
  try:
    return ArchSpec.from_dict(config_lib.arch_config(name))
  except ValueError as e:
    raise ValueError(f"search.target=baseline:{name}: {e}") from None


def load_or_fit_law(config: Any, workdir: pathlib.Path) -> tuple[Any, str]:
  """The law of `search.law`, or one fitted now from `search.results` / `fit.results`."""
  from archscale.study import fit as fit_stage
  from archscale.study import law as law_lib

  s = SearchConfig.from_config(config)
  if str(s.law).strip():
    path = pathlib.Path(str(s.law)).expanduser()
    if not path.exists():
      raise ValueError(f"search.law={str(s.law)!r} does not exist; point it at a fit.json (from "
                       "--mode=fit, or written by hand with `form` and `params`)")
    return law_lib.load_law(path), str(path)
  results = str(s.results or config.fit.results).strip()
  if not results or not pathlib.Path(results).expanduser().exists():
    raise ValueError(
        "search.law is empty and there is no results table to fit one from: set search.law to a "
        "fit.json, or search.results (or fit.results) to a results.jsonl from --mode=sweep")
  cfg = config.copy_and_resolve_references()
  cfg.fit.results = results
  logging.info("search: fitting a %s law to %s", cfg.fit.form, cfg.fit.results)
  fit_stage.run_fit(cfg, workdir)
  path = pathlib.Path(workdir) / "fit.json"
  return law_lib.load_law(path), str(path)


def resolve(config: Any) -> dict[str, Any]:
  """Checks the search section and derives the budget, space and target, before any work."""
  s = SearchConfig.from_config(config)
  target_value, baseline_name = parse_target(s.target)
  baseline = _baseline_spec(baseline_name) if baseline_name else None
  ref = baseline or ArchSpec.from_config(config)
  n = float(s.n_nonembed) if s.n_nonembed else float(ref.params_nonembed)
  budget = Budget(n, float(s.tokens) if s.tokens else 100.0 * n, int(s.n_layers or ref.n_layers),
                  int(s.d_head or ref.d_head), tuple((k, getattr(ref, k)) for k in FIXED_FIELDS))
  space = Space(s.d_model_multiple, s.d_ff_multiple, tuple(float(v) for v in s.r_range),
                float(s.n_tolerance))
  scenario = throughput.Scenario(s.batch_size, s.input_len, s.output_len, s.dtype_bytes)
  return {"target_value": target_value, "baseline_name": baseline_name, "baseline": baseline,
          "budget": budget, "space": space, "scenario": scenario, "gqa": int(s.gqa or ref.gqa),
          "width_range": tuple(float(v) for v in s.width_range)}


def _with_support(law_path: str, space: Space, s: SearchConfig) -> tuple[dict[str, Any], Space]:
  """The law's fit.json (form and params only when hand-written) and the space limited to its
  rows' support, widened by search.support_margin (no limit when the law carries none)."""
  from archscale.study import diagnostics

  doc = json.loads(pathlib.Path(law_path).read_text(encoding="utf-8"))
  support = diagnostics.widened_support(doc, s.support_margin)
  if support is None:
    logging.warning("search: the law %s carries no support (the rows it was fitted on): "
                    "candidates are not checked against the data's range", law_path)
    return doc, dataclasses.replace(space, extrapolate=s.extrapolate)
  limits = {k: None if v is None else (float(v[0]), float(v[1])) for k, v in support.items()}
  return doc, dataclasses.replace(space, support=limits, extrapolate=s.extrapolate)


def check_gqa(gqa: int, space: Space) -> None:
  """Refuses an enumeration at a GQA the rows never trained (the law has no GQA term), unless
  search.extrapolate is set."""
  limits = (space.support or {}).get("gqa")
  if limits is None or space.extrapolate or limits[0] <= gqa <= limits[1]:
    return
  held = f"{limits[0]:g}" if limits[0] == limits[1] else f"{limits[0]:g}..{limits[1]:g}"
  raise ValueError(
      f"search.gqa={gqa} (0 takes the baseline's) is outside the GQA of the rows the law was "
      f"fitted on ({held}), and the law has no GQA term: set search.gqa to a GQA the sweep "
      "trained, train that GQA too (sweep.gqa), or set search.extrapolate=True")


def scale_statements(space: Space, budget: Budget, doc: dict[str, Any]) -> list[str]:
  """How far the budget's N and D lie beyond the trained runs, with the error the progressive
  protocol measured at its largest step (the error to expect there); and what GQA rests on."""
  support, out = space.support or {}, []
  for axis, name, value in (("n_params", "N", budget.n_nonembed), ("tokens", "D", budget.tokens)):
    limits = support.get(axis)
    if limits is None or limits[0] <= value * (1 + 1e-9) and value <= limits[1] * (1 + 1e-9):
      continue
    factor, edge = (value / limits[1], "largest") if value > limits[1] else (
        value / limits[0], "smallest")
    out.append(f"{name} = {value:.4g} is {factor:.3g}x the {edge} trained run ({name} "
               f"{limits[1] if edge == 'largest' else limits[0]:.4g}): the law extrapolates")
  steps = [p for p in ((doc.get("metrics") or {}).get("progressive") or []) if p.get("mse")]
  if out and steps:
    out.append(f"the progressive protocol's error at its largest step (predicting N "
               f"{steps[-1]['test_scale']:.3g} from smaller scales) is RMSE "
               f"{math.sqrt(steps[-1]['mse']):.3g}: the least error to expect here")
  elif out:
    out.append("no progressive step (fitting smaller scales, predicting a larger one) measured "
               "how well this law extrapolates in scale")
  if support and support.get("gqa") is None:
    out.append("the rows do not record GQA, so every GQA is assumed to leave the loss unchanged")
  elif support and support["gqa"][0] == support["gqa"][1]:
    out.append(f"the rows hold GQA {support['gqa'][0]:g} only: the law has no GQA term, so "
               "another GQA is assumed to leave the loss unchanged")
  return out


def _uncertainty(law: Any, doc: dict[str, Any], result: SearchResult, budget: Budget,
                 baseline: ArchSpec | None) -> tuple[dict[str, Any], list[str]]:
  """Panda's and Surefire's predicted losses with intervals, and whether their difference from
  the baseline (or the target) exceeds the fit's uncertainty."""
  from archscale.study import diagnostics

  shape = lambda spec, n: (n, budget.tokens, spec.d_over_sqrt_n, spec.mlp_attn_ratio)
  picks = {name: shape(c.spec, c.spec.params_nonembed)
           for name, c in (("panda", result.panda), ("surefire", result.surefire)) if c}
  base = shape(baseline, budget.n_nonembed) if baseline is not None else None
  return diagnostics.pick_statements(law, doc, picks, base, result.target,
                                     float(doc.get("interval_level", 0.95)))


def _law_optimum(law: Any, doc: dict[str, Any], key: str = "d_over_sqrt_n") -> float | None:
  """The optimum a fit reported (null when the rows do not support one), else the law's own."""
  if isinstance(doc.get("optimum"), dict):
    value = doc["optimum"].get(key)
    return float(value) if value is not None else None
  try:
    value = float(law.optimum()[key])
  except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
    return None
  return value if math.isfinite(value) and (key == "r" or 0 < value < 10) else None


def measured_runs(config: Any, picks: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
  """The trained runs of the results table the search can reach with each pick's architecture,
  with their loss and downstream eval (see `measured` above); None without a table."""
  from archscale.study import table

  s = SearchConfig.from_config(config)
  path = str(s.results or config.fit.results).strip()
  if not path or not pathlib.Path(path).expanduser().exists():
    return None
  try:
    rows, _ = table.load_rows(pathlib.Path(path).expanduser())
  except ValueError:  # An empty or unreadable table: nothing was measured.
    rows = []
  latest = {r.get("run_id", i): r for i, r in enumerate(rows) if r.get("status") == "finished"}
  key = lambda a: tuple(a.get(k) for k in ARCH_KEYS)
  out: dict[str, Any] = {"results": path}
  for name, pick in picks.items():
    if pick is not None:
      out[name] = [{"run_id": r.get("run_id"), "tokens": r.get("tokens"), "loss": r.get("loss"),
                    "eval": r.get("eval")} for r in latest.values() if key(r) == key(pick)]
  return out


def run_search(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  """`--mode=search`: Algorithm 1 on the config; writes search.json, pareto.png and the configs."""
  workdir = pathlib.Path(workdir)
  s = SearchConfig.from_config(config)
  inputs = resolve(config)
  budget, space, scenario = inputs["budget"], inputs["space"], inputs["scenario"]
  baseline = inputs["baseline"]
  source = throughput.source(config, workdir, scenario)
  law, law_path = load_or_fit_law(config, workdir)
  doc, space = _with_support(law_path, space, s)
  check_gqa(inputs["gqa"], space)
  units = loss_units(law)
  if inputs["target_value"] is not None:
    target = inputs["target_value"]
    if target <= 0 and units != "offset":
      raise ValueError(f"search.target={s.target!r}: a {units} target must be positive (the law "
                       f"{law_path} predicts {units}s); give the loss to reach, or "
                       "'baseline:<architecture>'")
  else:  # The baseline's shape (x, r) at the search's N and D.
    target = float(np.asarray(law.predict(
        np.array([budget.n_nonembed]), np.array([budget.tokens]),
        np.array([baseline.d_over_sqrt_n]), np.array([baseline.mlp_attn_ratio]))).ravel()[0])
  if not math.isfinite(target):
    raise ValueError(f"search.target: the law predicts a non-finite loss ({target}) for "
                     f"{s.target}; check search.law")
  optimum = _law_optimum(law, doc)
  centers = [c for c in (optimum, baseline.d_over_sqrt_n if baseline else None) if c]
  if not centers:
    centers = [ArchSpec.from_config(config).d_over_sqrt_n]
  if space.support and not space.extrapolate:  # the grid around what the rows support
    lo, hi = space.support["d_over_sqrt_n"]
    centers = [min(max(c, lo), hi) for c in centers]
  d_models = d_model_grid(budget.n_nonembed, centers, inputs["width_range"],
                          space.d_model_multiple)
  logging.info("search: N=%.4g D=%.4g L=%d d_head=%d, d_model %d..%d, target %.5g (%s), %s",
               budget.n_nonembed, budget.tokens, budget.n_layers, budget.d_head, d_models[0],
               d_models[-1], target, units, source.name)
  result = search(law, budget, space, target, source, d_models, inputs["gqa"], s.patience,
                  s.top_k, s.gqa_max, baseline, rate_all=source.cheap,
                  max_rated=0 if source.cheap else s.max_measure,
                  check_target=inputs["target_value"] is not None)
  out = result.to_json()
  out.update({
      "budget": {"n_nonembed": budget.n_nonembed, "tokens": budget.tokens,
                 "n_layers": budget.n_layers, "d_head": budget.d_head, "gqa": inputs["gqa"],
                 **dict(budget.fixed)},
      "space": dataclasses.asdict(space),
      "scenario": {**dataclasses.asdict(scenario), "throughput": source.name,
                   "accelerator": getattr(source, "accelerator", None),
                   "calibration": getattr(source, "calibration", None)},
      "target_spec": str(s.target),
      "law": {"path": law_path, "form": getattr(law, "form", None),
              "optimum": optimum and {"d_over_sqrt_n": optimum,
                                      "r": _law_optimum(law, doc, "r")}},
      "loss_units": units,
      "support": space.support and {
          **{k: v and list(v) for k, v in space.support.items()},
          "rows": doc.get("support"), "margin": s.support_margin, "extrapolate": s.extrapolate},
      "provenance": io.provenance(config),
  })
  out["uncertainty"], statements = _uncertainty(law, doc, result, budget, baseline)
  out["measured"] = measured_runs(config, {k: out[k] for k in ("panda", "surefire", "baseline")})
  out["uncertainty"]["statements"] = statements + scale_statements(space, budget, doc)
  for line in out["uncertainty"]["statements"]:
    logging.info("search: %s", line)
  workdir.mkdir(parents=True, exist_ok=True)
  io.write_json_atomic(workdir / SEARCH_JSON, out)
  plots.pareto(result, workdir / PARETO_PNG, units, source.name)
  for name, cand in (("panda", result.panda), ("surefire", result.surefire)):
    if cand is not None:
      write_arch_config(workdir / f"{name}.py", name, cand, config, budget, units, source.name)
  _log_summary(result, units)
  return out


def _describe(c: Candidate | None) -> str:
  if c is None:
    return "none"
  s = c.spec
  speed = f"{c.throughput:,.0f} tok/s" if c.throughput else "no throughput"
  return (f"d_model {s.d_model}, d_ff {s.d_ff}, heads {s.n_heads}/{s.n_kv_heads} (GQA {s.gqa}), "
          f"x {s.d_over_sqrt_n:.4f}, r {s.mlp_attn_ratio:.3f}, loss {c.predicted_loss:.5g}, "
          f"{speed}")


def _log_summary(result: SearchResult, units: str) -> None:
  logging.info("search: target %.5g (%s); %d candidates, %d on the Pareto frontier",
               result.target, units, len(result.candidates), len(result.pareto))
  for name in ("baseline", "panda", "surefire"):
    logging.info("search: %-8s %s", name, _describe(getattr(result, name)))


# ---------------------------------------------------------------------------------- outputs


def _base_arch(config: Any) -> str:
  if config.name in config_lib.ARCHS:
    return config.name
  target = str(config.search.target)
  name = target.split(":", 1)[1].strip() if target.startswith("baseline:") else ""
  return name if name in config_lib.ARCHS else "demo"


def write_arch_config(path: pathlib.Path, name: str, cand: Candidate, config: Any,
                      budget: Budget, units: str, source: str) -> pathlib.Path:
  """A standalone config file for one found architecture, ready for --mode=train / decode_bench.

  It starts from `config_lib.make_config(<the search's base architecture>)` and sets every model
  field, what the search config changed in the sections a run reads, train.steps for D tokens at
  its batch and sequence length, and bench.archs to itself.
  """
  base_name = _base_arch(config)
  c = config_lib.make_config(base_name)
  c.name, c.mode = name, "train"
  for section in _CONFIG_SECTIONS:
    if section in config:
      c[section] = config[section].copy_and_resolve_references()
  c.model.update(cand.spec.to_dict())
  c.train.steps = steps_for_tokens(
      budget.tokens, int(config.train.global_batch_size) * int(config.data.seq_len))
  spec = cand.spec
  doc = (f"{name}: found by archscale --mode=search in {path.parent.resolve()}.\n\n"
         f"Budget N={budget.n_nonembed:.6g} non-embedding parameters (this architecture: "
         f"{spec.params_nonembed:,}), D={budget.tokens:.6g} tokens (train.steps at this batch "
         f"size and sequence length).\nd_model/sqrt(N)={spec.d_over_sqrt_n:.4f}, "
         f"r={spec.mlp_attn_ratio:.3f}, GQA={spec.gqa}; predicted {units} "
         f"{cand.predicted_loss:.5g}, throughput {cand.throughput or 0:,.0f} output tokens/s "
         f"({source}).\n")
  return config_lib.write_config_py(
      path, c, doc, base=base_name,
      tail=["c.bench.archs = str(pathlib.Path(__file__).resolve())"])
