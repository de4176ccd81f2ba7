"""`--mode=fit`: the fit of a results table, written as fit.json with its figures.

The fitter (archscale.study.fitting) computes; this stage reads the table, adds the progressive
protocol's out-of-sample steps when the rows span several scales, and draws the figures.
"""

from __future__ import annotations

import pathlib

import ml_collections
from absl import logging

from archscale.core import io, settings, tracking
from archscale.study import fitting, plots, verdict
from archscale.study import table as table_lib


def run_fit(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """`--mode=fit`: fits config.fit.form to config.fit.results; writes fit.json and plots."""
  fc = settings.FitConfig.from_config(config)
  if not fc.results:
    raise ValueError("config.fit.results is empty: set --config.fit.results=PATH to a results "
                     "table (JSONL or CSV)")
  rows, torn = table_lib.load_rows(fc.results)
  result = fitting.fit(rows, fc, seed=config.seed, log_warnings=False)
  result.diagnostics["torn_lines"] = torn
  if torn:
    result.diagnostics["warnings"].insert(
        0, f"{torn} torn line(s) in {fc.results} were skipped (a write cut short by a crash)")
  fitting.log_diagnostics(result)
  n_scales = max(row["scale_index"] for row in result.rows_used) + 1
  result.metrics["progressive"] = (fitting.evaluate_progressive(rows, fc, seed=config.seed)
                                   if n_scales > 1 else [])
  if result.verdict is not None:  # the out-of-sample test joins the verdict
    result.verdict = verdict.decide(result.verdict["tests"], result.diagnostics["identifiable"],
                                    result.metrics["progressive"])
    for reason in result.verdict["reasons"]:
      logging.info("fit: not supported: %s", reason)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  doc = dict(result.to_json(), results=str(fc.results),
             plots=[pathlib.Path(p).name for p in plots.fit_figures(result, workdir)],
             provenance=io.provenance(config))
  io.write_json_atomic(workdir / "fit.json", doc)
  tracker = tracking.Tracker.start(config, workdir, name=f"{config.name}-fit", job="fit",
                                   run_config=doc["settings"], group=str(config.name))
  if tracker is not None:
    tracker.log_files({"params": result.law.params, "verdict": result.verdict,
                       "optimum": result.optimum}, [workdir / p for p in doc["plots"]])
    tracker.close()
  logging.info("fit: wrote %s: params %s, optimum %s", workdir / "fit.json", result.law.params,
               result.optimum)
