"""`sweep.launch="slurm"`: the runs of a sweep as SLURM jobs, and a driver that may go away.

`submit_sweep` reconciles three sources each time it is called: the plan, the scheduler's job
states (`sacct`, and `squeue` for jobs too new for the accounting database) and the runs' own
result rows (`runs/<id>/attempts/`). A run with a finished row is done; a run whose last job is
pending or running is left alone; every other run (never submitted, or whose job ended without a
finished row: failed, cancelled, timed out, lost with its node) is submitted again, at most
`sweep.max_attempts` times in all. New jobs go in as one job array (every run of a sweep asks
for the same `sweep.slurm` resources). The job ids of every run are kept in
`WORKDIR/slurm/jobs.json`, so the driver may exit (`sweep.wait=False`, the default) and be rerun
at any time; with `sweep.wait=True` it polls until no job is left, resubmitting as it goes.

Each job runs `SlurmRun` under `srun`: one task per JAX process. Every task starts the training
child (`python -m archscale.main --mode=train`), which finds the other tasks through SLURM's
environment (`archscale.model.sharding`) and initialises `jax.distributed`; task 0 writes the row.
Jobs are submitted with `--requeue` and SIGUSR2 `sweep.slurm.signal_s` before the time limit:
on that signal (or the SIGTERM of a preemption or `scontrol requeue`) the child checkpoints and
exits `exits.EXIT_PREEMPTED`, and the job is requeued, to resume from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from archscale.core import config_lib, io
from archscale.core.exits import EXIT_PREEMPTED
from archscale.core.settings import SlurmConfig, SweepConfig
from archscale.study import attempts, planning, runner
from archscale.study.planning import Run
from archscale.study.progress import SweepProgress

JOBS = "jobs.json"
SLURM_DIR = "slurm"
ACTIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                    "COMPLETING", "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED"})
STATUSES = ("planned", "queued", "running", "finished", "failed", "unknown")
# A job whose state could not be read: squeue failed (the controller did not answer) and sacct
# did not know it. Its run is "unknown": waited on, never resubmitted on that basis.
NO_ANSWER = "NO_ANSWER"
ASK_TRIES = 3        # a scheduler query is tried this often before it counts as unanswered
ASK_BACKOFF_S = 1.0  # seconds before the second try (twice that before the third)
INTENT = "submitting.json"    # a submission in progress: its runs and the job name it uses
DRIVER_LOCK = ".driver.lock"  # held by the one driver of a sweep


# ------------------------------------------------------------------------------------ the job


@dataclasses.dataclass
class SlurmRun:
  """What one SLURM job runs on every task: one sweep run (pickled by submitit)."""

  workdir: str
  run_id: str
  config_path: str
  run: Run | None = None  # the run itself (verify's runs are not in the sweep's plan)

  def __post_init__(self):
    self._child = None

  def __getstate__(self) -> dict[str, Any]:
    return {k: v for k, v in self.__dict__.items() if k != "_child"}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state, _child=None)

  def __call__(self) -> str:
    """Trains the run (resuming its checkpoint); task 0 records the row. Returns the status."""
    config = config_lib.load_config_file(self.config_path)
    run = self.run or next(r for r in planning.plan(config)[0] if r.run_id == self.run_id)
    status = train_as_task(config, run, pathlib.Path(self.workdir),
                           on_start=lambda child: setattr(self, "_child", child))
    if status == "failed":
      raise RuntimeError(f"sweep run {run.run_id} failed; see its train.log")
    return status

  def checkpoint(self) -> Any:
    """On SIGUSR2 before the time limit: the child checkpoints and stops; submitit requeues."""
    import submitit

    child = self._child
    if child is not None and child.returncode is None:
      child.send_signal(signal.SIGTERM)
      # Not child.wait(): this handler interrupted a wait on the same child, which holds its lock.
      _wait_until_exited(child.pid, timeout_s=600)
    return submitit.helpers.DelayedSubmission(self)


def _wait_until_exited(pid: int, timeout_s: float) -> None:
  """Waits until process `pid` has exited (a zombie or gone), without reaping it (Linux)."""
  end = time.time() + timeout_s
  while time.time() < end:
    try:
      state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
      return
    if state in ("Z", "X"):
      return
    time.sleep(0.2)


def launched_as_tasks() -> bool:
  """Whether this process is one of several tasks of a launcher (srun -n 2, a TPU pod)."""
  from archscale.model import sharding

  return sharding.detect_cluster() is not None


def task_rank() -> int:
  """This process's index among the tasks of a multi-process launch (0 when alone)."""
  for var in ("SLURM_PROCID", "TPU_WORKER_ID", "OMPI_COMM_WORLD_RANK"):
    if os.environ.get(var, "").isdigit():
      return int(os.environ[var])
  return 0


def train_as_task(config: Any, run: Run, workdir: pathlib.Path,
                  on_start: Callable[[subprocess.Popen], None] | None = None) -> str:
  """One task's part of a run: every task trains (one `jax.distributed` process each), task 0
  evaluates it (`sweep.evaluate`) and records the row. No lock: the scheduler runs each run once.
  Returns the run's status."""
  rank = task_rank()
  s = SweepConfig.from_config(config)
  cfg = planning.run_config(config, run, config.data.path)
  run_dir = workdir / attempts.RUNS_DIR / run.run_id
  log = "train.log" if rank == 0 else f"train.task{rank}.log"
  trainer = lambda c, d: runner.train_in_subprocess(c, d, log, on_start=on_start)
  outcome = runner.attempt(cfg, run_dir, trainer, "process" if rank == 0 and s.evaluate else None)
  if outcome.busy:  # Another job of this run trains it: not an attempt of this one, not a failure.
    return "busy"
  if outcome.status == "preempted":
    _requeue_if_running()
    return "preempted"
  if rank != 0:
    return outcome.status
  row = runner.record(workdir, run, outcome.row(run, cfg, s.loss), slurm_job_id=_job_id())
  attempts.materialise(workdir)
  return row["status"]


def train_tasks(config: Any, workdir: pathlib.Path, runs: Sequence[Run],
                say: Callable[[str], None]) -> dict[str, Any]:
  """`--mode=sweep` started on every task of a multi-process launch (an emitted command under
  `launch/gpu_slurm.sh` or `launch/tpu_pod.sh`): the selected runs, each by all tasks together.

  Exits with `exits.EXIT_PREEMPTED` when a run was stopped to be resumed, so the launcher
  requeues the job.
  """
  done = {rid for rid, row in attempts.run_states(workdir).items()
          if row.get("status") == "finished"}
  counts = {"planned": len(runs), "finished": 0, "failed": 0}
  for run in runs:
    status = "finished" if run.run_id in done else train_as_task(config, run, workdir)
    if status == "preempted":
      say(f"sweep: {run.run_id} stopped to be resumed; exiting {EXIT_PREEMPTED}")
      raise SystemExit(EXIT_PREEMPTED)
    counts["finished" if status == "finished" else "failed"] += 1
    say(f"sweep: task {task_rank()}: {run.run_id} {status}")
  return counts


def _job_id() -> str:
  array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
  return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


def _requeue_if_running() -> None:
  """Requeues this job unless the scheduler already is (a preemption or `scontrol requeue`)."""
  if int(os.environ.get("SLURM_PROCID", "0")) != 0 or "SLURM_JOB_ID" not in os.environ:
    return
  job = os.environ["SLURM_JOB_ID"]
  state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                         text=True, timeout=60).stdout.strip()
  if state == "RUNNING":
    subprocess.run(["scontrol", "requeue", job], capture_output=True, timeout=60)


# -------------------------------------------------------------------------------- scheduler


def _ask(cmd: list[str]) -> str | None:
  """A scheduler command's output, or None when it failed `ASK_TRIES` times in a row (controller
  down, no accounting)."""
  for attempt in range(ASK_TRIES):
    if attempt:
      time.sleep(ASK_BACKOFF_S * attempt)
    try:
      done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
      continue
    if done.returncode == 0:
      return done.stdout
  return None


def job_states(job_ids: Sequence[str]) -> dict[str, str]:
  """The scheduler's state of each job id: "UNKNOWN" for a job neither sacct nor squeue knows
  (gone), `NO_ANSWER` when squeue failed and sacct did not know it either."""
  ids = sorted(set(job_ids))
  if not ids:
    return {}
  out: dict[str, str] = {}
  acct = _ask(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(ids)])
  for line in (acct or "").splitlines():
    job, _, state = line.partition("|")
    if job in ids:
      out[job] = state.split()[0] if state.strip() else "UNKNOWN"
  queue = _ask(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(ids)])
  for line in (queue or "").splitlines():  # Newer than sacct (the database lags the controller).
    job, _, state = line.partition("|")
    if job in ids and state.strip():
      out[job] = state.strip()
  return {j: out.get(j, "UNKNOWN" if queue is not None else NO_ANSWER) for j in ids}


def executor(s: SlurmConfig, folder: pathlib.Path, name: str) -> Any:
  """A submitit SlurmExecutor for the config's resources: requeueable, signalled before the end."""
  import submitit

  ex = submitit.SlurmExecutor(folder=str(folder / "%j"), max_num_timeout=1000)
  params: dict[str, Any] = dict(
      job_name=name, time=s.time_min, nodes=s.nodes, ntasks_per_node=s.tasks_per_node,
      cpus_per_task=s.cpus_per_task, signal_delay_s=s.signal_s, stderr_to_stdout=True,
      additional_parameters={"requeue": True, **s.sbatch_extra()})
  for key in ("partition", "account", "qos"):
    if getattr(s, key):
      params[key] = getattr(s, key)
  if s.gpus_per_node:
    params["gpus_per_node"] = s.gpus_per_node
  ex.update_parameters(**params)
  return ex


# ----------------------------------------------------------------------------------- driver


def _load_jobs(workdir: pathlib.Path) -> dict[str, list[str]]:
  path = workdir / SLURM_DIR / JOBS
  return json.loads(path.read_text()) if path.exists() else {}


def reconcile(runs: Sequence[Run], workdir: pathlib.Path, jobs: dict[str, list[str]],
              max_attempts: int) -> dict[str, dict[str, Any]]:
  """Each run's status (planned, queued, running, finished, failed, unknown), last job, and
  whether to submit it now."""
  # The scheduler first, the rows second: a job writes its row before it ends, so a job that
  # has left the queue by now has its row visible below.
  states = job_states([job for ids in jobs.values() for job in ids])
  rows = attempts.run_states(workdir)
  out = {}
  for run in runs:
    ids = jobs.get(run.run_id, [])
    # The job that speaks for the run: an active one (any of its submissions), else the last.
    job = next((j for j in reversed(ids) if states.get(j) in ACTIVE),
               next((j for j in reversed(ids) if states.get(j) == NO_ANSWER),
                    ids[-1] if ids else ""))
    state = states.get(job, "") if job else ""
    row = rows.get(run.run_id, {})
    if row.get("status") == "finished":
      status = "finished"
    elif state in ACTIVE:
      status = "running" if state in ("RUNNING", "COMPLETING", "SIGNALING") else "queued"
    elif state == NO_ANSWER:
      status = "unknown"
    elif not ids:
      status = "planned"
    else:
      status = "failed"
    submit = status == "planned" or (status == "failed" and len(ids) < max_attempts)
    out[run.run_id] = {"status": status, "job": job, "state": state, "attempts": len(ids),
                       "submit": submit, "error": row.get("error", "")}
  return out


def status_table(runs: Sequence[Run], view: dict[str, dict[str, Any]]) -> str:
  """One line per run (id, status, scheduler state, job id, submissions) and the totals."""
  lines = [f"{'run':44} {'status':9} {'scheduler':12} {'job':12} submissions"]
  for run in runs:
    v = view[run.run_id]
    lines.append(f"{run.run_id:44} {v['status']:9} {v['state'] or '-':12} {v['job'] or '-':12} "
                 f"{v['attempts']}")
  counts = {s: sum(v["status"] == s for v in view.values()) for s in STATUSES}
  lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
  return "\n".join(lines)


def _submit(config: Any, workdir: pathlib.Path, runs: Sequence[Run],
            data_path: pathlib.Path, jobs: dict[str, list[str]]) -> list[str]:
  """Submits `runs` as one job array; records and returns their job ids.

  The intent (runs, and the job name unique to this submission) is written before `sbatch`, so
  a driver killed before it records the ids leaves what `_adopt` needs to find the jobs.
  """
  s = SweepConfig.from_config(config)
  calls = []
  for run in runs:
    path = config_lib.write_config_py(
        workdir / attempts.RUNS_DIR / run.run_id / planning.SWEEP_CONFIG,
        planning.frozen_config(config, data_path, only=run.run_id),
        f"Sweep run {run.run_id} of the sweep in {workdir}.")
    calls.append(SlurmRun(str(workdir), run.run_id, str(path), run))
  name = f"archscale-{config.name}-{uuid.uuid4().hex[:8]}"
  io.write_json_atomic(workdir / SLURM_DIR / INTENT,
                       {"job_name": name, "runs": [r.run_id for r in runs]})
  ids = sbatch(s.slurm, workdir, name, calls)
  _record(workdir, jobs, [r.run_id for r in runs], ids)
  return ids


def sbatch(s: SlurmConfig, workdir: pathlib.Path, name: str,
           calls: Sequence[SlurmRun]) -> list[str]:
  """Submits `calls` as one job array named `name`; their job ids, in order."""
  ex = executor(s, workdir / SLURM_DIR, name)
  with ex.batch():
    submitted = [ex.submit(call) for call in calls]
  return [str(job.job_id) for job in submitted]


def _record(workdir: pathlib.Path, jobs: dict[str, list[str]], run_ids: Sequence[str],
            ids: Sequence[str]) -> None:
  for run_id, job in zip(run_ids, ids, strict=True):
    jobs.setdefault(run_id, []).append(job)
  io.write_json_atomic(workdir / SLURM_DIR / JOBS, jobs)
  (workdir / SLURM_DIR / INTENT).unlink(missing_ok=True)


def _adopt(workdir: pathlib.Path, jobs: dict[str, list[str]], say: Callable[[str], None]) -> bool:
  """Records the jobs of a submission that a killed driver did not record (found by their
  unique name). False when the scheduler could not tell: nothing may be submitted then."""
  path = workdir / SLURM_DIR / INTENT
  if not path.exists():
    return True
  intent = json.loads(path.read_text())
  found = _jobs_named(intent["job_name"])
  if found is None:
    say("sweep: the scheduler did not answer whether an interrupted submission reached it; "
        "submitting nothing until it does")
    return False
  index = lambda job: int(job.partition("_")[2] or 0)
  ids = sorted(found, key=index)
  if ids and len(ids) == len(intent["runs"]) and [index(j) for j in ids] == list(range(len(ids))):
    say(f"sweep: adopted job(s) {', '.join(ids)} of an interrupted submission")
    _record(workdir, jobs, intent["runs"], ids)
  elif not ids:  # The driver stopped before sbatch: nothing was submitted.
    path.unlink()
  else:
    raise io.ReportedError(f"sweep: the interrupted submission {intent['job_name']} has jobs "
                           f"{ids} for {len(intent['runs'])} runs; cancel them (scancel --name="
                           f"{intent['job_name']}) and delete {path}")
  return True


def _jobs_named(name: str) -> list[str] | None:
  """Job ids (array tasks as A_i) named `name`, queued or ended; None when squeue failed."""
  queue = _ask(["squeue", "-h", "-r", "-n", name, "-o", "%i"])
  if queue is None:
    return None
  acct = _ask(["sacct", "-n", "-X", "-P", "-S", "now-30days", f"--name={name}", "-o", "JobID"])
  return sorted({j for j in (queue + (acct or "")).split() if re.fullmatch(r"\d+(_\d+)?", j)})


def _stuck(view: dict[str, dict[str, Any]]) -> str:
  jobs = [f"{v['job']} ({v['state'] or v['status']})" for v in view.values()
          if v["status"] in ("queued", "running", "unknown")]
  return ", ".join(jobs[:10]) + (f" and {len(jobs) - 10} more" if len(jobs) > 10 else "")


def submit_sweep(config: Any, workdir: pathlib.Path, runs: Sequence[Run],
                 data_path: pathlib.Path, say: Callable[[str], None]) -> dict[str, Any]:
  """Reconciles and submits what is missing; with `sweep.wait` polls until no job is left."""
  s = SweepConfig.from_config(config)
  workdir = workdir.resolve()
  (workdir / SLURM_DIR).mkdir(parents=True, exist_ok=True)
  driver = io.WorkdirLock(workdir / SLURM_DIR, DRIVER_LOCK)
  driver.acquire()  # One driver per sweep: a second stops here, naming the first.
  try:
    return _drive(config, s, workdir, runs, data_path, say)
  finally:
    driver.release()


def _drive(config: Any, s: SweepConfig, workdir: pathlib.Path, runs: Sequence[Run],
           data_path: pathlib.Path, say: Callable[[str], None]) -> dict[str, Any]:
  jobs = _load_jobs(workdir)
  progress = SweepProgress(runs, int(config.data.seq_len), say)
  submitted: list[str] = []
  said_unknown, seen, changed = 0, None, time.monotonic()
  while True:
    may_submit = _adopt(workdir, jobs, say)
    view = reconcile(runs, workdir, jobs, s.max_attempts)
    now = {run_id: (v["status"], v["state"], v["job"]) for run_id, v in view.items()}
    if now != seen:
      seen, changed = now, time.monotonic()
    elif time.monotonic() - changed > s.wait_s:
      say(status_table(runs, view))
      raise io.ReportedError(
          f"sweep: no run changed status for {s.wait_s:g}s (sweep.wait_s) while waiting on "
          f"SLURM; jobs still queued or running: {_stuck(view)}. They stay in the queue; raise "
          "sweep.wait_s to wait longer, or rerun the sweep later to pick up where they are")
    todo = [r for r in runs if view[r.run_id]["submit"]] if may_submit else []
    if todo:
      ids = _submit(config, workdir, todo, data_path, jobs)
      submitted += ids
      say(f"sweep: submitted {len(todo)} run(s) as SLURM job(s) {', '.join(ids)}")
      view = reconcile(runs, workdir, jobs, s.max_attempts)
    active = [v for v in view.values() if v["status"] in ("queued", "running", "unknown")]
    unknown = sum(v["status"] == "unknown" for v in view.values())
    if unknown and unknown != said_unknown:
      say(f"sweep: the scheduler did not answer for {unknown} job(s) (squeue failed); "
          + ("waiting" if s.wait else "their runs are unknown, not resubmitted"))
    said_unknown = unknown
    progress.update({run_id: v["status"] for run_id, v in view.items()})
    if not s.wait or not active:
      break
    time.sleep(s.poll_s)
  attempts.materialise(workdir)
  say(status_table(runs, view))
  counts = {status: sum(v["status"] == status for v in view.values()) for status in STATUSES}
  return {"planned": len(runs), "submitted": len(submitted), "job_ids": submitted, **counts}
