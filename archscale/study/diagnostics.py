"""What a fit's rows support: standard errors, identifiability of each regressor, interior optima.

A fitted law is only a finding where the rows pin it down. For a fitted conditional law this
module computes
  - standard errors from the Jacobian of the residuals at the optimum: s^2 (J^T J)^-1 for the
    squared loss, and Huber's M-estimator form K^2 [sum psi^2 / (R - P)] / mean(psi')^2 (J^T J)^-1
    for the Huber loss (undefined when no residual lies within delta);
  - per regressor (d_over_sqrt_n, r), whether the rows identify its two terms: it has at least
    three distinct values, its basis (1, ln z, 1 / z) over the rows is well conditioned
    (column-normalised condition number <= COND_LIMIT), and neither term's interval includes zero
    (from the Jacobian standard errors, which carry the conditioning of the whole Jacobian; else
    from the bootstrap);
  - the seed noise, where design points were trained with several seeds, and whether each
    budget's shapes differ beyond it;
  - the optimum of each identified regressor, reported only where the fitted law has a minimum
    inside the rows' range: closed-form (x* = a2 / a1, r* = b2 / b1) when both terms are positive,
    otherwise found on a grid over the rows' box, or none, with the reason;
  - how well predictions match measurements (MSE, R^2, Spearman, and a bootstrap interval of the
    Spearman correlation), in sample and in the progressive protocol.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from archscale.core import settings
from archscale.study import law as law_lib
from archscale.study import solver as solver_lib
from archscale.study import table as table_lib

# Below this fraction of converged starts a fit warns (the best start is converged regardless).
LOW_CONVERGED_FRACTION = 0.5
# Above this condition number (columns scaled to unit norm) a regressor's terms are confounded
# with each other and the constant: ln z and 1 / z are nearly linear over a narrow range of z.
COND_LIMIT = 1e3
# A budget's shapes differ beyond seed noise where the F-test's p-value is at most this.
NOISE_TEST_LEVEL = 0.05
# A law whose residual RMS exceeds the seed noise by this factor misses the rows.
LACK_OF_FIT_RATIO = 3.0


@functools.cache
def _jacobian(model: Callable[[Any, Any], Any]) -> Callable[..., tuple[Any, Any]]:
  """jit of theta, feats -> (Jacobian (R, P), prediction (R,)), one per model: a fit's
  standard errors compile one small program instead of dispatching each operation."""
  def jac_and_pred(theta_P, f):
    pred_R, vjp_cols = jax.linearize(lambda t: model(t, f), theta_P)
    return jax.vmap(vjp_cols, out_axes=1)(jnp.eye(theta_P.shape[0], dtype=theta_P.dtype)), pred_R
  return jax.jit(jac_and_pred)


def jacobian_errors(model: Callable[[Any, Any], Any], theta_P: np.ndarray, feats: Any,
                    y_R: np.ndarray, loss: str,
                    delta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(standard errors (P,), covariance (P, P), Jacobian (R, P)) of the fitted parameters at the
  optimum theta_P; NaN where J^T J is singular or (Huber) no residual is within delta."""
  with solver_lib.float64():
    f = type(feats)(*(np.asarray(a, np.float64) for a in feats))
    jac_RP, pred_R = map(np.asarray, _jacobian(model)(np.asarray(theta_P, np.float64), f))
  resid_R = pred_R - np.asarray(y_R, np.float64)
  n_rows, n_p = jac_RP.shape
  nan, nan_PP = np.full(n_p, np.nan), np.full((n_p, n_p), np.nan)
  if n_rows <= n_p or not np.all(np.isfinite(jac_RP)) or not np.all(np.isfinite(resid_R)):
    return nan, nan_PP, jac_RP
  if loss == "squared":
    scale = np.sum(resid_R**2) / (n_rows - n_p)
  else:
    psi, inside = np.clip(resid_R, -delta, delta), (np.abs(resid_R) <= delta).astype(float)
    m = inside.mean()
    if m == 0:
      return nan, nan_PP, jac_RP
    k = 1 + n_p / n_rows * inside.var() / m**2
    scale = k**2 * np.sum(psi**2) / (n_rows - n_p) / m**2
  try:
    cov_PP = scale * np.linalg.inv(jac_RP.T @ jac_RP)
  except np.linalg.LinAlgError:
    return nan, nan_PP, jac_RP
  diag = np.diag(cov_PP)
  return np.where(diag >= 0, np.sqrt(np.abs(diag)), np.nan), cov_PP, jac_RP


def reported_stderr(form: str, free: Sequence[str], theta_P: np.ndarray,
                    se_P: np.ndarray) -> dict[str, float]:
  """Standard errors of the reported parameters (Chinchilla's E, A, B are exponentials of the
  solver's e, a, b: se(A) = A se(a))."""
  se = dict(zip(free, (float(v) for v in se_P), strict=True))
  if form != "chinchilla":
    return se
  t = dict(zip(free, theta_P, strict=True))
  return dict(E=math.exp(t["e"]) * se["e"], A=math.exp(t["a"]) * se["a"],
              B=math.exp(t["b"]) * se["b"], alpha=se["alpha"], beta=se["beta"])


def basis_condition(z: np.ndarray) -> float:
  """Condition number of the columns (1, ln z, 1 / z) over the rows, each scaled to unit norm:
  how far the rows' spread of z separates a regressor's two terms from the constant."""
  basis = np.stack(law_lib.basis(np.asarray(z, np.float64), np), axis=-1)
  return float(np.linalg.cond(basis / np.linalg.norm(basis, axis=0)))


def t_quantile(level: float, dof: int | None) -> float:
  """The two-sided `level` quantile of Student's t on `dof` degrees of freedom (normal without
  them): with few rows or seeds, normal quantiles make intervals too narrow."""
  if dof is None:
    return float(stats.norm.ppf((1 + level) / 2))
  return float(stats.t.ppf((1 + level) / 2, max(int(dof), 1)))


def identifiability(form: str, free: Sequence[str], theta_P: np.ndarray, se_P: np.ndarray,
                    jac_RP: np.ndarray, values: Mapping[str, np.ndarray],
                    boot_intervals: Mapping[str, Sequence[float]], level: float,
                    terms: str) -> tuple[dict[str, bool], dict[str, str | None], dict[str, float]]:
  """Per regressor: whether the rows identify its terms, why not, and the condition number.
  Intervals use t quantiles on the residual degrees of freedom (rows less parameters)."""
  roles = law_lib.term_keys(form)
  z = t_quantile(level, jac_RP.shape[0] - len(free))
  col = {k: i for i, k in enumerate(free)}
  ok, reasons = {}, {}
  norms = np.linalg.norm(jac_RP, axis=0)
  conds = {"jacobian": float(np.linalg.cond(jac_RP / np.where(norms > 0, norms, 1.0)))}
  for name in law_lib.REGRESSORS:
    keys = roles[name]
    if not all(k in col for k in keys):
      ok[name], reasons[name] = False, f"not fitted (fit.terms={terms!r})"
      continue
    cond = basis_condition(values[name])
    conds[name] = cond
    lo, hi = float(np.min(values[name])), float(np.max(values[name]))
    if not cond <= COND_LIMIT:
      ok[name], reasons[name] = False, (
          f"the rows' {name} spans only [{lo:.3g}, {hi:.3g}]: its ln and reciprocal "
          f"terms are confounded with the constant (condition number {cond:.3g} > {COND_LIMIT:g})")
      continue
    zero = []
    for k in keys:
      est, se = float(theta_P[col[k]]), float(se_P[col[k]])
      if math.isfinite(se):
        interval = (est - z * se, est + z * se)
      elif k in boot_intervals:
        interval = tuple(boot_intervals[k])
      else:
        continue  # untested: neither standard errors nor bootstrap intervals
      if interval[0] <= 0 <= interval[1]:
        zero.append(f"{k} in [{interval[0]:.3g}, {interval[1]:.3g}]")
    ok[name] = not zero
    reasons[name] = (f"the {level:.0%} intervals of its terms include zero ({'; '.join(zero)}): "
                     f"the rows (over {name} in [{lo:.3g}, {hi:.3g}]) cannot tell where its "
                     "optimum is") if zero else None
  return ok, reasons, conds


def interior_optimum(law: law_lib.Law, box: dict[str, tuple[float, float]],
                     identifiable: Mapping[str, bool],
                     reasons: Mapping[str, str | None]) -> dict[str, Any]:
  """The fitted law's optimum over the rows' box, per regressor; None with the reason where the
  regressor is not identified or the law has no minimum inside the rows' range."""
  form = law.form
  theta = law_lib.params_to_theta(form, law.params)
  x_g, r_g, x_in, r_in = law_lib.grid_argmin(form, theta, box["d_over_sqrt_n"], box["r"])
  numeric = {"d_over_sqrt_n": (float(x_g[0]), bool(x_in[0])), "r": (float(r_g[0]), bool(r_in[0]))}
  closed = _closed_forms(law, box)
  out: dict[str, Any] = dict(closed_form=form != "joint", reasons={},
                             range={k: list(v) for k, v in box.items()})
  for name in law_lib.REGRESSORS:
    lo, hi = box[name]
    value, reason = None, reasons.get(name)
    if identifiable[name] and name in closed:
      c = closed[name]
      if lo <= c <= hi:
        value = c
      else:
        reason = f"{name}* = {c:.3g} lies outside the rows' range [{lo:.3g}, {hi:.3g}]"
    elif identifiable[name]:
      out["closed_form"] = False
      v, inside = numeric[name]
      value = v if inside else None
      reason = None if inside else (
          f"the fitted law has no minimum in {name} inside the rows' range [{lo:.3g}, {hi:.3g}]: "
          f"its lowest loss there is at the edge {name} = {v:.3g}")
    out[name] = value
    out["reasons"][name] = None if value is not None else reason
  out["interior"] = all(out[k] is not None for k in law_lib.REGRESSORS)
  return out


def _closed_forms(law: law_lib.Law, box: dict[str, tuple[float, float]]) -> dict[str, float]:
  """x* = a2 / a1 and r* = b2 / b1 where both terms are positive and (multiplicative) the other
  factor stays positive over the box, so the closed form is a minimum of the product."""
  if law.form == "joint":
    return {}
  p = law.params
  out = {}
  for name, (c1, c2) in (("d_over_sqrt_n", ("a1", "a2")), ("r", ("b1", "b2"))):
    value = float(law_lib.closed_form_optimum(p[c1], p[c2]))
    if math.isfinite(value):
      out[name] = value
  if law.form == "multiplicative":
    x_Q, r_Q = (np.geomspace(*box[k], 64) for k in law_lib.REGRESSORS)
    u = p["a0"] + p["a1"] * np.log(x_Q) + p["a2"] / x_Q
    v = p.get("b0", 1.0) + p["b1"] * np.log(r_Q) + p["b2"] / r_Q
    if not (np.all(u > 0) and np.all(v > 0)):
      return {}
  return out


def optimum_samples(form: str, theta_EP: np.ndarray,
                     box: tuple[tuple[float, float], tuple[float, float]] | None) -> np.ndarray:
  """(B, 2) optimum (x*, r*) of each parameter row; NaN where there is no interior minimum."""
  p = law_lib.theta_to_params(form, theta_EP)
  if form != "joint":
    return np.stack([law_lib.closed_form_optimum(p["a1"], p["a2"]),
                     law_lib.closed_form_optimum(p["b1"], p["b2"])], axis=-1)
  x, r, interior = law_lib.grid_optimum(form, theta_EP, box[0], box[1])
  return np.where(interior[:, None], np.stack([x, r], axis=-1), np.nan)


def diagnose(law: law_lib.Law, cfg: settings.FitConfig, table: table_lib.Table,
             starts: Mapping[str, Any], bootstrap: tuple[int, int], se_P: np.ndarray,
             jac_RP: np.ndarray, intervals: Mapping[str, Sequence[float]],
             boot_note: str | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """A fit's `diagnostics` and `optimum`: what the rows support, and a warning per problem.

  cfg: the fit's settings; starts: its start counts (with
  `remedy` when the best start needed more iterations); bootstrap: (used, drawn) replicates.
  """
  form, terms = law.form, cfg.terms
  warnings = list(table.warnings)
  total, converged = starts["total"], starts["converged"]
  if converged < LOW_CONVERGED_FRACTION * total:
    warnings.append(f"only {converged} of {total} starts converged within "
                    f"fit.max_iter={cfg.max_iter}; "
                    + starts.get("remedy", "the best start did"))
  elif "remedy" in starts:
    warnings.append(starts["remedy"])
  if boot_note:
    warnings.append(boot_note)
  if not np.all(np.isfinite(se_P)):
    huber_empty = cfg.loss == "huber" and np.isfinite(jac_RP).all()
    warnings.append("standard errors from the Jacobian are undefined: " + (
        f"no residual lies within the Huber fit.delta={cfg.delta:g} (use "
        "fit.loss=squared or a larger fit.delta)" if huber_empty else
        "the Jacobian is singular at the optimum (some parameters are not identified)"))
  identifiable = {k: False for k in law_lib.REGRESSORS}
  reasons: dict[str, str | None] = {}
  conds: dict[str, float] = {}
  optimum = None
  if form != "chinchilla":
    values = {"d_over_sqrt_n": table.x, "r": table.r}
    free = law_lib.free_keys(form, terms)
    theta = law_lib.params_to_theta(form, law.params)
    theta_free = theta[[law_lib.THETA_KEYS[form].index(k) for k in free]]
    identifiable, reasons, conds = identifiability(
        form, free, theta_free, se_P, jac_RP, values, intervals, cfg.level, terms)
    box = {k: (float(np.min(v)), float(np.max(v))) for k, v in values.items()}
    optimum = interior_optimum(law, box, identifiable, reasons)
    if form == "joint":
      optimum["box"] = [list(box["d_over_sqrt_n"]), list(box["r"])]
    for name in law_lib.REGRESSORS:
      other = "width" if name == "r" else "ratio"
      if not identifiable[name] and not reasons[name].startswith("not fitted"):
        hint = f" (fit.terms={other!r} fits the {other} term alone)" if terms == "both" else ""
        warnings.append(f"{name} is not identified by these rows: {reasons[name]}{hint}; no "
                        f"{name} optimum is reported")
      elif identifiable[name] and optimum[name] is None:
        warnings.append(f"no interior {name} optimum: {optimum['reasons'][name]}")
  diag = dict(
      converged_fraction=converged / total, convergence=starts.get("remedy"),
      identifiable=identifiable, identifiability=reasons, condition_numbers=conds,
      bootstrap_used=bootstrap[0], bootstrap_total=bootstrap[1],
      bootstrap_note=boot_note, grouping=table.grouping,
      warnings=list(dict.fromkeys(warnings)))
  return diag, optimum


def seed_noise(table: table_lib.Table,
               predicted_R: np.ndarray) -> tuple[dict[str, Any] | None, list[str]]:
  """The seed-to-seed noise of the rows' losses, from design points trained with several seeds,
  and per budget whether its shapes' losses differ beyond it; None where no point is replicated.

  The noise is the pooled standard deviation of the replicates about their point's mean. Each
  budget with two or more design points gets a one-way ANOVA F-test of "all its shapes have the
  same expected loss" against that noise; a budget where the test does not reject it at
  NOISE_TEST_LEVEL earns a warning, since its shape effects are not distinguishable from seed
  luck. `fit_rms_over_noise` compares the law's residuals with the noise: near 1 the law fits as
  well as the noise allows; far above, its form misses the rows.
  """
  counts_G, mean_G = table_lib.points(table)
  dof = int(np.sum(counts_G - 1))
  if dof == 0:
    return None, []
  variance = float(np.sum((table.loss - mean_G[table.point]) ** 2) / dof)
  sigma = math.sqrt(variance)
  budgets, warnings = [], []
  for g in range(table.budget.max() + 1):
    in_g = table.budget == g
    points = np.unique(table.point[in_g])
    if len(points) < 2:
      continue
    k, m = counts_G[points], mean_G[points]
    between = float(np.sum(k * (m - np.average(m, weights=k)) ** 2) / (len(points) - 1))
    f = between / variance if variance > 0 else math.inf
    p = float(stats.f.sf(f, len(points) - 1, dof)) if math.isfinite(f) else 0.0
    budgets.append(dict(params_nonembed=float(np.median(table.n[in_g])),
                        tokens=float(np.median(table.d[in_g])), points=len(points),
                        spread=float(m.max() - m.min()), f=f, p=p,
                        beyond_noise=p <= NOISE_TEST_LEVEL))
    if not budgets[-1]["beyond_noise"]:
      warnings.append(
          f"at N~{budgets[-1]['params_nonembed']:.3g}, D~{budgets[-1]['tokens']:.3g} the "
          f"{len(points)} shapes' mean losses (spread {budgets[-1]['spread']:.3g}) do not differ "
          f"beyond seed noise (sigma {sigma:.3g}; F-test p = {p:.2f}): train more seeds "
          "(sweep.seeds), more tokens, or a wider grid")
  rms = float(np.sqrt(np.mean((table.loss - predicted_R) ** 2)))
  noise = dict(seed_std=sigma, seed_std_relative=sigma / float(np.mean(table.loss)), dof=dof,
               replicated_points=int(np.sum(counts_G > 1)), points=len(counts_G),
               budgets=budgets, fit_rms=rms, fit_rms_over_noise=rms / sigma if sigma else None)
  if sigma and rms > LACK_OF_FIT_RATIO * sigma:
    warnings.append(f"the law misses the rows by {rms / sigma:.1f}x the seed noise (residual RMS "
                    f"{rms:.3g}, sigma {sigma:.3g}): its form does not describe these losses")
  return noise, warnings


# ----------------------------------------------------------------------------------------------
# What a search may rely on: the rows' support and the uncertainty of predictions.


# The axes of a fit's `support`: the two shape regressors, GQA (which the law does not model), and
# the scale of the runs (N, D), which it does model, so that going beyond them is extrapolation.
SUPPORT_AXES = (*law_lib.REGRESSORS, "gqa", "n_params", "tokens")


def support_of(table: table_lib.Table) -> dict[str, list[float] | None]:
  """The rows' range on every `SUPPORT_AXES` axis; `gqa` is None when no row records its GQA."""
  gqa = [float(row["gqa"]) for row in table.rows if table_lib.is_finite_number(row.get("gqa"))]
  span = lambda v: [float(np.min(v)), float(np.max(v))]
  return {"d_over_sqrt_n": span(table.x), "r": span(table.r),
          "gqa": span(gqa) if len(gqa) == len(table.rows) else None,
          "n_params": span(table.n), "tokens": span(table.d)}


def widened_support(doc: Mapping[str, Any], margin: float) -> dict[str, list[float] | None] | None:
  """A fit.json's `support` with the shape ranges (d_over_sqrt_n, r) widened on each side by
  `margin` times their width in log space; GQA, N and D stay as the rows have them (None where
  the fit did not record an axis). None when the law carries no support (hand-written)."""
  support = doc.get("support")
  if not support:
    return None
  out: dict[str, list[float] | None] = {}
  for name in SUPPORT_AXES:
    if support.get(name) is None:
      out[name] = None
      continue
    lo, hi = (float(v) for v in support[name])
    pad = margin * math.log(hi / lo) if name in law_lib.REGRESSORS else 0.0
    out[name] = [lo * math.exp(-pad), hi * math.exp(pad)]
  return out


def _gradients(law: law_lib.Law, free: Sequence[str], x: np.ndarray, r: np.ndarray,
               l_opt: np.ndarray | None) -> np.ndarray:
  """(K, P) derivative of the prediction at each (x, r) by the fitted parameters, by central
  differences (L_opt held fixed)."""
  theta = law_lib.params_to_theta(law.form, law.params)
  cols = [law_lib.THETA_KEYS[law.form].index(k) for k in free]
  grads = []
  for c in cols:
    h = 1e-6 * max(1.0, abs(theta[c]))
    up, down = theta.copy(), theta.copy()
    up[c] += h
    down[c] -= h
    diff = (law_lib.calibrate(law.form, up[None], x, r, np)[0]
            - law_lib.calibrate(law.form, down[None], x, r, np)[0]) / (2 * h)
    grads.append(diff if l_opt is None or law.form == "additive" else diff * l_opt)
  return np.stack(grads, axis=-1)


def compare(law: law_lib.Law, doc: Mapping[str, Any], a: Sequence[float],
            b: Sequence[float] | None, level: float) -> dict[str, Any] | None:
  """Predicted loss of shape a = (n, d, x, r) with its interval at `level` (from the fit's
  Jacobian covariance, conditional on L_opt), and its difference from shape b (if given) with
  the difference's interval; None when the fit.json carries no covariance."""
  cov = doc.get("covariance") or {}
  matrix = np.asarray(cov.get("matrix") or [], np.float64)
  if not matrix.size or not np.all(np.isfinite(matrix)) or law.form == "chinchilla":
    return None
  z = t_quantile(level, cov.get("dof"))
  shapes = [a] + ([b] if b is not None else [])
  n, d, x, r = (np.array([float(s[i]) for s in shapes]) for i in range(4))
  l_opt = law.l_opt(n, d) if law.has_chinchilla else None
  g_AP = _gradients(law, cov["params"], x, r, l_opt)
  pred = np.asarray(law.predict(n, d, x, r), np.float64)
  half = z * math.sqrt(max(float(g_AP[0] @ matrix @ g_AP[0]), 0.0))
  out = dict(predicted=float(pred[0]), interval=[float(pred[0] - half), float(pred[0] + half)],
             level=level)
  if b is not None:
    g = g_AP[0] - g_AP[1]
    half_diff = z * math.sqrt(max(float(g @ matrix @ g), 0.0))
    out.update(difference=float(pred[0] - pred[1]), difference_half_width=half_diff)
  return out


def pick_statements(law: law_lib.Law, doc: Mapping[str, Any],
                    picks: Mapping[str, Sequence[float]], baseline: Sequence[float] | None,
                    target: float, level: float) -> tuple[dict[str, Any], list[str]]:
  """Each pick's (name -> (n, d, x, r)) predicted loss with its interval and, in plain words,
  whether its advantage over the baseline (or its margin to a numeric target) exceeds the fit's
  uncertainty."""
  out: dict[str, Any] = {}
  lines: list[str] = []
  for name, shape in picks.items():
    c = compare(law, doc, shape, baseline, level)
    if c is None:
      lines.append(f"{name}: the law carries no covariance (hand-written, or its standard errors "
                   "are undefined), so whether its predicted difference is real is untested")
      continue
    out[name] = c
    lo, hi = c["interval"]
    head = f"{name}: predicted loss {c['predicted']:.5g}, {level:.0%} interval [{lo:.5g}, {hi:.5g}]"
    if baseline is not None:
      diff, half = c["difference"], c["difference_half_width"]
      within = abs(diff) <= half
      lines.append(f"{head}; against the baseline {diff:+.3g} +/- {half:.2g}: "
                   + ("within the fit's uncertainty, so the law cannot tell it from the baseline"
                      if within else "beyond the fit's uncertainty"))
      c["within_uncertainty"] = within
    else:
      within = lo <= target <= hi
      lines.append(f"{head}; the target {target:.5g} is "
                   + ("inside that interval: whether it meets the target is within the fit's "
                      "uncertainty" if within else "outside that interval"))
      c["within_uncertainty"] = within
  return out, lines


def spearman_interval(predicted: Any, measured: Any, level: float, seed: int = 0,
                      n_boot: int = 2000) -> list[float] | None:
  """Percentile bootstrap interval of the Spearman correlation, resampling the rows; None with
  fewer than 4 rows or when most resamples have no ranking to correlate."""
  p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
  if len(p) < 4:
    return None
  i_BR = np.random.default_rng(seed).integers(0, len(p), (n_boot, len(p)))
  rp, rm = stats.rankdata(p[i_BR], axis=1), stats.rankdata(m[i_BR], axis=1)
  rp, rm = rp - rp.mean(axis=1, keepdims=True), rm - rm.mean(axis=1, keepdims=True)
  denom = np.sqrt(np.sum(rp**2, axis=1) * np.sum(rm**2, axis=1))
  rho = np.where(denom > 0, np.sum(rp * rm, axis=1) / np.where(denom > 0, denom, 1.0), np.nan)
  if np.isnan(rho).mean() > 0.5:
    return None
  q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
  return [float(v) for v in np.nanpercentile(rho, q)]


def prediction_metrics(predicted: Any, measured: Any) -> dict[str, float]:
  """MSE, R^2 and Spearman rank correlation (average ranks for ties) of predicted vs measured."""
  p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
  if p.shape != m.shape or p.ndim != 1:
    raise ValueError(f"predicted {p.shape} and measured {m.shape} must be 1-D of equal length")
  n = len(m)
  mse = float(np.mean((p - m) ** 2)) if n else math.nan
  ss_tot = float(np.sum((m - m.mean()) ** 2)) if n else 0.0
  r2 = 1.0 - float(np.sum((p - m) ** 2)) / ss_tot if ss_tot > 0 else math.nan
  rp, rm = stats.rankdata(p), stats.rankdata(m)
  denom = np.std(rp) * np.std(rm) if n > 1 else 0.0
  spearman = float(np.mean((rp - rp.mean()) * (rm - rm.mean())) / denom) if denom > 0 else math.nan
  return dict(n=n, mse=mse, r2=r2, spearman=spearman)
