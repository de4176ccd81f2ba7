"""Whether a fit supports a recommendation: tests that can fail both ways.

A recommendation rests on two claims: at a fixed budget the shape changes the loss, and the
fitted law describes how. Each test compares the rows with the seed noise measured at their own
budget (small runs are noisier, so one pooled noise would call noise an effect), and the budgets
are weighed together, so one budget whose shapes happen to be alike does not outvote the others.

  shape_effect    per budget, a one-way ANOVA F-test of "every shape has the same expected loss"
                  against that budget's seed noise; the p-values combined by Fisher's method.
                  Passes when the combined p <= LEVEL.
  explained       the share of the within-budget variance of the shapes' mean losses that the
                  law's shape term explains, each budget's mean residual removed (that is
                  L_opt's part) and each budget weighed by its noise. Passes at >= MIN_EXPLAINED.
  lack_of_fit     per budget, the law's misses of the shapes' means against pure error (the
                  seed replicates): F-tests, combined likewise. Passes unless p < LACK_OF_FIT_LEVEL.
  out_of_sample   the progressive protocol's RMSE at its largest step over the noise, when the
                  fit stage ran it. Passes at <= MAX_OUT_OF_SAMPLE.
  rank            the progressive protocol's Spearman correlation of predicted and measured
                  losses at each step (the paper's extrapolation tasks), with a bootstrap
                  interval over the held-out rows. Passes unless the largest step's interval
                  reaches down to zero: a ranking no better than chance.
  equal_variance  Bartlett's test that the budgets share one noise level: reported, not gated.
The rows must also identify at least one fitted term; one they do not identify while another is
becomes a caveat. Without seed replicates (`sweep.seeds`) nothing can be tested, and the verdict
says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from archscale.study import law as law_lib
from archscale.study import table as table_lib

LEVEL = 0.05
MIN_EXPLAINED = 0.5
LACK_OF_FIT_LEVEL = 0.01
MAX_OUT_OF_SAMPLE = 3.0


def _budget_noise(table: table_lib.Table) -> list[dict[str, Any]]:
  """Per budget: its design points, their replicate counts and means, and its seed noise."""
  counts_G, mean_G = table_lib.points(table)
  resid_R = table.loss - mean_G[table.point]
  out = []
  for g in range(int(table.budget.max()) + 1):
    in_g = table.budget == g
    pts = np.unique(table.point[in_g])
    dof = int(np.sum(counts_G[pts] - 1))
    ss = float(np.sum(resid_R[in_g] ** 2))
    out.append(dict(points=pts, counts=counts_G[pts], means=mean_G[pts], dof=dof,
                    sigma=math.sqrt(ss / dof) if dof and ss > 0 else None,
                    residuals=resid_R[in_g], params_nonembed=float(np.median(table.n[in_g])),
                    tokens=float(np.median(table.d[in_g]))))
  return out


def fitted_terms(form: str, free: Sequence[str]) -> list[str]:
  """The regressors (d_over_sqrt_n, r) whose terms the fit estimated."""
  roles = law_lib.term_keys(form)
  return [k for k in law_lib.REGRESSORS if all(p in free for p in roles[k])]


def shape_tests(table: table_lib.Table, predicted_R: np.ndarray, form: str,
                free: Sequence[str]) -> dict[str, Any]:
  """The figures the verdict decides from (see the module docstring); `tested` is False when no
  budget has both two shapes and seed replicates. `free`: the fitted solver parameters."""
  terms = fitted_terms(form, free)
  noise = _budget_noise(table)
  pred_G = np.zeros(int(table.point.max()) + 1)
  pred_G[table.point] = predicted_R  # one prediction per design point
  roles = law_lib.term_keys(form)
  n_shape = sum(len(roles[k]) for k in terms)
  free_shapes = sum(len(b["points"]) - 1 for b in noise if len(b["points"]) > 1)
  budgets, p_values, lof_p, residual, total = [], [], [], 0.0, 0.0
  for b in noise:
    if len(b["points"]) < 2 or b["sigma"] is None:
      continue
    k, m, var = b["counts"], b["means"], b["sigma"] ** 2
    between = float(np.sum(k * (m - np.average(m, weights=k)) ** 2))
    f = between / (len(m) - 1) / var
    p = float(stats.f.sf(f, len(m) - 1, b["dof"]))
    miss = m - pred_G[b["points"]]
    missed = float(np.sum(k * (miss - np.average(miss, weights=k)) ** 2))
    residual += missed / var
    total += between / var
    # This budget's share of the law's shape parameters comes off its lack-of-fit freedom.
    lof_dof = (len(m) - 1) * (1 - n_shape / free_shapes)
    lof_f = missed / lof_dof / var if lof_dof > 0 else None
    if lof_f is not None:
      lof_p.append(float(stats.f.sf(lof_f, lof_dof, b["dof"])))
    p_values.append(p)
    budgets.append(dict(params_nonembed=b["params_nonembed"], tokens=b["tokens"],
                        shapes=len(m), sigma=b["sigma"], dof=b["dof"], f=f, p=p,
                        lack_of_fit_f=lof_f, lack_of_fit_p=lof_p[-1] if lof_f else None))
  if not budgets:
    return {"tested": False, "terms": terms}
  groups = [b["residuals"] for b in noise if b["dof"] > 1]
  equal = stats.bartlett(*groups).pvalue if len(groups) > 1 else None
  return {
      "tested": True,
      "terms": terms,
      "budgets": budgets,
      "shape_effect_p": _fisher(p_values),
      "explained": 1.0 - residual / total if total > 0 else 0.0,
      "lack_of_fit_p": _fisher(lof_p) if lof_p else None,
      "equal_variance_p": None if equal is None or not math.isfinite(equal) else float(equal),
      "noise_ratio": max(b["sigma"] for b in budgets) / min(b["sigma"] for b in budgets),
      "pooled_sigma": math.sqrt(sum(b["sigma"] ** 2 * b["dof"] for b in budgets)
                                / sum(b["dof"] for b in budgets)),
  }


def _fisher(p_values: Sequence[float]) -> float:
  """Fisher's combination of independent p-values (one per budget) into one."""
  stat = -2.0 * float(np.sum(np.log(np.maximum(p_values, 1e-300))))
  return float(stats.chi2.sf(stat, 2 * len(p_values)))


def decide(tests: Mapping[str, Any], identifiable: Mapping[str, bool],
           progressive: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
  """fit.json's `verdict`: {"supported", "reasons", "tests"}, judging the terms the fit estimated
  (`tests["terms"]`); `progressive` is the fit stage's protocol, where it ran."""
  tests, reasons = dict(tests), []
  unidentified = [k for k in tests["terms"] if not identifiable.get(k, False)]
  if unidentified and len(unidentified) == len(tests["terms"]):
    reasons.append(f"the rows identify none of the fitted terms ({', '.join(unidentified)})")
  # A term the rows do not pin down while another is: the recommendation stands on the other,
  # and the report says that this one's part is the law's shape, not the data's.
  caveats = [f"the rows do not identify the {k} term, so the pick's {k} is the law's, not the "
             "data's" for k in unidentified if len(unidentified) < len(tests["terms"])]
  if not tests.get("tested"):
    reasons.append("no budget has two shapes trained with several seeds, so nothing tells a "
                   "shape effect from seed noise (sweep.seeds)")
    return {"supported": False, "reasons": reasons, "caveats": caveats, "tests": tests}
  if tests["shape_effect_p"] > LEVEL:
    reasons.append(f"the shapes' losses do not differ beyond each budget's seed noise (combined "
                   f"over {len(tests['budgets'])} budget{'s' * (len(tests['budgets']) != 1)}: "
                   f"p = {tests['shape_effect_p']:.2g})")
  if tests["explained"] < MIN_EXPLAINED:
    reasons.append(f"the law's shape term explains {tests['explained']:.0%} of the variation "
                   f"between shapes (at least {MIN_EXPLAINED:.0%} needed)")
  if tests["lack_of_fit_p"] is not None and tests["lack_of_fit_p"] < LACK_OF_FIT_LEVEL:
    reasons.append(f"the law misses the shapes' mean losses beyond seed noise (lack-of-fit "
                   f"F-tests per budget, combined: p = {tests['lack_of_fit_p']:.2g}): its form "
                   "does not describe them")
  steps = [s for s in progressive if s.get("mse") is not None]
  if steps:
    ratio = math.sqrt(steps[-1]["mse"]) / tests["pooled_sigma"]
    tests["out_of_sample_over_noise"] = ratio
    if ratio > MAX_OUT_OF_SAMPLE:
      reasons.append(f"predicting its largest scale from the smaller ones, the law errs by "
                     f"{ratio:.1f}x the seed noise (progressive protocol)")
    ranked = [s for s in steps if s.get("spearman_interval")]
    tests["rank_correlations"] = [{"test_scale": s.get("test_scale"), "spearman": s["spearman"],
                                   "interval": s["spearman_interval"]} for s in ranked]
    if ranked and ranked[-1]["spearman_interval"][0] <= 0:
      lo, hi = ranked[-1]["spearman_interval"]
      reasons.append(f"predicting its largest scale from the smaller ones, the law ranks the "
                     f"held-out shapes no better than chance (Spearman {ranked[-1]['spearman']:.2f}"
                     f", interval [{lo:.2f}, {hi:.2f}])")
  return {"supported": not reasons, "reasons": reasons, "caveats": caveats, "tests": tests}
