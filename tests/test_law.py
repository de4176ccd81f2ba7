"""Tests of the laws: hand-written laws, their predictions, optimum and gauge, and bad laws."""

import json

import numpy as np
import pytest

from archscale.study import law

# Epoch's Chinchilla estimate, the paper's multiplicative coefficients (80M + 145M + 297M), and
# an additive law with an optimum at the same place.
CHINCHILLA = dict(E=1.817, A=482.0, B=2085.0, alpha=0.3478, beta=0.3658)
PAPER_MULT = dict(a0=2.697, a1=0.0974, a2=0.0078, b0=0.3870, b1=0.0063, b2=0.0065)
ADDITIVE = dict(a0=0.9, a1=0.25, a2=0.02, b1=0.06, b2=0.06)


def test_multiplicative_scale_is_fixed_by_b0():
  """u and v are only defined up to c u, v / c: a hand law with any b0 predicts the same."""
  paper = law.Law("multiplicative", PAPER_MULT)
  theta = law.params_to_theta("multiplicative", PAPER_MULT)
  fixed = law.Law("multiplicative", {k: float(v) for k, v in
                                     law.theta_to_params("multiplicative", theta).items()})
  x, r = np.geomspace(0.03, 0.3, 5), np.geomspace(0.5, 5, 5)
  np.testing.assert_allclose(paper.calibration(x, r), fixed.calibration(x, r), rtol=1e-12)
  assert fixed.params["b0"] == 1.0


def test_hand_written_paper_law_predicts_calibration_and_optimum(tmp_path):
  path = tmp_path / "paper.json"
  path.write_text(json.dumps({"form": "multiplicative", "params": PAPER_MULT}))
  paper = law.load_law(path)
  assert paper.output == "factor" and not paper.has_chinchilla
  opt = paper.optimum()
  assert opt["d_over_sqrt_n"] == pytest.approx(0.080, abs=5e-4)
  assert opt["r"] == pytest.approx(1.03, abs=5e-3)
  x, r = np.array([0.066, 0.082]), np.array([4.8, 1.07])
  u = 2.697 + 0.0974 * np.log(x) + 0.0078 / x
  v = 0.3870 + 0.0063 * np.log(r) + 0.0065 / r
  np.testing.assert_allclose(paper.predict(1e9, 1e11, x, r), u * v, rtol=1e-12)
  with_l_opt = law.load_law({"form": "multiplicative", "params": dict(PAPER_MULT, **CHINCHILLA)})
  assert with_l_opt.output == "loss"
  l_opt = with_l_opt.l_opt(1e9, 1e11)
  assert l_opt == pytest.approx(1.817 + 482.0 / 1e9**0.3478 + 2085.0 / 1e11**0.3658)
  np.testing.assert_allclose(with_l_opt.predict(1e9, 1e11, x, r), u * v * l_opt, rtol=1e-12)
  additive = law.Law("additive", dict(ADDITIVE, b0=0.1))  # b0 folds into the constant a0.
  assert additive.output == "offset"
  assert additive.calibration(0.1, 1.0) == pytest.approx(
      0.9 + 0.1 + 0.25 * np.log(0.1) + 0.2 + 0.06)


def test_bad_laws_are_refused():
  with pytest.raises(ValueError, match=r"missing params \['a2'\]"):
    law.Law("multiplicative", {"a0": 1, "a1": 1, "b1": 1, "b2": 1})
  with pytest.raises(ValueError, match=r"give all of"):
    law.Law("additive", dict(ADDITIVE, E=1.8))
  with pytest.raises(ValueError, match=r"no Chinchilla params"):
    law.Law("additive", ADDITIVE).l_opt(1e9, 1e11)
  with pytest.raises(ValueError, match=r"needs `form` and `params`"):
    law.load_law({"params": PAPER_MULT})
