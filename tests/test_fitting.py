"""Tests of the scaling-law fitter: recovery of planted laws, bootstrap coverage, the progressive
protocol, `--mode=fit` and every bad-input path of a fit."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from archscale.core import config_lib
from archscale.study import diagnostics, fitting, law, solver
from archscale.study import fit as fit_stage

# Epoch's Chinchilla estimate stands in for L_opt(N, D) of the synthetic tables.
CHINCHILLA = dict(E=1.817, A=482.0, B=2085.0, alpha=0.3478, beta=0.3658)
# The paper's multiplicative coefficients (80M + 145M + 297M), and an additive law with an
# optimum at the same place; both have their minimum inside the sampled ranges.
PAPER_MULT = dict(a0=2.697, a1=0.0974, a2=0.0078, b0=0.3870, b1=0.0063, b2=0.0065)
ADDITIVE = dict(a0=0.9, a1=0.25, a2=0.02, b1=0.06, b2=0.06)
PLANTED = {"multiplicative": PAPER_MULT, "additive": ADDITIVE}
SCALES = (80e6, 145e6, 297e6)
SIGMA = 0.01  # Noise on the loss: MSE 1e-4, the paper's extrapolation error.


def synthetic_rows(form, params, seed=0, sigma=SIGMA, scales=SCALES, n_x=8, n_r=8):
  """A sweep over d_model/sqrt(N) and r at each scale, with losses drawn from a known law."""
  rng = np.random.default_rng(seed)
  truth = law.Law(form, dict(params, **CHINCHILLA))
  rows = []
  for n in scales:
    for x in np.geomspace(0.03, 0.25, n_x):
      for r in np.geomspace(0.5, 5.0, n_r):
        loss = float(truth.predict(n, 20 * n, x, r)) + sigma * rng.standard_normal()
        rows.append(dict(run_id=f"n{n:.0f}_x{x:.3f}_r{r:.2f}", params_nonembed=n, tokens=20 * n,
                         loss=loss, d_model=x * np.sqrt(n), mlp_attn_ratio=r, gqa=4))
  return rows


def chinchilla_rows(seed=0, sigma=0.003):
  """Losses from Epoch's Chinchilla law on a grid of (N, D), log-normal noise."""
  rng = np.random.default_rng(seed)
  truth = law.Law("chinchilla", CHINCHILLA)
  rows = []
  for n in np.geomspace(5e7, 1e10, 8):
    for tpp in np.geomspace(5, 200, 6):
      loss = float(truth.predict(n, tpp * n)) * np.exp(sigma * rng.standard_normal())
      rows.append(dict(params_nonembed=n, tokens=tpp * n, loss=loss))
  return rows


def gauge_fixed(form, params):
  """The planted parameters as the fitter reports them (multiplicative: b0 = 1)."""
  theta = law.params_to_theta(form, params)
  return {k: float(v) for k, v in law.theta_to_params(form, theta).items()}


@pytest.mark.parametrize("form", ["multiplicative", "additive"])
def test_conditional_forms_recover_planted_parameters_and_optimum(form):
  result = fitting.fit(synthetic_rows(form, PLANTED[form]), form=form, l_opt=CHINCHILLA)
  planted = gauge_fixed(form, PLANTED[form])
  for k in ("a0", "a1", "a2", "b1", "b2"):
    tol = 0.02 if k == "a0" else 0.15
    assert result.law.params[k] == pytest.approx(planted[k], rel=tol), k
  want = law.Law(form, PLANTED[form]).optimum()
  assert result.optimum["d_over_sqrt_n"] == pytest.approx(want["d_over_sqrt_n"], rel=0.05)
  assert result.optimum["r"] == pytest.approx(want["r"], rel=0.05)
  assert result.optimum["closed_form"] and result.optimum["interior"]
  assert result.metrics["in_sample"]["mse"] == pytest.approx(SIGMA**2, rel=0.3)
  assert result.starts["at_best"] >= 1
  assert sum(result.starts["status"].values()) == result.starts["total"]
  per_start = result.per_start
  assert len(per_start["objective"]) == result.starts["total"]
  assert np.nanmin(per_start["objective"]) == result.objective
  converged = solver.STATUS.index("converged")
  assert np.sum(per_start["status"] == converged) == result.starts["converged"]
  # The law carries L_opt's Chinchilla params, so it predicts absolute loss.
  assert result.law.output == "loss"


def test_bootstrap_intervals_cover_planted_values_at_nominal_rate():
  """Over repeated synthetic draws, 90% percentile intervals cover the truth about 90% of the
  time (checked over the optimum and the four shape parameters)."""
  planted = gauge_fixed("multiplicative", PAPER_MULT)
  opt = law.Law("multiplicative", PAPER_MULT).optimum()
  truth = dict(planted, d_over_sqrt_n=opt["d_over_sqrt_n"], r=opt["r"])
  names = ("a1", "a2", "b1", "b2", "d_over_sqrt_n", "r")
  hits = []
  for seed in range(40):
    rows = synthetic_rows("multiplicative", PAPER_MULT, seed=100 + seed, n_x=5, n_r=5)
    result = fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, loss="squared",
                     space="linear", starts="random", n_starts=4, bootstrap=100, level=0.9,
                     seed=seed)
    hits.append([result.intervals[k][0] <= truth[k] <= result.intervals[k][1] for k in names])
  coverage = np.mean(hits, axis=0)
  assert 0.75 <= coverage.mean() <= 0.97, dict(zip(names, coverage, strict=True))
  assert coverage.min() >= 0.6, dict(zip(names, coverage, strict=True))


def test_chinchilla_fit_recovers_planted_law():
  result = fitting.fit(chinchilla_rows(), form="chinchilla", starts="random", n_starts=64, seed=1)
  p = result.law.params
  assert p["E"] == pytest.approx(CHINCHILLA["E"], rel=0.05)
  assert p["alpha"] == pytest.approx(CHINCHILLA["alpha"], rel=0.1)
  assert p["beta"] == pytest.approx(CHINCHILLA["beta"], rel=0.1)
  assert result.optimum is None
  assert result.law.output == "loss"
  assert result.starts["total"] == 64 and result.starts["at_best"] >= 2


def test_lbfgs_and_lm_reach_the_same_optimum():
  rows = synthetic_rows("additive", ADDITIVE, n_x=5, n_r=5)
  kw = dict(form="additive", l_opt=CHINCHILLA, starts="random", n_starts=8)
  lm = fitting.fit(rows, solver="lm", **kw)
  lbfgs = fitting.fit(rows, solver="lbfgs", **kw)
  assert lbfgs.objective == pytest.approx(lm.objective, rel=1e-6)
  for k in ("a1", "a2", "b1", "b2"):
    assert lbfgs.law.params[k] == pytest.approx(lm.law.params[k], rel=1e-3)


def test_empirical_l_opt_is_the_best_loss_of_each_budget():
  rows = synthetic_rows("multiplicative", PAPER_MULT, n_x=5, n_r=5)
  result = fitting.fit(rows, form="multiplicative", l_opt="empirical", starts="random", n_starts=8)
  assert result.l_opt == "empirical" and not result.law.has_chinchilla
  assert result.law.output == "factor"
  assert len(result.l_opt_groups) == len(SCALES)
  for n, group in zip(SCALES, result.l_opt_groups, strict=True):
    assert group["l_opt"] == min(r["loss"] for r in rows if r["params_nonembed"] == n)
  # The optimum does not depend on where L_opt comes from.
  want = law.Law("multiplicative", PAPER_MULT).optimum()
  assert result.optimum["d_over_sqrt_n"] == pytest.approx(want["d_over_sqrt_n"], rel=0.1)


def test_empirical_l_opt_reports_and_warns_about_realised_n_spread(caplog):
  rows = synthetic_rows("multiplicative", PAPER_MULT, n_x=4, n_r=4)
  result = fitting.fit(rows, form="multiplicative", l_opt="empirical", starts="random", n_starts=4)
  assert all(g["n_spread"] == 0 for g in result.l_opt_groups)
  assert "realised N varies" not in caplog.text
  jitter = np.random.default_rng(1).uniform(-0.03, 0.03, len(rows))
  for row, j in zip(rows, jitter, strict=True):  # the sweep's rounding moves N by a few percent
    row.update(scale=row["params_nonembed"], params_nonembed=row["params_nonembed"] * (1 + j))
  result = fitting.fit(rows, form="multiplicative", l_opt="empirical", starts="random", n_starts=4)
  assert 0.03 < max(g["n_spread"] for g in result.l_opt_groups) < 0.065
  assert "realised N varies by up to" in caplog.text and "fit.l_opt=chinchilla" in caplog.text


def test_joint_form_is_the_bilinear_generalisation():
  """The multiplicative law is the rank-one case of the joint one: a noiseless table is fitted
  exactly, and the numeric optimum matches the closed form."""
  rows = synthetic_rows("multiplicative", PAPER_MULT, sigma=0.0, n_x=5, n_r=5)
  result = fitting.fit(rows, form="joint", l_opt=CHINCHILLA, loss="squared", space="linear",
                   n_starts=4)
  assert result.metrics["in_sample"]["mse"] < 1e-16
  want = law.Law("multiplicative", PAPER_MULT).optimum()
  assert not result.optimum["closed_form"]
  assert result.optimum["d_over_sqrt_n"] == pytest.approx(want["d_over_sqrt_n"], rel=0.02)
  assert result.optimum["r"] == pytest.approx(want["r"], rel=0.02)


def test_prediction_metrics_hand_checked():
  m = diagnostics.prediction_metrics([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 5.0])
  assert m["n"] == 4
  assert m["mse"] == pytest.approx(0.75)  # (0 + 1 + 1 + 1) / 4
  assert m["r2"] == pytest.approx(1 - 3 / 8.75)  # SS_tot around the mean 2.75 is 8.75
  assert m["spearman"] == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
  # Average ranks 1.5, 1.5, 3 for the tie.
  ties = diagnostics.prediction_metrics([1.0, 1.0, 2.0], [1.0, 2.0, 3.0])
  assert ties["spearman"] == pytest.approx(np.corrcoef([1.5, 1.5, 3], [1, 2, 3])[0, 1])


def test_progressive_protocol_fits_smaller_scales_and_scores_the_next():
  rows = synthetic_rows("multiplicative", PAPER_MULT, n_x=5, n_r=5)
  steps = fitting.evaluate_progressive(rows, form="multiplicative", l_opt=CHINCHILLA,
                                   starts="random", n_starts=8)
  assert [s["test_scale"] for s in steps] == [145e6, 297e6]
  assert [s["train_scales"] for s in steps] == [[80e6], [80e6, 145e6]]
  assert [s["n_train"] for s in steps] == [25, 50] and [s["n_test"] for s in steps] == [25, 25]
  for step in steps:
    test = [r for r in rows if r["params_nonembed"] == step["test_scale"]]
    fitted = law.Law("multiplicative", step["params"])
    pred = fitted.predict([r["params_nonembed"] for r in test], [r["tokens"] for r in test],
                          [r["d_model"] / np.sqrt(r["params_nonembed"]) for r in test],
                          [r["mlp_attn_ratio"] for r in test])
    want = diagnostics.prediction_metrics(pred, [r["loss"] for r in test])
    for k in ("mse", "r2", "spearman"):
      assert step[k] == pytest.approx(want[k], rel=1e-12)
    assert step["mse"] < 3 * SIGMA**2  # The planted law extrapolates.


def test_progressive_with_empirical_l_opt_uses_the_held_out_best_loss():
  """A noiseless table: the calibration is exact, so the held-out predictions are too."""
  rows = synthetic_rows("multiplicative", PAPER_MULT, sigma=0.0, n_x=5, n_r=5)
  for row in rows:  # L_opt is constant per budget, so it cancels out of the calibration.
    row["loss"] = float(law.Law("multiplicative", PAPER_MULT).calibration(
        row["d_model"] / np.sqrt(row["params_nonembed"]), row["mlp_attn_ratio"])) * 3.0
  steps = fitting.evaluate_progressive(rows, form="multiplicative", l_opt="empirical",
                                   loss="squared", space="linear", starts="random", n_starts=4)
  for step in steps:
    assert step["mse"] < 1e-12 and step["spearman"] == pytest.approx(1.0)


def test_fit_uses_float64_without_leaking_it():
  rows = synthetic_rows("additive", ADDITIVE, n_x=5, n_r=5)
  fitting.fit(rows, form="additive", l_opt=CHINCHILLA, starts="random", n_starts=8)
  assert jnp.ones(2).dtype == jnp.float32


def fit_config(tmp_path, text, n_starts):
  """--mode=fit (configs/fit.py, 20 bootstrap replicates, random starts) on `text` as the
  results table; fit.json and the plots go to tmp_path / "out"."""
  results = tmp_path / "results.jsonl"
  results.write_text(text)
  config = config_lib.load_config_file(config_lib.CONFIG_DIR / "fit.py")
  config.fit.results = str(results)
  config.fit.bootstrap = 20
  config.fit.starts = "random"
  config.fit.n_starts = n_starts
  fit_stage.run_fit(config, tmp_path / "out")


def test_run_fit_writes_fit_json_and_plots(tmp_path):
  rows = synthetic_rows("multiplicative", PAPER_MULT, n_x=5, n_r=5)
  rows.append(dict(rows[0], run_id="wide", mlp_attn_ratio=8.0))  # Outside the paper's r range.
  rows.append(dict(run_id="crashed", status="failed", error="out of memory"))
  fit_config(tmp_path, "".join(json.dumps(r) + "\n" for r in rows), n_starts=8)
  doc = json.loads((tmp_path / "out" / "fit.json").read_text())
  assert doc["form"] == "multiplicative" and doc["l_opt"] == "empirical"
  assert set(doc["params"]) == {"a0", "a1", "a2", "b0", "b1", "b2"}
  assert set(doc["optimum"]) >= {"d_over_sqrt_n", "r"}
  for k in ("a1", "a2", "b1", "b2", "d_over_sqrt_n", "r"):
    lo, hi = doc["intervals"][k]
    assert lo <= hi
  assert doc["intervals"]["d_over_sqrt_n"][0] <= doc["optimum"]["d_over_sqrt_n"] \
      <= doc["intervals"]["d_over_sqrt_n"][1]
  assert isinstance(doc["objective"], float)
  assert len(doc["rows_used"]) == 75
  assert {r["run_id"] for r in doc["rows_excluded"]} == {"wide", "crashed"}
  assert len(doc["metrics"]["progressive"]) == 2 and "mse" in doc["metrics"]["in_sample"]
  for name in doc["plots"]:
    assert (tmp_path / "out" / name).stat().st_size > 0
  assert "fit_loss_vs_d_over_sqrt_n.png" in doc["plots"]
  loaded = law.load_law(tmp_path / "out" / "fit.json")
  assert loaded.params == pytest.approx(doc["params"])
  assert loaded.optimum()["r"] == pytest.approx(doc["optimum"]["r"])


def test_predict_interval_brackets_the_prediction():
  rows = synthetic_rows("additive", ADDITIVE, n_x=5, n_r=5)
  result = fitting.fit(rows, form="additive", l_opt=CHINCHILLA, starts="random", n_starts=8,
                   bootstrap=50)
  n, d, x, r = np.full(3, 297e6), np.full(3, 20 * 297e6), np.array([0.05, 0.08, 0.12]), np.ones(3)
  lo, hi = result.predict_interval(n, d, x, r)
  mid = result.law.predict(n, d, x, r)
  assert np.all(lo < mid) and np.all(mid < hi)
  assert np.all(hi - lo < 0.05)


# --- bad inputs: each is refused before any solving, with the reason ----------------------------


def _rows():
  return synthetic_rows("multiplicative", PAPER_MULT, n_x=3, n_r=3)


@pytest.mark.parametrize("mutate, match", [
    (lambda rows: rows[4].pop("tokens"), r"row 4 \(run_id=.*\): tokens=None"),
    (lambda rows: rows[2].update(loss="n/a"), r"row 2 .*loss='n/a'"),
    (lambda rows: rows[7].update(loss=float("nan")), r"row 7 .*loss=nan"),
    (lambda rows: rows[1].update(d_model=-5), r"row 1 .*d_model=-5"),
    (lambda rows: rows[3].update(mlp_attn_ratio=True), r"row 3 .*mlp_attn_ratio=True"),
    (lambda rows: [r.update(loss_source="eval" if i else "train") for i, r in enumerate(rows)],
     r"different sources \['eval', 'train'\] \(field loss_source\)"),
])
def test_malformed_rows_are_named(mutate, match):
  rows = _rows()
  mutate(rows)
  with pytest.raises(ValueError, match=match):
    fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA)


def test_too_few_rows_for_the_form():
  rows = _rows()[:5]
  with pytest.raises(ValueError, match=r"5 free parameters but only 5 rows"):
    fitting.fit(rows, form="additive", l_opt=CHINCHILLA)
  with pytest.raises(ValueError, match=r"9 free parameters"):
    fitting.fit(_rows()[:9], form="joint", l_opt=CHINCHILLA)


def test_r_filter_can_leave_too_few_rows():
  rows = _rows()
  with pytest.raises(ValueError, match=r"only 0 rows remain after the r filter \(27 excluded\)"):
    fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, r_range=(0.9, 1.2))
  with pytest.raises(ValueError, match=r"r_range=\(5.0, 0.5\) needs 0 < lo < hi"):
    fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, r_range=(5.0, 0.5))


def test_degenerate_data_is_refused():
  one_scale = [r for r in chinchilla_rows() if r["params_nonembed"] == 5e7]
  with pytest.raises(ValueError, match=r"two distinct params_nonembed.*one scale only"):
    fitting.fit(one_scale, form="chinchilla")
  one_r = [dict(r, mlp_attn_ratio=1.0) for r in _rows()]
  with pytest.raises(ValueError, match=r"three distinct values of mlp_attn_ratio"):
    fitting.fit(one_r, form="multiplicative", l_opt=CHINCHILLA)
  with pytest.raises(ValueError, match=r"3 budget\(s\).*l_opt='empirical'"):
    fitting.fit(_rows(), form="multiplicative", l_opt="chinchilla")
  with pytest.raises(ValueError, match=r"at least two scales"):
    fitting.evaluate_progressive([r for r in _rows() if r["params_nonembed"] == 80e6],
                             form="multiplicative", l_opt=CHINCHILLA)
  with pytest.raises(ValueError, match=r"empty"):
    fitting.fit([], form="chinchilla")


def test_fit_json_records_the_support_on_every_axis_and_what_intervals_hold_fixed():
  result = fitting.fit(_rows(), form="multiplicative", l_opt=CHINCHILLA, bootstrap=8)
  support = result.to_json()["support"]
  assert support["gqa"] == [4, 4] and support["n_params"] == [80e6, 297e6]
  assert support["tokens"] == [20 * 80e6, 20 * 297e6]
  assert support["d_over_sqrt_n"] == pytest.approx([0.03, 0.25])
  assert result.diagnostics["intervals_hold_fixed"] == ["l_opt"]
  no_gqa = [{k: v for k, v in r.items() if k != "gqa"} for r in _rows()]
  assert fitting.fit(no_gqa, form="multiplicative", l_opt=CHINCHILLA).support["gqa"] is None
  chin = fitting.fit(chinchilla_rows(), form="chinchilla", starts="grid", bootstrap=4)
  assert chin.diagnostics["intervals_hold_fixed"] == []


def test_a_chinchilla_l_opt_on_budgets_whose_d_follows_n_is_refused():
  scales = np.geomspace(5e7, 1e9, 7)
  rows = synthetic_rows("multiplicative", PAPER_MULT, scales=scales, n_x=3, n_r=3)
  with pytest.raises(ValueError, match=r"R\^2 1.0000; about 20 tokens .*fit.l_opt=empirical"):
    fitting.fit(rows, form="multiplicative", l_opt="chinchilla")
  # The same budgets at tokens per parameter that vary with N: separable, so fitted.
  tpp = dict(zip(scales, [5, 80, 10, 40, 20, 160, 8], strict=True))
  spread = [dict(r, tokens=tpp[r["params_nonembed"]] * r["params_nonembed"]) for r in rows]
  assert fitting.fit(spread, form="multiplicative", l_opt="chinchilla").l_opt == "chinchilla"


@pytest.mark.parametrize("kwargs, match", [
    (dict(form="quadratic"), r"form='quadratic' is not allowed"),
    (dict(loss="l1"), r"loss='l1'"),
    (dict(space="sqrt"), r"space='sqrt'"),
    (dict(solver="adam"), r"solver='adam'"),
    (dict(starts="sobol"), r"starts='sobol'"),
    (dict(delta=0.0), r"delta=0.0 is out of range"),
    (dict(bootstrap=-1), r"bootstrap=-1"),
    (dict(level=1.5), r"level=1.5"),
    (dict(l_opt="optimal"), r"l_opt='optimal' must be one of \['chinchilla', 'empirical'\]"),
    (dict(l_opt={"E": 1.0}), r"missing params"),
])
def test_bad_settings_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fitting.fit(_rows(), **dict(dict(form="multiplicative", l_opt=CHINCHILLA), **kwargs))


def test_run_fit_refuses_an_empty_results_setting(tmp_path):
  config = config_lib.make_config("demo")
  with pytest.raises(ValueError, match=r"config.fit.results is empty"):
    fit_stage.run_fit(config, tmp_path)
  config.fit.results = str(tmp_path / "missing.jsonl")
  for field, value, match in (("terms", "neither", r"fit.terms must be one of .*'neither'"),
                              ("r_range", (2.0, 1.0), r"fit.r_range=\(2.0, 1.0\) needs 0 < lo"),
                              ("tol", 0.0, r"fit.tol=0.0 is out of range")):
    bad = config_lib.make_config("demo")
    bad.fit.results = config.fit.results
    bad.fit[field] = value
    with pytest.raises(ValueError, match=match):
      fit_stage.run_fit(bad, tmp_path)


# --- what the rows support: diagnostics, fit.terms -------------------------------------------


def narrow_r_rows(r_values, seed=0, sigma=SIGMA):
  """The paper's law sampled at the usual widths but only at the given ratios."""
  rng = np.random.default_rng(seed)
  truth = law.Law("multiplicative", dict(PAPER_MULT, **CHINCHILLA))
  rows = []
  for n in SCALES:
    for x in np.geomspace(0.03, 0.25, 8):
      for r in r_values:
        rows.append(dict(run_id=f"n{n:.0f}_x{x:.3f}_r{r:.3f}", params_nonembed=n, tokens=20 * n,
                         loss=float(truth.predict(n, 20 * n, x, r)) + sigma * rng.standard_normal(),
                         d_model=x * np.sqrt(n), mlp_attn_ratio=r))
  return rows


def test_narrow_r_gets_a_warning_no_r_optimum_and_constant_r_an_error(caplog):
  """r over [2.0, 2.25]: ln r and 1/r are confounded with the constant, so no r optimum is
  reported (the planted one, 1.03, lies outside anyway), the log says why once, pointing at
  fit.terms, and the width term alone then finds the planted x*; a constant r is refused."""
  rows = narrow_r_rows(np.linspace(2.0, 2.25, 4))
  result = fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, starts="random",
                       n_starts=8, bootstrap=40)
  diag = result.diagnostics
  assert diag["identifiable"]["r"] is False
  assert diag["condition_numbers"]["r"] > 1e3 > diag["condition_numbers"]["d_over_sqrt_n"]
  assert result.optimum["r"] is None and "r" not in result.intervals
  assert "spans only [2, 2.25]" in result.optimum["reasons"]["r"]
  warning = [w for w in diag["warnings"] if w.startswith("r is not identified")]
  assert len(warning) == 1 and "fit.terms='width'" in warning[0]
  assert caplog.text.count("r is not identified") == 1
  doc = json.loads(json.dumps(result.to_json()))
  assert doc["optimum"]["r"] is None and doc["diagnostics"]["identifiable"]["r"] is False
  width = fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, terms="width",
                      starts="random", n_starts=8)
  assert width.diagnostics["identifiable"] == {"d_over_sqrt_n": True, "r": False}
  assert width.optimum["d_over_sqrt_n"] == pytest.approx(0.0078 / 0.0974, rel=0.05)
  with pytest.raises(ValueError, match=r"three distinct values of mlp_attn_ratio.*"
                                       r"Set fit.terms='width'"):
    fitting.fit(narrow_r_rows([2.0]), form="multiplicative", l_opt=CHINCHILLA)


def test_width_term_alone_recovers_a_planted_optimum():
  rows = narrow_r_rows([2.0])
  planted = PAPER_MULT["a2"] / PAPER_MULT["a1"]
  result = fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, terms="width",
                       starts="random", n_starts=8, bootstrap=40)
  assert result.optimum["d_over_sqrt_n"] == pytest.approx(planted, rel=0.05)
  assert result.law.params["b1"] == 0.0 and result.law.params["b2"] == 0.0
  assert result.optimum["r"] is None and result.optimum["reasons"]["r"].startswith("not fitted")
  assert set(result.stderr) == {"a0", "a1", "a2"}
  assert result.diagnostics["identifiable"] == {"d_over_sqrt_n": True, "r": False}
  lo, hi = result.intervals["d_over_sqrt_n"]
  assert lo < planted < hi
  ratio_only = fitting.fit(narrow_r_rows(np.geomspace(0.5, 5, 6)), form="additive",
                           l_opt=CHINCHILLA, terms="ratio", starts="random", n_starts=8)
  assert ratio_only.law.params["a1"] == 0.0 and ratio_only.optimum["d_over_sqrt_n"] is None
  with pytest.raises(ValueError, match=r"terms='width' selects architecture terms"):
    fitting.fit(chinchilla_rows(), form="chinchilla", terms="width")


@pytest.mark.parametrize("form", ["additive", "multiplicative"])
def test_jacobian_standard_errors_cover_planted_values_at_nominal_rate(form):
  """A planted law with both terms comes back within 5%, and 90% intervals from the Jacobian
  standard errors cover each planted parameter about 90% of the time."""
  planted = gauge_fixed(form, PLANTED[form])
  names = ("a1", "a2", "b1", "b2")
  hits = []
  for seed in range(30):
    rows = synthetic_rows(form, PLANTED[form], seed=200 + seed, sigma=0.003, n_x=6, n_r=6)
    result = fitting.fit(rows, form=form, l_opt=CHINCHILLA, loss="squared", space="linear",
                         starts="random", n_starts=4, level=0.9, seed=seed)
    if seed == 0:
      for k in names:
        assert result.law.params[k] == pytest.approx(planted[k], rel=0.05), k
      assert result.diagnostics["identifiable"] == {"d_over_sqrt_n": True, "r": True}
    z = 1.6449  # two-sided 90%
    hits.append([abs(result.law.params[k] - planted[k]) <= z * result.stderr[k] for k in names])
  coverage = np.mean(hits, axis=0)
  assert 0.8 <= coverage.mean() <= 0.97, dict(zip(names, coverage, strict=True))
  assert coverage.min() >= 0.66, dict(zip(names, coverage, strict=True))


def test_bootstrap_with_most_replicates_failing_reports_no_interval_and_why():
  rows = synthetic_rows("multiplicative", PAPER_MULT, n_x=5, n_r=5)
  result = fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, loss="squared",
                       space="linear", starts="random", n_starts=8, max_iter=3, bootstrap=40)
  diag = result.diagnostics
  assert diag["bootstrap_total"] == 40 and diag["bootstrap_used"] < 20
  assert result.intervals == {} and result.samples == {}
  assert "bootstrap replicates converged; no intervals are reported" in diag["bootstrap_note"]
  assert diag["bootstrap_note"] in diag["warnings"]
  with pytest.raises(ValueError, match=r"no intervals are reported"):
    result.predict_interval(297e6, 6e9, 0.08, 1.0)
  # The best start also stopped at max_iter=3: it was iterated further until it converged.
  assert "further iterations converged it" in result.starts["remedy"]
  assert diag["converged_fraction"] < 0.5
  assert any(w.startswith("only ") and "fit.max_iter=3" in w for w in diag["warnings"])


def test_a_best_start_that_cannot_converge_fails_with_the_reason():
  rows = synthetic_rows("multiplicative", PAPER_MULT, n_x=5, n_r=5)
  with pytest.raises(ValueError, match=r"did not converge: it stopped at fit.max_iter=3 and was "
                                       r"still max_iter after \d+ further iterations.*Raise "
                                       r"fit.max_iter"):
    fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, starts="random", n_starts=8,
                max_iter=3, loss="huber", space="log")


def test_an_optimum_outside_the_rows_range_is_not_reported():
  """The planted x* = 0.080 lies below the widths sampled here (0.12 to 0.3)."""
  rows = [r for r in synthetic_rows("multiplicative", PAPER_MULT, sigma=0.002, n_x=12)
          if r["d_model"] / np.sqrt(r["params_nonembed"]) > 0.12]
  result = fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, loss="squared",
                       space="linear", starts="random", n_starts=8)
  assert result.optimum["d_over_sqrt_n"] is None
  reason = result.optimum["reasons"]["d_over_sqrt_n"]
  assert "outside the rows' range" in reason or "not identified" in " ".join(
      result.diagnostics["warnings"])
  assert result.law.optimum()["d_over_sqrt_n"] < 0.12  # the law's own closed form, unreported


def test_duplicated_runs_count_once_in_a_fit(caplog):
  rows = synthetic_rows("multiplicative", PAPER_MULT, n_x=4, n_r=4)
  repeats = [dict(rows[0], loss=rows[0]["loss"] + 0.5 * k) for k in range(1, 6)]
  result = fitting.fit(rows + repeats, form="multiplicative", l_opt=CHINCHILLA,
                       starts="random", n_starts=4)
  assert len(result.rows_used) == len(rows)
  used = [r for r in result.rows_used if r["run_id"] == rows[0]["run_id"]]
  assert len(used) == 1 and used[0]["loss"] == repeats[-1]["loss"]
  assert sum("superseded" in r["reason"] for r in result.rows_excluded) == 5
  assert caplog.text.count(f"{rows[0]['run_id']} (x6)") == 1


def test_run_fit_reports_diagnostics_torn_lines_and_grouping(tmp_path, caplog):
  caplog.set_level("INFO")
  rows = synthetic_rows("multiplicative", PAPER_MULT, n_x=4, n_r=4)
  fit_config(tmp_path, "".join(json.dumps(r) + "\n" for r in rows) + '{"run_id": "torn", "lo\n',
             n_starts=4)
  doc = json.loads((tmp_path / "out" / "fit.json").read_text())
  diag = doc["diagnostics"]
  assert set(diag) >= {"converged_fraction", "identifiable", "bootstrap_used", "bootstrap_total",
                       "warnings"}
  assert set(diag["identifiable"]) == {"d_over_sqrt_n", "r"}
  assert diag["bootstrap_total"] == 20 and diag["torn_lines"] == 1
  assert any("1 torn line(s)" in w for w in diag["warnings"])
  assert set(doc["stderr"]) == {"a0", "a1", "a2", "b1", "b2"}
  assert all(v > 0 for v in doc["stderr"].values())
  assert "scales by params_nonembed" in diag["grouping"]
  assert "scales by params_nonembed" in caplog.text
  assert caplog.text.count("1 torn line(s)") == 1


def replicated_rows(params, seeds, sigma, scales=(80e6,), n_x=4, n_r=4, offset=0):
  """synthetic_rows trained with several seeds: one row per (point, seed), its own run id."""
  rows = []
  for seed in seeds:
    for row in synthetic_rows("multiplicative", params, seed=offset + seed, sigma=sigma,
                              scales=scales, n_x=n_x, n_r=n_r):
      rows.append(dict(row, run_id=f"{row['run_id']}_s{seed}", seed=seed))
  return rows


def test_seed_noise_is_measured_from_replicates_and_tests_each_budgets_shapes():
  sigma = 0.01
  rows = replicated_rows(PAPER_MULT, seeds=range(4), sigma=sigma, scales=SCALES[:2])
  result = fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, starts="random",
                       n_starts=4)
  noise = result.diagnostics["noise"]
  assert noise["replicated_points"] == noise["points"] == 32 and noise["dof"] == 96
  assert noise["seed_std"] == pytest.approx(sigma, rel=0.2)
  assert [b["beyond_noise"] for b in noise["budgets"]] == [True, True]
  assert noise["fit_rms_over_noise"] == pytest.approx(1.0, rel=0.25)
  assert not any("seed noise" in w for w in result.diagnostics["warnings"])

  flat = dict(PAPER_MULT, a1=1e-6, a2=1e-6, b1=1e-6, b2=1e-6)  # shapes do not matter
  result = fitting.fit(replicated_rows(flat, seeds=range(3), sigma=sigma), form="multiplicative",
                       l_opt=CHINCHILLA, starts="random", n_starts=4)
  (budget,) = result.diagnostics["noise"]["budgets"]
  assert not budget["beyond_noise"] and budget["p"] > 0.05
  assert sum("do not differ beyond seed noise" in w
             for w in result.diagnostics["warnings"]) == 1


def test_seed_noise_is_none_without_replicates_and_the_law_missing_rows_is_flagged():
  rows = synthetic_rows("multiplicative", PAPER_MULT, n_x=4, n_r=4)
  result = fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, starts="random",
                       n_starts=4)
  assert result.diagnostics["noise"] is None
  # Replicates 100x quieter than the law's misfit: the rows vary by 0.1 about the law but the
  # seeds agree to 1e-3.
  rows = replicated_rows(PAPER_MULT, seeds=range(2), sigma=0.0, scales=SCALES[:2])
  bumps = np.random.default_rng(0).normal(0, 0.1, len(rows) // 2)
  for i, row in enumerate(rows):
    row["loss"] += bumps[i % len(bumps)] + 1e-3 * (i // len(bumps))
  result = fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, starts="random",
                       n_starts=4)
  assert result.diagnostics["noise"]["fit_rms_over_noise"] > 10
  assert any("misses the rows by" in w for w in result.diagnostics["warnings"])


def test_empirical_l_opt_averages_replicates_so_one_lucky_seed_does_not_set_it():
  rows = replicated_rows(PAPER_MULT, seeds=range(2), sigma=0.0, n_x=3, n_r=3)
  best = min(r["loss"] for r in rows)
  lucky = next(r for r in rows if r["loss"] > best + 0.01 and r["seed"] == 0)
  lucky["loss"] = best - 0.05  # one seed of a worse point lands below the best point
  twin = next(r for r in rows if r["run_id"] == lucky["run_id"].replace("_s0", "_s1"))
  result = fitting.fit(rows, form="multiplicative", l_opt="empirical", starts="random",
                       n_starts=4)
  (group,) = result.l_opt_groups
  assert group["l_opt"] == pytest.approx(min(best, (lucky["loss"] + twin["loss"]) / 2))
  assert group["l_opt"] > lucky["loss"]
