"""Algorithm 1 (`--mode=search`): the fastest architecture that meets a loss target at a budget.

Given a budget (N non-embedding parameters, D tokens) at the depth and head size the paper fixes
per scale, a fitted conditional law and a serving scenario, the search

  1. loads the law (`search.law`, a fit.json; hand-written ones with only `form` and `params` are
     fine), or fits one from a results table when none is given;
  2. enumerates, rates and walks the candidates (archscale.study.candidates);
  3. reports the Pareto frontier, Panda and Surefire, and writes each as a config file.

Losses are absolute when the law carries Chinchilla parameters. A law without them predicts the
calibration L / L_opt(N, D) ("factor", multiplicative form) or L - L_opt ("offset", additive), and
so does everything here: a numeric `search.target` is then read in those units.

Outputs in WORKDIR: search.json (keys below), pareto.png, panda.py, surefire.py.
  candidates  every evaluated architecture, fastest first: ArchSpec fields, params_nonembed,
              params_total, mlp_attn_ratio, d_over_sqrt_n, gqa, predicted_loss, throughput
              (output tokens/s), fits (weights + KV cache fit the accelerator), meets_target,
              extrapolated_axes (those of d_over_sqrt_n, r, gqa, n_params, tokens outside the
              rows' support), extrapolated (any), origin ("grid" or "gqa")
  pareto      the frontier, by increasing predicted loss
  panda, surefire, baseline (when the target names one): the same fields
  budget, scenario, target, law, loss_units, stats (enumeration, drops, GQA walks), provenance
  support     the rows' range per axis (x and r widened by search.support_margin), margin,
              extrapolate; uncertainty (each pick's interval and statements, with how far the
              budget lies beyond the trained runs)
  measured    when a results table is reachable (`search.results`, else `fit.results`): its path,
              and for panda, surefire and baseline the finished runs of the same architecture
              (`ARCH_KEYS`): run_id, tokens, loss and the run's downstream `eval` (null when it
              was not evaluated); an empty list when no run has that architecture
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import numpy as np
from absl import logging

from archscale.core import config_lib, io, tracking
from archscale.core.settings import SearchConfig
from archscale.model.arch import FIXED_FIELDS, ArchSpec, steps_for_tokens
from archscale.serve import throughput
from archscale.study import plots
from archscale.study.candidates import (
  Budget,
  Candidate,
  SearchResult,
  Space,
  d_model_grid,
  loss_units,
  search,
  within,
)

SEARCH_JSON = "search.json"
# The fields that make two architectures the same, for matching picks to trained runs.
ARCH_KEYS = ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "d_head", "vocab_size")
PARETO_PNG = "pareto.png"
# Sections of a search config copied into panda.py / surefire.py when they differ from defaults.
_CONFIG_SECTIONS = ("compute", "data", "train", "mesh", "distributed", "bench")
# ------------------------------------------------------------------------------ the mode


def parse_target(value: Any) -> tuple[float | None, str | None]:
  """`search.target` as (number, None) or (None, baseline name)."""
  text = str(value).strip()
  if text.startswith("baseline:") and text[len("baseline:"):].strip():
    return None, text[len("baseline:"):].strip()
  try:
    loss = float(value) if isinstance(value, (int, float)) else float(text)
  except ValueError:
    loss = None
  if isinstance(value, bool) or loss is None or not math.isfinite(loss):
    raise ValueError(
        f"search.target={value!r} must be a loss (a number) or 'baseline:<architecture or config "
        "file>', e.g. 'baseline:llama3_2_1b'")
  return loss, None


def _baseline_spec(name: str) -> ArchSpec:
  try:
    return ArchSpec.from_dict(config_lib.arch_config(name))
  except ValueError as e:
    raise ValueError(f"search.target=baseline:{name}: {e}") from None


def load_or_fit_law(config: Any, workdir: pathlib.Path) -> tuple[Any, str]:
  """The law of `search.law`, or one fitted now from `search.results` / `fit.results`."""
  from archscale.study import fit as fit_stage
  from archscale.study import law as law_lib

  s = SearchConfig.from_config(config)
  if str(s.law).strip():
    path = pathlib.Path(str(s.law)).expanduser()
    if not path.exists():
      raise ValueError(f"search.law={str(s.law)!r} does not exist; point it at a fit.json (from "
                       "--mode=fit, or written by hand with `form` and `params`)")
    return law_lib.load_law(path), str(path)
  results = str(s.results or config.fit.results).strip()
  if not results or not pathlib.Path(results).expanduser().exists():
    raise ValueError(
        "search.law is empty and there is no results table to fit one from: set search.law to a "
        "fit.json, or search.results (or fit.results) to a results.jsonl from --mode=sweep")
  cfg = config.copy_and_resolve_references()
  cfg.fit.results = results
  logging.info("search: fitting a %s law to %s", cfg.fit.form, cfg.fit.results)
  fit_stage.run_fit(cfg, workdir)
  path = pathlib.Path(workdir) / "fit.json"
  return law_lib.load_law(path), str(path)


def resolve(config: Any) -> dict[str, Any]:
  """Checks the search section and derives the budget, space and target, before any work."""
  s = SearchConfig.from_config(config)
  target_value, baseline_name = parse_target(s.target)
  baseline = _baseline_spec(baseline_name) if baseline_name else None
  ref = baseline or ArchSpec.from_config(config)
  n = float(s.n_nonembed) if s.n_nonembed else float(ref.params_nonembed)
  budget = Budget(n, float(s.tokens) if s.tokens else 100.0 * n, int(s.n_layers or ref.n_layers),
                  int(s.d_head or ref.d_head), tuple((k, getattr(ref, k)) for k in FIXED_FIELDS))
  space = Space(s.d_model_multiple, s.d_ff_multiple, tuple(float(v) for v in s.r_range),
                float(s.n_tolerance))
  scenario = throughput.Scenario(s.batch_size, s.input_len, s.output_len, s.dtype_bytes)
  return {"target_value": target_value, "baseline_name": baseline_name, "baseline": baseline,
          "budget": budget, "space": space, "scenario": scenario, "gqa": int(s.gqa or ref.gqa),
          "width_range": tuple(float(v) for v in s.width_range)}


def _with_support(law_path: str, space: Space, s: SearchConfig) -> tuple[dict[str, Any], Space]:
  """The law's fit.json (form and params only when hand-written) and the space limited to its
  rows' support, widened by search.support_margin (no limit when the law carries none)."""
  from archscale.study import diagnostics

  doc = json.loads(pathlib.Path(law_path).read_text(encoding="utf-8"))
  support = diagnostics.widened_support(doc, s.support_margin)
  if support is None:
    logging.warning("search: the law %s carries no support (the rows it was fitted on): "
                    "candidates are not checked against the data's range", law_path)
    return doc, dataclasses.replace(space, extrapolate=s.extrapolate)
  limits = {k: None if v is None else (float(v[0]), float(v[1])) for k, v in support.items()}
  return doc, dataclasses.replace(space, support=limits, extrapolate=s.extrapolate)


def check_gqa(gqa: int, space: Space) -> None:
  """Refuses an enumeration at a GQA the rows never trained (the law has no GQA term), unless
  search.extrapolate is set."""
  limits = (space.support or {}).get("gqa")
  if limits is None or space.extrapolate or limits[0] <= gqa <= limits[1]:
    return
  held = f"{limits[0]:g}" if limits[0] == limits[1] else f"{limits[0]:g}..{limits[1]:g}"
  raise ValueError(
      f"search.gqa={gqa} (0 takes the baseline's) is outside the GQA of the rows the law was "
      f"fitted on ({held}), and the law has no GQA term: set search.gqa to a GQA the sweep "
      "trained, train that GQA too (sweep.gqa), or set search.extrapolate=True")


def scale_statements(space: Space, budget: Budget, doc: dict[str, Any]) -> list[str]:
  """How far the budget's N and D lie beyond the trained runs, with the error the progressive
  protocol measured at its largest step (the error to expect there); and what GQA rests on."""
  support, out = space.support or {}, []
  for axis, name, value in (("n_params", "N", budget.n_nonembed), ("tokens", "D", budget.tokens)):
    limits = support.get(axis)
    if limits is None or within(limits, value):
      continue
    factor, edge = (value / limits[1], "largest") if value > limits[1] else (
        value / limits[0], "smallest")
    out.append(f"{name} = {value:.4g} is {factor:.3g}x the {edge} trained run ({name} "
               f"{limits[1] if edge == 'largest' else limits[0]:.4g}): the law extrapolates")
  steps = [p for p in ((doc.get("metrics") or {}).get("progressive") or []) if p.get("mse")]
  if out and steps:
    out.append(f"the progressive protocol's error at its largest step (predicting N "
               f"{steps[-1]['test_scale']:.3g} from smaller scales) is RMSE "
               f"{math.sqrt(steps[-1]['mse']):.3g}: the least error to expect here")
  elif out:
    out.append("no progressive step (fitting smaller scales, predicting a larger one) measured "
               "how well this law extrapolates in scale")
  if support and support.get("gqa") is None:
    out.append("the rows do not record GQA, so every GQA is assumed to leave the loss unchanged")
  elif support and support["gqa"][0] == support["gqa"][1]:
    out.append(f"the rows hold GQA {support['gqa'][0]:g} only: the law has no GQA term, so "
               "another GQA is assumed to leave the loss unchanged")
  return out


def _uncertainty(law: Any, doc: dict[str, Any], result: SearchResult, budget: Budget,
                 baseline: ArchSpec | None) -> tuple[dict[str, Any], list[str]]:
  """Panda's and Surefire's predicted losses with intervals, and whether their difference from
  the baseline (or the target) exceeds the fit's uncertainty."""
  from archscale.study import diagnostics

  shape = lambda spec, n: (n, budget.tokens, spec.d_over_sqrt_n, spec.mlp_attn_ratio)
  picks = {name: shape(c.spec, c.spec.params_nonembed)
           for name, c in (("panda", result.panda), ("surefire", result.surefire)) if c}
  base = shape(baseline, budget.n_nonembed) if baseline is not None else None
  return diagnostics.pick_statements(law, doc, picks, base, result.target,
                                     float(doc.get("interval_level", 0.95)))


def _law_optimum(law: Any, doc: dict[str, Any], key: str = "d_over_sqrt_n") -> float | None:
  """The optimum a fit reported (null when the rows do not support one), else the law's own."""
  if isinstance(doc.get("optimum"), dict):
    value = doc["optimum"].get(key)
    return float(value) if value is not None else None
  try:
    value = float(law.optimum()[key])
  except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
    return None
  return value if math.isfinite(value) and (key == "r" or 0 < value < 10) else None


def measured_runs(config: Any, picks: dict[str, dict[str, Any] | None]) -> dict[str, Any] | None:
  """The trained runs of the results table the search can reach with each pick's architecture,
  with their loss and downstream eval (see `measured` above); None without a table."""
  from archscale.study import table

  s = SearchConfig.from_config(config)
  path = str(s.results or config.fit.results).strip()
  if not path or not pathlib.Path(path).expanduser().exists():
    return None
  try:
    rows, _ = table.load_rows(pathlib.Path(path).expanduser())
  except ValueError:  # An empty or unreadable table: nothing was measured.
    rows = []
  latest = {r.get("run_id", i): r for i, r in enumerate(rows) if r.get("status") == "finished"}
  key = lambda a: tuple(a.get(k) for k in ARCH_KEYS)
  out: dict[str, Any] = {"results": path}
  for name, pick in picks.items():
    if pick is not None:
      out[name] = [{"run_id": r.get("run_id"), "tokens": r.get("tokens"), "loss": r.get("loss"),
                    "eval": r.get("eval")} for r in latest.values() if key(r) == key(pick)]
  return out


def run_search(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  """`--mode=search`: Algorithm 1 on the config; writes search.json, pareto.png and the configs."""
  workdir = pathlib.Path(workdir)
  s = SearchConfig.from_config(config)
  inputs = resolve(config)
  budget, space, scenario = inputs["budget"], inputs["space"], inputs["scenario"]
  baseline = inputs["baseline"]
  source = throughput.source(config, workdir, scenario)
  law, law_path = load_or_fit_law(config, workdir)
  doc, space = _with_support(law_path, space, s)
  check_gqa(inputs["gqa"], space)
  units = loss_units(law)
  if inputs["target_value"] is not None:
    target = inputs["target_value"]
    if target <= 0 and units != "offset":
      raise ValueError(f"search.target={s.target!r}: a {units} target must be positive (the law "
                       f"{law_path} predicts {units}s); give the loss to reach, or "
                       "'baseline:<architecture>'")
  else:  # The baseline's shape (x, r) at the search's N and D.
    target = float(np.asarray(law.predict(
        np.array([budget.n_nonembed]), np.array([budget.tokens]),
        np.array([baseline.d_over_sqrt_n]), np.array([baseline.mlp_attn_ratio]))).ravel()[0])
  if not math.isfinite(target):
    raise ValueError(f"search.target: the law predicts a non-finite loss ({target}) for "
                     f"{s.target}; check search.law")
  optimum = _law_optimum(law, doc)
  centers = [c for c in (optimum, baseline.d_over_sqrt_n if baseline else None) if c]
  if not centers:
    centers = [ArchSpec.from_config(config).d_over_sqrt_n]
  if space.support and not space.extrapolate:  # the grid around what the rows support
    lo, hi = space.support["d_over_sqrt_n"]
    centers = [min(max(c, lo), hi) for c in centers]
  d_models = d_model_grid(budget.n_nonembed, centers, inputs["width_range"],
                          space.d_model_multiple)
  logging.info("search: N=%.4g D=%.4g L=%d d_head=%d, d_model %d..%d, target %.5g (%s), %s",
               budget.n_nonembed, budget.tokens, budget.n_layers, budget.d_head, d_models[0],
               d_models[-1], target, units, source.name)
  result = search(law, budget, space, target, source, d_models, inputs["gqa"], s.patience,
                  s.top_k, s.gqa_max, baseline, rate_all=source.cheap,
                  max_rated=0 if source.cheap else s.max_measure,
                  check_target=inputs["target_value"] is not None)
  out = result.to_json()
  out.update({
      "budget": {"n_nonembed": budget.n_nonembed, "tokens": budget.tokens,
                 "n_layers": budget.n_layers, "d_head": budget.d_head, "gqa": inputs["gqa"],
                 **dict(budget.fixed)},
      "space": dataclasses.asdict(space),
      "scenario": {**dataclasses.asdict(scenario), "throughput": source.name,
                   "accelerator": getattr(source, "accelerator", None),
                   "calibration": getattr(source, "calibration", None)},
      "target_spec": str(s.target),
      "law": {"path": law_path, "form": getattr(law, "form", None),
              "optimum": optimum and {"d_over_sqrt_n": optimum,
                                      "r": _law_optimum(law, doc, "r")}},
      "loss_units": units,
      "support": space.support and {
          **{k: v and list(v) for k, v in space.support.items()},
          "rows": doc.get("support"), "margin": s.support_margin, "extrapolate": s.extrapolate},
      "provenance": io.provenance(config),
  })
  out["uncertainty"], statements = _uncertainty(law, doc, result, budget, baseline)
  out["measured"] = measured_runs(config, {k: out[k] for k in ("panda", "surefire", "baseline")})
  out["uncertainty"]["statements"] = statements + scale_statements(space, budget, doc)
  for line in out["uncertainty"]["statements"]:
    logging.info("search: %s", line)
  workdir.mkdir(parents=True, exist_ok=True)
  io.write_json_atomic(workdir / SEARCH_JSON, out)
  plots.pareto(result, workdir / PARETO_PNG, units, source.name)
  for name, cand in (("panda", result.panda), ("surefire", result.surefire)):
    if cand is not None:
      write_arch_config(workdir / f"{name}.py", name, cand, config, budget, units, source.name)
  _log_summary(result, units)
  tracker = tracking.Tracker.start(config, workdir, name=f"{config.name}-search", job="search",
                                   run_config=dataclasses.asdict(SearchConfig.from_config(config)),
                                   group=str(config.name))
  if tracker is not None:
    tracker.log_files({k: out.get(k) for k in ("target", "panda", "surefire", "baseline")},
                      [workdir / PARETO_PNG])
    tracker.close()
  return out


def _describe(c: Candidate | None) -> str:
  if c is None:
    return "none"
  s = c.spec
  speed = f"{c.throughput:,.0f} tok/s" if c.throughput else "no throughput"
  return (f"d_model {s.d_model}, d_ff {s.d_ff}, heads {s.n_heads}/{s.n_kv_heads} (GQA {s.gqa}), "
          f"x {s.d_over_sqrt_n:.4f}, r {s.mlp_attn_ratio:.3f}, loss {c.predicted_loss:.5g}, "
          f"{speed}")


def _log_summary(result: SearchResult, units: str) -> None:
  logging.info("search: target %.5g (%s); %d candidates, %d on the Pareto frontier",
               result.target, units, len(result.candidates), len(result.pareto))
  for name in ("baseline", "panda", "surefire"):
    logging.info("search: %-8s %s", name, _describe(getattr(result, name)))


# ---------------------------------------------------------------------------------- outputs


def _base_arch(config: Any) -> str:
  if config.name in config_lib.ARCHS:
    return config.name
  target = str(config.search.target)
  name = target.split(":", 1)[1].strip() if target.startswith("baseline:") else ""
  return name if name in config_lib.ARCHS else "demo"


def write_arch_config(path: pathlib.Path, name: str, cand: Candidate, config: Any,
                      budget: Budget, units: str, source: str) -> pathlib.Path:
  """A standalone config file for one found architecture, ready for --mode=train / decode_bench.

  It starts from `config_lib.make_config(<the search's base architecture>)` and sets every model
  field, what the search config changed in the sections a run reads, train.steps for D tokens at
  its batch and sequence length, and bench.archs to itself.
  """
  base_name = _base_arch(config)
  c = config_lib.make_config(base_name)
  c.name, c.mode = name, "train"
  for section in _CONFIG_SECTIONS:
    if section in config:
      c[section] = config[section].copy_and_resolve_references()
  c.model.update(cand.spec.to_dict())
  c.train.steps = steps_for_tokens(
      budget.tokens, int(config.train.global_batch_size) * int(config.data.seq_len))
  spec = cand.spec
  doc = (f"{name}: found by archscale --mode=search in {path.parent.resolve()}.\n\n"
         f"Budget N={budget.n_nonembed:.6g} non-embedding parameters (this architecture: "
         f"{spec.params_nonembed:,}), D={budget.tokens:.6g} tokens (train.steps at this batch "
         f"size and sequence length).\nd_model/sqrt(N)={spec.d_over_sqrt_n:.4f}, "
         f"r={spec.mlp_attn_ratio:.3f}, GQA={spec.gqa}; predicted {units} "
         f"{cand.predicted_loss:.5g}, throughput {cand.throughput or 0:,.0f} output tokens/s "
         f"({source}).\n")
  return config_lib.write_config_py(
      path, c, doc, base=base_name,
      tail=["c.bench.archs = str(pathlib.Path(__file__).resolve())"])
