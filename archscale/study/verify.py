"""`--mode=verify`: train the search's picks and the baseline, and hold the predictions to them.

The paper checks its picks by training them. This mode reads WORKDIR/search.json, trains Panda,
Surefire and the baseline (when the target named one) at the search's budget (D tokens) once per
`sweep.seeds` seed, through the sweep's own run-and-record path, here or, with
`sweep.launch=slurm`, as SLURM jobs it waits for (runs in WORKDIR/verify/runs, rows in
WORKDIR/verify/results.jsonl; a rerun trains only what is missing), and writes
WORKDIR/verify.json, a list of

  name, spec, predicted_loss and predicted_interval (the search's, as losses), measured_losses,
  measured_mean, measured_stderr, meets_target, prediction_held

`meets_target`: the measured losses are below the target (the baseline's measured losses when the
target named one, else the number) by a one-sided Welch or one-sample t-test at LEVEL; False when
above it by the same test; null when noise decides neither way (or one seed). `prediction_held`:
whether the measured mean lies within the predicted interval widened by the measurement's own
t interval; null with one seed. A law without Chinchilla parameters predicts factors of L_opt
(or offsets), so its picks are held to it relative to the measured baseline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np
from absl import logging
from scipy import stats

from archscale.core import io, settings
from archscale.core.settings import SweepConfig
from archscale.model.arch import ArchSpec
from archscale.study import attempts, planning, runner
from archscale.study.planning import Run, Scale

VERIFY_JSON = "verify.json"
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ArchSpec))
VERIFY_DIR = "verify"
PICKS = ("panda", "surefire", "baseline")
LEVEL = 0.05


def _search_doc(workdir: pathlib.Path) -> dict[str, Any]:
  path = workdir / "search.json"
  if not path.is_file():
    raise ValueError(f"{path} does not exist: run --mode=search with the same --workdir first "
                     "(verify trains the picks it wrote)")
  return json.loads(path.read_text(encoding="utf-8"))


def plan_runs(config: Any, doc: dict[str, Any]) -> dict[str, list[Run]]:
  """Per pick (panda, surefire, baseline when present), one run per sweep seed at the search's
  budget, with the sweep's training recipe."""
  tokens = int(doc["budget"]["tokens"])
  seeds = planning.seeds_of(SweepConfig.from_config(config), config.seed)
  recipe = settings.training_recipe(config)
  out = {}
  for name in PICKS:
    pick = doc.get(name)
    if not pick:
      continue
    spec = ArchSpec.from_dict({k: pick[k] for k in ARCH_FIELDS if k in pick})
    scale = Scale(float(doc["budget"]["n_nonembed"]), spec.n_layers, spec.d_head)
    out[name] = [Run(planning.run_id(spec, tokens, seed, recipe), spec, tokens, seed, scale,
                     {"pick": name}) for seed in seeds]
  return out


def _t_interval(losses: list[float]) -> tuple[float, float | None, float]:
  """Mean, standard error (None with one value) and the two-sided t half-width at 1 - LEVEL."""
  mean = float(np.mean(losses))
  if len(losses) < 2:
    return mean, None, math.inf
  se = float(np.std(losses, ddof=1) / math.sqrt(len(losses)))
  return mean, se, float(stats.t.ppf(1 - LEVEL / 2, len(losses) - 1)) * se


def _below(a: list[float], b: list[float] | float) -> bool | None:
  """True when `a` lies below `b` (losses or a number) by a one-sided t-test at LEVEL, False when
  above it, None when noise decides neither way."""
  if len(a) < 2 or (not isinstance(b, float) and len(b) < 2):
    return None
  if isinstance(b, float):
    p_below = stats.ttest_1samp(a, b, alternative="less").pvalue
    p_above = stats.ttest_1samp(a, b, alternative="greater").pvalue
  else:
    p_below = stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue
    p_above = stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue
  return True if p_below <= LEVEL else False if p_above <= LEVEL else None


def _in_loss_units(doc: dict[str, Any], base: list[float]) -> Any:
  """Maps the search's predictions to losses: as they are when the law predicts losses, else
  through the measured baseline (a factor or offset of L_opt, which the baseline shares); None
  when there is no baseline to anchor them."""
  units = doc.get("loss_units", "loss")
  if units == "loss":
    return lambda v: v
  if not base or not doc.get("baseline"):
    return None
  ref, ref_pred = float(np.mean(base)), float(doc["baseline"]["predicted_loss"])
  return (lambda v: ref * v / ref_pred) if units == "factor" else (lambda v: ref + v - ref_pred)


def judge(doc: dict[str, Any], measured: dict[str, list[float]]) -> list[dict[str, Any]]:
  """verify.json's entries from the search document and each pick's measured losses."""
  to_loss = _in_loss_units(doc, measured.get("baseline") or [])
  numeric = doc.get("baseline") is None
  target = float(doc["target"]) if numeric else measured.get("baseline") or []
  out = []
  for name, losses in measured.items():
    pick = doc[name]
    interval = ((doc.get("uncertainty") or {}).get(name) or {}).get("interval")
    mean, se, half = _t_interval(losses)
    pred = lo = hi = None
    if to_loss is not None:
      pred = to_loss(pick["predicted_loss"])
      lo, hi = (to_loss(interval[0]), to_loss(interval[1])) if interval else (pred, pred)
    held = None if pred is None or se is None else bool(lo - half <= mean <= hi + half)
    # A numeric target is in the law's units: comparable with losses only when those are losses.
    comparable = name != "baseline" and (not numeric or doc.get("loss_units") == "loss")
    out.append({"name": name, "spec": {k: pick[k] for k in ARCH_FIELDS if k in pick},
                "predicted_loss": pred, "predicted_interval": [lo, hi] if interval and pred
                is not None else None, "measured_losses": losses, "measured_mean": mean,
                "measured_stderr": se, "meets_target": _below(losses, target) if comparable
                else None, "prediction_held": held})
  return out


def _train_here(config: Any, runs: dict[str, list[Run]], vdir: pathlib.Path,
                data_path: Any) -> None:
  trainer = runner.train_in_subprocess if SweepConfig.from_config(config).isolation == \
      "process" else runner.train_in_process
  total = sum(len(v) for v in runs.values())
  for name, pick_runs in runs.items():
    for i, run in enumerate(pick_runs, 1):
      logging.info("verify: %s, seed %d (%d of %d for this pick, %d runs in all)", name,
                   run.seed, i, len(pick_runs), total)
      runner.execute(run, config, vdir, data_path, trainer)


def run_verify(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  """`--mode=verify`: trains the picks (see the module docstring) and writes verify.json."""
  from archscale.study import sweep

  workdir = pathlib.Path(workdir)
  doc = _search_doc(workdir)
  runs = plan_runs(config, doc)
  vdir = workdir / VERIFY_DIR
  data_path = sweep.prepared_data_path(config, workdir)
  if SweepConfig.from_config(config).launch == "slurm":  # as jobs, waited for
    from archscale.study import slurm

    waiting = config.copy_and_resolve_references()
    waiting.sweep.wait = True
    unique = {r.run_id: r for rs in runs.values() for r in rs}  # picks may coincide
    slurm.submit_sweep(waiting, vdir, list(unique.values()), data_path,
                       lambda line: logging.info("verify: %s", line))
  else:
    _train_here(config, runs, vdir, data_path)
  measured, rows = {}, attempts.run_states(vdir)
  for name, pick_runs in runs.items():
    measured[name] = [float(rows[r.run_id]["loss"]) for r in pick_runs
                      if rows.get(r.run_id, {}).get("status") == "finished"]
    if not measured[name]:
      raise ValueError(f"verify: no run of {name} finished; see {vdir / attempts.RESULTS} and "
                       "the runs' train.log, then rerun --mode=verify")
  attempts.materialise(vdir)
  entries = judge(doc, measured)
  io.write_json_atomic(workdir / VERIFY_JSON, entries)
  for e in entries:
    logging.info("verify: %-8s measured %.4f +- %s (predicted %s): meets target %s, prediction "
                 "held %s", e["name"], e["measured_mean"], e["measured_stderr"],
                 e["predicted_loss"], e["meets_target"], e["prediction_held"])
  return {"picks": entries, "results": str(vdir / attempts.RESULTS)}
