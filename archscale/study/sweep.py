"""Architecture sweeps (`--mode=sweep`): a grid of ArchSpecs per scale, trained here or emitted.

For every scale N (with the depth and head size the paper fixes per scale) and every point of the
`sweep.d_over_sqrt_n` x `sweep.r` x `sweep.gqa` grid, `ArchSpec.from_budget` builds the nearest
feasible architecture. Points that cannot be built, land too far from the requested N or r, or
repeat an architecture already planned are dropped, and `sweep_plan.json` says which and why.

Each planned run (archscale.study.planning) has a stable id derived from (ArchSpec, tokens, seed)
and trains into `WORKDIR/runs/<run_id>/` from a standalone config file written there
(`run_config.py`), so a run can be repeated by hand and an interrupted one resumes from its
checkpoint; archscale.study.runs trains, evaluates and records one attempt at a run. With
`sweep.launch="local"` the runs train here one after another; with "emit" the sweep writes
`launch_commands.sh`, one shell-quoted command per run (its own config file in
`runs/<run_id>/sweep_config.py`, the interpreter that ran the sweep), each of which trains that
single run (`sweep.only`) and records its row, so a cluster can run them in any order and
concurrently; with "slurm" the runs are submitted as SLURM jobs (archscale.study.slurm).

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

Row fields (what `table` reads): `params_nonembed`, `tokens` (tokens actually trained),
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

import os
import pathlib
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from archscale.core import config_lib, io
from archscale.core.exits import EXIT_PREEMPTED
from archscale.core.settings import SweepConfig
from archscale.interop import evaluate
from archscale.study import attempts, planning, runner, slurm
from archscale.study.attempts import RUNS_DIR, materialise, run_rows
from archscale.study.attempts import latest as _latest
from archscale.study.planning import (  # noqa: F401 - the sweep's plan, as tests and tools read it
  PLAN,
  RUN_CONFIG,
  SWEEP_CONFIG,
  Run,
  frozen_config,
  parse_count,
  parse_scales,
  plan,
  plan_json,
  run_config,
  run_id,
  selected,
)
from archscale.study.progress import SweepProgress
from archscale.study.runner import Trainer

LAUNCH_COMMANDS = "launch_commands.sh"






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


def _check_rows_data(workdir: Any, fingerprint: str, data_path: Any) -> None:
  """Refuses a sweep whose finished runs trained on another dataset than `data_path` holds now
  (another corpus prepared into the same folder): their rows would be reused as if they had not."""
  other = sorted(rid for rid, row in attempts.run_states(workdir).items()
                 if row.get("status") == "finished"
                 and row.get("data_fingerprint") not in (None, fingerprint))
  if other:
    raise ValueError(
        f"{len(other)} finished run(s) of this sweep (e.g. {other[0]}) trained on another dataset "
        f"than data.path={str(data_path)!r} holds now (fingerprint {fingerprint}); point data.path "
        "back at that dataset, or run the sweep in a new --workdir")


def prepared_data_path(config: Any, workdir: pathlib.Path) -> pathlib.Path:
  """The prepared dataset the runs read, preparing it (once) from `data.source` if needed."""
  from archscale.data import batches as data_lib
  from archscale.data import prepare

  path = data_lib.data_path(config, workdir)
  if not (path / data_lib.METADATA).exists():
    if not str(config.data.source).strip():
      raise ValueError(
          "data.path holds no prepared dataset and data.source is empty: set data.source (e.g. "
          "'kjv') or point data.path at a dataset made by --mode=prepare_data")
    prepare.run_prepare_data(config, workdir)
  return io.absolute(path)


def _train_here(config: Any, s: SweepConfig, workdir: pathlib.Path, selected: Sequence[Run],
                data_path: str | os.PathLike, trainer: Trainer,
                say: Callable[[str], None]) -> dict[str, Any]:
  """Trains the unfinished runs one after another; a SIGTERM stops the sweep (exit 75).
  Returns the counts and, in `unfinished`, each run that did not finish: run_id, status, error."""
  counts: dict[str, Any] = {"finished": 0, "failed": 0, "skipped": 0, "unfinished": []}
  missed = lambda run, status, error: counts["unfinished"].append(
      {"run_id": run.run_id, "status": status, "error": error.strip().splitlines()[0][:200]
       if error.strip() else ""})
  progress = SweepProgress(selected, int(config.data.seq_len), say)
  before = _latest(run_rows(workdir, [r.run_id for r in selected]))
  status = {r.run_id: "finished" if before.get(r.run_id, {}).get("status") == "finished"
            else "queued" for r in selected}
  progress.line(status)  # the runs finished before this session do not enter the ETA
  for i, run in enumerate(selected, 1):
    tag = f"sweep: [{i}/{len(selected)}] {run.run_id}"
    prior = _latest(run_rows(workdir, [run.run_id])).get(run.run_id, {})
    if prior.get("status") == "finished":
      counts["finished"] += 1
      status[run.run_id] = "finished"
      continue
    if prior and not s.retry_failed:
      say(f"{tag} {prior['status']} before; not retried (sweep.retry_failed=False)")
      counts["failed"] += 1
      status[run.run_id] = "failed"
      missed(run, prior["status"], prior.get("error") or "")
      continue
    say(f"sweep: [{i}/{len(selected)}] training {run.run_id} (N={run.spec.params_nonembed:,}, "
        f"x={run.spec.d_over_sqrt_n:.3f}, r={run.spec.mlp_attn_ratio:.2f}, gqa={run.spec.gqa}, "
        f"seed {run.seed}, {run.tokens:,} tokens)")
    row = runner.execute(run, config, workdir, data_path, trainer)
    materialise(workdir)
    status[run.run_id] = "failed" if row is None or row["status"] != "finished" else "finished"
    if row is None:
      counts["skipped"] += 1
      missed(run, "held", "another process is training it")
      say(f"{tag} is held by another process; skipped")
    elif row["status"] == "finished":
      counts["finished"] += 1
      say(f"{tag} finished: loss {row['loss']:.4f} ({row['loss_source']}) in "
          f"{row['wall_s']:.0f}s; {progress.line(status)}")
    elif row["status"] == "preempted":  # SIGTERM: the whole sweep stops, to be rerun.
      say(f"{tag} stopped by SIGTERM and checkpointed; the sweep stops (exit "
          f"{EXIT_PREEMPTED}); rerun it to resume")
      raise SystemExit(EXIT_PREEMPTED)
    else:
      counts["failed"] += 1
      missed(run, row["status"], row["error"])
      say(f"{tag} {row['status']}: {counts['unfinished'][-1]['error']} (recorded; continuing); "
          f"{progress.line(status)}")
  return counts


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
  from archscale.data import batches as data_lib

  data_lib.data_path(config, workdir)  # A data path that cannot be read here fails now.
  evaluate.check_for_sweep(config)  # sweep.evaluate: missing task data fails before training.
  runs, dropped = planning.plan(config)
  if not runs:
    reasons = sorted({d["reason"].split(":")[0] for d in dropped})
    raise ValueError(
        f"the sweep plans no runs: all {len(dropped)} grid points were dropped ({reasons}); widen "
        "sweep.d_over_sqrt_n / sweep.r, or loosen sweep.n_tolerance / sweep.r_tolerance")
  workdir.mkdir(parents=True, exist_ok=True)
  io.write_json_atomic(workdir / PLAN, plan_json(runs, dropped))
  for d in dropped:
    logging.info("sweep: dropped N=%.4g x=%.3g r=%.3g gqa=%d: %s", d["n_nonembed"],
                 d["d_over_sqrt_n"], d["r"], d["gqa"], d["reason"])
  say(f"sweep: {len(runs)} runs planned over {len({r.scale for r in runs})} scale(s), "
      f"{len(dropped)} grid points dropped (see {workdir / PLAN})")

  data_path = prepared_data_path(config, workdir)
  _check_rows_data(workdir, data_lib.fingerprint(data_lib.dataset_info(data_path)), data_path)
  if s.launch == "emit":
    path = emit_commands(config, workdir, runs, data_path)
    say(f"sweep: wrote {len(runs)} launch commands to {path}")
    return {"planned": len(runs), "dropped": len(dropped), "emitted": len(runs)}

  chosen = selected(runs, s.only)
  if s.launch == "slurm":
    return {"dropped": len(dropped),
            **slurm.submit_sweep(config, workdir, chosen, data_path, say)}
  if slurm.launched_as_tasks():  # An emitted command on every task of a multi-process job.
    return {"dropped": len(dropped), **slurm.train_tasks(config, workdir, chosen, say)}
  if trainer is None:
    trainer = runner.train_in_subprocess if s.isolation == "process" else runner.train_in_process
  counts = {"planned": len(runs), "dropped": len(dropped),
            **_train_here(config, s, workdir, chosen, data_path, trainer, say)}
  table = materialise(workdir)
  say(f"sweep: {counts['finished']}/{len(chosen)} runs finished, {counts['failed']} failed, "
      f"{counts['skipped']} held elsewhere; table {table}")
  if counts["unfinished"]:
    say(unfinished_table(counts["unfinished"]))
  return counts


def unfinished_table(unfinished: Sequence[dict[str, Any]]) -> str:
  """The runs a sweep did not finish, one line each: run id, status and the error's first line."""
  lines = [f"sweep: {len(unfinished)} run(s) not finished (the mode exits non-zero):"]
  lines += [f"  {u['run_id']:44} {u['status']:9} {u['error']}" for u in unfinished]
  return "\n".join(lines)
