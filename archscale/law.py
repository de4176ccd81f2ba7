"""Scaling laws and their fitter (`--mode=fit`): Chinchilla and the paper's conditional law, in JAX.

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

Fitting: Huber (delta) or squared loss on log or linear residuals, summed over rows. Levenberg-
Marquardt (robust losses through iteratively reweighted Gauss-Newton) or optax's L-BFGS; residuals
and Jacobians by autodiff; all starts (Hoffmann's grid for Chinchilla, perturbations of a linear
least-squares anchor for the conditional forms, or random) and all bootstrap replicates (row weights
drawn from a multinomial, each warm-started from the full-data optimum) stream through one
`jit(vmap(...))` program of LANES lanes, in float64 enabled only inside the fitter.

Rows: `params_nonembed`, `tokens`, `loss` (all forms) and `d_model`, `mlp_attn_ratio` (conditional
forms), finite and positive; other fields are kept. Rows whose `status` is not "finished" (failed
sweep attempts) and rows outside `r_range` are excluded and listed. Scales are the rows' `scale`
(the sweep's requested N) when every row has one, else groups of N within SCALE_FACTOR.

Public API:
  load_rows(path) -> list[dict]                 results table, JSONL or CSV
  hoffmann_grid() -> np.ndarray                 the 4500 Chinchilla starts (a, b, e, alpha, beta)
  fit(rows, form=, l_opt=, r_range=, loss=, delta=, space=, solver=, starts=, n_starts=,
      max_iter=, tol=, bootstrap=, level=, seed=) -> FitResult
  evaluate_progressive(rows, form=, l_opt=, r_range=, **fit_kwargs) -> list[dict]
      fit on the smaller scales, predict the next: train_scales, test_scale, mse, r2, spearman
  prediction_metrics(predicted, measured) -> {"n", "mse", "r2", "spearman"}
  load_law(path_or_dict) -> Law                 a fit.json, hand-written ones (`form`, `params`) too
  Law(form, params).predict(n, d, x=None, r=None, l_opt=None) -> np.ndarray
      absolute loss when the law has Chinchilla params (or `l_opt` is given); otherwise the
      calibration factor u(x) v(r) (`Law.output == "factor"`) or offset u(x) + v(r) ("offset")
  Law.calibration(x, r), Law.l_opt(n, d), Law.has_chinchilla,
  Law.optimum() -> {"d_over_sqrt_n", "r", "closed_form"}
  FitResult: law, objective, intervals, stderr, optimum, starts, metrics, samples, timings,
      per_start (each start's objective, status, iterations),
      predict_interval(n, d, x, r) -> (2, ...) bounds, to_json()
  run_fit(config, workdir)                      `--mode=fit`: writes workdir/fit.json and plots

fit.json: form, l_opt ("empirical", "chinchilla", a path, "given" or "none"), params, intervals
({name: [lo, hi]} at interval_level, the optimum's d_over_sqrt_n and r included), stderr (bootstrap
standard deviations), optimum (d_over_sqrt_n, r, closed_form, interior; null for chinchilla),
objective, starts (total, converged, at_best, status counts), settings, metrics (in_sample;
progressive steps), timings, l_opt_groups (N, D, L_opt, rows and N spread per budget), rows_used
(each row plus d_over_sqrt_n, l_opt, predicted, predicted_interval, scale_index, budget_index),
rows_excluded (each row plus reason), results, plots, provenance.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import math
import pathlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from archscale import io

FORMS = ("multiplicative", "additive", "joint", "chinchilla")
L_OPTS = ("chinchilla", "empirical")
LOSSES = ("huber", "squared")
SPACES = ("log", "linear")
SOLVERS = ("lm", "lbfgs")
STARTS = ("grid", "random")
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
_THETA_KEYS = {
    "chinchilla": ("a", "b", "e", "alpha", "beta"),
    "multiplicative": ("a0", "a1", "a2", "b1", "b2"),
    "additive": ("a0", "a1", "a2", "b1", "b2"),
    "joint": JOINT_KEYS,
}
STATUS = ("running", "converged", "stalled", "max_iter", "nonfinite")
REQUIRED_FIELDS = ("params_nonembed", "tokens", "loss")
ARCH_FIELDS = ("d_model", "mlp_attn_ratio")
# A new scale starts where N exceeds the smallest N of the current one by more than this factor.
SCALE_FACTOR = 1.25
# Starts whose objective is within this relative distance of the best count as reaching it.
AT_BEST_RTOL = 1e-6
# Hoffmann et al.'s grid of starting points for the log-sum-exp Chinchilla fit (4500 starts).
HOFFMANN_GRID = dict(
    a=np.arange(0.0, 30.0, 5.0), b=np.arange(0.0, 30.0, 5.0), e=np.arange(-1.0, 1.5, 0.5),
    alpha=np.arange(0.0, 2.5, 0.5), beta=np.arange(0.0, 2.5, 0.5))


@contextlib.contextmanager
def _x64() -> Iterator[None]:
  """float64 inside the fitter only; other modules run float32 models in the same process."""
  enable = getattr(jax, "enable_x64", None)
  if enable is None:
    from jax.experimental import enable_x64 as enable  # Older jax.
    with enable():
      yield
  else:
    with enable(True):
      yield


# ----------------------------------------------------------------------------------------------
# The laws, written once for numpy (prediction) and jax.numpy (fitting).


def _chinchilla_log(theta: Any, ln_n: Any, ln_d: Any, xp: Any) -> Any:
  """ln L of the Chinchilla law from (a, b, e, alpha, beta).

  Summed directly rather than through logaddexp: half the transcendentals, and float64 only
  overflows for terms above e^709, which the solver sees as an infinite objective and rejects.
  """
  a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
  return xp.log(xp.exp(a - alpha * ln_n) + xp.exp(b - beta * ln_d) + xp.exp(e))


def _basis(z: Any, xp: Any) -> tuple[Any, Any, Any]:
  return xp.ones_like(z), xp.log(z), 1.0 / z


def _calibration(form: str, theta: Any, x: Any, r: Any, xp: Any) -> Any:
  """u(x) v(r) (multiplicative, b0 = 1), u(x) + v(r) (additive) or the bilinear joint form."""
  t = [theta[..., i, None] for i in range(theta.shape[-1])]
  _, lnx, invx = _basis(x, xp)
  _, lnr, invr = _basis(r, xp)
  if form == "multiplicative":
    return (t[0] + t[1] * lnx + t[2] * invx) * (1.0 + t[3] * lnr + t[4] * invr)
  if form == "additive":
    return t[0] + t[1] * lnx + t[2] * invx + t[3] * lnr + t[4] * invr
  fx, fr = _basis(x, xp), _basis(r, xp)
  return sum(t[3 * i + j] * fx[i] * fr[j] for i in range(3) for j in range(3))


def _combine(form: str, l_opt: Any, calibration: Any) -> Any:
  return l_opt + calibration if form == "additive" else l_opt * calibration


class _Feats(NamedTuple):
  """Per-row inputs of the solver, float64 arrays of length R."""
  ln_n: Any
  ln_d: Any
  l_opt: Any
  x: Any
  r: Any


def _predict_fit_space(form: str, space: str, theta_P: Any, f: _Feats) -> Any:
  """Predicted loss of every row in the space the residuals live in (log or linear)."""
  if form == "chinchilla":
    log_l = _chinchilla_log(theta_P, f.ln_n, f.ln_d, jnp)
    return log_l if space == "log" else jnp.exp(log_l)
  pred = _combine(form, f.l_opt, _calibration(form, theta_P, f.x, f.r, jnp))
  if space == "linear":
    return pred
  return jnp.log(jnp.where(pred > 0, pred, jnp.nan))  # A non-positive loss is no solution.


# ----------------------------------------------------------------------------------------------
# Solvers: one start per lane; lanes are vmapped, and starts stream through them (see _solve).


class _Spec(NamedTuple):
  """Everything static about one solve (hashable: it keys the compiled executable)."""
  form: str
  space: str
  loss: str
  delta: float
  solver: str
  max_iter: int
  tol: float


def _rho(spec: _Spec, r: Any) -> Any:
  if spec.loss == "squared":
    return 0.5 * r * r
  a = jnp.abs(r)
  return jnp.where(a <= spec.delta, 0.5 * r * r, spec.delta * (a - 0.5 * spec.delta))


def _rho_prime(spec: _Spec, r: Any) -> Any:
  return r if spec.loss == "squared" else jnp.clip(r, -spec.delta, spec.delta)


def _irls_weight(spec: _Spec, r: Any) -> Any:
  """rho'(r) / r: the Gauss-Newton curvature of each residual (a majoriser of the Huber loss)."""
  if spec.loss == "squared":
    return jnp.ones_like(r)
  return jnp.minimum(1.0, spec.delta / jnp.maximum(jnp.abs(r), 1e-300))


def _objective(spec: _Spec, theta_P: Any, w_R: Any, f: _Feats, y_R: Any) -> Any:
  resid = _predict_fit_space(spec.form, spec.space, theta_P, f) - y_R
  obj = jnp.sum(w_R * _rho(spec, resid))
  return jnp.where(jnp.isfinite(obj), obj, jnp.inf)


def _gauss_newton(spec: _Spec, theta_P: Any, w_R: Any, f: _Feats, y_R: Any) -> tuple[Any, ...]:
  """Objective, gradient and Gauss-Newton matrix at theta, by forward-mode autodiff.

  One JVP per parameter, reduced at once: XLA fuses these small sums far better than a batched
  (R x P) Jacobian product, and the Jacobian is never materialised.
  """
  predict = functools.partial(_predict_fit_space, spec.form, spec.space)
  n_p = theta_P.shape[0]
  cols = []
  for e_P in jnp.eye(n_p, dtype=theta_P.dtype):
    pred_R, col_R = jax.jvp(lambda t: predict(t, f), (theta_P,), (e_P,))
    cols.append(col_R)
  r_R = pred_R - y_R
  obj = jnp.sum(w_R * _rho(spec, r_R))
  psi_R = w_R * _rho_prime(spec, r_R)
  curv_R = w_R * _irls_weight(spec, r_R)
  grad_P = jnp.stack([jnp.sum(c * psi_R) for c in cols])
  weighted = [c * curv_R for c in cols]
  hess_PP = jnp.stack([jnp.stack([jnp.sum(wc * c) for c in cols]) for wc in weighted])
  finite = jnp.isfinite(obj) & jnp.all(jnp.isfinite(grad_P)) & jnp.all(jnp.isfinite(hess_PP))
  return jnp.where(finite, obj, jnp.inf), grad_P, hess_PP


def _lm_init(theta0_P: Any) -> dict[str, Any]:
  """Levenberg-Marquardt state before the first iteration (the start is the first candidate)."""
  n_p, dtype = theta0_P.shape[0], theta0_P.dtype
  return dict(theta=theta0_P, obj=jnp.asarray(jnp.inf, dtype), grad=jnp.zeros((n_p,), dtype),
              hess=jnp.zeros((n_p, n_p), dtype), cand=theta0_P,
              predicted=jnp.asarray(jnp.inf, dtype), lam=jnp.asarray(1e-3, dtype),
              nu=jnp.asarray(2.0, dtype), scale=jnp.zeros((n_p,), dtype), it=jnp.asarray(0),
              status=jnp.asarray(0))


def _lm_step(spec: _Spec, c: dict[str, Any], w_R: Any, f: _Feats, y_R: Any) -> dict[str, Any]:
  """One Levenberg-Marquardt iteration: evaluate the candidate, accept or not, propose the next.

  Robust losses use iteratively reweighted Gauss-Newton curvature; the damping is scaled by the
  largest diagonal seen so far (More's scaling), so steps do not depend on parameter units.
  """
  dtype = c["theta"].dtype
  obj_c, grad_c, hess_c = _gauss_newton(spec, c["cand"], w_R, f, y_R)
  first = c["it"] == 0
  accept = obj_c < c["obj"]
  gain = (c["obj"] - obj_c) / jnp.maximum(c["predicted"], jnp.finfo(dtype).tiny)
  # Nielsen's damping update: shrink after good steps, grow geometrically after rejections.
  lam = jnp.where(first, c["lam"], jnp.where(
      accept, c["lam"] * jnp.maximum(1.0 / 3.0, 1.0 - (2.0 * gain - 1.0) ** 3), c["lam"] * c["nu"]))
  nu = jnp.where(accept, 2.0, 2.0 * c["nu"])
  theta = c["theta"]
  small_step = (jnp.linalg.norm(c["cand"] - theta)
                <= spec.tol * (jnp.linalg.norm(theta) + spec.tol))
  small_drop = accept & (c["obj"] - obj_c <= spec.tol * obj_c)
  keep = lambda new, old: jnp.where(accept, new, old)
  theta, obj = keep(c["cand"], theta), keep(obj_c, c["obj"])
  grad_P, hess_PP = keep(grad_c, c["grad"]), keep(hess_c, c["hess"])
  scale_P = jnp.maximum(c["scale"], jnp.diag(hess_PP))
  step = jnp.linalg.solve(hess_PP + lam * jnp.diag(jnp.maximum(scale_P, 1e-30)), -grad_P)
  status = jnp.where(~first & (small_step | small_drop), STATUS.index("converged"), 0)
  status = jnp.where(lam > 1e16, STATUS.index("stalled"), status)
  status = jnp.where(~jnp.isfinite(obj), STATUS.index("nonfinite"), status)
  status = jnp.where((status == 0) & (c["it"] + 1 >= spec.max_iter), STATUS.index("max_iter"),
                     status)
  return dict(theta=theta, obj=obj, grad=grad_P, hess=hess_PP, cand=theta + step,
              predicted=-(grad_P @ step + 0.5 * step @ hess_PP @ step), lam=lam, nu=nu,
              scale=scale_P, it=c["it"] + 1, status=status)


_LBFGS = optax.lbfgs()


def _lbfgs_init(theta0_P: Any) -> dict[str, Any]:
  return dict(theta=theta0_P, opt=_LBFGS.init(theta0_P),
              obj=jnp.asarray(jnp.inf, theta0_P.dtype), it=jnp.asarray(0), status=jnp.asarray(0))


def _lbfgs_step(spec: _Spec, c: dict[str, Any], w_R: Any, f: _Feats, y_R: Any) -> dict[str, Any]:
  """One optax L-BFGS iteration (zoom line search); stops on a tiny gradient or no progress."""
  value_fn = functools.partial(_objective, spec, w_R=w_R, f=f, y_R=y_R)
  theta = c["theta"]
  value, grad = optax.value_and_grad_from_state(value_fn)(theta, state=c["opt"])
  updates, opt_state = _LBFGS.update(grad, c["opt"], theta, value=value, grad=grad,
                                     value_fn=value_fn)
  theta_new = optax.apply_updates(theta, updates)
  obj_new = optax.tree.get(opt_state, "value")
  gnorm = jnp.max(jnp.abs(grad) * jnp.maximum(jnp.abs(theta), 1.0))
  status = jnp.where((gnorm <= spec.tol * jnp.maximum(value, 1e-12))
                     | (jnp.abs(value - obj_new) <= spec.tol * jnp.abs(obj_new)),
                     STATUS.index("converged"), 0)
  status = jnp.where(~jnp.isfinite(obj_new) | ~jnp.all(jnp.isfinite(theta_new)),
                     STATUS.index("nonfinite"), status)
  status = jnp.where((status == 0) & (c["it"] + 1 >= spec.max_iter), STATUS.index("max_iter"),
                     status)
  return dict(theta=theta_new, opt=opt_state, obj=obj_new, it=c["it"] + 1, status=status)


_SOLVERS = {"lm": (_lm_init, _lm_step), "lbfgs": (_lbfgs_init, _lbfgs_step)}
# The starts stream through a fixed set of lanes: every call runs ROUND iterations on LANES starts
# at once, then finished lanes take the next starts. A vmapped loop costs as much for a finished
# lane as for a running one, so this keeps the lanes busy instead of waiting for the slowest start.
LANES = 512
ROUND = 10


def _advance(spec: _Spec, state: dict[str, Any], fresh_C: Any, theta0_CP: Any, rep_C: Any,
             w_BR: Any, f: _Feats, y_R: Any) -> dict[str, Any]:
  """Restarts the `fresh` lanes from theta0, then runs up to ROUND iterations on every lane."""
  init, step = _SOLVERS[spec.solver]
  restarted = jax.vmap(init)(theta0_CP)
  state = jax.tree.map(
      lambda new, old: jnp.where(fresh_C.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
      restarted, state)

  def run(c, w_R):
    def body(carry):
      c, k = carry
      return step(spec, c, w_R, f, y_R), k + 1
    return jax.lax.while_loop(lambda ck: (ck[0]["status"] == 0) & (ck[1] < ROUND), body, (c, 0))[0]

  return jax.vmap(run)(state, w_BR[rep_C])


_COMPILED: dict[tuple, Any] = {}


def _bucket(n: int, least: int = 1) -> int:
  """The next power of two >= n: padding shapes to few sizes lets compiled programs be reused."""
  return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _solve(spec: _Spec, theta0_BSP: np.ndarray, w_BR: np.ndarray, f: _Feats,
           y_R: np.ndarray) -> tuple[tuple[np.ndarray, ...], float, float]:
  """Solves every start of every replicate (replicate b weights the rows by w_BR[b]).

  Rows, replicates and lanes are padded to powers of two (padded rows weigh nothing), so fits of
  similar size share one compiled program. Returns ((theta_BSP, objective_BS, status_BS,
  iterations_BS), compile seconds, solve seconds).
  """
  n_b, n_s, n_p = theta0_BSP.shape
  theta0_LP = theta0_BSP.reshape(n_b * n_s, n_p)
  rep_L = np.repeat(np.arange(n_b), n_s)
  n_lanes = min(LANES, _bucket(len(theta0_LP)))
  pad_r = _bucket(len(y_R), 32) - len(y_R)
  w_BR = np.pad(w_BR, ((0, _bucket(n_b) - n_b), (0, pad_r)))
  f = _Feats(*(np.pad(a, (0, pad_r), mode="edge") for a in f))
  y_R = np.pad(y_R, (0, pad_r), mode="edge")
  with _x64():
    args = (jnp.asarray(w_BR, jnp.float64), _Feats(*(jnp.asarray(a, jnp.float64) for a in f)),
            jnp.asarray(y_R, jnp.float64))
    init = _SOLVERS[spec.solver][0]
    lane_job = np.where(np.arange(n_lanes) < len(theta0_LP), np.arange(n_lanes), -1)
    theta0_CP = theta0_LP[np.maximum(lane_job, 0) % len(theta0_LP)].copy()
    rep_C = rep_L[np.maximum(lane_job, 0) % len(theta0_LP)].copy()
    state = jax.vmap(init)(jnp.asarray(theta0_CP))
    state["status"] = jnp.where(jnp.asarray(lane_job) >= 0, state["status"],  # idle lanes
                                STATUS.index("nonfinite"))
    fresh = np.zeros(n_lanes, bool)
    key = (spec, n_lanes, n_p, w_BR.shape)
    compile_s = 0.0
    if key not in _COMPILED:
      t0 = time.perf_counter()
      _COMPILED[key] = jax.jit(functools.partial(_advance, spec)).lower(
          state, fresh, theta0_CP, rep_C, *args).compile()
      compile_s = time.perf_counter() - t0
    advance = _COMPILED[key]
    t0 = time.perf_counter()
    theta_LP = np.full_like(theta0_LP, np.nan)
    obj_L = np.full(len(theta0_LP), np.inf)
    status_L = np.zeros(len(theta0_LP), int)
    iters_L = np.zeros(len(theta0_LP), int)
    queue = n_lanes  # the next start to hand to a free lane; lane_job is -1 on idle lanes
    while (lane_job >= 0).any():
      state = advance(state, fresh, theta0_CP, rep_C, *args)
      status = np.asarray(state["status"])
      done = (status != 0) & (lane_job >= 0)
      if done.any():
        jobs = lane_job[done]
        theta_LP[jobs] = np.asarray(state["theta"])[done]
        obj_L[jobs] = np.asarray(state["obj"])[done]
        status_L[jobs], iters_L[jobs] = status[done], np.asarray(state["it"])[done]
      fresh = np.zeros(n_lanes, bool)
      for lane in np.flatnonzero(done):
        if queue < len(theta0_LP):
          lane_job[lane], fresh[lane] = queue, True
          theta0_CP[lane], rep_C[lane] = theta0_LP[queue], rep_L[queue]
          queue += 1
        else:
          lane_job[lane] = -1
    solve_s = time.perf_counter() - t0
  shape = (n_b, n_s)
  return ((theta_LP.reshape(n_b, n_s, n_p), obj_L.reshape(shape), status_L.reshape(shape),
           iters_L.reshape(shape)), compile_s, solve_s)


# ----------------------------------------------------------------------------------------------
# Laws as objects: what fit() returns and what the search module loads.


def _theta_to_params(form: str, theta_BP: np.ndarray) -> dict[str, np.ndarray]:
  """Solver parameters (last axis) to the reported ones: E, A, B from logs; b0 = 1 when fixed."""
  t = {k: theta_BP[..., i] for i, k in enumerate(_THETA_KEYS[form])}
  if form == "chinchilla":
    return dict(E=np.exp(t["e"]), A=np.exp(t["a"]), B=np.exp(t["b"]), alpha=t["alpha"],
                beta=t["beta"])
  if form == "multiplicative":
    return dict(a0=t["a0"], a1=t["a1"], a2=t["a2"], b0=np.ones_like(t["a0"]), b1=t["b1"],
                b2=t["b2"])
  return t


def _params_to_theta(form: str, params: Mapping[str, Any]) -> np.ndarray:
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


def _closed_form_optimum(c1: Any, c2: Any) -> Any:
  """argmin of c1 ln z + c2 / z: z = c2 / c1, a minimum only when both are positive."""
  c1, c2 = np.asarray(c1, np.float64), np.asarray(c2, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where((c1 > 0) & (c2 > 0), c2 / c1, np.nan)


def _grid_optimum(form: str, theta_BP: np.ndarray, x_range: Sequence[float],
                  r_range: Sequence[float], size: int = 161) -> tuple[np.ndarray, ...]:
  """Numeric argmin of the calibration over a log grid: (x*, r*, interior) per parameter row."""
  x_G = np.geomspace(x_range[0], x_range[1], size)
  r_G = np.geomspace(r_range[0], r_range[1], size)
  xx, rr = (a.ravel() for a in np.meshgrid(x_G, r_G, indexing="ij"))
  theta_BP = np.atleast_2d(theta_BP)
  cal_BG = _calibration(form, theta_BP, xx, rr, np)
  best = np.argmin(np.where(np.isfinite(cal_BG), cal_BG, np.inf), axis=-1)
  i, j = np.unravel_index(best, (size, size))
  interior = (i > 0) & (i < size - 1) & (j > 0) & (j < size - 1)
  return x_G[i], r_G[j], interior


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
    bad = {k: v for k, v in self.params.items() if not _is_finite_number(v)}
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
    theta = _params_to_theta("chinchilla", self.params)
    return np.exp(_chinchilla_log(theta, np.log(n.ravel()), np.log(d.ravel()), np)).reshape(n.shape)

  def calibration(self, x: Any, r: Any) -> np.ndarray:
    """u(x) v(r) (multiplicative, joint) or u(x) + v(r) (additive): the architecture's effect."""
    if self.form == "chinchilla":
      raise ValueError("the chinchilla law has no architecture terms; use predict(n, d)")
    x, r = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(r, np.float64))
    theta = _params_to_theta(self.form, self.params)
    return _calibration(self.form, theta, x.ravel(), r.ravel(), np).reshape(x.shape)

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
    return _combine(self.form, np.asarray(l_opt, np.float64), cal)

  def optimum(self, x_range: Sequence[float] | None = None,
              r_range: Sequence[float] | None = None) -> dict[str, Any]:
    """The loss-optimal (d_model / sqrt(N), r): closed-form, or on a grid for the joint form."""
    if self.form == "chinchilla":
      raise ValueError("the chinchilla law has no architecture optimum; fit a conditional form")
    p = self.params
    if self.form != "joint":
      return dict(d_over_sqrt_n=float(_closed_form_optimum(p["a1"], p["a2"])),
                  r=float(_closed_form_optimum(p["b1"], p["b2"])), closed_form=True)
    box = self.box or ((0.01, 1.0), (0.1, 10.0))
    x_range, r_range = x_range or box[0], r_range or box[1]
    x, r, interior = _grid_optimum(self.form, _params_to_theta(self.form, p), x_range, r_range)
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


# ----------------------------------------------------------------------------------------------
# Results tables.


def _is_finite_number(v: Any) -> bool:
  if isinstance(v, bool):
    return False
  try:
    return math.isfinite(float(v))
  except (TypeError, ValueError):
    return False


def _parse_cell(text: str) -> Any:
  text = text.strip()
  if text == "":
    return None
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def load_rows(path: str | pathlib.Path) -> list[dict[str, Any]]:
  """Rows of a results table: JSONL (one object a line) or CSV with a header."""
  path = pathlib.Path(path)
  if not path.exists():
    raise ValueError(f"results table {path} does not exist; set config.fit.results to the sweep's "
                     "results.jsonl or a CSV")
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".json"):
    rows = list(io.read_jsonl(path))
  elif suffix == ".csv":
    with open(path, encoding="utf-8", newline="") as f:
      rows = [{k: _parse_cell(v or "") for k, v in row.items() if k is not None}
              for row in csv.DictReader(f)]
  else:
    raise ValueError(f"results table {path} must end in .jsonl or .csv, not {suffix!r}")
  if not rows:
    raise ValueError(f"results table {path} has no rows")
  return rows


def _row_name(i: int, row: Mapping[str, Any]) -> str:
  for key in ("run_id", "id", "name"):
    if row.get(key) not in (None, ""):
      return f"row {i} ({key}={row[key]})"
  return f"row {i}"


def _cluster(values: np.ndarray) -> np.ndarray:
  """Integer ids of groups of nearby positive values, in increasing order (see SCALE_FACTOR)."""
  order = np.argsort(values, kind="stable")
  ids = np.empty(len(values), int)
  current, start = -1, -np.inf
  for i in order:
    if values[i] > start * SCALE_FACTOR:
      current, start = current + 1, values[i]
    ids[i] = current
  return ids


@dataclasses.dataclass
class _Table:
  """Validated, filtered rows as float64 arrays, with their scale and budget groups."""
  rows: list[dict[str, Any]]
  excluded: list[dict[str, Any]]
  n: np.ndarray
  d: np.ndarray
  loss: np.ndarray
  x: np.ndarray
  r: np.ndarray
  scale: np.ndarray
  budget: np.ndarray

  def take(self, mask: np.ndarray) -> _Table:
    idx = np.flatnonzero(mask)
    arrays = {k: getattr(self, k)[idx] for k in ("n", "d", "loss", "x", "r")}
    return _table([self.rows[i] for i in idx], [], **arrays)


def _table(rows: list[dict[str, Any]], excluded: list[dict[str, Any]], n: np.ndarray,
           d: np.ndarray, loss: np.ndarray, x: np.ndarray, r: np.ndarray) -> _Table:
  """Scales are the rows' `scale` (the sweep's requested N) when all have one, else clusters of
  N; budgets are clusters of D within a scale."""
  nominal = [row.get("scale") for row in rows]
  if rows and all(_is_finite_number(v) and float(v) > 0 for v in nominal):
    scale = np.unique(np.array(nominal, np.float64), return_inverse=True)[1].reshape(-1)
  else:
    scale = _cluster(n)
  budget = np.zeros(len(n), int)
  for s in np.unique(scale):
    in_s = scale == s
    budget[in_s] = _cluster(d[in_s]) + budget.max() + 1
  _, budget = np.unique(budget, return_inverse=True)
  return _Table(rows, excluded, n, d, loss, x, r, scale, budget)


def _prepare(rows: Sequence[Mapping[str, Any]], form: str,
             r_range: Sequence[float] | None) -> _Table:
  """Checks every row (raising on malformed ones) and applies the r filter."""
  if not rows:
    raise ValueError("the results table is empty: nothing to fit")
  fields = REQUIRED_FIELDS + (ARCH_FIELDS if form != "chinchilla" else ())
  problems, unfinished, finished = [], [], []
  for i, row in enumerate(rows):
    if not isinstance(row, Mapping):
      problems.append(f"row {i}: not a mapping of fields")
    elif row.get("status") not in (None, "finished"):
      unfinished.append(dict(row, reason=f"status={row['status']!r}: not a finished run"))
    else:
      bad = [f"{k}={row.get(k)!r}" for k in fields
             if not (_is_finite_number(row.get(k)) and float(row[k]) > 0)]
      if bad:
        problems.append(f"{_row_name(i, row)}: " + ", ".join(bad))
      finished.append(row)
  if problems:
    shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10
                                         else "")
    raise ValueError(f"{len(problems)} malformed row(s) in the results table: {shown}. Every row "
                     f"needs finite positive {list(fields)}; fix or remove these rows.")
  if not finished:
    raise ValueError(f"none of the {len(rows)} rows has status 'finished': nothing to fit")
  sources = sorted({str(row["loss_source"]) for row in finished if "loss_source" in row})
  if len(sources) > 1:
    raise ValueError(f"the rows' loss comes from different sources {sources} (field loss_source); "
                     "held-out and training losses are not comparable: rerun the 'train' runs with "
                     "train.eval_batches > 0, or fit the rows of one source at a time")
  rows = finished
  cols = {k: np.array([float(row[k]) for row in rows]) for k in fields}
  n, d, loss = cols["params_nonembed"], cols["tokens"], cols["loss"]
  if form == "chinchilla":
    x = r = np.ones_like(n)
  else:
    x, r = cols["d_model"] / np.sqrt(n), cols["mlp_attn_ratio"]
  keep = np.ones(len(rows), bool)
  excluded = unfinished
  if form != "chinchilla" and r_range:
    lo, hi = _check_r_range(r_range)
    keep = (r >= lo) & (r <= hi)
    excluded += [dict(rows[i], reason=f"mlp_attn_ratio={r[i]:.4g} outside r_range [{lo}, {hi}]")
                 for i in np.flatnonzero(~keep)]
  kept = [dict(rows[i]) for i in np.flatnonzero(keep)]
  table = _table(kept, excluded, n[keep], d[keep], loss[keep], x[keep], r[keep])
  _check_identifiable(table, form)
  return table


def _check_r_range(r_range: Sequence[float]) -> tuple[float, float]:
  if len(r_range) != 2 or not all(_is_finite_number(v) for v in r_range):
    raise ValueError(f"r_range={tuple(r_range)!r} must be two numbers (lo, hi), or empty for none")
  lo, hi = float(r_range[0]), float(r_range[1])
  if not 0 < lo < hi:
    raise ValueError(f"r_range=({lo}, {hi}) needs 0 < lo < hi; the paper keeps 0.5 <= r <= 5")
  return lo, hi


def _distinct(values: np.ndarray) -> int:
  return len(np.unique(np.round(np.log(values), 9)))


def _check_identifiable(table: _Table, form: str) -> None:
  """Refuses data that cannot pin down the form's parameters, naming the reason."""
  n_free = len(_THETA_KEYS[form])
  n_rows = len(table.rows)
  if n_rows <= n_free:
    after = f" after the r filter ({len(table.excluded)} excluded)" if table.excluded else ""
    raise ValueError(f"form {form!r} has {n_free} free parameters but only {n_rows} rows "
                     f"remain{after}; it needs at least {n_free + 1}")
  if form == "chinchilla":
    if _distinct(table.n) < 2 or _distinct(table.d) < 2:
      raise ValueError(
          f"a Chinchilla fit needs at least two distinct params_nonembed and two distinct tokens "
          f"values; the rows have {_distinct(table.n)} and {_distinct(table.d)} (one scale only)")
    return
  for name, values in (("d_model / sqrt(params_nonembed)", table.x), ("mlp_attn_ratio", table.r)):
    if _distinct(values) < 3:
      raise ValueError(f"the {form} form needs at least three distinct values of {name}; the "
                       f"rows have {_distinct(values)}: the U-shape cannot be fitted")


# ----------------------------------------------------------------------------------------------
# Fitting.


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
  if value not in allowed:
    raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")
  return value


def _settings(form: str, loss: str, delta: float, space: str, solver: str, starts: str,
              n_starts: int, max_iter: int, tol: float, bootstrap: int,
              level: float) -> dict[str, Any]:
  _check_choice("form", form, FORMS)
  _check_choice("loss", loss, LOSSES)
  _check_choice("space", space, SPACES)
  _check_choice("solver", solver, SOLVERS)
  _check_choice("starts", starts, STARTS)
  for name, value, ok in (("delta", delta, delta > 0), ("n_starts", n_starts, n_starts >= 1),
                          ("max_iter", max_iter, max_iter >= 1), ("tol", tol, tol > 0),
                          ("bootstrap", bootstrap, bootstrap >= 0),
                          ("level", level, 0 < level < 1)):
    if not ok:
      raise ValueError(f"{name}={value!r} is out of range (delta, tol > 0; n_starts, max_iter >= 1;"
                       " bootstrap >= 0; 0 < level < 1)")
  return dict(loss=loss, delta=float(delta), space=space, solver=solver, starts=starts,
              n_starts=int(n_starts), max_iter=int(max_iter), tol=float(tol),
              bootstrap=int(bootstrap), level=float(level))


def hoffmann_grid() -> np.ndarray:
  """Hoffmann et al.'s 4500 starts as (a, b, e, alpha, beta) rows."""
  g = HOFFMANN_GRID
  mesh = np.meshgrid(g["a"], g["b"], g["e"], g["alpha"], g["beta"], indexing="ij")
  return np.stack([m.ravel() for m in mesh], axis=-1)


def _lstsq(cols: Sequence[np.ndarray], y: np.ndarray) -> np.ndarray:
  return np.linalg.lstsq(np.stack(cols, axis=-1), y, rcond=None)[0]


def _anchor(form: str, f: _Feats, loss: np.ndarray) -> np.ndarray:
  """A least-squares starting point for the conditional forms (linear in u, then in v)."""
  one, lnx, invx = _basis(f.x, np)
  _, lnr, invr = _basis(f.r, np)
  if form == "additive":
    return _lstsq([one, lnx, invx, lnr, invr], loss - f.l_opt)
  ratio = loss / f.l_opt
  if form == "joint":
    return _lstsq([fx * fr for fx in (one, lnx, invx) for fr in (one, lnr, invr)], ratio)
  b = np.zeros(2)
  for _ in range(5):  # Alternate: u given v, then v given u, folding v's constant into u.
    v = 1.0 + b[0] * lnr + b[1] * invr
    a = _lstsq([one, lnx, invx], ratio / v)
    c, b1, b2 = _lstsq([one, lnr, invr], ratio / (a[0] + a[1] * lnx + a[2] * invx))
    a, b = a * c, np.array([b1, b2]) / c
  return np.concatenate([a, b])


def _starting_points(form: str, settings: dict[str, Any], f: _Feats, loss: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
  """Starts (S, P): Hoffmann's grid or a random box for Chinchilla; around an anchor otherwise."""
  if form == "chinchilla":
    if settings["starts"] == "grid":
      return hoffmann_grid()
    lo = np.array([v.min() for v in HOFFMANN_GRID.values()])
    hi = np.array([v.max() for v in HOFFMANN_GRID.values()])
    return rng.uniform(lo, hi, size=(settings["n_starts"], 5))
  anchor = _anchor(form, f, loss)
  spread = 0.5 * np.maximum(np.abs(anchor), 1e-3)
  if settings["starts"] == "grid" and len(anchor) <= 6:
    steps = np.stack([m.ravel() for m in np.meshgrid(*[[-1.0, 0.0, 1.0]] * len(anchor),
                                                        indexing="ij")], axis=-1)
    return anchor + steps * spread
  noise = rng.standard_normal((settings["n_starts"] - 1, len(anchor)))
  return np.concatenate([anchor[None], anchor + noise * spread])


class _Solution(NamedTuple):
  theta: np.ndarray          # (P,) best parameters
  objective: float
  starts: dict[str, Any]     # counts of start outcomes
  theta_samples: np.ndarray  # (B, P) bootstrap replicates (B = 0 without bootstrap)
  timings: dict[str, float]
  per_start: dict[str, np.ndarray]  # objective, status (index into STATUS), iterations


def _fit_arrays(form: str, settings: dict[str, Any], f: _Feats, loss: np.ndarray,
                rng: np.random.Generator) -> _Solution:
  """Multi-start fit of one form to prepared arrays, then the vectorised bootstrap."""
  spec = _Spec(form, settings["space"], settings["loss"], settings["delta"], settings["solver"],
               settings["max_iter"], settings["tol"])
  y = np.log(loss) if settings["space"] == "log" else loss
  theta0_SP = _starting_points(form, settings, f, loss, rng)
  logging.info("fit: %s, %d rows, %d starts, solver %s", form, len(loss), len(theta0_SP),
               settings["solver"])
  t0 = time.perf_counter()
  (theta_BSP, obj_BS, status_BS, iters_BS), compile_s, _ = _solve(
      spec, theta0_SP[None], np.ones((1, len(loss))), f, y)
  theta_SP, obj_S, status_S, iters_S = theta_BSP[0], obj_BS[0], status_BS[0], iters_BS[0]
  finite = np.isfinite(obj_S)
  if not finite.any():
    raise ValueError(f"no start of the {form} fit reached a finite objective: check that the "
                     "losses and architecture fields are on the scales the law expects")
  best = int(np.argmin(np.where(finite, obj_S, np.inf)))
  objective = float(obj_S[best])
  at_best = finite & (np.abs(obj_S - objective) <= AT_BEST_RTOL * abs(objective) + 1e-300)
  starts = dict(total=len(obj_S), converged=int(np.sum(status_S == STATUS.index("converged"))),
                at_best=int(at_best.sum()), at_best_rtol=AT_BEST_RTOL,
                status={s: int(np.sum(status_S == i)) for i, s in enumerate(STATUS) if i},
                iterations_of_best=int(iters_S[best]))
  timings = dict(compile_seconds=compile_s, seconds=time.perf_counter() - t0)
  logging.info("fit: objective %.6g; %d/%d starts converged, %d at the best (%.1f s)", objective,
               starts["converged"], starts["total"], starts["at_best"], timings["seconds"])
  samples = np.zeros((0, len(theta0_SP[0])))
  if settings["bootstrap"]:
    n_rows, n_boot = len(loss), settings["bootstrap"]
    w_BR = rng.multinomial(n_rows, np.full(n_rows, 1.0 / n_rows), size=n_boot).astype(np.float64)
    t1 = time.perf_counter()
    (theta_B1P, obj_B1, status_B1, _), boot_compile_s, _ = _solve(
        spec, np.broadcast_to(theta_SP[best], (n_boot, 1, theta_SP.shape[1])), w_BR, f, y)
    samples = theta_B1P[np.isfinite(obj_B1[:, 0]), 0]
    timings.update(bootstrap_seconds=time.perf_counter() - t1,
                   compile_seconds=compile_s + boot_compile_s)
    starts["bootstrap_status"] = {s: int(np.sum(status_B1 == i)) for i, s in enumerate(STATUS)
                                  if i}
    logging.info("fit: %d bootstrap replicates (%.1f s)", n_boot, timings["bootstrap_seconds"])
  per_start = dict(objective=obj_S, status=status_S, iterations=iters_S)
  return _Solution(theta_SP[best], objective, starts, samples, timings, per_start)


def _feats(table: _Table, l_opt: np.ndarray | None = None) -> _Feats:
  l_opt = np.ones_like(table.n) if l_opt is None else l_opt
  return _Feats(np.log(table.n), np.log(table.d), l_opt, table.x, table.r)


def _empirical_l_opt(table: _Table) -> np.ndarray:
  """The lowest loss of each row's (N, D) budget."""
  best = np.full(table.budget.max() + 1, np.inf)
  np.minimum.at(best, table.budget, table.loss)
  return best[table.budget]


def _best_rows(table: _Table) -> np.ndarray:
  """Index of the lowest-loss row of each budget."""
  return np.array([i[np.argmin(table.loss[i])] for i in
                   (np.flatnonzero(table.budget == g) for g in range(table.budget.max() + 1))])


# Realised N may differ from its budget's by this much before an empirical L_opt warns.
N_SPREAD_WARNING = 0.02


def _n_spreads(table: _Table) -> list[float]:
  """Per budget, the largest relative distance of a row's realised N from its best row's N."""
  best = _best_rows(table)
  return [float(np.max(np.abs(table.n[table.budget == g] / table.n[best[g]] - 1)))
          for g in range(len(best))]


def _warn_n_spread(table: _Table) -> None:
  spreads = _n_spreads(table)
  if max(spreads) > N_SPREAD_WARNING:
    logging.warning(
        "fit: with an empirical L_opt every row of a budget shares its best loss, but realised N "
        "varies by up to %.1f%% within a budget; its loss effect is then read as an architecture "
        "effect. Use fit.l_opt=chinchilla (or a fit.json with Chinchilla params), which evaluates "
        "L_opt at each row's own N, or a smaller sweep.n_tolerance.", 100 * max(spreads))


def _resolve_l_opt(l_opt: Any, table: _Table, settings: dict[str, Any],
                   rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float] | None, str]:
  """L_opt per row, the Chinchilla params behind it (if any), and a description."""
  if isinstance(l_opt, str) and l_opt == "empirical":
    _warn_n_spread(table)
    return _empirical_l_opt(table), None, "empirical"
  if isinstance(l_opt, str) and l_opt == "chinchilla":
    n_budgets = table.budget.max() + 1
    first = _best_rows(table)  # each budget's minimum, at the N and D of the row that reached it
    mins = table.loss[first]
    if n_budgets <= len(CHINCHILLA_KEYS) or _distinct(table.n[first]) < 2 \
        or _distinct(table.d[first]) < 2:
      raise ValueError(
          f"l_opt='chinchilla' fits E, A, B, alpha, beta to the best loss of each (N, D) budget, "
          f"but the rows have {n_budgets} budget(s) ({_distinct(table.n[first])} distinct N, "
          f"{_distinct(table.d[first])} distinct D); it needs at least 6 with two or more of each. "
          "Use l_opt='empirical', or the path of a fit.json with Chinchilla params.")
    sub = _Table([], [], table.n[first], table.d[first], mins, table.x[first], table.r[first],
                 table.scale[first], np.arange(n_budgets))
    sol = _fit_arrays("chinchilla", dict(settings, starts="grid", bootstrap=0), _feats(sub),
                      mins, rng)
    params = {k: float(v) for k, v in _theta_to_params("chinchilla", sol.theta).items()}
    return Law("chinchilla", params).l_opt(table.n, table.d), params, "chinchilla"
  law = None
  if isinstance(l_opt, Law):
    law = l_opt
  elif isinstance(l_opt, Mapping):
    law = load_law(l_opt) if "params" in l_opt else Law("chinchilla", dict(l_opt))
  elif isinstance(l_opt, (str, pathlib.Path)) and pathlib.Path(l_opt).is_file():
    law = load_law(l_opt)
  if law is None or not (law.form == "chinchilla" or law.has_chinchilla):
    raise ValueError(f"l_opt={l_opt!r} must be one of {list(L_OPTS)}, the path of a fit.json with "
                     f"Chinchilla params {list(CHINCHILLA_KEYS)}, or those params")
  params = {k: law.params[k] for k in CHINCHILLA_KEYS}
  source = str(l_opt) if isinstance(l_opt, (str, pathlib.Path)) else "given"
  return Law("chinchilla", params).l_opt(table.n, table.d), params, source


def prediction_metrics(predicted: Any, measured: Any) -> dict[str, float]:
  """MSE, R^2 and Spearman rank correlation (average ranks for ties) of predicted vs measured."""
  from scipy import stats

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


@dataclasses.dataclass
class FitResult:
  """A fitted law with its uncertainty, start statistics, metrics and the rows it used."""
  law: Law
  objective: float
  settings: dict[str, Any]
  l_opt: str
  intervals: dict[str, list[float]]
  stderr: dict[str, float]
  optimum: dict[str, Any] | None
  starts: dict[str, Any]
  metrics: dict[str, Any]
  rows_used: list[dict[str, Any]]
  rows_excluded: list[dict[str, Any]]
  l_opt_groups: list[dict[str, float]]
  samples: dict[str, np.ndarray]
  timings: dict[str, float]
  per_start: dict[str, np.ndarray]  # each start's objective, status (STATUS index), iterations

  def predict_interval(self, n: Any = None, d: Any = None, x: Any = None, r: Any = None,
                       l_opt: Any = None, level: float | None = None) -> np.ndarray:
    """Percentile interval (2, ...) of `law.predict` over the bootstrap replicates.

    For the conditional forms L_opt is held at the full-data fit: the intervals are conditional
    on it.
    """
    if not self.samples:
      raise ValueError("this fit has no bootstrap replicates; refit with bootstrap > 0")
    form = self.law.form
    level = self.settings["level"] if level is None else level
    params = {k: v for k, v in self.samples.items() if k in PARAM_KEYS[form]}
    theta_BP = _params_to_theta(form, params)
    if form == "chinchilla":
      n, d = np.broadcast_arrays(np.asarray(n, np.float64), np.asarray(d, np.float64))
      pred_BR = np.exp(_chinchilla_log(theta_BP, np.log(n.ravel()), np.log(d.ravel()), np))
      shape = n.shape
    else:
      x, r = np.broadcast_arrays(np.asarray(x, np.float64), np.asarray(r, np.float64))
      pred_BR = _calibration(form, theta_BP, x.ravel(), r.ravel(), np)
      shape = x.shape
      if l_opt is None and self.law.has_chinchilla:
        l_opt = self.law.l_opt(n, d)
      if l_opt is not None:
        pred_BR = _combine(form, np.broadcast_to(l_opt, shape).ravel(), pred_BR)
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    return np.nanpercentile(pred_BR, q, axis=0).reshape((2,) + shape)

  def to_json(self) -> dict[str, Any]:
    """The fit.json document (without provenance)."""
    return _jsonable(dict(
        form=self.law.form, l_opt=self.l_opt, params=dict(self.law.params),
        intervals=self.intervals, interval_level=self.settings["level"], stderr=self.stderr,
        optimum=self.optimum, objective=self.objective, starts=self.starts,
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


def _optimum_samples(form: str, theta_BP: np.ndarray,
                     box: tuple[tuple[float, float], tuple[float, float]] | None) -> np.ndarray:
  """(B, 2) optimum (x*, r*) of each parameter row; NaN where there is no interior minimum."""
  p = _theta_to_params(form, theta_BP)
  if form != "joint":
    return np.stack([_closed_form_optimum(p["a1"], p["a2"]),
                     _closed_form_optimum(p["b1"], p["b2"])], axis=-1)
  x, r, interior = _grid_optimum(form, theta_BP, box[0], box[1])
  return np.where(interior[:, None], np.stack([x, r], axis=-1), np.nan)


def fit(rows: Sequence[Mapping[str, Any]], form: str = "multiplicative",
        l_opt: str | pathlib.Path | Mapping[str, float] | Law = "chinchilla",
        r_range: Sequence[float] | None = (0.5, 5.0), loss: str = "huber", delta: float = 1e-3,
        space: str = "log", solver: str = "lm", starts: str = "grid", n_starts: int = 256,
        max_iter: int = 200, tol: float = 1e-12, bootstrap: int = 0, level: float = 0.95,
        seed: int = 0) -> FitResult:
  """Fits one law to results rows; every input is checked before any solving starts.

  l_opt: "chinchilla" (fitted to the best loss of each budget), "empirical" (that best loss
  itself), or Chinchilla params given directly (a dict, a Law, or a fit.json path).
  r_range: keep rows with lo <= mlp_attn_ratio <= hi (conditional forms); None keeps all.
  """
  settings = _settings(form, loss, delta, space, solver, starts, n_starts, max_iter, tol,
                       bootstrap, level)
  table = _prepare(rows, form, r_range)
  rng = np.random.default_rng(seed)
  chin_params, l_opt_desc, l_opt_R = None, "none", None
  if form != "chinchilla":
    l_opt_R, chin_params, l_opt_desc = _resolve_l_opt(l_opt, table, settings, rng)
  f = _feats(table, l_opt_R)
  sol = _fit_arrays(form, settings, f, table.loss, rng)

  params = {k: float(v) for k, v in _theta_to_params(form, sol.theta).items()}
  box = None
  if form == "joint":
    box = ((float(table.x.min()), float(table.x.max())),
           (float(table.r.min()), float(table.r.max())))
  law = Law(form, dict(params, **(chin_params or {})), box=box)

  samples: dict[str, np.ndarray] = {}
  optimum = None
  if form != "chinchilla":
    optimum = law.optimum()
    optimum["interior"] = bool(np.isfinite(_optimum_samples(form, sol.theta[None], box)).all())
  if len(sol.theta_samples):
    samples = {k: np.asarray(v) for k, v in _theta_to_params(form, sol.theta_samples).items()
               if not (form == "multiplicative" and k == "b0")}  # b0 = 1 fixes the scale.
    if form != "chinchilla":
      opt_B2 = _optimum_samples(form, sol.theta_samples, box)
      samples["d_over_sqrt_n"], samples["r"] = opt_B2[:, 0], opt_B2[:, 1]
      optimum["bootstrap_interior_fraction"] = float(np.mean(np.isfinite(opt_B2).all(axis=1)))
  q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
  intervals = {k: [float(v) for v in np.nanpercentile(s, q)] for k, s in samples.items()
               if np.isfinite(s).any()}
  stderr = {k: float(np.nanstd(s, ddof=1)) for k, s in samples.items() if np.isfinite(s).sum() > 1}

  pred = law.predict(table.n, table.d, table.x, table.r, l_opt=l_opt_R)
  rows_used = [dict(row, d_over_sqrt_n=float(table.x[i]), predicted=float(pred[i]),
                    scale_index=int(table.scale[i]), budget_index=int(table.budget[i]),
                    **({"l_opt": float(l_opt_R[i])} if l_opt_R is not None else {}))
               for i, row in enumerate(table.rows)]
  if form == "chinchilla":
    for row in rows_used:
      row.pop("d_over_sqrt_n")
  result = FitResult(
      law=law, objective=sol.objective, settings=settings, l_opt=l_opt_desc, intervals=intervals,
      stderr=stderr, optimum=optimum, starts=sol.starts,
      metrics=dict(in_sample=prediction_metrics(pred, table.loss)), rows_used=rows_used,
      rows_excluded=table.excluded, l_opt_groups=[], samples=samples, timings=sol.timings,
      per_start=sol.per_start)
  if samples:
    lo, hi = result.predict_interval(table.n, table.d, table.x, table.r, l_opt=l_opt_R)
    for row, lo_i, hi_i in zip(rows_used, lo, hi, strict=True):
      row["predicted_interval"] = [float(lo_i), float(hi_i)]
  if l_opt_R is not None:
    for g, spread in enumerate(_n_spreads(table)):
      i = np.flatnonzero(table.budget == g)
      result.l_opt_groups.append(dict(
          params_nonembed=float(np.median(table.n[i])), tokens=float(np.median(table.d[i])),
          l_opt=float(l_opt_R[i[0]]), rows=len(i), n_spread=spread))
  return result


def evaluate_progressive(rows: Sequence[Mapping[str, Any]], form: str = "multiplicative",
                         l_opt: Any = "chinchilla", r_range: Sequence[float] | None = (0.5, 5.0),
                         **fit_kwargs: Any) -> list[dict[str, Any]]:
  """The paper's protocol: fit on scales 1..k, predict scale k + 1, for every k.

  Scales are groups of params_nonembed (see SCALE_FACTOR). With l_opt="empirical" the held-out
  scale's L_opt is its own best loss, so the metrics score the architecture calibration, as in
  the paper. Steps whose training rows cannot support the form are reported with `skipped`.
  """
  table = _prepare(rows, form, r_range)
  n_scales = table.scale.max() + 1
  if n_scales < 2:
    raise ValueError("the progressive protocol needs at least two scales of params_nonembed; "
                     f"the rows have {n_scales}")
  fit_kwargs = dict(fit_kwargs, bootstrap=0)
  steps = []
  for k in range(1, n_scales):
    train, test = table.take(table.scale < k), table.take(table.scale == k)
    step = dict(train_scales=[float(np.median(table.n[table.scale == s])) for s in range(k)],
                test_scale=float(np.median(test.n)), n_train=len(train.rows), n_test=len(test.rows))
    try:
      result = fit(train.rows, form=form, l_opt=l_opt, r_range=None, **fit_kwargs)
    except ValueError as e:
      logging.info("progressive: step %d skipped: %s", k, e)
      steps.append(dict(step, skipped=str(e)))
      continue
    law = result.law
    test_l_opt = None
    if form != "chinchilla" and not law.has_chinchilla:
      test_l_opt = _empirical_l_opt(test)
    pred = law.predict(test.n, test.d, test.x, test.r, l_opt=test_l_opt)
    metrics = prediction_metrics(pred, test.loss)
    steps.append(dict(step, mse=metrics["mse"], r2=metrics["r2"], spearman=metrics["spearman"],
                      params=dict(law.params)))
    logging.info("progressive: %s -> %.3g: %s", step["train_scales"], step["test_scale"],
                 {k: steps[-1][k] for k in ("mse", "r2", "spearman")})
  return steps


def _fit_plots(result: FitResult, workdir: pathlib.Path) -> list[str]:
  """Loss vs d/sqrt(N) and vs r per scale with the fitted curves, predicted vs measured,
  residuals."""
  from archscale import plots

  rows = result.rows_used
  law = result.law
  loss = np.array([row["loss"] for row in rows])
  pred = np.array([row["predicted"] for row in rows])
  scale = np.array([row["scale_index"] for row in rows])
  n = np.array([float(row["params_nonembed"]) for row in rows])
  labels = [f"N={plots.human(np.median(n[scale == s]))}" for s in scale]
  written = [plots.predicted_vs_measured(workdir / "fit_predicted_vs_measured.png", pred, loss,
                                         labels, title=f"{law.form} fit"),
             plots.residuals(workdir / "fit_residuals.png", pred, loss - pred, labels,
                             title=f"{law.form} fit")]
  if law.form == "chinchilla":
    return written
  x = np.array([row["d_over_sqrt_n"] for row in rows])
  r = np.array([float(row["mlp_attn_ratio"]) for row in rows])
  l_opt = np.array([row["l_opt"] for row in rows])
  opt = result.optimum or {}
  for name, values, other, key in (("d_over_sqrt_n", x, r, "d_over_sqrt_n"),
                                   ("mlp_attn_ratio", r, x, "r")):
    panels = []
    for s in np.unique(scale):
      i = scale == s
      grid = np.geomspace(values[i].min() / 1.2, values[i].max() * 1.2, 100)
      held = np.full_like(grid, np.median(other[i]))
      xs, rs = (grid, held) if key == "d_over_sqrt_n" else (held, grid)
      curve = law.predict(x=xs, r=rs, l_opt=np.median(l_opt[i]))
      held_name = "r" if key == "d_over_sqrt_n" else "d/sqrt(N)"
      panels.append(plots.Panel(
          title=labels[np.flatnonzero(i)[0]], points=[(values[i], loss[i], "measured")],
          curves=[(grid, curve, f"fit at {held_name}={np.median(other[i]):.3g}")],
          vlines=[(opt[key], "optimum")] if np.isfinite(opt.get(key) or np.nan) else []))
    written.append(plots.panels(workdir / f"fit_loss_vs_{key}.png", panels, xlabel=name,
                                ylabel="loss", logx=True))
  return written


def run_fit(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """`--mode=fit`: fits config.fit.form to config.fit.results; writes fit.json and plots."""
  fc = config.fit
  if not fc.results:
    raise ValueError("config.fit.results is empty: set --config.fit.results=PATH to a results "
                     "table (JSONL or CSV)")
  rows = load_rows(fc.results)
  kwargs = dict(form=fc.form, l_opt=fc.l_opt, r_range=tuple(fc.r_range) if fc.r_range else None,
                loss=fc.loss, delta=fc.delta, space=fc.space, solver=fc.solver, starts=fc.starts,
                n_starts=fc.n_starts, max_iter=fc.max_iter, seed=config.seed)
  result = fit(rows, bootstrap=fc.bootstrap, level=fc.level, **kwargs)
  n_scales = max(row["scale_index"] for row in result.rows_used) + 1
  result.metrics["progressive"] = evaluate_progressive(rows, **kwargs) if n_scales > 1 else []
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  doc = dict(result.to_json(), results=str(fc.results),
             plots=[pathlib.Path(p).name for p in _fit_plots(result, workdir)],
             provenance=io.provenance(config))
  io.write_json_atomic(workdir / "fit.json", doc)
  logging.info("fit: wrote %s: params %s, optimum %s", workdir / "fit.json", result.law.params,
               result.optimum)
