"""One attempt at one sweep run, the same wherever it runs: train it (in a fresh process or this
one), evaluate it when `sweep.evaluate` asks, and record the attempt's row.

The local sweep (`execute`, under the run's `.sweep.lock`), the SLURM job (archscale.study.slurm)
and `--mode=evaluate` all go through here. `sweep.isolation="process"` trains each run in a fresh
`python -m archscale.main --mode=train` process: a crash, a hang killed by the scheduler or an
out-of-memory in one run cannot take the sweep down or leak device memory into the next run.
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections
from absl import logging

from archscale.core import config_lib, io
from archscale.core.exits import EXIT_BUSY, EXIT_PREEMPTED
from archscale.core.settings import SweepConfig
from archscale.interop import evaluate
from archscale.study.attempts import (
  RESULTS,
  RUNS_DIR,
  failed_row,
  finished_row,
  materialise,
  record_attempt,
  run_rows,
)
from archscale.study.planning import RUN_CONFIG, Run, run_config

_POLL_S = 5.0        # how often a waiting sweep looks at its child's log
_STOP_GRACE_S = 60.0  # a stalled child's time to stop on SIGTERM before SIGKILL

# trainer(run_config, run_dir) -> the train summary (dict with "status"); raises on failure.
Trainer = Callable[[ml_collections.ConfigDict, pathlib.Path], dict[str, Any]]


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
    rc = _wait_while_talking(child, log_path, SweepConfig.from_config(cfg).stall_s, mode)
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


def _wait_while_talking(child: subprocess.Popen, log_path: pathlib.Path, stall_s: float,
                        mode: str) -> int:
  """The child's exit status; a child whose log has not grown for `stall_s` seconds (a hung
  collective, a dead peer) is stopped (SIGTERM, then SIGKILL) and a RuntimeError says so."""
  size, changed = -1, time.monotonic()
  while True:
    try:
      return child.wait(timeout=min(_POLL_S, stall_s or _POLL_S))
    except subprocess.TimeoutExpired:
      pass
    now_size = log_path.stat().st_size
    if now_size != size:
      size, changed = now_size, time.monotonic()
    elif stall_s and time.monotonic() - changed > stall_s:
      child.terminate()
      try:
        child.wait(timeout=_STOP_GRACE_S)
      except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
      raise RuntimeError(
          f"--mode={mode} (pid {child.pid}) wrote nothing to {log_path} for {stall_s:g}s and "
          "was stopped; if it was only slow, raise sweep.stall_s (0 = wait forever)")


def train_in_process(cfg: ml_collections.ConfigDict, run_dir: pathlib.Path) -> dict[str, Any]:
  """Trains one run in this process (`archscale.train.trainer.train`)."""
  from archscale.train import trainer as train_lib

  run_dir.mkdir(parents=True, exist_ok=True)
  config_lib.write_config_py(run_dir / RUN_CONFIG, cfg, f"Training config of sweep run {cfg.name}.")
  return train_lib.train(cfg, run_dir)


def execute(run: Run, config: Any, workdir: pathlib.Path, data_path: str | os.PathLike,
            trainer: Trainer) -> dict[str, Any] | None:
  """Trains one run here and records its row; None when another process holds the run."""
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
    if any(r.get("status") == "finished" for r in run_rows(workdir, [run.run_id])):
      return None  # Finished elsewhere meanwhile.
    s = SweepConfig.from_config(config)
    outcome = attempt(cfg, run_dir, trainer, s.isolation if s.evaluate else None)
    if outcome.busy:
      logging.info("sweep: %s is being trained by another process; skipping", run.run_id)
      return None
    return record(workdir, run, outcome.row(run, cfg, s.loss))
  finally:
    lock.release()


class Outcome(NamedTuple):
  """What one attempt at a run came to: its train summary, or the error that ended it."""

  summary: dict[str, Any]
  error: str | None
  wall_s: float
  busy: bool = False

  @property
  def status(self) -> str:
    return "failed" if self.error else str(self.summary.get("status", "failed"))

  def row(self, run: Run, cfg: Any, loss: str) -> dict[str, Any]:
    """The attempt's results row (finished, failed or preempted)."""
    if self.status == "finished":
      return finished_row(run, self.summary, cfg, loss, self.wall_s)
    error = self.error or "training stopped before the last step; rerun the sweep to resume"
    return failed_row(run, self.status, error, cfg, self.wall_s)


def attempt(cfg: Any, run_dir: Any, trainer: Trainer, evaluate_in: str | None) -> Outcome:
  """Trains one run (resuming its checkpoint) and, when `evaluate_in` names an isolation and
  the run finished, evaluates it. Any failure is caught: it is the attempt's outcome."""
  start = time.time()
  try:
    summary = trainer(cfg, run_dir)
    if evaluate_in and summary.get("status") == "finished":
      evaluate_trained_run(cfg, run_dir, evaluate_in)
  except io.WorkdirBusy:
    return Outcome({}, "held by another trainer", time.time() - start, busy=True)
  except Exception as e:  # noqa: BLE001 - any failure of one run is recorded, not fatal.
    error = "".join(traceback.format_exception_only(type(e), e)).strip()
    return Outcome({}, error, time.time() - start)
  return Outcome(summary, None, time.time() - start)


def record(workdir: Any, run: Run, row: dict[str, Any], **extra: Any) -> dict[str, Any]:
  """Numbers the attempt and writes its row as its own file; returns the row."""
  row = {**row, **extra, "attempt": len(run_rows(workdir, [run.run_id])) + 1}
  record_attempt(workdir, row)
  return row


def evaluate_trained_run(cfg: Any, run_dir: Any, isolation: str) -> dict[str, Any]:
  """`sweep.evaluate`: a trained run's eval.json (reused when current), made in a fresh process
  when runs are isolated, so no model or device memory of the evaluation stays behind."""
  try:
    if isolation == "process":
      return train_in_subprocess(cfg, run_dir, "eval.log", mode="evaluate")
    return evaluate.run_evaluate(cfg, run_dir)
  except Exception as e:
    raise RuntimeError(f"the run trained, but evaluating it failed (rerun the sweep to evaluate "
                       f"it again): {e}") from e


def run_evaluate(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  """`--mode=evaluate`: archscale.interop.evaluate's, then, for a run of a sweep, its sweep's
  results table rebuilt so that the run's row shows the evaluation."""
  summary = evaluate.run_evaluate(config, workdir)
  run_dir = io.as_path(workdir, "--workdir")
  run_dir = run_dir.resolve() if io.is_local(run_dir) else run_dir
  sweep_dir = run_dir.parent.parent
  if run_dir.parent.name == RUNS_DIR and (sweep_dir / RESULTS).exists():
    materialise(sweep_dir)
  return summary
