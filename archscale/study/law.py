"""Scaling laws: Chinchilla and the paper's conditional law, for prediction and fitting.

Laws (the paper's, and Chinchilla), with x = d_model / sqrt(N) and r = MLP / attention parameters:

  chinchilla      L = E + A / N^alpha + B / D^beta, fitted in log space as
                  logsumexp(a - alpha ln N, b - beta ln D, e) with A = e^a, B = e^b, E = e^e
  multiplicative  L = L_opt(N, D) * u(x) * v(r),  u = a0 + a1 ln x + a2 / x,
                  v = b0 + b1 ln r + b2 / r
  additive        L = L_opt(N, D) + u(x) + v(r)   (one constant term: b0 = 0)
  joint           L = L_opt(N, D) * sum_ij c_ij f_i(x) f_j(r),  f = (1, ln ., 1 / .)  (the
                  non-separable ablation: multiplicative is its rank-one case)

u and v of the multiplicative form are only defined up to a common factor (c u, v / c), so fits fix
b0 = 1; a hand-written law may use any b0. `L_opt` is a Chinchilla law (fitted on the best loss of
each (N, D) budget, or read from a fit.json) or the empirical minimum of each budget. The optimum
is closed-form for the separable forms, x* = a2 / a1 and r* = b2 / b1, and numeric for `joint`.

Public API:
  Law(form, params).predict(n, d, x=None, r=None, l_opt=None) -> np.ndarray
      absolute loss when the law has Chinchilla params (or `l_opt` is given); otherwise the
      calibration factor u(x) v(r) (`Law.output == "factor"`) or offset u(x) + v(r) ("offset")
  Law.calibration(x, r), Law.l_opt(n, d), Law.has_chinchilla,
  Law.optimum() -> {"d_over_sqrt_n", "r", "closed_form"}
  load_law(path_or_dict) -> Law      a fit.json, hand-written ones (`form`, `params`) too
  The law functions below work on the solver's parameter vectors (theta, last axis) for numpy
  and jax.numpy alike (`xp`); `archscale.study.fitting` fits them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from archscale.core import settings
from archscale.study import table as table_lib

FORMS = settings.FIT_FORMS
CHINCHILLA_KEYS = ("E", "A", "B", "alpha", "beta")
JOINT_KEYS = tuple(f"c{i}{j}" for i in range(3) for j in range(3))
# Keys of `Law.params` per form; the conditional forms may also carry CHINCHILLA_KEYS for L_opt.
PARAM_KEYS = {
    "chinchilla": CHINCHILLA_KEYS,
    "multiplicative": ("a0", "a1", "a2", "b0", "b1", "b2"),
    "additive": ("a0", "a1", "a2", "b1", "b2"),
    "joint": JOINT_KEYS,
}
# Names of the free parameters the solver sees (Chinchilla in log-sum-exp form; b0 fixed).
THETA_KEYS = {
    "chinchilla": ("a", "b", "e", "alpha", "beta"),
    "multiplicative": ("a0", "a1", "a2", "b1", "b2"),
    "additive": ("a0", "a1", "a2", "b1", "b2"),
    "joint": JOINT_KEYS,
}


# Which terms of a conditional law a fit estimates (`fit.terms`); the others are held at zero.
TERMS = settings.FIT_TERMS
# The two regressors of the conditional forms, by the names fit.json uses.
REGRESSORS = ("d_over_sqrt_n", "r")


def term_keys(form: str) -> dict[str, tuple[str, ...]]:
  """The solver parameters of a conditional form by role: the constant, the width (x) terms and
  the ratio (r) terms (the joint form's mixed terms belong to neither)."""
  if form == "joint":
    return dict(constant=("c00",), d_over_sqrt_n=("c10", "c20"), r=("c01", "c02"))
  return dict(constant=("a0",), d_over_sqrt_n=("a1", "a2"), r=("b1", "b2"))


def free_keys(form: str, terms: str) -> tuple[str, ...]:
  """The solver parameters a fit of `form` with `fit.terms=terms` estimates, in THETA_KEYS order."""
  if form == "chinchilla" or terms == "both":
    return THETA_KEYS[form]
  roles = term_keys(form)
  kept = set(roles["constant"]) | set(roles["d_over_sqrt_n" if terms == "width" else "r"])
  return tuple(k for k in THETA_KEYS[form] if k in kept)


# ----------------------------------------------------------------------------------------------
# The laws, written once for numpy (prediction) and jax.numpy (fitting).


def chinchilla_log(theta: Any, ln_n: Any, ln_d: Any, xp: Any) -> Any:
  """ln L of the Chinchilla law from (a, b, e, alpha, beta).

  Summed directly rather than through logaddexp: half the transcendentals, and float64 only
  overflows for terms above e^709, which the solver sees as an infinite objective and rejects.
  """
  a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
  return xp.log(xp.exp(a - alpha * ln_n) + xp.exp(b - beta * ln_d) + xp.exp(e))


def basis(z: Any, xp: Any) -> tuple[Any, Any, Any]:
  return xp.ones_like(z), xp.log(z), 1.0 / z


def calibrate(form: str, theta: Any, x: Any, r: Any, xp: Any) -> Any:
  """u(x) v(r) (multiplicative, b0 = 1), u(x) + v(r) (additive) or the bilinear joint form."""
  t = [theta[..., i, None] for i in range(theta.shape[-1])]
  _, lnx, invx = basis(x, xp)
  _, lnr, invr = basis(r, xp)
  if form == "multiplicative":
    return (t[0] + t[1] * lnx + t[2] * invx) * (1.0 + t[3] * lnr + t[4] * invr)
  if form == "additive":
    return t[0] + t[1] * lnx + t[2] * invx + t[3] * lnr + t[4] * invr
  fx, fr = basis(x, xp), basis(r, xp)
  return sum(t[3 * i + j] * fx[i] * fr[j] for i in range(3) for j in range(3))


def combine(form: str, l_opt: Any, calibration: Any) -> Any:
  return l_opt + calibration if form == "additive" else l_opt * calibration


# ----------------------------------------------------------------------------------------------
# Laws as objects: what fit() returns and what the search module loads.


def theta_to_params(form: str, theta_EP: np.ndarray) -> dict[str, np.ndarray]:
  """Solver parameters (last axis) to the reported ones: E, A, B from logs; b0 = 1 when fixed."""
  t = {k: theta_EP[..., i] for i, k in enumerate(THETA_KEYS[form])}
  if form == "chinchilla":
    return dict(E=np.exp(t["e"]), A=np.exp(t["a"]), B=np.exp(t["b"]), alpha=t["alpha"],
                beta=t["beta"])
  if form == "multiplicative":
    return dict(a0=t["a0"], a1=t["a1"], a2=t["a2"], b0=np.ones_like(t["a0"]), b1=t["b1"],
                b2=t["b2"])
  return t


def params_to_theta(form: str, params: Mapping[str, Any]) -> np.ndarray:
  """Reported parameters (scalars or arrays) to the solver's vector on the last axis."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  if form == "chinchilla":
    cols = [np.log(p["A"]), np.log(p["B"]), np.log(p["E"]), p["alpha"], p["beta"]]
  elif form == "multiplicative":
    b0 = p.get("b0", np.float64(1.0))  # u v = (b0 u)(v / b0): move b0 into u.
    cols = [p["a0"] * b0, p["a1"] * b0, p["a2"] * b0, p["b1"] / b0, p["b2"] / b0]
  elif form == "additive":
    cols = [p["a0"] + p.get("b0", np.float64(0.0)), p["a1"], p["a2"], p["b1"], p["b2"]]
  else:
    cols = [p[k] for k in JOINT_KEYS]
  return np.stack(np.broadcast_arrays(*cols), axis=-1)


def closed_form_optimum(c1: Any, c2: Any) -> Any:
  """argmin of c1 ln z + c2 / z: z = c2 / c1, a minimum only when both are positive."""
  c1, c2 = np.asarray(c1, np.float64), np.asarray(c2, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where((c1 > 0) & (c2 > 0), c2 / c1, np.nan)


def grid_optimum(form: str, theta_EP: np.ndarray, x_range: Sequence[float],
                 r_range: Sequence[float], size: int = 161) -> tuple[np.ndarray, ...]:
  """Numeric argmin of the calibration over a log grid: (x*, r*, interior) per parameter row."""
  x, r, x_inside, r_inside = grid_argmin(form, theta_EP, x_range, r_range, size)
  return x, r, x_inside & r_inside


def grid_argmin(form: str, theta_EP: np.ndarray, x_range: Sequence[float],
                r_range: Sequence[float], size: int = 161) -> tuple[np.ndarray, ...]:
  """Argmin of the calibration over a log grid of the box, per parameter row: (x*, r*, whether
  x* is off the x edges, whether r* is off the r edges)."""
  x_Q = np.geomspace(x_range[0], x_range[1], size)
  r_Q = np.geomspace(r_range[0], r_range[1], size)
  xx, rr = (a.ravel() for a in np.meshgrid(x_Q, r_Q, indexing="ij"))
  theta_EP = np.atleast_2d(theta_EP)
  cal_EQ = calibrate(form, theta_EP, xx, rr, np)
  best = np.argmin(np.where(np.isfinite(cal_EQ), cal_EQ, np.inf), axis=-1)
  i, j = np.unravel_index(best, (size, size))
  return x_Q[i], r_Q[j], (i > 0) & (i < size - 1), (j > 0) & (j < size - 1)


@dataclasses.dataclass(frozen=True)
class Law:
  """A scaling law: `form` and its `params` (see PARAM_KEYS), as fitted or written by hand.

  Conditional forms may carry the Chinchilla keys too; then `predict` returns absolute loss.
  `box` bounds the numeric optimum search of the joint form ((x_lo, x_hi), (r_lo, r_hi)).
  """
  form: str
  params: Mapping[str, float]
  box: tuple[tuple[float, float], tuple[float, float]] | None = None

  def __post_init__(self):
    if self.form not in FORMS:
      raise ValueError(f"law form {self.form!r} is unknown; choose one of {list(FORMS)}")
    optional = {"multiplicative": {"b0"}, "additive": {"b0"}}.get(self.form, set())
    missing = [k for k in PARAM_KEYS[self.form] if k not in self.params and k not in optional]
    if missing:
      raise ValueError(f"{self.form} law is missing params {missing}; it needs "
                       f"{list(PARAM_KEYS[self.form])}")
    present = [k for k in CHINCHILLA_KEYS if k in self.params]
    if self.form != "chinchilla" and present and len(present) != len(CHINCHILLA_KEYS):
      raise ValueError(f"law params have {present} of the Chinchilla keys; give all of "
                       f"{list(CHINCHILLA_KEYS)} (for L_opt) or none")
    bad = {k: v for k, v in self.params.items() if not table_lib.is_finite_number(v)}
    if bad:
      raise ValueError(f"law params must be finite numbers; got {bad}")
    object.__setattr__(self, "params", {k: float(v) for k, v in self.params.items()})

  @property
  def has_chinchilla(self) -> bool:
    """Whether the law knows L_opt(N, D), so predictions are absolute losses."""
    return all(k in self.params for k in CHINCHILLA_KEYS)

  @property
  def output(self) -> str:
    """What `predict` returns without `l_opt`: "loss", or "factor" / "offset" relative to L_opt."""
    if self.has_chinchilla:
      return "loss"
    return "offset" if self.form == "additive" else "factor"

  def l_opt(self, n: Any, d: Any) -> np.ndarray:
    """The Chinchilla loss E + A / N^alpha + B / D^beta."""
    if not self.has_chinchilla:
      raise ValueError(f"this {self.form} law has no Chinchilla params {list(CHINCHILLA_KEYS)}, "
                       "so it cannot give L_opt(N, D); pass l_opt= to predict")
    n, d = np.broadcast_arrays(np.asarray(n, np.float64), np.asarray(d, np.float64))
    theta = params_to_theta("chinchilla", self.params)
    return np.exp(chinchilla_log(theta, np.log(n.ravel()), np.log(d.ravel()), np)).reshape(n.shape)

  def calibration(self, x: Any, r: Any) -> np.ndarray:
    """u(x) v(r) (multiplicative, joint) or u(x) + v(r) (additive): the architecture's effect."""
    if self.form == "chinchilla":
      raise ValueError("the chinchilla law has no architecture terms; use predict(n, d)")
    x, r = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(r, np.float64))
    theta = params_to_theta(self.form, self.params)
    return calibrate(self.form, theta, x.ravel(), r.ravel(), np).reshape(x.shape)

  def predict(self, n: Any = None, d: Any = None, x: Any = None, r: Any = None,
              l_opt: Any = None) -> np.ndarray:
    """Loss for arrays of (N, D, d_model / sqrt(N), r); see `output` for what comes back."""
    if self.form == "chinchilla":
      if n is None or d is None:
        raise ValueError("the chinchilla law predicts from n (params_nonembed) and d (tokens)")
      return self.l_opt(n, d)
    if x is None or r is None:
      raise ValueError(f"the {self.form} law needs x (d_model / sqrt(N)) and r (mlp_attn_ratio)")
    cal = self.calibration(x, r)
    if l_opt is None and self.has_chinchilla:
      if n is None or d is None:
        raise ValueError("absolute predictions need n (params_nonembed) and d (tokens)")
      l_opt = self.l_opt(n, d)
    if l_opt is None:
      return cal
    return combine(self.form, np.asarray(l_opt, np.float64), cal)

  def optimum(self, x_range: Sequence[float] | None = None,
              r_range: Sequence[float] | None = None) -> dict[str, Any]:
    """The loss-optimal (d_model / sqrt(N), r): closed-form, or on a grid for the joint form."""
    if self.form == "chinchilla":
      raise ValueError("the chinchilla law has no architecture optimum; fit a conditional form")
    p = self.params
    if self.form != "joint":
      return dict(d_over_sqrt_n=float(closed_form_optimum(p["a1"], p["a2"])),
                  r=float(closed_form_optimum(p["b1"], p["b2"])), closed_form=True)
    box = self.box or ((0.01, 1.0), (0.1, 10.0))
    x_range, r_range = x_range or box[0], r_range or box[1]
    x, r, interior = grid_optimum(self.form, params_to_theta(self.form, p), x_range, r_range)
    return dict(d_over_sqrt_n=float(x[0]), r=float(r[0]), closed_form=False,
                interior=bool(interior[0]), box=[list(x_range), list(r_range)])

  def to_json(self) -> dict[str, Any]:
    return dict(form=self.form, params=dict(self.params))


def load_law(source: str | pathlib.Path | Mapping[str, Any]) -> Law:
  """A Law from a fit.json path or its parsed dict; only `form` and `params` are required."""
  if not isinstance(source, Mapping):
    path = pathlib.Path(source)
    if not path.exists():
      raise ValueError(f"law file {path} does not exist; give a fit.json written by --mode=fit "
                       "or by hand ({\"form\": ..., \"params\": {...}})")
    try:
      source = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
      raise ValueError(f"law file {path} is not valid JSON: {e}") from e
  if not isinstance(source, Mapping) or "form" not in source or "params" not in source:
    raise ValueError("a law needs `form` and `params`, e.g. {\"form\": \"multiplicative\", "
                     "\"params\": {\"a0\": 2.697, ...}}")
  box = (source.get("optimum") or {}).get("box")
  box = (tuple(box[0]), tuple(box[1])) if box else None
  return Law(source["form"], dict(source["params"]), box=box)
