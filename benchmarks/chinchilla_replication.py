"""Chinchilla Approach 3, replicated: archscale's JAX fitter against scipy's L-BFGS on Epoch's data.

Epoch's preprocessing of the points read off Hoffmann et al.'s Figure 4 (D = C / (6 N), the five
highest losses dropped), then the log-sum-exp fit with Huber (delta 1e-3) on log-loss residuals,
summed, from Hoffmann's grid of 4500 starts. The JAX fitter solves all starts at once (jit + vmap,
Levenberg-Marquardt); scipy runs `minimize(method="L-BFGS-B")` start by start with finite-difference
gradients, as Epoch did. scipy is timed on a random subset of the grid (--scipy_starts) and its time
scaled to the full grid; its objective is the best over that subset (--scipy_starts=4500 for all).

  python benchmarks/chinchilla_replication.py --data=../shared/data/chinchilla_fig4_points.csv

The last line printed is one JSON object: {"jax": {...}, "scipy": {...}, "speedup": ...}, where
`seconds` is wall time including compilation (`compile_seconds` is its compile part, `phases` the
fit's own timings: compile, multi-start solve, iterating the best start further, Jacobian standard
errors, diagnostics), `warm_seconds` the same fit repeated in the process (compiled programs
reused); speedup and speedup_warm are scipy's full-grid seconds over those.
"""

from __future__ import annotations

import csv
import json
import pathlib
import time

import numpy as np
from absl import app, flags, logging

from archscale.study import fitting, law, solver

_DATA = flags.DEFINE_string("data", "../shared/data/chinchilla_fig4_points.csv",
                            "Epoch's svg_extracted_data.csv (Model Size, Training FLOP, loss).")
_SCIPY_STARTS = flags.DEFINE_integer("scipy_starts", 450,
                                     "Grid starts scipy is timed on (random subset; 4500 = all).")
_SOLVER = flags.DEFINE_enum("solver", "lm", list(solver.SOLVERS), "JAX solver.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of scipy's subset.")

# Epoch AI (Besiroglu et al. 2024), Approach 3 on the same points: estimate and standard error.
EPOCH = dict(E=(1.817, 0.026), A=(482.0, 124.5), B=(2085.0, 1293.0), alpha=(0.3478, 0.0154),
             beta=(0.3658, 0.0206))
DELTA = 1e-3


def epoch_rows(path: pathlib.Path) -> list[dict[str, float]]:
  """Epoch's preprocessing: tokens = FLOP / (6 N); drop the five highest-loss points."""
  with open(path, encoding="utf-8", newline="") as f:
    raw = list(csv.DictReader(f))
  rows = [dict(params_nonembed=float(r["Model Size"]),
               tokens=float(r["Training FLOP"]) / (6.0 * float(r["Model Size"])),
               loss=float(r["loss"])) for r in raw]
  rows.sort(key=lambda r: r["loss"])
  return rows[:-5]


def scipy_fit(rows: list[dict[str, float]], starts_IP: np.ndarray) -> tuple[np.ndarray, float]:
  """Epoch's loop: L-BFGS-B (numerical gradients) from each start; the best result."""
  from scipy.optimize import minimize

  ln_n = np.log([r["params_nonembed"] for r in rows])
  ln_d = np.log([r["tokens"] for r in rows])
  ln_l = np.log([r["loss"] for r in rows])

  def objective(p):
    a, b, e, alpha, beta = p
    pred = np.logaddexp(np.logaddexp(a - alpha * ln_n, b - beta * ln_d), e)
    resid = np.abs(ln_l - pred)
    return np.sum(np.where(resid <= DELTA, 0.5 * resid**2, DELTA * (resid - 0.5 * DELTA)))

  best_x, best_f = None, np.inf
  for start in starts_IP:
    res = minimize(objective, start, method="L-BFGS-B")
    if res.fun < best_f:
      best_x, best_f = res.x, float(res.fun)
  return best_x, best_f


def _named(theta: np.ndarray) -> dict[str, float]:
  a, b, e, alpha, beta = (float(v) for v in theta)
  return dict(E=np.exp(e), A=np.exp(a), B=np.exp(b), alpha=alpha, beta=beta)


def main(argv):
  del argv
  rows = epoch_rows(pathlib.Path(_DATA.value))
  logging.info("%d points after Epoch's preprocessing", len(rows))

  t0 = time.perf_counter()
  result = fitting.fit(rows, form="chinchilla", loss="huber", delta=DELTA, space="log",
                   solver=_SOLVER.value, starts="grid")
  jax_seconds = time.perf_counter() - t0
  jax_out = dict({k: result.law.params[k] for k in law.CHINCHILLA_KEYS},
                 objective=result.objective, seconds=jax_seconds,
                 compile_seconds=result.timings["compile_seconds"],
                 phases={k: round(v, 4) for k, v in result.timings.items()})
  print(f"JAX ({_SOLVER.value}): {result.starts['total']} starts in {jax_seconds:.1f} s "
        f"({result.timings['compile_seconds']:.1f} s compiling); {result.starts['converged']} "
        f"converged, {result.starts['at_best']} at the best objective {result.objective:.12g}")

  # The same fit again in this process: its compiled programs are reused (as in the bootstrap,
  # the progressive protocol and every later fit of a session).
  t0 = time.perf_counter()
  fitting.fit(rows, form="chinchilla", loss="huber", delta=DELTA, space="log",
              solver=_SOLVER.value, starts="grid")
  jax_out["warm_seconds"] = time.perf_counter() - t0

  grid = solver.hoffmann_grid()
  n_timed = min(_SCIPY_STARTS.value, len(grid))
  subset = np.random.default_rng(_SEED.value).choice(len(grid), n_timed, replace=False)
  t0 = time.perf_counter()
  x, scipy_obj = scipy_fit(rows, grid[np.sort(subset)])
  measured = time.perf_counter() - t0
  scipy_seconds = measured * len(grid) / n_timed
  scipy_out = dict(_named(x), objective=scipy_obj, seconds=scipy_seconds, compile_seconds=0.0,
                   starts_timed=n_timed, seconds_measured=measured)
  print(f"scipy L-BFGS-B: {n_timed} starts in {measured:.1f} s -> {scipy_seconds:.1f} s for "
        f"{len(grid)} (scaled); best objective {scipy_obj:.12g}")

  print(f"{'':6} {'JAX':>10} {'scipy':>10} {'Epoch':>10} {'SE':>8}  within 1 SE")
  for k, (est, se) in EPOCH.items():
    print(f"{k:6} {jax_out[k]:10.4f} {scipy_out[k]:10.4f} {est:10.4f} {se:8.4f}  "
          f"{abs(jax_out[k] - est) <= se}")
  print(f"objective: JAX {jax_out['objective']:.12g} <= scipy {scipy_obj:.12g}: "
        f"{jax_out['objective'] <= scipy_obj}")
  speedup = scipy_seconds / jax_seconds
  print(json.dumps(dict(jax=jax_out, scipy=scipy_out, speedup=speedup,
                        speedup_warm=scipy_seconds / jax_out["warm_seconds"])))


if __name__ == "__main__":
  app.run(main)
