"""Small matplotlib (Agg) helpers for any stage, each writing one PNG and returning its path.

Each takes plain arrays, so new modules can add their own figures beside these without a layout
framework: `panels` draws a row of small multiples (points, curves and marker lines per panel).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def pyplot() -> Any:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


@dataclasses.dataclass
class Panel:
  """One subplot: `points` and `curves` as (x, y, label), vertical `vlines` as (x, label)."""
  title: str
  points: Sequence[tuple[Any, Any, str]] = ()
  curves: Sequence[tuple[Any, Any, str]] = ()
  vlines: Sequence[tuple[float, str]] = ()


def panels(path: str | pathlib.Path, items: Sequence[Panel], xlabel: str, ylabel: str,
           logx: bool = False, title: str = "", ncols: int = 3) -> str:
  """Small multiples sharing the y axis, wrapped into rows of at most `ncols` panels."""
  plt = pyplot()
  n = max(len(items), 1)
  cols = min(n, ncols)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.4 * rows), sharey=True,
                           squeeze=False)
  flat = axes.ravel()
  for ax, item in zip(flat, items, strict=False):
    for x, y, label in item.points:
      ax.scatter(x, y, s=14, alpha=0.8, label=label)
    for x, y, label in item.curves:
      ax.plot(x, y, lw=1.5, label=label)
    for x, label in item.vlines:
      ax.axvline(x, ls="--", lw=1, color="gray", label=label)
    if logx:
      log_x(ax)
    ax.set_title(item.title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7)
  for ax in flat[len(items):]:
    ax.set_visible(False)
  for row in axes:
    row[0].set_ylabel(ylabel)
  if title:
    fig.suptitle(title)
  return save(fig, path)


def log_x(ax: Any) -> None:
  """Log x axis labelled at 1, 2 and 5 per decade in plain numbers (no overlapping minor labels)."""
  from matplotlib import ticker

  ax.set_xscale("log")
  axis = ax.xaxis
  axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
  axis.set_minor_formatter(ticker.NullFormatter())


def human(value: float) -> str:
  """80000000 -> "80M": compact labels for parameter and token counts."""
  for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= div:
      return f"{value / div:.3g}{unit}"
  return f"{value:.3g}"


def _grouped_scatter(ax: Any, x: np.ndarray, y: np.ndarray, groups: Sequence[str] | None) -> None:
  groups = np.asarray(groups if groups is not None else [""] * len(x))
  for g in dict.fromkeys(groups.tolist()):
    i = groups == g
    ax.scatter(x[i], y[i], s=14, alpha=0.8, label=g or None)
  if any(groups):
    ax.legend(fontsize=7)


def predicted_vs_measured(path: str | pathlib.Path, predicted: Any, measured: Any,
                          groups: Sequence[str] | None = None, title: str = "") -> str:
  """Scatter of predicted against measured values with the y = x line."""
  plt = pyplot()
  p, m = np.asarray(predicted, float), np.asarray(measured, float)
  fig, ax = plt.subplots(figsize=(4.2, 4))
  lo, hi = float(np.nanmin([p.min(), m.min()])), float(np.nanmax([p.max(), m.max()]))
  ax.plot([lo, hi], [lo, hi], color="gray", lw=1)
  _grouped_scatter(ax, m, p, groups)
  ax.set_xlabel("measured")
  ax.set_ylabel("predicted")
  ax.set_title(title, fontsize=9)
  return save(fig, path)


def residuals(path: str | pathlib.Path, predicted: Any, resid: Any,
              groups: Sequence[str] | None = None, title: str = "") -> str:
  """Residuals (measured - predicted) against the prediction."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(4.2, 3.4))
  ax.axhline(0.0, color="gray", lw=1)
  _grouped_scatter(ax, np.asarray(predicted, float), np.asarray(resid, float), groups)
  ax.set_xlabel("predicted")
  ax.set_ylabel("measured - predicted")
  ax.set_title(title, fontsize=9)
  return save(fig, path)


def save(fig: Any, path: str | pathlib.Path) -> str:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  pyplot().close(fig)
  return str(path)
