"""The study's figures: the fitted law against its rows, the Pareto front, the sweep's losses."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from archscale.core import figures
from archscale.core.figures import Panel, human, panels, predicted_vs_measured, residuals
from archscale.study.fitting import FitResult


def fit_figures(result: FitResult, workdir: pathlib.Path) -> list[str]:
  """A fit's figures: predicted vs measured, residuals, and (conditional forms) loss against
  d/sqrt(N) and against r, one panel per scale and one fitted curve per (scale, tokens) group."""
  rows = result.rows_used
  law = result.law
  loss = np.array([row["loss"] for row in rows])
  pred = np.array([row["predicted"] for row in rows])
  scale = np.array([row["scale_index"] for row in rows])
  n = np.array([float(row["params_nonembed"]) for row in rows])
  labels = [f"N={human(np.median(n[scale == s]))}" for s in scale]
  written = [predicted_vs_measured(workdir / "fit_predicted_vs_measured.png", pred, loss,
                                   labels, title=f"{law.form} fit"),
             residuals(workdir / "fit_residuals.png", pred, loss - pred, labels,
                       title=f"{law.form} fit")]
  if law.form == "chinchilla":
    return written
  x = np.array([row["d_over_sqrt_n"] for row in rows])
  r = np.array([float(row["mlp_attn_ratio"]) for row in rows])
  cols = dict(x=x, r=r, loss=loss, l_opt=np.array([row["l_opt"] for row in rows]),
              tokens=np.array([float(row["tokens"]) for row in rows]),
              budget=np.array([row["budget_index"] for row in rows]))
  opt = result.optimum or {}
  for name, key in (("d_over_sqrt_n", "d_over_sqrt_n"), ("mlp_attn_ratio", "r")):
    items = [_fit_panel(law, cols, scale == s, key, labels[np.flatnonzero(scale == s)[0]],
                        opt.get(key)) for s in np.unique(scale)]
    written.append(panels(workdir / f"fit_loss_vs_{key}.png", items, xlabel=name,
                          ylabel="loss", logx=True))
  return written


def _fit_panel(law: Any, cols: dict[str, np.ndarray], in_scale: np.ndarray, key: str,
               title: str, optimum: float | None) -> Panel:
  """One scale's panel: each tokens group's runs and its fitted curve, the other regressor held
  at the group's median."""
  values, other = (cols["x"], cols["r"]) if key == "d_over_sqrt_n" else (cols["r"], cols["x"])
  held_name = "r" if key == "d_over_sqrt_n" else "d/sqrt(N)"
  points, curves = [], []
  for b in np.unique(cols["budget"][in_scale]):
    i = in_scale & (cols["budget"] == b)
    grid = np.geomspace(values[i].min() / 1.2, values[i].max() * 1.2, 100)
    held = np.full_like(grid, np.median(other[i]))
    xs, rs = (grid, held) if key == "d_over_sqrt_n" else (held, grid)
    tokens = f"D={human(np.median(cols['tokens'][i]))}"
    points.append((values[i], cols["loss"][i], tokens))
    curves.append((grid, law.predict(x=xs, r=rs, l_opt=np.median(cols["l_opt"][i])),
                   f"fit, {tokens}, {held_name}={np.median(other[i]):.3g}"))
  marks = [(optimum, "optimum")] if optimum is not None and np.isfinite(optimum) else []
  return Panel(title=title, points=points, curves=curves, vlines=marks)


def pareto(result: Any, path: str | pathlib.Path, units: str, source: str) -> str:
  """Search: predicted loss against throughput; candidates, frontier, Panda/Surefire/baseline."""
  plt = figures.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  pts = [(c.throughput, c.predicted_loss) for c in result.candidates if (c.throughput or 0) > 0]
  if pts:
    ax.scatter(*zip(*pts, strict=True), s=6, c="0.75", label="candidates", zorder=1)
  if result.pareto:
    ax.plot([c.throughput for c in result.pareto], [c.predicted_loss for c in result.pareto],
            "-o", c="tab:green", ms=3, lw=1.2, label="Pareto frontier", zorder=2)
  ax.axhline(result.target, ls="--", c="0.4", lw=1, label="target", zorder=1)
  marks = (("baseline", result.baseline, "X", "black"), ("Panda", result.panda, "*", "tab:red"),
           ("Surefire", result.surefire, "D", "tab:blue"))
  for label, c, marker, color in marks:
    if c is not None and c.throughput:
      ax.scatter([c.throughput], [c.predicted_loss], marker=marker, s=110, c=color,
                 edgecolors="white", label=label, zorder=3)
  ax.set_xlabel(f"output tokens / s ({source})")
  ax.set_ylabel({"loss": "predicted loss", "factor": "predicted L / L_opt",
                 "offset": "predicted L - L_opt"}[units])
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  ax.set_title("architecture search: loss vs throughput")
  return figures.save(fig, path)


def sweep_losses(rows: Sequence[dict[str, Any]], path: str | pathlib.Path) -> str:
  """Sweep: loss against d_model/sqrt(N) and against r, one colour per scale (the U-curves)."""
  import matplotlib.ticker

  plt = figures.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  scales = sorted({r["scale"] for r in rows})
  for i, scale in enumerate(scales):
    mine = [r for r in rows if r["scale"] == scale]
    color = plt.cm.viridis(i / max(1, len(scales) - 1))
    for ax, key in zip(axes, ("d_over_sqrt_n", "mlp_attn_ratio"), strict=True):
      pts = sorted((r[key], r["loss"]) for r in mine)
      ax.plot(*zip(*pts, strict=True), "o", color=color, label=f"N = {human(scale)}")
  axes[0].set_xlabel("d_model / sqrt(N)")
  axes[1].set_xlabel("r = MLP / attention parameters")
  axes[1].set_xscale("log")
  axes[1].set_xticks([0.5, 1, 2, 3, 5])
  axes[1].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
  axes[1].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  axes[0].set_ylabel(f"loss ({rows[0].get('loss_source', 'eval')})")
  for ax in axes:
    ax.grid(True, alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("sweep: loss by architecture")
  return figures.save(fig, path)
