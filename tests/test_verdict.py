"""The verdict decides from tests that can fail both ways: simulated tables with and without a
shape effect, noise that differs by budget, and t intervals that cover at their nominal rate."""

import numpy as np
import pytest
from test_fitting import CHINCHILLA, PAPER_MULT, gauge_fixed, synthetic_rows

from archscale.study import diagnostics, fitting, law, verdict

SCALES = (2e7, 5e7, 1.2e8, 3e8)
SIGMA = [0.004 * 0.7**j for j in range(len(SCALES))]  # small runs are noisier
# A width effect in the law's own form, minimum at x = 0.1: its spread over the sampled widths
# (0.58 K x L) is about five times the noise of the budgets.
K = 5 * float(np.mean(SIGMA)) / 0.584 / 3.5


def simulated_rows(seed, effect):
  """Four budgets x 5 widths x 3 ratios x 2 seeds; the loss is Chinchilla's L_opt times the
  planted width factor (or none), plus noise whose scale differs by budget."""
  rng = np.random.default_rng(seed)
  chinchilla = law.Law("chinchilla", CHINCHILLA)
  rows = []
  for n, sigma in zip(SCALES, SIGMA, strict=True):
    base = float(chinchilla.predict(n, 20 * n))
    for x in np.geomspace(0.04, 0.3, 5):
      width = 1 + effect * K * (np.log(x / 0.1) + 0.1 / x - 1)
      for r in (0.8, 1.6, 3.2):
        for s in range(2):
          rows.append(dict(run_id=f"{n:g}-{x:.3f}-{r}-{s}", params_nonembed=n, tokens=20 * n,
                           loss=base * width + sigma * rng.standard_normal(),
                           d_model=x * np.sqrt(n), mlp_attn_ratio=r, gqa=1))
  return rows


def _supported(effect, terms, tables=50):
  verdicts = [fitting.fit(simulated_rows(seed, effect), form="multiplicative", terms=terms,
                          bootstrap=0, log_warnings=False).verdict for seed in range(tables)]
  return sum(v["supported"] for v in verdicts), verdicts


@pytest.mark.parametrize("terms", ["width", "both"])
def test_no_shape_effect_is_not_supported(terms):
  count, verdicts = _supported(effect=0, terms=terms)
  assert count <= 5, count
  tests = verdicts[0]["tests"]
  assert tests["noise_ratio"] > 2 and tests["equal_variance_p"] < 0.05  # noise differs by budget
  assert any("do not differ beyond each budget's seed noise" in r
             for r in verdicts[0]["reasons"])


@pytest.mark.parametrize("terms", ["width", "both"])
def test_a_planted_width_effect_is_supported(terms):
  count, verdicts = _supported(effect=1, terms=terms)
  assert count >= 45, [v["reasons"] for v in verdicts if not v["supported"]]
  supported = next(v for v in verdicts if v["supported"])
  assert supported["tests"]["explained"] > 0.8 and supported["tests"]["shape_effect_p"] < 1e-6
  if terms == "both":  # r has no effect: a caveat on r, not a reason against the width finding
    assert any("identify the r term" in c for c in supported["caveats"])


def test_without_seed_replicates_nothing_is_tested():
  rows = [r for r in simulated_rows(0, effect=1) if r["run_id"].endswith("-0")]
  v = fitting.fit(rows, form="multiplicative", terms="width", bootstrap=0,
                  log_warnings=False).verdict
  assert v["supported"] is False and not v["tests"]["tested"]
  assert any("sweep.seeds" in r for r in v["reasons"])


def test_a_law_of_the_wrong_form_fails_the_lack_of_fit_test():
  """A width effect the law cannot bend to (a step), far beyond the noise."""
  rows = [dict(r, loss=r["loss"] + (0.03 if r["d_model"] / np.sqrt(r["params_nonembed"]) > 0.12
                                    and r["d_model"] / np.sqrt(r["params_nonembed"]) < 0.2
                                    else 0.0)) for r in simulated_rows(0, effect=1)]
  v = fitting.fit(rows, form="multiplicative", terms="width", bootstrap=0,
                  log_warnings=False).verdict
  assert v["tests"]["lack_of_fit_p"] < verdict.LACK_OF_FIT_LEVEL
  assert any("lack-of-fit" in r for r in v["reasons"])


def test_progressive_error_far_beyond_the_noise_is_a_reason():
  v = fitting.fit(simulated_rows(2, effect=1), form="multiplicative", terms="width", bootstrap=0,
                  log_warnings=False).verdict
  sigma = v["tests"]["pooled_sigma"]
  assert verdict.decide(v["tests"], {"d_over_sqrt_n": True},
                        [{"mse": (2 * sigma) ** 2}])["supported"]
  far = verdict.decide(v["tests"], {"d_over_sqrt_n": True}, [{"mse": (10 * sigma) ** 2}])
  assert not far["supported"] and "10.0x the seed noise" in far["reasons"][0]


def test_t_intervals_cover_planted_parameters_at_their_nominal_rate():
  """Twelve rows, five parameters: t quantiles on 7 degrees of freedom, where normal ones
  would cover visibly less."""
  names, hits_t, hits_z = ["a1", "a2", "b1", "b2"], [], []
  t = diagnostics.t_quantile(0.9, 12 - 5)
  z = diagnostics.t_quantile(0.9, None)
  assert t > 1.1 * z
  for seed in range(80):
    rows = synthetic_rows("multiplicative", PAPER_MULT, seed=500 + seed, sigma=0.003,
                          scales=(80e6,), n_x=4, n_r=3)
    result = fitting.fit(rows, form="multiplicative", l_opt=CHINCHILLA, starts="random",
                         n_starts=4, seed=seed)
    assert result.covariance["dof"] == 7
    planted = gauge_fixed("multiplicative", PAPER_MULT)
    err = [abs(result.law.params[k] - planted[k]) / result.stderr[k] for k in names]
    hits_t.append([e <= t for e in err])
    hits_z.append([e <= z for e in err])
  assert 0.84 <= np.mean(hits_t) <= 0.96, np.mean(hits_t, axis=0)
  assert np.mean(hits_z) < np.mean(hits_t)


def test_a_ranking_no_better_than_chance_is_a_reason():
  v = fitting.fit(simulated_rows(2, effect=1), form="multiplicative", terms="width", bootstrap=0,
                  log_warnings=False).verdict
  sigma = v["tests"]["pooled_sigma"]
  good = {"mse": sigma**2, "spearman": 0.8, "spearman_interval": [0.5, 0.95], "test_scale": 1e8}
  chance = dict(good, spearman=0.2, spearman_interval=[-0.3, 0.6])
  assert verdict.decide(v["tests"], {"d_over_sqrt_n": True}, [good])["supported"]
  bad = verdict.decide(v["tests"], {"d_over_sqrt_n": True}, [good, chance])
  assert not bad["supported"] and "no better than chance" in bad["reasons"][0]
  assert [r["spearman"] for r in bad["tests"]["rank_correlations"]] == [0.8, 0.2]


def test_the_spearman_interval_separates_a_ranking_from_noise():
  rng = np.random.default_rng(0)
  x = rng.normal(size=40)
  lo, hi = diagnostics.spearman_interval(x, x + 0.3 * rng.normal(size=40), 0.95)
  assert 0.7 < lo < hi <= 1.0
  lo, hi = diagnostics.spearman_interval(x, rng.normal(size=40), 0.95)
  assert lo < 0 < hi
  assert diagnostics.spearman_interval(x[:3], x[:3], 0.95) is None
