"""The whole study in one command (`--mode=pipeline`): data, sweep, fit, bench, search, report.

Steps, in order, each writing into WORKDIR:

  prepare_data  tokenized corpus in WORKDIR/data (unless data.path names a prepared one)
  sweep         WORKDIR/runs/<run_id>/, results.jsonl                    (study.sweep)
  fit           fit.json and its plots, from results.jsonl                (study.fit)
  decode_bench  decode_bench.json / .png for bench.archs on this machine  (serve.decode_bench)
  search        search.json, pareto.png, panda.py, surefire.py            (study.search)
  report        report.md: the key numbers and every plot

A finished step leaves WORKDIR/.done/<step> (its wall time, when it ended, a fingerprint of what
it read of the config and the ids of the steps it read outputs of); rerunning the pipeline skips
those, and the sweep itself skips finished runs and resumes an interrupted one, so an
interrupted pipeline picks up where it stopped. A step whose config changed since it was done is
redone, and so is every step that reads its outputs. Delete a marker to redo that step by hand.

The fit, search and report steps read what earlier steps wrote: fit.results defaults to this
workdir's results.jsonl (the fitter skips the failed attempts the table also records), search.law
to this workdir's fit.json and search.calibration to the bench's calibration (when the bench ran
on an accelerator of the cost model's table).
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from archscale.core import io, settings
from archscale.core.settings import DataConfig, PipelineConfig, SweepConfig
from archscale.study import attempts, plots, sweep

STEPS = ("prepare_data", "sweep", "fit", "decode_bench", "search", "verify", "report")
# What each step reads of the config (bookkeeping such as log cadence or sweep.only left out) and
# the steps whose outputs it reads.
STEP_READS = {
    "prepare_data": lambda c: {**DataConfig.from_config(c).prepare_fields, "path": c.data.path},
    "sweep": lambda c: {"recipe": settings.training_recipe(c), "model": c.model.to_dict(),
                        "sweep": SweepConfig.from_config(c).identity(), "seed": c.seed},
    "fit": lambda c: {"fit": c.fit.to_dict(), "seed": c.seed},
    "decode_bench": lambda c: {"bench": c.bench.to_dict(), "seed": c.seed},
    "search": lambda c: {"search": c.search.to_dict(), "bench": c.bench.to_dict()},
    "verify": lambda c: {"verify": PipelineConfig.from_config(c).verify,
                         "recipe": settings.training_recipe(c),
                         "seeds": SweepConfig.from_config(c).seeds, "seed": c.seed},
    "report": lambda c: {},
}
STEP_INPUTS = {"sweep": ("prepare_data",), "fit": ("sweep",), "search": ("fit", "decode_bench"),
               "verify": ("search",),
               "report": ("sweep", "fit", "decode_bench", "search", "verify")}
DONE_DIR = ".done"
UNSUPPORTED = "**The data of this run do not support a recommendation**"
SCALE_AXES = ("n_params", "tokens")
REPORT = "report.md"
SWEEP_PNG = "sweep.png"


def _say(msg: str) -> None:
  print(f"[pipeline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stdout, flush=True)


def _done(workdir: pathlib.Path, step: str) -> pathlib.Path:
  return workdir / DONE_DIR / step


def fingerprint(config: Any, step: str) -> str:
  """A short hash of what `step` reads of the config (as given, before paths are resolved)."""
  text = json.dumps(STEP_READS[step](config), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _marker(workdir: pathlib.Path, step: str) -> dict[str, Any] | None:
  path = _done(workdir, step)
  return json.loads(path.read_text()) if path.exists() else None


def _stage_config(config: Any, workdir: pathlib.Path) -> Any:
  """The config every step sees: paths wired to this workdir's outputs."""
  from archscale.data import batches as data_lib

  c = config.copy_and_resolve_references()
  c.data.path = str(io.absolute(data_lib.data_path(config, workdir)))
  c.fit.results = str(c.fit.results or workdir.resolve() / attempts.RESULTS)
  c.search.law = str(c.search.law or workdir.resolve() / "fit.json")
  return c


def _prepare_data(config: Any, workdir: pathlib.Path, say: Callable[[str], None]) -> None:
  from archscale.data import batches as data_lib
  from archscale.data import prepare

  prepare.run_prepare_data(config, workdir)
  info = data_lib.dataset_info(config.data.path)
  say(f"data: {info['tokens']['train']:,} train / {info['tokens']['eval']:,} eval tokens "
      f"({info['tokenizer']} tokenizer, vocab {info['vocab_size']}) in {config.data.path}")


def _sweep(config: Any, workdir: pathlib.Path, say: Callable[[str], None]) -> bool:
  """Trains the sweep; False (not done: a rerun retries them) when runs failed but the pipeline
  may go on without them."""
  counts = sweep.run_sweep(config, workdir, progress=say)
  if counts["finished"] == counts["planned"]:
    return True
  missing = ", ".join(f"{u['run_id']} ({u['status']})" for u in counts.get("unfinished", []))
  if PipelineConfig.from_config(config).allow_failed_runs:
    say(f"sweep: going on with the {counts['finished']} finished runs, without {missing} "
        "(pipeline.allow_failed_runs); the next pipeline call retries them")
    return False
  raise ValueError(
      f"sweep: {counts['finished']} of {counts['planned']} runs finished; not finished: "
      f"{missing}. See {workdir / attempts.RESULTS} and the runs' train.log, then rerun the "
      "pipeline to retry them, or set pipeline.allow_failed_runs=True to fit without them")


def _fit(config: Any, workdir: pathlib.Path, say: Callable[[str], None]) -> None:
  from archscale.study import fit as fit_stage

  finished = sum(r.get("status", "finished") == "finished"
                 for r in io.read_jsonl(config.fit.results))
  say(f"fit: {config.fit.form} law (L_opt: {config.fit.l_opt}) on {finished} finished runs")
  fit_stage.run_fit(config, workdir)
  fit = json.loads((workdir / "fit.json").read_text())
  say(f"fit: params {_fmt_params(fit.get('params', {}))}; optimum {fit.get('optimum')}")


def _decode_bench(config: Any, workdir: pathlib.Path, say: Callable[[str], None]) -> None:
  from archscale.serve import decode_bench

  say(f"decode_bench: {config.bench.archs} at batch sizes {tuple(config.bench.batch_sizes)}, "
      f"{config.bench.input_len} prompt + {config.bench.output_len} generated tokens")
  rows = decode_bench.run_decode_bench(config, workdir)
  for r in rows:
    if r.get("error"):
      say(f"decode_bench: {r['arch']} batch {r['batch_size']}: {r['error']}")
    else:
      say(f"decode_bench: {r['arch']} batch {r['batch_size']}: "
          f"{r['output_tokens_per_s']:,.0f} output tokens/s, step {r['step_ms_median']:.2f} ms")


def _search(config: Any, workdir: pathlib.Path, say: Callable[[str], None]) -> None:
  from archscale.study import search

  out = search.run_search(config, workdir)
  say(f"search: {len(out['candidates'])} candidates, target {out['target']:.5g} "
      f"({out['loss_units']}), throughput from {out['scenario']['throughput']}")
  for name in ("baseline", "panda", "surefire"):
    if out.get(name):
      say(f"search: {name:8s} {_arch_line(out[name])}")


def _verify(config: Any, workdir: pathlib.Path, say: Callable[[str], None]) -> None:
  if not PipelineConfig.from_config(config).verify:
    say("verify: off (pipeline.verify=true trains the picks and the baseline to check them)")
    return
  from archscale.study import verify

  for e in verify.run_verify(config, workdir)["picks"]:
    say(f"verify: {e['name']:8s} measured {e['measured_mean']:.4f} over "
        f"{len(e['measured_losses'])} seed(s), predicted {_num(e['predicted_loss'])}; meets the "
        f"target: {_verdict_word(e['meets_target'])}; prediction held: "
        f"{_verdict_word(e['prediction_held'])}")


def _num(v: Any) -> str:
  return "n/a" if v is None else f"{v:.4f}"


def _verdict_word(v: bool | None) -> str:
  return {True: "yes", False: "**no**", None: "undecided (noise)"}[v]


def run_pipeline(config: Any, workdir: pathlib.Path) -> dict[str, float]:
  """`--mode=pipeline`: every step not yet done, in order; returns each step's seconds."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  c = _stage_config(config, workdir)
  # Fail on a bad sweep section before preparing anything.
  if SweepConfig.from_config(c).launch != "local":
    raise ValueError("the pipeline trains its sweep here: set sweep.launch='local' (or run "
                     "--mode=sweep with launch='emit' on a cluster, then --mode=fit and search)")
  # A step that returns False did not finish its work: it is not marked done, so it runs again.
  steps: dict[str, Callable[[Any, pathlib.Path, Callable[[str], None]], bool | None]] = {
      "prepare_data": _prepare_data, "sweep": _sweep, "fit": _fit,
      "decode_bench": _decode_bench, "search": _search, "verify": _verify,
      "report": write_report,
  }
  start = time.time()
  times: dict[str, float] = {}
  _say(f"workdir {workdir.resolve()}; steps: {', '.join(STEPS)}")
  for i, name in enumerate(STEPS, 1):
    marker = _done(workdir, name)
    fp = fingerprint(config, name)
    inputs = {step: (_marker(workdir, step) or {}).get("id") for step in STEP_INPUTS.get(name, ())}
    done = _marker(workdir, name)
    if done is not None:
      changed = [s for s, run_id in done.get("inputs", inputs).items() if inputs.get(s) != run_id]
      if done.get("config", fp) == fp and not changed:
        times[name] = done.get("seconds", 0.0)
        _say(f"[{i}/{len(STEPS)}] {name}: done before (delete {marker} to redo)")
        continue
      why = (f"{', '.join(changed)} redone since" if changed else
             "the config it reads changed since it was done")
      _say(f"[{i}/{len(STEPS)}] {name}: redoing: {why}")
      marker.unlink()
    _say(f"[{i}/{len(STEPS)}] {name} ...")
    t0 = time.time()
    complete = steps[name](c, workdir, lambda msg, i=i: _say(f"[{i}/{len(STEPS)}] {msg}"))
    times[name] = time.time() - t0
    if complete is False:
      continue
    io.write_json_atomic(marker, {
        "seconds": times[name], "config": fp, "inputs": inputs, "id": uuid.uuid4().hex,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    _say(f"[{i}/{len(STEPS)}] {name}: done in {times[name]:.0f}s "
         f"({time.time() - start:.0f}s this call)")
  _say(f"all steps done; report: {workdir.resolve() / REPORT}")
  return times


# ------------------------------------------------------------------------------------- report


def _fmt_params(params: dict[str, Any]) -> str:
  return ", ".join(f"{k}={v:.4g}" if isinstance(v, (int, float)) else f"{k}={v}"
                   for k, v in params.items())


def _arch_line(a: dict[str, Any]) -> str:
  speed = f"{a['throughput']:,.0f} tok/s" if a.get("throughput") else "no throughput"
  return (f"d_model {a['d_model']}, d_ff {a['d_ff']}, heads {a['n_heads']}/{a['n_kv_heads']} "
          f"(GQA {a['gqa']}), x {a['d_over_sqrt_n']:.3f}, r {a['mlp_attn_ratio']:.2f}, "
          f"predicted {a['predicted_loss']:.5g}, {speed}")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
  def cell(v: Any) -> str:
    if isinstance(v, float):
      return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return "" if v is None else str(v)
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def _search_support(s: dict[str, Any]) -> list[str]:
  """report.md lines on where the search may trust the law: its support and each pick's
  uncertainty (predicted losses whose differences are within it are not findings)."""
  sup = s.get("support")
  if sup:
    names = {"d_over_sqrt_n": "d_model/sqrt(N)", "r": "r", "gqa": "GQA"}
    ranges = ", ".join(f"{label} in [{sup[k][0]:.3g}, {sup[k][1]:.3g}]"
                       for k, label in names.items() if sup.get(k))
    out = [f"Searched within the fit rows' support: {ranges} (margin {sup['margin']:g} on "
           "d_model/sqrt(N) and r"
           + ("; extrapolating, outside candidates marked" if sup["extrapolate"] else "")
           + ").", ""]
  else:
    out = ["The law carries no support (no fit rows), so candidates were not checked against "
           "the data's range.", ""]
  statements = (s.get("uncertainty") or {}).get("statements", [])
  return out + [f"- {line}" for line in statements] + ([""] if statements else [])


def _noise_lines(diag: dict[str, Any]) -> list[str]:
  """report.md lines on seed noise: how large, and per budget whether shapes differ beyond it."""
  noise = diag.get("noise")
  if not noise:
    return ["Seed noise: **not measured**: no design point was trained with more than one seed "
            "(`sweep.seeds`), so no difference between shapes below is tested against it.", ""]
  ratio = noise.get("fit_rms_over_noise")
  out = [f"Seed noise: sigma = {noise['seed_std']:.3g} "
         f"({noise['seed_std_relative']:.2%} of the loss), from {noise['replicated_points']} of "
         f"{noise['points']} design points trained with several seeds ({noise['dof']} degrees of "
         "freedom)" + (f"; the law's residual RMS is {ratio:.2f}x sigma" if ratio else "") + ".",
         ""]
  if noise["budgets"]:
    out += [_table(["N", "D", "shapes", "spread of mean losses", "F", "p", "beyond noise"],
                   [[b["params_nonembed"], b["tokens"], b["points"], b["spread"], b["f"], b["p"],
                     "yes" if b["beyond_noise"] else "**no**"] for b in noise["budgets"]]), ""]
  return out


def _fit_diagnostics(fit: dict[str, Any]) -> list[str]:
  """report.md lines on what the fit's rows support: optimum (or why none), standard errors,
  identifiability, convergence, bootstrap, and every warning."""
  opt, diag = fit.get("optimum") or {}, fit.get("diagnostics") or {}
  out = []
  if opt:
    reasons = opt.get("reasons") or {}
    show = lambda k: (f"{opt[k]:.4g}" if opt.get(k) is not None else
                      f"none ({reasons.get(k) or 'the fitted curve has no minimum'})")
    out += [f"Loss-optimal shape: d_model/sqrt(N) = {show('d_over_sqrt_n')}, r = {show('r')}.",
            ""]
  if fit.get("stderr"):
    known = [f"{k} {v:.3g}" for k, v in fit["stderr"].items() if v is not None]
    out += ["Standard errors (Jacobian): "
            + (", ".join(known) if known else "undefined (see the warnings)") + ".", ""]
  tests = (fit.get("verdict") or {}).get("tests") or {}
  if tests.get("tested"):
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    out += ["Verdict tests (each budget against its own seed noise, budgets combined): shape "
            f"effect p = {tests['shape_effect_p']:.2g}; shape term explains "
            f"{tests['explained']:.0%} of the variation between shapes; lack of fit p = "
            f"{fmt(tests.get('lack_of_fit_p'), '.2g')}; noise differs by up to "
            f"{tests['noise_ratio']:.2g}x between budgets (equal-variance p = "
            f"{fmt(tests.get('equal_variance_p'), '.2g')})"
            + (f"; progressive error {tests['out_of_sample_over_noise']:.2g}x the noise"
               if "out_of_sample_over_noise" in tests else "")
            + "".join(f"; rank correlation at N={r['test_scale']:.3g}: {r['spearman']:.2f} "
                      f"[{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]"
                      for r in tests.get("rank_correlations", [])) + ".", ""]
  if diag:
    out += _noise_lines(diag)
    named = ", ".join(f"{k} {'yes' if ok else '**no**'}"
                      for k, ok in (diag.get("identifiable") or {}).items())
    out += [f"Terms identified by the rows: {named}; starts converged: "
            f"{diag.get('converged_fraction', 0):.0%}; bootstrap replicates used: "
            f"{diag.get('bootstrap_used')} of {diag.get('bootstrap_total')}"
            + ("; intervals hold L_opt fixed at its full-data values, so its own uncertainty is "
               "not in them" if "l_opt" in diag.get("intervals_hold_fixed", []) else "")
            + ".", ""]
    out += [f"- **warning**: {w}" for w in diag.get("warnings", [])]
    out += [""] if diag.get("warnings") else []
  return out


def verdict(workdir: pathlib.Path) -> list[str]:
  """The report's first lines: fit.json's verdict (archscale.study.verdict) with the search's own
  reasons added, and if not supported why, so no pick or speedup below reads as a finding."""
  fit_path, search_path = workdir / "fit.json", workdir / "search.json"
  if not fit_path.exists() and not search_path.exists():
    return []
  reasons, caveats, tests = [], [], {}
  if fit_path.exists():
    found = json.loads(fit_path.read_text()).get("verdict")
    if found is None:
      reasons.append("the fit carries no verdict (a Chinchilla fit, or one from an older "
                     "archscale: rerun --mode=fit)")
    else:
      reasons += found["reasons"]
      caveats, tests = found.get("caveats", []), found.get("tests", {})
  if search_path.exists():
    reasons += _search_reasons(json.loads(search_path.read_text()))
  if (workdir / "verify.json").exists():
    for e in json.loads((workdir / "verify.json").read_text()):
      if e["prediction_held"] is False:
        reasons.append(f"{e['name']}'s measured loss {e['measured_mean']:.4g} lies outside its "
                       "predicted interval (verify)")
      if e["meets_target"] is False:
        reasons.append(f"{e['name']} measured worse than the target (verify)")
  notes = [f"- caveat: {c}" for c in caveats] + ([""] if caveats else [])
  if reasons:
    return [UNSUPPORTED + ": " + "; ".join(reasons)
            + ". The picks and speedups below are what the fitted law says, not findings.",
            ""] + notes
  evidence = ""
  if tests.get("tested"):
    evidence = (f": the shapes' losses differ beyond each budget's seed noise (combined p = "
                f"{tests['shape_effect_p']:.2g}), the law's shape term explains "
                f"{tests['explained']:.0%} of that variation"
                + (f" without lack of fit (p = {tests['lack_of_fit_p']:.2g})"
                   if tests.get("lack_of_fit_p") is not None else ""))
  return ["The data support a recommendation" + evidence + ", and the picks' predicted "
          "differences exceed the fit's uncertainty.", ""] + notes


def _search_reasons(s: dict[str, Any]) -> list[str]:
  """Why the search's picks are no findings: untested or within the uncertainty, or outside the
  rows' support on a shape axis or GQA."""
  reasons, tested = [], (s.get("uncertainty") or {})
  for name in ("panda", "surefire"):
    if not s.get(name):
      continue
    if name not in tested:
      reasons.append(f"whether {name}'s predicted difference is real is untested")
    elif tested[name].get("within_uncertainty"):
      reasons.append(f"{name}'s predicted difference is within the fit's uncertainty")
    # Scale (N, D) beyond the runs is the law's purpose: stated in the support section, with
    # the progressive error to expect; a shape or GQA beyond the rows is no finding.
    axes = [a for a in s[name].get("extrapolated_axes", ["shape"]) if a not in SCALE_AXES]
    if s[name].get("extrapolated") and axes:
      reasons.append(f"{name} lies outside the rows' support on {', '.join(axes)} "
                     "(extrapolated)")
  return reasons


def write_report(config: Any, workdir: pathlib.Path, say: Callable[[str], None]) -> pathlib.Path:
  """report.md: what each step produced, with the plots inline (relative paths)."""
  out = [f"# archscale pipeline report: {config.name}", ""]
  times = {}
  for step in STEPS[:-1]:
    marker = _done(workdir, step)
    if marker.exists():
      times[step] = json.loads(marker.read_text()).get("seconds", 0.0)
  head = verdict(workdir)
  supported = not head or not head[0].startswith(UNSUPPORTED)
  out += head + _report_support(workdir)
  if times:
    out += ["Step times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
            + f" (total {sum(times.values()):.0f}s).", ""]
  for part in (_report_sweep, _report_fit, _report_bench):
    out += part(workdir)
  out += _report_search(workdir, supported) + _report_verify(workdir)
  path = workdir / REPORT
  io.write_text_atomic(path, "\n".join(out))
  say(f"report: {path}")
  return path


def _report_verify(workdir: pathlib.Path) -> list[str]:
  """report.md's verification: each pick trained, measured against its prediction."""
  path = workdir / "verify.json"
  if not path.exists():
    return []
  rows = []
  for e in json.loads(path.read_text()):
    interval = e["predicted_interval"]
    pred = _num(e["predicted_loss"]) + (f" [{interval[0]:.4f}, {interval[1]:.4f}]"
                                         if interval else "")
    se = e["measured_stderr"]
    rows.append([e["name"], pred, f"{e['measured_mean']:.4f}" + (f" +- {se:.4f}" if se else ""),
                 len(e["measured_losses"]), _verdict_word(e["meets_target"]),
                 _verdict_word(e["prediction_held"])])
  return ["## Verification", "", "The picks and the baseline trained at the search's budget "
          "(`verify.json`); measured +- standard error over seeds.", "",
          _table(["model", "predicted loss [interval]", "measured", "seeds", "meets target",
                  "prediction held"], rows), ""]


def _report_support(workdir: pathlib.Path) -> list[str]:
  """What the data support, before any number that depends on it: the seed noise, the fit's
  diagnostics and the search's support and uncertainty."""
  fit_path, search_path = workdir / "fit.json", workdir / "search.json"
  out = ["## What the data support", ""] if fit_path.exists() or search_path.exists() else []
  if fit_path.exists():
    out += _fit_diagnostics(json.loads(fit_path.read_text()))
  if search_path.exists():
    out += _search_support(json.loads(search_path.read_text()))
  return out


def _report_sweep(workdir: pathlib.Path) -> list[str]:
  """The sweep: finished and unfinished runs, the U-curves, the table."""
  out: list[str] = []
  rows = [r for r in attempts.latest_rows(workdir / attempts.RESULTS).values()]
  done = sorted((r for r in rows if r.get("status") == "finished"),
                key=lambda r: (r["scale"], r["d_over_sqrt_n"], r["mlp_attn_ratio"]))
  failed = [r for r in rows if r.get("status") != "finished"]
  out += ["## Sweep", "",
          f"{len(done)} runs finished, {len(failed)} not finished (`{attempts.RESULTS}`). "
          f"`loss` is the {done[0].get('loss_source', 'eval') if done else 'eval'} loss.", ""]
  if done:
    plots.sweep_losses(done, workdir / SWEEP_PNG)
    evaluated = any("eval_average" in r for r in done)  # sweep.evaluate or --mode=evaluate
    out += [f"![sweep]({SWEEP_PNG})", "",
            _table(["run", "N", "tokens", "d_model", "d_ff", "heads", "x", "r", "loss"]
                   + ["downstream average"] * evaluated,
                   [[r["run_id"], r["params_nonembed"], r["tokens"], r["d_model"], r["d_ff"],
                     f"{r['n_heads']}/{r['n_kv_heads']}", r["d_over_sqrt_n"],
                     r["mlp_attn_ratio"], r["loss"]] + [r.get("eval_average")] * evaluated
                    for r in done]), ""]
  return out


def _report_fit(workdir: pathlib.Path) -> list[str]:
  """The fit: form, parameters, diagnostics, in-sample metrics, plots."""
  out: list[str] = []
  fit_path = workdir / "fit.json"
  if fit_path.exists():
    fit = json.loads(fit_path.read_text())
    out += ["## Fit", "", f"Form `{fit.get('form')}`, L_opt `{fit.get('l_opt')}`: "
            f"{_fmt_params(fit.get('params', {}))}.", ""]
    metrics = (fit.get("metrics") or {}).get("in_sample")
    if metrics:
      out += ["In-sample: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in metrics.items()) + ".", ""]
    for png in sorted(workdir.glob("fit*.png")):
      out += [f"![{png.stem}]({png.name})", ""]
  return out


def _report_bench(workdir: pathlib.Path) -> list[str]:
  """The decode benchmark rows of this machine."""
  out: list[str] = []
  bench_path = workdir / "decode_bench.json"
  if bench_path.exists():
    bench = json.loads(bench_path.read_text())
    out += ["## Decode benchmark (this machine)", "",
            _table(["arch", "batch", "in/out", "output tok/s", "step ms (median)", "error"],
                   [[pathlib.Path(str(r["arch"])).stem, r["batch_size"],
                     f"{r['input_len']}/{r['output_len']}", r.get("output_tokens_per_s"),
                     r.get("step_ms_median"), r.get("error")] for r in bench]), ""]
    if (workdir / "decode_bench.png").exists():
      out += ["![decode bench](decode_bench.png)", ""]
  return out


def _report_search(workdir: pathlib.Path, supported: bool) -> list[str]:
  """The search: budget, target, the picks against the baseline (speedups labelled as the
  law's, not findings, where the data do not support a recommendation)."""
  out: list[str] = []
  search_path = workdir / "search.json"
  if search_path.exists():
    s = json.loads(search_path.read_text())
    units = {"loss": "loss", "factor": "L / L_opt", "offset": "L - L_opt"}[s["loss_units"]]
    sc = s["scenario"]
    b = s["budget"]
    out += ["## Search (Algorithm 1)", "",
            f"Budget N={b['n_nonembed']:,.0f}, D={b['tokens']:,.0f}, {b['n_layers']} layers, "
            f"d_head {b['d_head']}. Target `{s['target_spec']}` = {s['target']:.5g} ({units}). "
            f"Throughput: {sc['throughput']}, batch {sc['batch_size']}, "
            f"{sc['input_len']} prompt / {sc['output_len']} generated tokens. "
            f"{len(s['candidates'])} candidates, {len(s['pareto'])} on the Pareto frontier.", ""]
    base_speed = (s.get("baseline") or {}).get("throughput")
    table = []
    for name in ("baseline", "panda", "surefire"):
      a = s.get(name)
      if a:
        speedup = (a["throughput"] / base_speed if base_speed and a.get("throughput") else None)
        table.append([name, a["d_model"], a["d_ff"], f"{a['n_heads']}/{a['n_kv_heads']}",
                      a["gqa"], a["d_over_sqrt_n"], a["mlp_attn_ratio"], a["params_nonembed"],
                      a["predicted_loss"], a.get("throughput"),
                      None if speedup is None else f"{speedup:.2f}x"])
    out += [_table(["", "d_model", "d_ff", "heads", "GQA", "x", "r", "N", f"predicted {units}",
                    "tok/s", "vs baseline" if supported else
                    "vs baseline (the law's, not a finding)"], table), "",
            "![pareto](pareto.png)", "",
            "Configs: [panda.py](panda.py), [surefire.py](surefire.py) "
            "(`python -m archscale.main --config=WORKDIR/panda.py --mode=train`).", ""]
    if not math.isfinite(s["target"]):
      out += ["The target is not finite; check the law.", ""]
    out += _search_measured(s.get("measured"))
  return out


def _search_measured(measured: dict[str, Any] | None) -> list[str]:
  """report.md lines on the trained runs sharing a pick's architecture and their evaluations."""
  if not measured:
    return []
  out = [f"Trained runs with a pick's architecture (`{measured['results']}`):", ""]
  for name in ("baseline", "panda", "surefire"):
    if not measured.get(name):
      out += [f"- {name}: no trained run has this architecture"] if name in measured else []
    for r in measured.get(name) or []:
      e = r.get("eval") or {}
      scores = ", ".join(f"{t} {e['tasks'][t][m]:.4g}" for t, m in e.get("average_of", {}).items())
      downstream = (f"downstream average {e['average']:.4g} ({scores})"
                    if e.get("average") is not None else "no downstream evaluation")
      out.append(f"- {name}: run `{r['run_id']}`, loss {r['loss']:.5g}, {downstream}")
  return out + [""]
