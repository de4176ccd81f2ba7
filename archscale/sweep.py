"""Architecture sweeps (`--mode=sweep`): a grid of ArchSpecs per scale, trained here or emitted.

For every scale N (with the depth and head size the paper fixes per scale) and every point of the
`sweep.d_over_sqrt_n` x `sweep.r` x `sweep.gqa` grid, `ArchSpec.from_budget` builds the nearest
feasible architecture. Points that cannot be built, land too far from the requested N or r, or
repeat an architecture already planned are dropped, and `sweep_plan.json` says which and why.

Each planned run has a stable id derived from (ArchSpec, tokens, seed) and trains into
`WORKDIR/runs/<run_id>/` from a standalone config file written there (`run_config.py`), so a run
can be repeated by hand and an interrupted one resumes from its checkpoint. With
`sweep.launch="local"` the runs train here one after another; with "emit" the sweep writes
`launch_commands.sh`, one shell-quoted command per run (its own config file in
`runs/<run_id>/sweep_config.py`, the interpreter that ran the sweep), each of which trains that
single run (`sweep.only`) and records its row, so a cluster can run them in any order and
concurrently; with "slurm" the runs are submitted as SLURM jobs (`archscale.slurm`).

`sweep.isolation="process"` (the default) trains each run in a fresh `python -m archscale.main
--mode=train` process: a crash, a hang killed by the user's scheduler or an out-of-memory in one run
cannot take the sweep down or leak device memory into the next run. "none" trains in-process
(faster to start; a Python exception is still caught and recorded).

Every attempt writes its row to its own file, `runs/<run_id>/attempts/<time>-<host>-<pid>.json`
(atomically, no lock: shared file systems such as gcsfuse have none), and `WORKDIR/results.jsonl`
is rebuilt from those files, oldest first, after every run (`materialise`); the fit reads it.
With `sweep.evaluate` the process or job that trained a run then writes its eval.json too.
Rows with status "finished" are final: rerunning the sweep skips their runs. Rows with status
"failed" (an exception or a non-zero exit, with the error) or "preempted" are retried on the next
run unless `sweep.retry_failed` is off. A run being trained by another local sweep holds
`runs/<run_id>/.sweep.lock` (and its trainer `runs/<run_id>/.lock`) and is skipped. With
`sweep.launch="local"` the workdir may be a gs:// URI (`io.WorkdirLock` then holds leases).

Row fields (what `archscale.table` reads): `params_nonembed`, `tokens` (tokens actually trained),
`loss`, every ArchSpec field, `mlp_attn_ratio`, `d_over_sqrt_n`, `gqa`, plus `run_id`, `status`,
`eval_loss`, `final_train_loss`, `loss_source`, `scale` (the requested N), `requested` (grid
point), `steps`, `seq_len`, `global_batch_size`, `seed`, `tokens_requested`, `wall_s`, `error`
(failed rows), `provenance` (code revision, device, time, the run's config) and, for a finished
run with an eval.json of its last step, `eval` (tasks, average, ...) and `eval_average`.

Which loss: `loss` is the held-out `eval_loss` by default (`sweep.loss="eval"`), falling back to
the final train loss when a run has no eval split. The paper's runs see each token once, where
train and held-out loss coincide; small corpora such as the demo's are repeated for many epochs,
and there the train loss rewards memorisation that the law is not meant to describe.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import logging

from archscale import config_lib, evaluate, io, settings
from archscale.arch import FIXED_FIELDS, ArchSpec, steps_for_tokens
from archscale.attempts import (
  RUNS_DIR,
  materialise,
  record_attempt,
  run_rows,
)
from archscale.attempts import latest as _latest
from archscale.monitor import EXIT_BUSY, EXIT_PREEMPTED
from archscale.settings import SweepConfig

PLAN = "sweep_plan.json"
LAUNCH_COMMANDS = "launch_commands.sh"
RUN_CONFIG = "run_config.py"
SWEEP_CONFIG = "sweep_config.py"
_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}

# trainer(run_config, run_dir) -> the train summary (dict with "status"); raises on failure.
Trainer = Callable[[ml_collections.ConfigDict, pathlib.Path], dict[str, Any]]


# ------------------------------------------------------------------------------------ planning


@dataclasses.dataclass(frozen=True)
class Scale:
  """One parameter budget of a sweep: N and the depth and head size fixed at that N."""

  n_nonembed: float
  n_layers: int
  d_head: int


@dataclasses.dataclass(frozen=True)
class Run:
  """One planned training run: the architecture, its budget and the grid point it came from."""

  run_id: str
  spec: ArchSpec
  tokens: int
  seed: int
  scale: Scale
  requested: dict[str, float]


def parse_count(text: str | float | int, field: str = "sweep.scales") -> float:
  """A positive count written as 80e6, 80M, 1.2B or 50k (case-insensitive)."""
  if isinstance(text, (int, float)) and not isinstance(text, bool):
    value = float(text)
  else:
    s = str(text).strip().lower().replace("_", "")
    scale = _SUFFIXES.get(s[-1:], 1.0)
    if s[-1:] in _SUFFIXES:
      s = s[:-1]
    try:
      value = float(s) * scale
    except ValueError:
      raise ValueError(f"{field}: {text!r} is not a count such as 80e6, 80M, 1.2B or 50k") from None
  if not (math.isfinite(value) and value > 0):
    raise ValueError(f"{field}: {text!r} must be a positive count")
  return value


def parse_scales(value: Any, model: Any) -> list[Scale]:
  """`sweep.scales` ("N:n_layers:d_head,..." or a sequence of triples) as Scales.

  Empty means one scale: the N, depth and head size of the config's model.
  """
  if not value:
    spec = ArchSpec.from_dict(model.to_dict() if hasattr(model, "to_dict") else dict(model))
    return [Scale(float(spec.params_nonembed), spec.n_layers, spec.d_head)]
  items = ([p.split(":") for p in str(value).split(",") if p.strip()]
           if isinstance(value, str) else [tuple(p) for p in value])
  scales = []
  for item in items:
    if len(item) != 3:
      raise ValueError(
          f"sweep.scales: {':'.join(map(str, item))!r} must be N:n_layers:d_head, e.g. "
          "'80M:12:64,145M:12:64'")
    n = parse_count(item[0])
    try:
      n_layers, d_head = int(str(item[1]).strip()), int(str(item[2]).strip())
    except ValueError:
      raise ValueError(f"sweep.scales: n_layers and d_head of {item!r} must be integers") from None
    if n_layers < 1 or d_head < 2 or d_head % 2:
      raise ValueError(f"sweep.scales: {item!r} needs n_layers >= 1 and an even d_head >= 2")
    scales.append(Scale(n, n_layers, d_head))
  return scales


def _grid(s: SweepConfig, name: str, cast: Callable[[Any], Any]) -> list[Any]:
  value = getattr(s, name)
  items = [v for v in str(value).split(",") if v.strip()] if isinstance(value, str) else value
  try:
    out = [cast(v) for v in items]
  except (TypeError, ValueError):
    raise ValueError(f"sweep.{name} must be a list of numbers, got {value!r}") from None
  if not out or any(not (v > 0) for v in out):
    raise ValueError(f"sweep.{name} must be a non-empty list of positive numbers, got {value!r}")
  return out


def _positive_int(value: Any, field: str) -> int:
  if isinstance(value, bool) or int(value) != value or value < 1:
    raise ValueError(f"{field} must be a positive integer, got {value!r}")
  return int(value)


def run_id(spec: ArchSpec, tokens: int, seed: int, recipe: dict[str, Any] | None = None) -> str:
  """A stable, readable id: the main dimensions plus a hash of (spec, tokens, seed, recipe).

  A change of learning rate, batch, sequence length or tokenizer gives new ids, so a rerun trains
  afresh instead of reusing results (or resuming checkpoints) made under other settings.
  """
  key = json.dumps({"arch": spec.to_dict(), "tokens": int(tokens), "seed": int(seed),
                    "recipe": recipe or {}}, sort_keys=True, default=str)
  digest = hashlib.sha256(key.encode()).hexdigest()[:10]
  return (f"L{spec.n_layers}-d{spec.d_model}-h{spec.n_heads}kv{spec.n_kv_heads}-ff{spec.d_ff}"
          f"-{digest}")


def tokens_for(s: SweepConfig, n_nonembed: float) -> int:
  """Tokens per run at this N: `sweep.tokens`, else `sweep.tokens_per_param` x N."""
  if s.tokens:
    return int(parse_count(s.tokens, "sweep.tokens"))
  if not (s.tokens_per_param > 0):
    raise ValueError(
        f"sweep.tokens_per_param must be positive (or set sweep.tokens), got {s.tokens_per_param}")
  return int(round(s.tokens_per_param * n_nonembed))


def _grid_points(s: SweepConfig) -> list[tuple[float, float, int]]:
  """The (d_over_sqrt_n, r, gqa) points of the design."""
  xs = _grid(s, "d_over_sqrt_n", float)
  rs = _grid(s, "r", float)
  gqas = _grid(s, "gqa", lambda v: _positive_int(float(v), "sweep.gqa"))
  if s.design == "grid":
    return [(x, r, g) for x in xs for r in rs for g in gqas]
  # cross: one factor at a time through the middle of each grid, as the U-curves are drawn
  x0, r0, g0 = (sorted(v)[(len(v) - 1) // 2] for v in (xs, rs, gqas))
  return list(dict.fromkeys([(x, r0, g0) for x in xs] + [(x0, r, g0) for r in rs]
                            + [(x0, r0, g) for g in gqas]))


def _build_point(s: SweepConfig, scale: Scale, x: float, r: float, g: int,
                 fixed: dict[str, Any]) -> tuple[ArchSpec | None, dict[str, Any]]:
  """The spec of one grid point at one scale, or (None, why it was dropped)."""
  point = {"n_nonembed": scale.n_nonembed, "n_layers": scale.n_layers, "d_head": scale.d_head,
           "d_over_sqrt_n": x, "r": r, "gqa": g}
  try:
    spec, _ = ArchSpec.from_budget(
        scale.n_nonembed, x, r, g, scale.n_layers, scale.d_head,
        d_model_multiple=int(s.d_model_multiple), d_ff_multiple=int(s.d_ff_multiple), **fixed)
  except ValueError as e:
    return None, {**point, "reason": f"infeasible: {e}"}
  spec = spec.refilled(scale.n_nonembed, r, int(s.d_ff_multiple), r_tolerance=s.r_tolerance,
                       n_tolerance=s.n_tolerance)
  achieved = {"n_nonembed": spec.params_nonembed, "d_over_sqrt_n": spec.d_over_sqrt_n,
              "r": spec.mlp_attn_ratio, "gqa": spec.gqa}
  n_error, r_error = spec.params_nonembed / scale.n_nonembed - 1, spec.mlp_attn_ratio / r - 1
  if abs(n_error) > s.n_tolerance:
    return None, {**point, "reason": (
        f"N off budget by {n_error:+.1%} (sweep.n_tolerance={s.n_tolerance})"),
        "achieved": achieved}
  if abs(r_error) > s.r_tolerance:
    return None, {**point, "reason": (
        f"r off by {r_error:+.1%} after rounding heads and d_ff (sweep.r_tolerance="
        f"{s.r_tolerance})"), "achieved": achieved}
  return spec, point


def plan(config: Any) -> tuple[list[Run], list[dict[str, Any]]]:
  """The runs of the sweep and the grid points dropped (each with a `reason`)."""
  s = SweepConfig.from_config(config)
  scales = parse_scales(s.scales, config.model)
  points = _grid_points(s)
  fixed = {k: config.model[k] for k in FIXED_FIELDS}  # from the config's model, not the grid
  recipe = settings.training_recipe(config)
  runs: list[Run] = []
  dropped: list[dict[str, Any]] = []
  seen: dict[str, dict[str, Any]] = {}
  seeds = seeds_of(s, config.seed)
  for scale in scales:
    tokens = tokens_for(s, scale.n_nonembed)
    for x, r, g in points:
      spec, point = _build_point(s, scale, x, r, g, fixed)
      if spec is None:
        dropped.append(point)
        continue
      rids = [run_id(spec, tokens, seed, recipe) for seed in seeds]
      if rids[0] in seen:
        dropped.append({**point, "reason": f"duplicate of {rids[0]}", "same_as": seen[rids[0]]})
        continue
      requested = {"d_over_sqrt_n": x, "r": r, "gqa": g}
      for rid, seed in zip(rids, seeds, strict=True):
        seen[rid] = requested
        runs.append(Run(rid, spec, tokens, seed, scale, requested))
  return runs, dropped


def seeds_of(s: SweepConfig, default: int) -> list[int]:
  """The seeds every grid point is trained with: `sweep.seeds`, else the config's seed."""
  if s.seeds in ((), [], "", None):
    return [int(default)]
  items = str(s.seeds).split(",") if isinstance(s.seeds, str) else list(s.seeds)
  try:
    seeds = [int(v) for v in items if float(v) == int(float(v)) and int(float(v)) >= 0]
  except (TypeError, ValueError):
    seeds = []
  if len(seeds) != len(items) or len(set(seeds)) != len(seeds):
    raise ValueError(f"sweep.seeds={s.seeds!r} must list distinct non-negative integers, "
                     "e.g. (0, 1, 2)")
  return seeds


# ---------------------------------------------------------------------------- result rows


def _spec_fields(run: Run) -> dict[str, Any]:
  return {
      "run_id": run.run_id,
      **run.spec.summary(),
      "scale": run.scale.n_nonembed,
      "requested": run.requested,
      "tokens_requested": run.tokens,
      "seed": run.seed,
  }


def _host_provenance(config: Any) -> dict[str, Any]:
  """Provenance without touching an accelerator (the parent of isolated runs must not)."""
  return {
      "code_revision": io.code_revision(),
      "host": socket.gethostname(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "config": config.to_dict() if hasattr(config, "to_dict") else config,
  }


def finished_row(run: Run, summary: dict[str, Any], run_config: Any, loss: str,
                 wall_s: float) -> dict[str, Any]:
  """The results row of a run that trained to the end."""
  eval_loss, train_loss = summary.get("eval_loss"), summary.get("final_train_loss")
  if loss == "eval" and eval_loss is not None:
    value, source = eval_loss, "eval"
  else:
    value, source = train_loss, "train"
  provenance = {**_host_provenance(run_config), **(summary.get("provenance") or {}),
                "config": run_config.to_dict()}
  provenance.setdefault("device_kind", summary.get("device_kind"))
  return {
      **_spec_fields(run),
      "status": "finished",
      "tokens": summary.get("tokens", run.tokens),
      "loss": value,
      "loss_source": source,
      "eval_loss": eval_loss,
      "final_train_loss": train_loss,
      "steps": summary.get("steps"),
      "seq_len": summary.get("seq_len"),
      "global_batch_size": summary.get("global_batch_size"),
      "train_wall_s": summary.get("wall_s"),
      "wall_s": wall_s,
      "provenance": provenance,
  }


def failed_row(run: Run, status: str, error: str, run_config: Any, wall_s: float) -> dict[str, Any]:
  """The results row of a run that crashed or was preempted (retried by the next sweep)."""
  return {
      **_spec_fields(run),
      "status": status,
      "tokens": None,
      "loss": None,
      "error": error[-4000:],
      "wall_s": wall_s,
      "provenance": _host_provenance(run_config),
  }


# ------------------------------------------------------------------------------------ running


def run_config(config: Any, run: Run, data_path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The training config of one run: the sweep's config with the run's model, steps and data."""
  c = config.copy_and_resolve_references()
  c.name = run.run_id
  c.mode = "train"
  c.seed = run.seed
  for key, value in run.spec.to_dict().items():
    c.model[key] = value
  c.train.steps = steps_for_tokens(
      run.tokens, int(config.train.global_batch_size) * int(config.data.seq_len))
  c.data.path = str(data_path)
  c.sweep.only = ""
  return c


def _tail(path: pathlib.Path, n_chars: int = 3000) -> str:
  if not path.exists():
    return ""
  with open(path, "rb") as f:
    f.seek(max(0, path.stat().st_size - n_chars))
    return f.read().decode("utf-8", errors="replace")


def _die_with_parent() -> None:
  """In the child: Linux sends it SIGTERM (train checkpoints and stops) if the sweep dies.

  Otherwise a killed sweep would leave its run training unlocked, and a rerun could start a
  second trainer in the same directory.
  """
  try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # Not Linux: no such call; the lock still guards reruns.
    pass
  # SLURM's warning before the time limit (SIGUSR2, sent to every process of the job) is for the
  # parent, which then stops the child with SIGTERM (a checkpoint); by default it would kill it.
  signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def train_in_subprocess(cfg: ml_collections.ConfigDict, run_dir: Any,
                        log_name: str = "train.log",
                        on_start: Callable[[subprocess.Popen], None] | None = None,
                        mode: str = "train") -> dict[str, Any]:
  """Trains one run in a fresh `python -m archscale.main --mode=train` process.

  Output goes to `run_dir/<log_name>`; `on_start` receives the child (to forward signals).
  Raises RuntimeError (with the log's tail) when the process fails and io.WorkdirBusy when
  another trainer holds the run; returns the summary (status "preempted" when the trainer exited
  with `monitor.EXIT_PREEMPTED`). `mode="evaluate"` evaluates the run instead (eval.json). A
  remote `run_dir` (gs://) keeps its config and log there too; the child reads its config from,
  and writes its log to, a local copy (`local_mirror`).
  """
  run_dir.mkdir(parents=True, exist_ok=True)
  doc = f"Training config of sweep run {cfg.name}."
  local = run_dir if io.is_local(run_dir) else io.local_mirror(run_dir)
  config_path = config_lib.write_config_py(local / RUN_CONFIG, cfg, doc)
  if local is not run_dir:
    config_lib.write_config_py(run_dir / RUN_CONFIG, cfg, doc)
  log_path = local / log_name
  cmd = [sys.executable, "-m", "archscale.main", f"--config={config_path}", f"--mode={mode}",
         f"--workdir={run_dir}"]
  with open(log_path, "ab") as log:
    log_start = log.tell()
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
    log.flush()
    child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"},
                             preexec_fn=_die_with_parent)
    if on_start is not None:
      on_start(child)
    rc = child.wait()
  if local is not run_dir:  # This attempt's part of the log joins the remote log.
    with open(log_path, "rb") as f:
      f.seek(log_start)
      io.append_text(run_dir / log_name, f.read().decode("utf-8", errors="replace"))
  if rc == EXIT_PREEMPTED:
    return {"status": "preempted"}
  if rc == EXIT_BUSY:
    raise io.WorkdirBusy(f"{run_dir} is held by another trainer")
  if rc != 0:
    raise RuntimeError(f"--mode={mode} exited with status {rc}; the end of "
                       f"{run_dir / log_name}:\n"
                       f"{_tail(log_path)}")
  return json.loads((run_dir / {"train": "summary.json"}.get(mode, evaluate.EVAL_FILE)).read_text())


def train_in_process(cfg: ml_collections.ConfigDict, run_dir: pathlib.Path) -> dict[str, Any]:
  """Trains one run in this process (`archscale.train.train`)."""
  from archscale import train as train_lib

  run_dir.mkdir(parents=True, exist_ok=True)
  config_lib.write_config_py(run_dir / RUN_CONFIG, cfg, f"Training config of sweep run {cfg.name}.")
  return train_lib.train(cfg, run_dir)


def execute(run: Run, config: Any, workdir: pathlib.Path, data_path: str | os.PathLike,
            trainer: Trainer) -> dict[str, Any] | None:
  """Trains one run and appends its row; None when another process holds the run."""
  run_dir = workdir / RUNS_DIR / run.run_id
  cfg = run_config(config, run, data_path)
  run_dir.mkdir(parents=True, exist_ok=True)
  # The sweep's lock on the run; its trainer holds `.lock` as well, so a trainer left running by
  # a sweep that died cannot be joined by a second one.
  lock = io.WorkdirLock(run_dir, ".sweep.lock")
  try:
    lock.acquire()
  except io.WorkdirBusy:
    logging.info("sweep: %s is being trained by another process; skipping", run.run_id)
    return None
  try:
    prior = run_rows(workdir, [run.run_id])
    if any(r.get("status") == "finished" for r in prior):  # Finished elsewhere meanwhile.
      return None
    start = time.time()
    s = SweepConfig.from_config(config)
    try:
      summary = trainer(cfg, run_dir)
      if s.evaluate and summary.get("status") == "finished":
        evaluate.evaluate_trained_run(cfg, run_dir, s.isolation)
    except io.WorkdirBusy:
      logging.info("sweep: %s is being trained by another process; skipping", run.run_id)
      return None
    except Exception as e:  # noqa: BLE001 - any failure of one run is recorded, not fatal.
      err = "".join(traceback.format_exception_only(type(e), e)).strip()
      row = failed_row(run, "failed", err, cfg, time.time() - start)
    else:
      if summary.get("status") == "finished":
        row = finished_row(run, summary, cfg, s.loss, time.time() - start)
      else:
        row = failed_row(run, str(summary.get("status", "failed")),
                         "training stopped before the last step; rerun the sweep to resume",
                         cfg, time.time() - start)
    row["attempt"] = len(prior) + 1
    record_attempt(workdir, row)
  finally:
    lock.release()
  return row


def frozen_config(config: Any, data_path: str | os.PathLike, only: str = "",
                  launch: str = "local") -> ml_collections.ConfigDict:
  """The sweep's config with the prepared data path fixed, for jobs that must not prepare again."""
  frozen = config.copy_and_resolve_references()
  frozen.sweep.launch = launch
  frozen.sweep.only = only
  frozen.data.path = str(data_path)
  return frozen


def run_command(config_path: os.PathLike | str, workdir: os.PathLike | str) -> list[str]:
  """The argv that trains the run(s) its sweep config selects and writes their result rows."""
  return [sys.executable, "-m", "archscale.main", f"--config={config_path}", "--mode=sweep",
          f"--workdir={workdir}"]


def emit_commands(config: Any, workdir: pathlib.Path, runs: Sequence[Run],
                  data_path: pathlib.Path) -> pathlib.Path:
  """Writes `launch_commands.sh`: one shell-quoted command per run, each with its own config.

  Every run gets `runs/<run_id>/sweep_config.py` (the sweep's config with `sweep.only` set to
  that run and the prepared `data_path` fixed, so no job tokenises the corpus again); its command
  uses the interpreter that ran the sweep, so the commands work from any directory and shell.
  """
  workdir = workdir.resolve()
  config_lib.write_config_py(workdir / SWEEP_CONFIG, frozen_config(config, data_path),
                             f"The configuration of the sweep in {workdir}.")
  lines = ["#!/bin/sh",
           f"# {len(runs)} sweep runs; each trains one architecture into "
           f"{workdir / RUNS_DIR}/<run_id>/",
           "# and writes its row there (results.jsonl is rebuilt from them). Run them in any order",
           "# or concurrently; rerunning a finished one does nothing, an interrupted one resumes."]
  for run in runs:
    config_path = config_lib.write_config_py(
        workdir / RUNS_DIR / run.run_id / SWEEP_CONFIG,
        frozen_config(config, data_path, only=run.run_id),
        f"Sweep run {run.run_id} of the sweep in {workdir}.")
    lines.append(shlex.join(run_command(config_path, workdir)))
  path = workdir / LAUNCH_COMMANDS
  io.write_text_atomic(path, "\n".join(lines) + "\n")
  path.chmod(0o755)
  return path


def _data_path(config: Any, workdir: pathlib.Path) -> pathlib.Path:
  """The prepared dataset the runs read, preparing it (once) from `data.source` if needed."""
  from archscale import data as data_lib
  from archscale import prepare

  path = data_lib.data_path(config, workdir)
  if not (path / data_lib.METADATA).exists():
    if not str(config.data.source).strip():
      raise ValueError(
          "data.path holds no prepared dataset and data.source is empty: set data.source (e.g. "
          "'kjv') or point data.path at a dataset made by --mode=prepare_data")
    prepare.run_prepare_data(config, workdir)
  return io.absolute(path)


def _selected(runs: list[Run], only: str) -> list[Run]:
  ids = [i.strip() for i in str(only).split(",") if i.strip()]
  if not ids:
    return runs
  known = {r.run_id for r in runs}
  unknown = [i for i in ids if i not in known]
  if unknown:
    raise ValueError(f"sweep.only names run ids {unknown} that this sweep does not plan; planned: "
                     f"{sorted(known)}")
  return [r for r in runs if r.run_id in ids]


def _plan_json(runs: Sequence[Run], dropped: Sequence[dict[str, Any]]) -> dict[str, Any]:
  return {
      "runs": [{**_spec_fields(r), "tokens": r.tokens} for r in runs],
      "dropped": list(dropped),
  }


def _train_here(config: Any, s: SweepConfig, workdir: pathlib.Path, selected: Sequence[Run],
                data_path: str | os.PathLike, trainer: Trainer,
                say: Callable[[str], None]) -> dict[str, int]:
  """Trains the unfinished runs one after another; a SIGTERM stops the sweep (exit 75)."""
  counts = {"finished": 0, "failed": 0, "skipped": 0}
  start, trained = time.time(), 0
  for i, run in enumerate(selected, 1):
    tag = f"sweep: [{i}/{len(selected)}] {run.run_id}"
    prior = _latest(run_rows(workdir, [run.run_id])).get(run.run_id, {})
    if prior.get("status") == "finished":
      counts["finished"] += 1
      continue
    if prior and not s.retry_failed:
      say(f"{tag} {prior['status']} before; not retried (sweep.retry_failed=False)")
      counts["failed"] += 1
      continue
    say(f"sweep: [{i}/{len(selected)}] training {run.run_id} (N={run.spec.params_nonembed:,}, "
        f"x={run.spec.d_over_sqrt_n:.3f}, r={run.spec.mlp_attn_ratio:.2f}, gqa={run.spec.gqa}, "
        f"seed {run.seed}, {run.tokens:,} tokens)")
    row = execute(run, config, workdir, data_path, trainer)
    materialise(workdir)
    trained += 1
    elapsed = time.time() - start
    eta = elapsed / trained * (len(selected) - i)
    if row is None:
      counts["skipped"] += 1
      say(f"{tag} is held by another process; skipped")
    elif row["status"] == "finished":
      counts["finished"] += 1
      say(f"{tag} finished: loss {row['loss']:.4f} ({row['loss_source']}) in "
          f"{row['wall_s']:.0f}s; {elapsed:.0f}s so far, ETA {_clock(eta)}")
    elif row["status"] == "preempted":  # SIGTERM: the whole sweep stops, to be rerun.
      say(f"{tag} stopped by SIGTERM and checkpointed; the sweep stops (exit "
          f"{EXIT_PREEMPTED}); rerun it to resume")
      raise SystemExit(EXIT_PREEMPTED)
    else:
      counts["failed"] += 1
      first = row["error"].strip().splitlines()[0] if row["error"].strip() else ""
      say(f"{tag} {row['status']}: {first[:200]} (recorded; continuing)")
  return counts


def _clock(seconds: float) -> str:
  return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


def run_sweep(config: Any, workdir: pathlib.Path, trainer: Trainer | None = None,
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
  """`--mode=sweep`: plans the grid, then trains every unfinished run or emits its command.

  Returns counts: planned, dropped, finished (now or before), failed (this call), skipped (held
  by another process). `trainer` replaces the training call (tests); `progress` receives one line
  per event (the pipeline prints them).
  """
  workdir = io.as_path(workdir, "--workdir")
  say = progress or (lambda msg: logging.info("%s", msg))
  s = SweepConfig.from_config(config)
  if s.launch != "local":  # emit's scripts and submitit's job files are read as local files.
    io.local_only(workdir, "--workdir", f"sweep.launch={s.launch} writes the jobs' scripts "
                  "there; use sweep.launch=local for a remote workdir")
  from archscale import data as data_lib

  data_lib.data_path(config, workdir)  # A data path that cannot be read here fails now.
  evaluate.check_for_sweep(config)  # sweep.evaluate: missing task data fails before training.
  runs, dropped = plan(config)
  if not runs:
    reasons = sorted({d["reason"].split(":")[0] for d in dropped})
    raise ValueError(
        f"the sweep plans no runs: all {len(dropped)} grid points were dropped ({reasons}); widen "
        "sweep.d_over_sqrt_n / sweep.r, or loosen sweep.n_tolerance / sweep.r_tolerance")
  workdir.mkdir(parents=True, exist_ok=True)
  io.write_json_atomic(workdir / PLAN, _plan_json(runs, dropped))
  for d in dropped:
    logging.info("sweep: dropped N=%.4g x=%.3g r=%.3g gqa=%d: %s", d["n_nonembed"],
                 d["d_over_sqrt_n"], d["r"], d["gqa"], d["reason"])
  say(f"sweep: {len(runs)} runs planned over {len({r.scale for r in runs})} scale(s), "
      f"{len(dropped)} grid points dropped (see {workdir / PLAN})")

  data_path = _data_path(config, workdir)
  if s.launch == "emit":
    path = emit_commands(config, workdir, runs, data_path)
    say(f"sweep: wrote {len(runs)} launch commands to {path}")
    return {"planned": len(runs), "dropped": len(dropped), "emitted": len(runs)}

  selected = _selected(runs, s.only)
  from archscale import slurm

  if s.launch == "slurm":
    return {"dropped": len(dropped),
            **slurm.submit_sweep(config, workdir, selected, data_path, say)}
  if slurm.launched_as_tasks():  # An emitted command on every task of a multi-process job.
    return {"dropped": len(dropped), **slurm.train_tasks(config, workdir, selected, say)}
  if trainer is None:
    trainer = train_in_subprocess if s.isolation == "process" else train_in_process
  counts = {"planned": len(runs), "dropped": len(dropped),
            **_train_here(config, s, workdir, selected, data_path, trainer, say)}
  table = materialise(workdir)
  say(f"sweep: {counts['finished']}/{len(selected)} runs finished, {counts['failed']} failed, "
      f"{counts['skipped']} held elsewhere; table {table}")
  return counts
