"""Algorithm 1 on an enumerated space, without files: the candidates of one budget.

Given a budget (N non-embedding parameters, D tokens) at a fixed depth and head size, a law
and a throughput source, `search`

  1. enumerates every feasible architecture: d_model over multiples of `search.d_model_multiple`
     in a range around the law's optimum and the baseline; for each, every integer KV-head count
     with n_heads = GQA x n_kv_heads; d_ff is the multiple of `search.d_ff_multiple` that brings N
     closest to the budget. Candidates off the budget by more than `search.n_tolerance` or with r
     outside `search.r_range` (where the law was fitted) are dropped, and counted;
  2. predicts every candidate's loss from its *realised* N, d_model/sqrt(N) and r, keeps those at
     or below the target, and ranks them by throughput (the cost model for a named accelerator,
     calibrated when a calibration exists, or the decode harness on this machine);
  3. walks GQA around each kept candidate (fastest first; `search.top_k` limits how many): the
     query heads stay, the KV heads step through the divisors of n_heads, and d_ff is refilled to
     keep N on budget, so r (and the loss) move with GQA. Each direction stops early at the first
     variant whose predicted loss exceeds the target, whose r leaves the law's range, whose GQA
     or r leaves the rows' support, or after `search.patience` steps without a throughput gain;
  4. finds the Pareto frontier (lower loss, higher throughput), Panda (lowest predicted loss
     of the enumeration: the law has no GQA term, so GQA variants cannot improve on it except by
     rounding) and Surefire (highest throughput among all candidates meeting the target and
     fitting in memory).

Candidates outside the law's support (the rows it was fitted on) on a shape axis or GQA are
dropped unless the space allows extrapolation; each candidate names its `extrapolated_axes`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from absl import logging

from archscale.model import arch
from archscale.model.arch import ArchSpec

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


def within(limits: tuple[float, float], value: float, slack: float = 0.0) -> bool:
  """Whether `value` lies in [lo, hi], each edge widened by the relative `slack` (and rounding)."""
  slack += 1e-9
  return limits[0] * (1 - slack) <= value <= limits[1] * (1 + slack)


def outside_axes(space: Space, spec: ArchSpec, tokens: float, n_slack: float = 0.0) -> list[str]:
  """The axes on which the spec (trained on `tokens`) lies outside the law's support. N counts
  as outside only beyond `n_slack` (the budget's tolerance) of the rows' range."""
  out = []
  for axis, v in axis_values(spec, tokens).items():
    limits = (space.support or {}).get(axis)
    if limits is not None and not within(limits, v, n_slack if axis == "n_params" else 0.0):
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
