"""Figures for any mode: small matplotlib (Agg) helpers that write one PNG each and return its path.

Each takes plain arrays, so new modules can add their own figures beside these without a layout
framework: `panels` draws a row of small multiples (points, curves and marker lines per panel).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
  from archscale.fitting import FitResult


def _pyplot() -> Any:
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
  plt = _pyplot()
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
      _log_x(ax)
    ax.set_title(item.title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.legend(fontsize=7)
  for ax in flat[len(items):]:
    ax.set_visible(False)
  for row in axes:
    row[0].set_ylabel(ylabel)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def _log_x(ax: Any) -> None:
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
  plt = _pyplot()
  p, m = np.asarray(predicted, float), np.asarray(measured, float)
  fig, ax = plt.subplots(figsize=(4.2, 4))
  lo, hi = float(np.nanmin([p.min(), m.min()])), float(np.nanmax([p.max(), m.max()]))
  ax.plot([lo, hi], [lo, hi], color="gray", lw=1)
  _grouped_scatter(ax, m, p, groups)
  ax.set_xlabel("measured")
  ax.set_ylabel("predicted")
  ax.set_title(title, fontsize=9)
  return _save(fig, path)


def residuals(path: str | pathlib.Path, predicted: Any, resid: Any,
              groups: Sequence[str] | None = None, title: str = "") -> str:
  """Residuals (measured - predicted) against the prediction."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(4.2, 3.4))
  ax.axhline(0.0, color="gray", lw=1)
  _grouped_scatter(ax, np.asarray(predicted, float), np.asarray(resid, float), groups)
  ax.set_xlabel("predicted")
  ax.set_ylabel("measured - predicted")
  ax.set_title(title, fontsize=9)
  return _save(fig, path)


def decode_throughput(rows: Sequence[dict[str, Any]], path: str | pathlib.Path,
                      title: str | None = None) -> str:
  """Output tokens/s against batch size (log-x), one line per architecture; failed rows skipped.

  `rows` are the decode harness's (`archscale.decode_bench`).
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  archs = list(dict.fromkeys(r["arch"] for r in rows))
  for arch in archs:
    ok = sorted((r["batch_size"], r["output_tokens_per_s"]) for r in rows
                if r["arch"] == arch and not r.get("error"))
    if ok:
      ax.plot([b for b, _ in ok], [v for _, v in ok], marker="o", label=arch)
  ax.set_xscale("log", base=2)
  batches = sorted({r["batch_size"] for r in rows})
  ax.set_xticks(batches, [str(b) for b in batches])
  ax.minorticks_off()
  ax.set_xlabel("batch size")
  ax.set_ylabel("output tokens / s")
  if rows:
    r = rows[0]
    ax.set_title(title or f"decode throughput ({r['input_len']} in / {r['output_len']} out)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  return _save(fig, path)


def _save(fig: Any, path: str | pathlib.Path) -> str:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  _pyplot().close(fig)
  return str(path)


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
  plt = _pyplot()
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
  return _save(fig, path)


def sweep_losses(rows: Sequence[dict[str, Any]], path: str | pathlib.Path) -> str:
  """Sweep: loss against d_model/sqrt(N) and against r, one colour per scale (the U-curves)."""
  import matplotlib.ticker

  plt = _pyplot()
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
  return _save(fig, path)
