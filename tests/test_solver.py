"""Tests of the least-squares solvers: planted problems, row weights, starts, float64 scope."""

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

from archscale.study import solver

TRUTH = np.array([1.5, 2.0, 0.7])  # y = c + a exp(-k t)


class Feats(NamedTuple):
  t: Any


def decay(theta_P, f):
  """The model under test: a hashable module-level function, as the solver's Spec requires."""
  return theta_P[0] + theta_P[1] * jnp.exp(-theta_P[2] * f.t)


def problem():
  t = np.linspace(0.0, 6.0, 25)
  return Feats(t), TRUTH[0] + TRUTH[1] * np.exp(-TRUTH[2] * t)


@pytest.mark.parametrize("name", solver.SOLVERS)
def test_both_solvers_recover_a_planted_curve(name):
  f, y = problem()
  spec = solver.Spec(decay, "squared", 1e-3, name, 500, 1e-12)
  starts = np.array([[1.0, 1.0, 0.3], [2.0, 3.0, 1.5], [0.5, 1.0, 1.0]])
  (theta, obj, status, iters), _, _ = solver.solve(spec, starts[None], np.ones((1, len(y))), f, y)
  assert theta.shape == (1, 3, 3) and obj.shape == status.shape == iters.shape == (1, 3)
  best = int(np.argmin(obj[0]))
  np.testing.assert_allclose(theta[0, best], TRUTH, rtol=1e-5)
  assert obj[0, best] < 1e-12
  assert status[0, best] == solver.STATUS.index("converged") and 0 < iters[0, best] < 500


def test_replicate_weights_select_rows():
  """A zero weight removes a row: the replicate without the outlier finds the planted curve."""
  f, y = problem()
  y = y.copy()
  y[3] += 1.0
  w = np.ones((2, len(y)))
  w[1, 3] = 0.0
  spec = solver.Spec(decay, "squared", 1e-3, "lm", 500, 1e-12)
  starts = np.broadcast_to(np.array([1.0, 1.0, 0.5]), (2, 1, 3))
  (theta, obj, _, _), _, _ = solver.solve(spec, starts, w, f, y)
  np.testing.assert_allclose(theta[1, 0], TRUTH, rtol=1e-5)
  assert np.abs(theta[0, 0] - TRUTH).max() > 1e-3 and obj[0, 0] > 0.1


def test_huber_loss_resists_an_outlier():
  f, y = problem()
  y = y.copy()
  y[3] += 1.0
  spec = solver.Spec(decay, "huber", 1e-3, "lm", 2000, 1e-12)
  (theta, _, _, _), _, _ = solver.solve(spec, np.array([[[1.0, 1.0, 0.5]]]),
                                        np.ones((1, len(y))), f, y)
  np.testing.assert_allclose(theta[0, 0], TRUTH, rtol=1e-3)


def test_solve_runs_in_float64_without_leaking_it():
  f, y = problem()
  spec = solver.Spec(decay, "squared", 1e-3, "lm", 50, 1e-12)
  (theta, _, _, _), _, _ = solver.solve(spec, np.array([[[1.0, 1.0, 0.5]]]),
                                        np.ones((1, len(y))), f, y)
  assert theta.dtype == np.float64
  assert jnp.ones(2).dtype == jnp.float32


def test_perturbed_starts_grid_and_random():
  anchor = np.array([1.0, -2.0, 0.0])
  grid = solver.perturbed_starts(anchor, "grid", 5, np.random.default_rng(0))
  assert grid.shape == (27, 3)
  assert any(np.array_equal(row, anchor) for row in grid)
  np.testing.assert_allclose(np.sort(np.unique(grid[:, 1])), [-3.0, -2.0, -1.0])
  np.testing.assert_allclose(np.unique(grid[:, 2]), [-5e-4, 0.0, 5e-4])  # spread floor 1e-3
  rand = solver.perturbed_starts(anchor, "random", 5, np.random.default_rng(0))
  assert rand.shape == (5, 3) and np.array_equal(rand[0], anchor)
  box = solver.hoffmann_box(100, np.random.default_rng(0))
  grid_all = solver.hoffmann_grid()
  assert np.all(box >= grid_all.min(axis=0)) and np.all(box <= grid_all.max(axis=0))


def test_hoffmann_grid_is_the_published_one():
  grid = solver.hoffmann_grid()
  assert grid.shape == (4500, 5)
  assert set(np.unique(grid[:, 3])) == {0.0, 0.5, 1.0, 1.5, 2.0}  # alpha
  assert set(np.unique(grid[:, 0])) == {0.0, 5.0, 10.0, 15.0, 20.0, 25.0}  # a
  assert set(np.unique(grid[:, 2])) == {-1.0, -0.5, 0.0, 0.5, 1.0}  # e

