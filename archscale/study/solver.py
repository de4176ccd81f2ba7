"""Least-squares solvers for the scaling-law fitter: Levenberg-Marquardt and optax's L-BFGS in JAX.

A problem is a model `model(theta_P, feats) -> prediction_R` (a hashable callable: it keys the
compiled program), a residual loss (Huber with `delta`, or squared) summed over rows with per-row
weights, and a set of starts. All starts of all weightings (bootstrap replicates) stream through
one `jit(vmap(...))` program of LANES lanes, in float64 enabled only inside `solve`. Residuals,
gradients and Gauss-Newton matrices come from forward-mode autodiff.

Public API:
  Spec(model, loss, delta, solver, max_iter, tol)   everything static about one solve
  solve(spec, theta0_EIP, w_ER, feats, y_R) -> ((theta_EIP, objective_EI, status_EI,
      iterations_EI), compile_seconds, solve_seconds)
  STATUS                          names of the per-start status codes
  hoffmann_grid() -> np.ndarray   the 4500 Chinchilla starts (a, b, e, alpha, beta)
  hoffmann_box(n_starts, rng)     random starts in the box that grid spans
  perturbed_starts(anchor_P, starts, n_starts, rng)   starts around an anchor (grid or random)
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from archscale.core import settings

SOLVERS = settings.FIT_SOLVERS
STARTS = settings.FIT_STARTS
STATUS = ("running", "converged", "stalled", "max_iter", "nonfinite")
# Hoffmann et al.'s grid of starting points for the log-sum-exp Chinchilla fit (4500 starts).
HOFFMANN_GRID = dict(
    a=np.arange(0.0, 30.0, 5.0), b=np.arange(0.0, 30.0, 5.0), e=np.arange(-1.0, 1.5, 0.5),
    alpha=np.arange(0.0, 2.5, 0.5), beta=np.arange(0.0, 2.5, 0.5))


@contextlib.contextmanager
def float64() -> Iterator[None]:
  """float64 inside the fitter only; other modules run float32 models in the same process."""
  enable = getattr(jax, "enable_x64", None)
  if enable is None:
    from jax.experimental import enable_x64 as enable  # Older jax.
    with enable():
      yield
  else:
    with enable(True):
      yield


# Solvers: one start per lane; lanes are vmapped, and starts stream through them (see solve).


class Spec(NamedTuple):
  """Everything static about one solve (hashable: it keys the compiled executable).

  `model(theta_P, feats)` predicts every row in the space the residuals live in (NaN where the
  parameters give no valid prediction); `feats` is a NamedTuple of float arrays of length R.
  """
  model: Callable[[Any, Any], Any]
  loss: str
  delta: float
  solver: str
  max_iter: int
  tol: float


def _rho(spec: Spec, r: Any) -> Any:
  if spec.loss == "squared":
    return 0.5 * r * r
  a = jnp.abs(r)
  return jnp.where(a <= spec.delta, 0.5 * r * r, spec.delta * (a - 0.5 * spec.delta))


def _rho_prime(spec: Spec, r: Any) -> Any:
  return r if spec.loss == "squared" else jnp.clip(r, -spec.delta, spec.delta)


def _irls_weight(spec: Spec, r: Any) -> Any:
  """rho'(r) / r: the Gauss-Newton curvature of each residual (a majoriser of the Huber loss)."""
  if spec.loss == "squared":
    return jnp.ones_like(r)
  return jnp.minimum(1.0, spec.delta / jnp.maximum(jnp.abs(r), 1e-300))


def _objective(spec: Spec, theta_P: Any, w_R: Any, f: Any, y_R: Any) -> Any:
  resid = spec.model(theta_P, f) - y_R
  obj = jnp.sum(w_R * _rho(spec, resid))
  return jnp.where(jnp.isfinite(obj), obj, jnp.inf)


def _gauss_newton(spec: Spec, theta_P: Any, w_R: Any, f: Any, y_R: Any) -> tuple[Any, ...]:
  """Objective, gradient and Gauss-Newton matrix at theta, by forward-mode autodiff.

  One JVP per parameter, reduced at once: XLA fuses these small sums far better than a batched
  (R x P) Jacobian product, and the Jacobian is never materialised.
  """
  predict = spec.model
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


def _lm_step(spec: Spec, c: dict[str, Any], w_R: Any, f: Any, y_R: Any) -> dict[str, Any]:
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


def _lbfgs_step(spec: Spec, c: dict[str, Any], w_R: Any, f: Any, y_R: Any) -> dict[str, Any]:
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


def _advance(spec: Spec, state: dict[str, Any], fresh_W: Any, theta0_WP: Any, rep_W: Any,
             w_ER: Any, f: Any, y_R: Any) -> dict[str, Any]:
  """Restarts the `fresh` lanes from theta0, then runs up to ROUND iterations on every lane."""
  init, step = _SOLVERS[spec.solver]
  restarted = jax.vmap(init)(theta0_WP)
  state = jax.tree.map(
      lambda new, old: jnp.where(fresh_W.reshape((-1,) + (1,) * (old.ndim - 1)), new, old),
      restarted, state)

  def run(c, w_R):
    def body(carry):
      c, k = carry
      return step(spec, c, w_R, f, y_R), k + 1
    return jax.lax.while_loop(lambda ck: (ck[0]["status"] == 0) & (ck[1] < ROUND), body, (c, 0))[0]

  return jax.vmap(run)(state, w_ER[rep_W])


_COMPILED: dict[tuple, Any] = {}


def _bucket(n: int, least: int = 1) -> int:
  """The next power of two >= n: padding shapes to few sizes lets compiled programs be reused."""
  return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def solve(spec: Spec, theta0_EIP: np.ndarray, w_ER: np.ndarray, f: Any,
           y_R: np.ndarray) -> tuple[tuple[np.ndarray, ...], float, float]:
  """Solves every start of every replicate (replicate b weights the rows by w_ER[b]).

  Rows, replicates and lanes are padded to powers of two (padded rows weigh nothing), so fits of
  similar size share one compiled program. Returns ((theta_EIP, objective_EI, status_EI,
  iterations_EI), compile seconds, solve seconds).
  """
  n_b, n_s, n_p = theta0_EIP.shape
  theta0_JP = theta0_EIP.reshape(n_b * n_s, n_p)
  rep_J = np.repeat(np.arange(n_b), n_s)
  n_lanes = min(LANES, _bucket(len(theta0_JP)))
  pad_r = _bucket(len(y_R), 32) - len(y_R)
  w_ER = np.pad(w_ER, ((0, _bucket(n_b) - n_b), (0, pad_r)))
  f = type(f)(*(np.pad(a, (0, pad_r), mode="edge") for a in f))
  y_R = np.pad(y_R, (0, pad_r), mode="edge")
  with float64():
    args = (jnp.asarray(w_ER, jnp.float64), type(f)(*(jnp.asarray(a, jnp.float64) for a in f)),
            jnp.asarray(y_R, jnp.float64))
    init = _SOLVERS[spec.solver][0]
    lane_job = np.where(np.arange(n_lanes) < len(theta0_JP), np.arange(n_lanes), -1)
    theta0_WP = theta0_JP[np.maximum(lane_job, 0) % len(theta0_JP)].copy()
    rep_W = rep_J[np.maximum(lane_job, 0) % len(theta0_JP)].copy()
    # Every busy lane starts fresh inside the compiled program; the state it replaces is zeros
    # of the right shapes (no operation runs outside that program), and idle lanes are done.
    state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                         jax.eval_shape(jax.vmap(init), theta0_WP))
    state["status"] = np.where(lane_job >= 0, 0, STATUS.index("nonfinite"))
    fresh = lane_job >= 0
    key = (spec, n_lanes, n_p, w_ER.shape)
    compile_s = 0.0
    if key not in _COMPILED:
      t0 = time.perf_counter()
      _COMPILED[key] = jax.jit(functools.partial(_advance, spec)).lower(
          state, fresh, theta0_WP, rep_W, *args).compile()
      compile_s = time.perf_counter() - t0
    advance = _COMPILED[key]
    t0 = time.perf_counter()
    theta_JP = np.full_like(theta0_JP, np.nan)
    obj_J = np.full(len(theta0_JP), np.inf)
    status_J = np.zeros(len(theta0_JP), int)
    iters_J = np.zeros(len(theta0_JP), int)
    queue = n_lanes  # the next start to hand to a free lane; lane_job is -1 on idle lanes
    while (lane_job >= 0).any():
      state = advance(state, fresh, theta0_WP, rep_W, *args)
      status = np.asarray(state["status"])
      done = (status != 0) & (lane_job >= 0)
      if done.any():
        jobs = lane_job[done]
        theta_JP[jobs] = np.asarray(state["theta"])[done]
        obj_J[jobs] = np.asarray(state["obj"])[done]
        status_J[jobs], iters_J[jobs] = status[done], np.asarray(state["it"])[done]
      fresh = np.zeros(n_lanes, bool)
      for lane in np.flatnonzero(done):
        if queue < len(theta0_JP):
          lane_job[lane], fresh[lane] = queue, True
          theta0_WP[lane], rep_W[lane] = theta0_JP[queue], rep_J[queue]
          queue += 1
        else:
          lane_job[lane] = -1
    solve_s = time.perf_counter() - t0
  shape = (n_b, n_s)
  return ((theta_JP.reshape(n_b, n_s, n_p), obj_J.reshape(shape), status_J.reshape(shape),
           iters_J.reshape(shape)), compile_s, solve_s)


# ----------------------------------------------------------------------------------------------
# Starts.


def hoffmann_grid() -> np.ndarray:
  """Hoffmann et al.'s 4500 starts as (a, b, e, alpha, beta) rows."""
  g = HOFFMANN_GRID
  mesh = np.meshgrid(g["a"], g["b"], g["e"], g["alpha"], g["beta"], indexing="ij")
  return np.stack([m.ravel() for m in mesh], axis=-1)


def hoffmann_box(n_starts: int, rng: np.random.Generator) -> np.ndarray:
  """`n_starts` starts drawn uniformly from the box Hoffmann's grid spans."""
  lo = np.array([v.min() for v in HOFFMANN_GRID.values()])
  hi = np.array([v.max() for v in HOFFMANN_GRID.values()])
  return rng.uniform(lo, hi, size=(n_starts, 5))


def perturbed_starts(anchor_P: np.ndarray, starts: str, n_starts: int,
                     rng: np.random.Generator) -> np.ndarray:
  """Starts (S, P) around an anchor, spread by half its magnitude per parameter.

  "grid": every combination of -1, 0, +1 spreads (3^P starts, P <= 6); otherwise the anchor
  and n_starts - 1 Gaussian perturbations.
  """
  spread = 0.5 * np.maximum(np.abs(anchor_P), 1e-3)
  if starts == "grid" and len(anchor_P) <= 6:
    steps = np.stack([m.ravel() for m in np.meshgrid(*[[-1.0, 0.0, 1.0]] * len(anchor_P),
                                                        indexing="ij")], axis=-1)
    return anchor_P + steps * spread
  noise = rng.standard_normal((n_starts - 1, len(anchor_P)))
  return np.concatenate([anchor_P[None], anchor_P + noise * spread])

