"""Fitting scaling laws to results tables (`--mode=fit`), with uncertainty and the paper's protocol.

Squared (the default for the conditional forms, as in the paper) or Huber (delta; Chinchilla's
default, Hoffmann's choice) loss on linear or log residuals, summed over rows, solved by
`solver` (Levenberg-Marquardt or optax's L-BFGS, all starts vectorised) from Hoffmann's
grid for Chinchilla, perturbations of a linear least-squares anchor for the conditional forms, or
random starts. Bootstrap replicates (row weights drawn from a multinomial, each warm-started from
the full-data optimum) run through the same program. Rows are read and grouped by
`table`; the laws are `law`'s; `fit` (`--mode=fit`) writes fit.json and draws the figures.

Public API:
  fit(rows, config=None, *, l_opt=None, seed=0, log_warnings=True, **options) -> FitResult
      config: settings.FitConfig (the `fit.*` section); options override its fields
  evaluate_progressive(rows, config=None, *, l_opt=None, seed=0, **options) -> list[dict]
      fit on the smaller scales, predict the next: train_scales, test_scale, mse, r2, spearman
  diagnostics.prediction_metrics(predicted, measured) -> {"n", "mse", "r2", "spearman"}
  FitResult: law, objective, intervals, stderr, optimum, diagnostics, starts, metrics, samples,
      timings, per_start (each start's objective, status, iterations),
      predict_interval(n, d, x, r) -> (2, ...) bounds, to_json()

fit.json: form, l_opt ("empirical", "chinchilla", a path, "given" or "none"), params, intervals
({name: [lo, hi]}: bootstrap percentiles at interval_level, the optimum's d_over_sqrt_n and r
included when reported), stderr (per fitted parameter, from the Jacobian at the optimum),
bootstrap_stderr (standard deviations of the replicates), optimum (d_over_sqrt_n and r, each null
when not identified or not inside the rows' range, with `reasons`, `range`, closed_form,
interior; null for chinchilla), diagnostics (converged_fraction, convergence, identifiable
{"d_over_sqrt_n": bool, "r": bool}, identifiability reasons, condition_numbers, bootstrap_used,
bootstrap_total, bootstrap_note, intervals_hold_fixed (["l_opt"] when the bootstrap keeps
L_opt at its full-data values), grouping, torn_lines, warnings), covariance (of the fitted
solver parameters, from the Jacobian, with its residual degrees of freedom `dof` for t
quantiles), support (the rows' d_over_sqrt_n, r, gqa, n_params and
tokens ranges; gqa null when the rows do not record it), objective,
starts (total, converged, at_best, status counts, remedy), settings, metrics (in_sample;
progressive steps), timings, l_opt_groups (N, D, L_opt, rows and N spread per budget),
rows_used (each row plus d_over_sqrt_n, l_opt, predicted, predicted_interval, scale_index,
budget_index), rows_excluded (each row plus reason), results, plots, provenance.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
from absl import logging

from archscale.core import settings
from archscale.study import diagnostics as diagnostics_lib
from archscale.study import law as law_lib
from archscale.study import solver as solver_lib
from archscale.study import table as table_lib
from archscale.study import verdict as verdict_lib

L_OPTS = settings.FIT_L_OPTS
# Starts whose objective is within this relative distance of the best count as reaching it.
AT_BEST_RTOL = 1e-6


class _Feats(NamedTuple):
  """Per-row inputs of the solver, float64 arrays of length R."""
  ln_n: Any
  ln_d: Any
  l_opt: Any
  x: Any
  r: Any


@dataclasses.dataclass(frozen=True)
class _FitModel:
  """The solver's model for one form and residual space (hashable: it keys compiled programs).

  `free` lists the positions in law.THETA_KEYS[form] the solver estimates (None: all); the
  other parameters are held at zero (`fit.terms`).
  """
  form: str
  space: str
  free: tuple[int, ...] | None = None

  def __call__(self, theta_P: Any, f: _Feats) -> Any:
    if self.free is not None:
      full = jnp.zeros(theta_P.shape[:-1] + (len(law_lib.THETA_KEYS[self.form]),), theta_P.dtype)
      theta_P = full.at[..., list(self.free)].set(theta_P)
    return _predict_fit_space(self.form, self.space, theta_P, f)


def _model(cfg: settings.FitConfig) -> _FitModel:
  form, keys = cfg.form, law_lib.THETA_KEYS[cfg.form]
  free = law_lib.free_keys(form, cfg.terms)
  return _FitModel(form, cfg.space,
                   None if free == keys else tuple(keys.index(k) for k in free))


def _full_theta(form: str, terms: str, theta_fP: np.ndarray) -> np.ndarray:
  """Fitted parameters (last axis, law.free_keys order) to the full vector, zeros elsewhere."""
  keys, free = law_lib.THETA_KEYS[form], law_lib.free_keys(form, terms)
  full = np.zeros(theta_fP.shape[:-1] + (len(keys),))
  full[..., [keys.index(k) for k in free]] = theta_fP
  return full


def _predict_fit_space(form: str, space: str, theta_P: Any, f: _Feats) -> Any:
  """Predicted loss of every row in the space the residuals live in (log or linear)."""
  if form == "chinchilla":
    log_l = law_lib.chinchilla_log(theta_P, f.ln_n, f.ln_d, jnp)
    return log_l if space == "log" else jnp.exp(log_l)
  pred = law_lib.combine(form, f.l_opt, law_lib.calibrate(form, theta_P, f.x, f.r, jnp))
  if space == "linear":
    return pred
  return jnp.log(jnp.where(pred > 0, pred, jnp.nan))  # A non-positive loss is no solution.


def _prepare(rows: Sequence[Mapping[str, Any]], form: str, r_range: Sequence[float] | None,
             terms: str = "both") -> table_lib.Table:
  """The checked, r-filtered table, refused when it cannot pin down the form's parameters."""
  table = table_lib.prepare(rows, arch=form != "chinchilla", r_range=r_range)
  _check_identifiable(table, form, terms)
  return table


def _check_identifiable(table: table_lib.Table, form: str, terms: str) -> None:
  """Refuses data that cannot pin down the form's parameters, naming the reason."""
  n_free = len(law_lib.free_keys(form, terms))
  n_rows = len(table.rows)
  if n_rows <= n_free:
    after = f" after the r filter ({len(table.excluded)} excluded)" if table.excluded else ""
    raise ValueError(f"form {form!r} has {n_free} free parameters but only {n_rows} rows "
                     f"remain{after}; it needs at least {n_free + 1}")
  if form == "chinchilla":
    if table_lib.distinct(table.n) < 2 or table_lib.distinct(table.d) < 2:
      raise ValueError(
          f"a Chinchilla fit needs at least two distinct params_nonembed and two distinct tokens "
          f"values; the rows have {table_lib.distinct(table.n)} and "
          f"{table_lib.distinct(table.d)} (one scale only)")
    return
  fitted = {"both": ("width", "ratio"), "width": ("width",), "ratio": ("ratio",)}[terms]
  for term, name, values in (("width", "d_model / sqrt(params_nonembed)", table.x),
                             ("ratio", "mlp_attn_ratio", table.r)):
    if term in fitted and table_lib.distinct(values) < 3:
      other = "ratio" if term == "width" else "width"
      hint = (f" Set fit.terms={other!r} to fit the {other} term alone." if terms == "both"
              else "")
      raise ValueError(f"the {form} form needs at least three distinct values of {name} to fit "
                       f"its {term} term; the rows have {table_lib.distinct(values)}: the U-shape "
                       f"cannot be fitted.{hint}")


# ----------------------------------------------------------------------------------------------
# Fitting.


def _lstsq(cols: Sequence[np.ndarray], y: np.ndarray) -> np.ndarray:
  return np.linalg.lstsq(np.stack(cols, axis=-1), y, rcond=None)[0]


def _anchor(form: str, f: _Feats, loss: np.ndarray, terms: str) -> np.ndarray:
  """A least-squares starting point for the conditional forms' fitted terms (linear in u, then
  in v)."""
  one, lnx, invx = law_lib.basis(f.x, np)
  _, lnr, invr = law_lib.basis(f.r, np)
  free = law_lib.free_keys(form, terms)
  if form == "additive":
    cols = dict(zip(law_lib.THETA_KEYS[form], (one, lnx, invx, lnr, invr), strict=True))
    return _lstsq([cols[k] for k in free], loss - f.l_opt)
  ratio = loss / f.l_opt
  if form == "joint":
    cols = dict(zip(law_lib.JOINT_KEYS, [fx * fr for fx in (one, lnx, invx)
                                          for fr in (one, lnr, invr)], strict=True))
    return _lstsq([cols[k] for k in free], ratio)
  if terms == "width":
    return _lstsq([one, lnx, invx], ratio)
  if terms == "ratio":  # a0 (1 + b1 ln r + b2 / r)
    c = _lstsq([one, lnr, invr], ratio)
    return np.array([c[0], c[1] / c[0], c[2] / c[0]])
  b = np.zeros(2)
  for _ in range(5):  # Alternate: u given v, then v given u, folding v's constant into u.
    v = 1.0 + b[0] * lnr + b[1] * invr
    a = _lstsq([one, lnx, invx], ratio / v)
    c, b1, b2 = _lstsq([one, lnr, invr], ratio / (a[0] + a[1] * lnx + a[2] * invx))
    a, b = a * c, np.array([b1, b2]) / c
  return np.concatenate([a, b])


def _starting_points(cfg: settings.FitConfig, f: _Feats, loss: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
  """Starts (S, P): Hoffmann's grid or a random box for Chinchilla; around an anchor otherwise."""
  if cfg.form == "chinchilla":
    if cfg.starts == "grid":
      return solver_lib.hoffmann_grid()
    return solver_lib.hoffmann_box(cfg.n_starts, rng)
  return solver_lib.perturbed_starts(_anchor(cfg.form, f, loss, cfg.terms), cfg.starts,
                                     cfg.n_starts, rng)


class _Solution(NamedTuple):
  theta: np.ndarray          # (P,) best parameters (the fitted ones, law.free_keys order)
  objective: float
  starts: dict[str, Any]     # counts of start outcomes
  theta_samples: np.ndarray  # (B, P) bootstrap replicates that converged (B = 0 without)
  timings: dict[str, float]
  per_start: dict[str, np.ndarray]  # objective, status (index into solver.STATUS), iterations
  bootstrap_total: int = 0


_CONVERGED = (solver_lib.STATUS.index("converged"), solver_lib.STATUS.index("stalled"))
# A start that stopped at max_iter is iterated further up to this many times, each with twice
# the previous iteration budget, before the fit fails.
EXTEND_ROUNDS = 3


def _fit_arrays(cfg: settings.FitConfig, f: _Feats, loss: np.ndarray,
                rng: np.random.Generator) -> _Solution:
  """Multi-start fit of one form to prepared arrays (the best start iterated until it
  converges), then the vectorised bootstrap."""
  form = cfg.form
  spec = solver_lib.Spec(_model(cfg), cfg.loss, cfg.delta, cfg.solver, cfg.max_iter, cfg.tol)
  y = np.log(loss) if cfg.space == "log" else loss
  theta0_IP = _starting_points(cfg, f, loss, rng)
  logging.info("fit: %s, %d rows, %d starts, solver %s", form, len(loss), len(theta0_IP),
               cfg.solver)
  t0 = time.perf_counter()
  (theta_EIP, obj_EI, status_EI, iters_EI), compile_s, solve_s = solver_lib.solve(
      spec, theta0_IP[None], np.ones((1, len(loss))), f, y)
  theta_IP, obj_I, status_I, iters_I = theta_EIP[0], obj_EI[0], status_EI[0], iters_EI[0]
  finite = np.isfinite(obj_I)
  if not finite.any():
    raise ValueError(f"no start of the {form} fit reached a finite objective: check that the "
                     "losses and architecture fields are on the scales the law expects")
  best = int(np.argmin(np.where(finite, obj_I, np.inf)))
  objective = float(obj_I[best])
  at_best = finite & (np.abs(obj_I - objective) <= AT_BEST_RTOL * abs(objective) + 1e-300)
  status_names = solver_lib.STATUS
  converged = int(np.sum(status_I == status_names.index("converged")))
  starts = dict(total=len(obj_I), converged=converged,
                at_best=int(at_best.sum()), at_best_rtol=AT_BEST_RTOL,
                status={s: int(np.sum(status_I == i)) for i, s in enumerate(status_names) if i},
                iterations_of_best=int(iters_I[best]))
  t1 = time.perf_counter()
  theta, objective = _converge_best(spec, form, theta_IP[best], objective, int(status_I[best]),
                                    starts, f, y)
  timings = dict(compile_seconds=compile_s, solve_seconds=solve_s,
                 converge_best_seconds=time.perf_counter() - t1,
                 seconds=time.perf_counter() - t0)
  logging.info("fit: objective %.6g; %d/%d starts converged, %d at the best (%.1f s)", objective,
               starts["converged"], starts["total"], starts["at_best"], timings["seconds"])
  samples = np.zeros((0, len(theta0_IP[0])))
  if cfg.bootstrap:
    samples = _bootstrap(spec, theta, cfg.bootstrap, f, y, rng, starts, timings)
  per_start = dict(objective=obj_I, status=status_I, iterations=iters_I)
  return _Solution(theta, objective, starts, samples, timings, per_start, cfg.bootstrap)


def _converge_best(spec: solver_lib.Spec, form: str, theta_P: np.ndarray, objective: float,
                   status: int, starts: dict[str, Any], f: _Feats,
                   y: np.ndarray) -> tuple[np.ndarray, float]:
  """The best start, iterated further while it stops at max_iter; records what was done in
  `starts["remedy"]` and fails, with the reason, when it still does not converge."""
  if status in _CONVERGED:
    return theta_P, objective
  extra, budget = 0, spec.max_iter
  for _ in range(EXTEND_ROUNDS):
    budget *= 2
    (theta_EIP, obj_EI, status_EI, iters_EI), _, _ = solver_lib.solve(
        spec._replace(max_iter=budget), theta_P[None, None], np.ones((1, len(y))), f, y)
    extra += int(iters_EI[0, 0])
    if obj_EI[0, 0] <= objective:
      theta_P, objective = theta_EIP[0, 0], float(obj_EI[0, 0])
    status = int(status_EI[0, 0])
    if status in _CONVERGED:
      starts["remedy"] = (f"the best start stopped at fit.max_iter={spec.max_iter}; {extra} "
                          "further iterations converged it")
      return theta_P, objective
  raise ValueError(
      f"the best of {starts['total']} starts of the {form} fit did not converge: it stopped at "
      f"fit.max_iter={spec.max_iter} and was still {solver_lib.STATUS[status]} after {extra} "
      f"further iterations ({starts['converged']} of {starts['total']} starts converged). Raise "
      "fit.max_iter, or check that the rows can support the form (fit.terms, fit.r_range)")


def _bootstrap(spec: solver_lib.Spec, theta_P: np.ndarray, n_boot: int, f: _Feats, y: np.ndarray,
               rng: np.random.Generator, starts: dict[str, Any],
               timings: dict[str, float]) -> np.ndarray:
  """Refits on `n_boot` multinomial row resamples, each warm-started at theta_P; the replicates
  that converged (B, P)."""
  n_rows = len(y)
  w_ER = rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=n_boot).astype(np.float64)
  t1 = time.perf_counter()
  (theta_B1P, obj_B1, status_B1, _), boot_compile_s, _ = solver_lib.solve(
      spec, np.broadcast_to(theta_P, (n_boot, 1, len(theta_P))), w_ER, f, y)
  used = np.isfinite(obj_B1[:, 0]) & np.isin(status_B1[:, 0], _CONVERGED)
  timings.update(bootstrap_seconds=time.perf_counter() - t1,
                 compile_seconds=timings["compile_seconds"] + boot_compile_s)
  starts["bootstrap_status"] = {s: int(np.sum(status_B1 == i))
                                for i, s in enumerate(solver_lib.STATUS) if i}
  logging.info("fit: %d bootstrap replicates, %d converged (%.1f s)", n_boot, int(used.sum()),
               timings["bootstrap_seconds"])
  return theta_B1P[used, 0]


def _feats(table: table_lib.Table, l_opt: np.ndarray | None = None) -> _Feats:
  l_opt = np.ones_like(table.n) if l_opt is None else l_opt
  return _Feats(np.log(table.n), np.log(table.d), l_opt, table.x, table.r)


# Above this R^2 of log D on log N the budgets' D follows N, and A/alpha cannot be told from
# B/beta: any split of the scale term between them fits the budgets alike.
COLLINEAR_R2 = 0.99


def _check_separable(n: np.ndarray, d: np.ndarray) -> None:
  """Refuses a Chinchilla L_opt on budgets whose log N and log D are nearly collinear."""
  r2 = float(np.corrcoef(np.log(n), np.log(d))[0, 1] ** 2)
  if r2 > COLLINEAR_R2:
    ratio = np.median(d / n)
    raise ValueError(
        f"l_opt='chinchilla' cannot separate N's term from D's: the budgets' log D follows log N "
        f"(R^2 {r2:.4f}; about {ratio:.3g} tokens per parameter throughout). Set "
        "fit.l_opt=empirical, or train some budgets at other tokens per parameter")


def _resolve_l_opt(l_opt: Any, table: table_lib.Table, cfg: settings.FitConfig,
                   rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float] | None, str]:
  """L_opt per row, the Chinchilla params behind it (if any), and a description."""
  if isinstance(l_opt, str) and l_opt == "empirical":
    spread_warning = table_lib.n_spread_warning(table)
    if spread_warning:
      table.warnings.append(spread_warning)
    return table_lib.empirical_l_opt(table), None, "empirical"
  if isinstance(l_opt, str) and l_opt == "chinchilla":
    n_budgets = table.budget.max() + 1
    first = table_lib.best_rows(table)  # each budget's minimum, at the N and D of its row
    mins = table_lib.point_means(table)[first]
    if n_budgets <= len(law_lib.CHINCHILLA_KEYS) or table_lib.distinct(table.n[first]) < 2 \
        or table_lib.distinct(table.d[first]) < 2:
      raise ValueError(
          f"l_opt='chinchilla' fits E, A, B, alpha, beta to the best loss of each (N, D) budget, "
          f"but the rows have {n_budgets} budget(s) ({table_lib.distinct(table.n[first])} distinct "
          f"N, {table_lib.distinct(table.d[first])} distinct D); it needs at least 6 with two or "
          "more of each. "
          "Use l_opt='empirical', or the path of a fit.json with Chinchilla params.")
    _check_separable(table.n[first], table.d[first])
    sub = table_lib.Table([], [], table.n[first], table.d[first], mins, table.x[first],
                          table.r[first], table.scale[first], np.arange(n_budgets),
                          np.arange(n_budgets))
    # Hoffmann's objective (Huber on log loss), whatever the conditional fit's.
    chin = dataclasses.replace(cfg, form="chinchilla", terms="both", starts="grid", bootstrap=0,
                               loss="huber", space="log")
    sol = _fit_arrays(chin, _feats(sub), mins, rng)
    params = {k: float(v) for k, v in law_lib.theta_to_params("chinchilla", sol.theta).items()}
    return law_lib.Law("chinchilla", params).l_opt(table.n, table.d), params, "chinchilla"
  law = None
  if isinstance(l_opt, law_lib.Law):
    law = l_opt
  elif isinstance(l_opt, Mapping):
    law = law_lib.load_law(l_opt) if "params" in l_opt else law_lib.Law("chinchilla", dict(l_opt))
  elif isinstance(l_opt, (str, pathlib.Path)) and pathlib.Path(l_opt).is_file():
    law = law_lib.load_law(l_opt)
  if law is None or not (law.form == "chinchilla" or law.has_chinchilla):
    raise ValueError(f"l_opt={l_opt!r} must be one of {list(L_OPTS)}, the path of a fit.json with "
                     f"Chinchilla params {list(law_lib.CHINCHILLA_KEYS)}, or those params")
  params = {k: law.params[k] for k in law_lib.CHINCHILLA_KEYS}
  source = str(l_opt) if isinstance(l_opt, (str, pathlib.Path)) else "given"
  return law_lib.Law("chinchilla", params).l_opt(table.n, table.d), params, source




@dataclasses.dataclass
class FitResult:
  """A fitted law with its uncertainty, diagnostics, start statistics, metrics and rows used."""
  law: law_lib.Law
  objective: float
  settings: dict[str, Any]
  l_opt: str
  intervals: dict[str, list[float]]
  stderr: dict[str, float]  # from the Jacobian at the optimum (see archscale.study.diagnostics)
  optimum: dict[str, Any] | None
  starts: dict[str, Any]
  metrics: dict[str, Any]
  rows_used: list[dict[str, Any]]
  rows_excluded: list[dict[str, Any]]
  l_opt_groups: list[dict[str, float]]
  samples: dict[str, np.ndarray]
  timings: dict[str, float]
  per_start: dict[str, np.ndarray]  # each start's objective, status (solver.STATUS), iterations
  diagnostics: dict[str, Any] = dataclasses.field(default_factory=dict)
  bootstrap_stderr: dict[str, float] = dataclasses.field(default_factory=dict)
  # The fitted (solver) parameters' covariance from the Jacobian, and the rows' x and r ranges.
  covariance: dict[str, Any] = dataclasses.field(default_factory=dict)
  support: dict[str, list[float]] | None = None
  # Whether the rows support a recommendation (archscale.study.verdict); None for chinchilla.
  verdict: dict[str, Any] | None = None

  def predict_interval(self, n: Any = None, d: Any = None, x: Any = None, r: Any = None,
                       l_opt: Any = None, level: float | None = None) -> np.ndarray:
    """Percentile interval (2, ...) of `law.predict` over the bootstrap replicates.

    For the conditional forms L_opt is held at the full-data fit: the intervals are conditional
    on it.
    """
    if not self.samples:
      raise ValueError(self.diagnostics.get("bootstrap_note")
                       or "this fit has no bootstrap replicates; refit with bootstrap > 0")
    form = self.law.form
    level = self.settings["level"] if level is None else level
    params = {k: self.samples.get(k, v) for k, v in self.law.params.items()
              if k in law_lib.PARAM_KEYS[form]}
    theta_EP = law_lib.params_to_theta(form, params)
    if form == "chinchilla":
      n, d = np.broadcast_arrays(np.asarray(n, np.float64), np.asarray(d, np.float64))
      pred_ER = np.exp(law_lib.chinchilla_log(theta_EP, np.log(n.ravel()), np.log(d.ravel()), np))
      shape = n.shape
    else:
      x, r = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(r, np.float64))
      pred_ER = law_lib.calibrate(form, theta_EP, x.ravel(), r.ravel(), np)
      shape = x.shape
      if l_opt is None and self.law.has_chinchilla:
        l_opt = self.law.l_opt(n, d)
      if l_opt is not None:
        pred_ER = law_lib.combine(form, np.broadcast_to(l_opt, shape).ravel(), pred_ER)
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    return np.nanpercentile(pred_ER, q, axis=0).reshape((2,) + shape)

  def to_json(self) -> dict[str, Any]:
    """The fit.json document (without provenance)."""
    return _jsonable(dict(
        form=self.law.form, l_opt=self.l_opt, params=dict(self.law.params),
        intervals=self.intervals, interval_level=self.settings["level"], stderr=self.stderr,
        bootstrap_stderr=self.bootstrap_stderr, optimum=self.optimum,
        diagnostics=self.diagnostics, covariance=self.covariance, support=self.support,
        verdict=self.verdict,
        objective=self.objective, starts=self.starts,
        settings=self.settings, metrics=self.metrics, timings=self.timings,
        l_opt_groups=self.l_opt_groups, rows_used=self.rows_used,
        rows_excluded=self.rows_excluded))


def _jsonable(obj: Any) -> Any:
  """Plain JSON types, with NaN and infinities as null."""
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _jsonable(obj.tolist())
  if isinstance(obj, (np.integer, np.bool_)):
    return obj.item()
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


# Fewer converged bootstrap replicates than this (or than this fraction of those drawn) give no
# intervals: percentiles of a handful of refits say little, and failures are not at random.
MIN_BOOTSTRAP_USED = 10
MIN_BOOTSTRAP_FRACTION = 0.5


def fit(rows: Sequence[Mapping[str, Any]], config: settings.FitConfig | None = None, *,
        l_opt: str | pathlib.Path | Mapping[str, float] | law_lib.Law | None = None,
        seed: int = 0, log_warnings: bool = True, **options: Any) -> FitResult:
  """Fits one law to results rows; every input is checked before any solving starts.

  config: the fit section (settings.FitConfig); `options` override its fields (form, terms,
  r_range, loss, delta, space, solver, starts, n_starts, max_iter, tol, bootstrap, level).
  Without a config the fields take FitConfig's defaults, except bootstrap: 0 (none).
  l_opt: "chinchilla" (fitted to the best loss of each budget), "empirical" (that best loss
  itself), or Chinchilla params given directly (a dict, a Law, or a fit.json path); None takes
  the config's.
  log_warnings: log the diagnostics' warnings (they are in `diagnostics["warnings"]` always).
  """
  start = time.perf_counter()
  cfg = _config(config, l_opt, options)
  l_opt = cfg.l_opt if l_opt is None or isinstance(l_opt, str) else l_opt
  form = cfg.form
  table = _prepare(rows, form, cfg.r_bounds, cfg.terms)
  rng = np.random.default_rng(seed)
  chin_params, l_opt_desc, l_opt_R = None, "none", None
  if form != "chinchilla":
    l_opt_R, chin_params, l_opt_desc = _resolve_l_opt(l_opt, table, cfg, rng)
  f = _feats(table, l_opt_R)
  prepared = time.perf_counter()
  sol = _fit_arrays(cfg, f, table.loss, rng)
  solved = time.perf_counter()
  params = {k: float(v) for k, v in
            law_lib.theta_to_params(form, _full_theta(form, cfg.terms, sol.theta)).items()}
  box = None
  if form == "joint":
    box = ((float(table.x.min()), float(table.x.max())),
           (float(table.r.min()), float(table.r.max())))
  law = law_lib.Law(form, dict(params, **(chin_params or {})), box=box)
  result = _assemble(law, cfg, table, f, sol, l_opt_R, l_opt_desc)
  now = time.perf_counter()
  result.timings.update(prepare_seconds=prepared - start, total_seconds=now - start,
                        diagnostics_seconds=now - solved - result.timings["stderr_seconds"])
  if log_warnings:
    log_diagnostics(result)
  return result


def _config(config: settings.FitConfig | None, l_opt: Any,
            options: Mapping[str, Any]) -> settings.FitConfig:
  """The checked fit settings: `config` (or the defaults, without bootstrap) with `options`."""
  if isinstance(l_opt, (str, pathlib.Path)):
    options = dict(options, l_opt=str(l_opt))
  if config is None:
    return settings.FitConfig(**{"bootstrap": 0, **options}).objective()
  return dataclasses.replace(config, **options).objective()


def _assemble(law: law_lib.Law, cfg: settings.FitConfig, table: table_lib.Table, f: _Feats,
              sol: _Solution, l_opt_R: np.ndarray | None, l_opt_desc: str) -> FitResult:
  """The FitResult of a solved fit: uncertainty, diagnostics, predictions per row."""
  form, terms = law.form, cfg.terms
  free = law_lib.free_keys(form, terms)
  y = np.log(table.loss) if cfg.space == "log" else table.loss
  t0 = time.perf_counter()
  se_P, cov_PP, jac_RP = diagnostics_lib.jacobian_errors(_model(cfg), sol.theta, f, y,
                                                         cfg.loss, cfg.delta)
  sol.timings["stderr_seconds"] = time.perf_counter() - t0
  samples, boot_note = _bootstrap_samples(form, terms, sol, law.box)
  q = 100 * np.array([(1 - cfg.level) / 2, (1 + cfg.level) / 2])
  intervals = {k: [float(v) for v in np.nanpercentile(s, q)] for k, s in samples.items()
               if np.isfinite(s).any()}
  diag, optimum = diagnostics_lib.diagnose(
      law, cfg, table, sol.starts, (len(sol.theta_samples), sol.bootstrap_total), se_P,
      jac_RP, intervals, boot_note)
  # Replicates refit the law's own parameters; L_opt (the budgets' best losses or their
  # Chinchilla fit) stays as the full data gave it, so intervals leave out its uncertainty.
  diag["intervals_hold_fixed"] = ["l_opt"] if l_opt_R is not None else []
  for k in law_lib.REGRESSORS:  # no interval for an optimum that is not reported
    if optimum is not None and optimum[k] is None:
      intervals.pop(k, None)
  if optimum is not None and "d_over_sqrt_n" in samples:
    opt_B2 = np.stack([samples["d_over_sqrt_n"], samples["r"]], axis=-1)
    optimum["bootstrap_interior_fraction"] = float(np.mean(np.isfinite(opt_B2).all(axis=1)))
  pred = law.predict(table.n, table.d, table.x, table.r, l_opt=l_opt_R)
  diag["noise"], noise_warnings = diagnostics_lib.seed_noise(table, pred)
  diag["warnings"] = list(dict.fromkeys(diag["warnings"] + noise_warnings))
  result = FitResult(
      law=law, objective=sol.objective, settings=_settings_doc(cfg), l_opt=l_opt_desc,
      intervals=intervals,
      stderr=diagnostics_lib.reported_stderr(form, free, sol.theta, se_P), optimum=optimum,
      starts=sol.starts,
      metrics=dict(in_sample=diagnostics_lib.prediction_metrics(pred, table.loss)),
      rows_used=_rows_used(form, table, pred, l_opt_R), rows_excluded=table.excluded,
      l_opt_groups=[], samples=samples, timings=sol.timings, per_start=sol.per_start,
      diagnostics=diag, covariance=dict(params=list(free), matrix=cov_PP,
                                        dof=len(table.loss) - len(free)),
      support=None if form == "chinchilla" else diagnostics_lib.support_of(table),
      bootstrap_stderr={k: float(np.nanstd(s, ddof=1)) for k, s in samples.items()
                        if np.isfinite(s).sum() > 1},
      verdict=None if form == "chinchilla" else verdict_lib.decide(
          verdict_lib.shape_tests(table, pred, form, free), diag["identifiable"]))
  if samples:
    lo, hi = result.predict_interval(table.n, table.d, table.x, table.r, l_opt=l_opt_R)
    for row, lo_i, hi_i in zip(result.rows_used, lo, hi, strict=True):
      row["predicted_interval"] = [float(lo_i), float(hi_i)]
  if l_opt_R is not None:
    for g, spread in enumerate(table_lib.n_spreads(table)):
      i = np.flatnonzero(table.budget == g)
      result.l_opt_groups.append(dict(
          params_nonembed=float(np.median(table.n[i])), tokens=float(np.median(table.d[i])),
          l_opt=float(l_opt_R[i[0]]), rows=len(i), n_spread=spread))
  return result


def _settings_doc(cfg: settings.FitConfig) -> dict[str, Any]:
  """fit.json's `settings`: how the law was fitted (the form, table and L_opt are reported
  beside it)."""
  skip = ("results", "form", "l_opt", "r_range")
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


def _rows_used(form: str, table: table_lib.Table, pred: np.ndarray,
               l_opt_R: np.ndarray | None) -> list[dict[str, Any]]:
  """Each row with its d_over_sqrt_n, prediction, scale and budget (and L_opt)."""
  rows = [dict(row, d_over_sqrt_n=float(table.x[i]), predicted=float(pred[i]),
               scale_index=int(table.scale[i]), budget_index=int(table.budget[i]),
               **({"l_opt": float(l_opt_R[i])} if l_opt_R is not None else {}))
          for i, row in enumerate(table.rows)]
  if form == "chinchilla":
    for row in rows:
      row.pop("d_over_sqrt_n")
  return rows


def _bootstrap_samples(form: str, terms: str, sol: _Solution,
                       box: Any) -> tuple[dict[str, np.ndarray], str | None]:
  """Each reported parameter (and the optimum) per converged replicate, or none and the reason
  when too few converged."""
  total, used = sol.bootstrap_total, len(sol.theta_samples)
  if not total:
    return {}, None
  need = max(MIN_BOOTSTRAP_USED, math.ceil(MIN_BOOTSTRAP_FRACTION * total))
  if used < need:
    return {}, (f"only {used} of {total} bootstrap replicates converged; no intervals are "
                f"reported from fewer than {need}. Raise fit.max_iter (or fit.bootstrap), or "
                "check the fit's other diagnostics")
  theta_EP = _full_theta(form, terms, sol.theta_samples)
  fitted = set(law_lib.free_keys(form, terms)) if form != "chinchilla" else None
  samples = {k: np.asarray(v) for k, v in law_lib.theta_to_params(form, theta_EP).items()
             if fitted is None or k in fitted}  # b0 = 1 and unfitted terms are fixed
  if form != "chinchilla":
    opt_B2 = diagnostics_lib.optimum_samples(form, theta_EP, box)
    samples["d_over_sqrt_n"], samples["r"] = opt_B2[:, 0], opt_B2[:, 1]
  return samples, None


def log_diagnostics(result: FitResult) -> None:
  """Logs a fit's grouping and summary at INFO, and each of its warnings once."""
  d = result.diagnostics
  logging.info("fit: %s", d.get("grouping", ""))
  logging.info("fit: %.0f%% of starts converged; identifiable %s; bootstrap %d/%d; optimum %s",
               100 * d["converged_fraction"], d["identifiable"], d["bootstrap_used"],
               d["bootstrap_total"], result.optimum and {
                   k: result.optimum[k] for k in law_lib.REGRESSORS})
  for warning in d["warnings"]:
    logging.warning("fit: %s", warning)


def evaluate_progressive(rows: Sequence[Mapping[str, Any]],
                         config: settings.FitConfig | None = None, *, l_opt: Any = None,
                         seed: int = 0, **options: Any) -> list[dict[str, Any]]:
  """The paper's protocol: fit on scales 1..k, predict scale k + 1, for every k.

  config, options and l_opt as for `fit` (no bootstrap). Scales are the rows' `scale`, else
  groups of params_nonembed (see archscale.study.table). With l_opt="empirical" the held-out scale's
  L_opt is its own best loss, so the metrics score the architecture calibration, as in the
  paper. Steps whose training rows cannot support the form are reported with `skipped`; each
  step's fit warnings are kept in the step, not logged.
  """
  cfg = _config(config, l_opt, dict(options, bootstrap=0))
  l_opt = cfg.l_opt if l_opt is None or isinstance(l_opt, str) else l_opt
  table = _prepare(rows, cfg.form, cfg.r_bounds, cfg.terms)
  n_scales = table.scale.max() + 1
  if n_scales < 2:
    raise ValueError("the progressive protocol needs at least two scales of params_nonembed; "
                     f"the rows have {n_scales}")
  step_cfg = dataclasses.replace(cfg, r_range=())  # the r filter has been applied
  steps = []
  for k in range(1, n_scales):
    train, test = table.take(table.scale < k), table.take(table.scale == k)
    step = dict(train_scales=[float(np.median(table.n[table.scale == s])) for s in range(k)],
                test_scale=float(np.median(test.n)), n_train=len(train.rows), n_test=len(test.rows))
    try:
      result = fit(train.rows, step_cfg, l_opt=l_opt, seed=seed, log_warnings=False)
    except ValueError as e:
      logging.info("progressive: step %d skipped: %s", k, e)
      steps.append(dict(step, skipped=str(e)))
      continue
    law = result.law
    test_l_opt = None
    if cfg.form != "chinchilla" and not law.has_chinchilla:
      test_l_opt = table_lib.empirical_l_opt(test)
    pred = law.predict(test.n, test.d, test.x, test.r, l_opt=test_l_opt)
    metrics = diagnostics_lib.prediction_metrics(pred, test.loss)
    ranks = diagnostics_lib.spearman_interval(pred, test.loss, cfg.level, seed)
    steps.append(dict(step, mse=metrics["mse"], r2=metrics["r2"], spearman=metrics["spearman"],
                      spearman_interval=ranks,
                      params=dict(law.params), warnings=result.diagnostics["warnings"]))
    logging.info("progressive: %s -> %.3g: %s", step["train_scales"], step["test_scale"],
                 {k: steps[-1][k] for k in ("mse", "r2", "spearman")})
  return steps
