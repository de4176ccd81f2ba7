"""`sweep.launch="slurm"` against a real one-node SLURM cluster started for this module.

The cluster (slurmctld, slurmd, munge and, for sacct, slurmdbd with MariaDB) is installed and
started by tests/slurm/start-slurm.sh, which needs root; without root these tests are skipped.
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from helpers import REPO, make_config, wait_for, write_tiny_tasks

from archscale.core import config_lib, exits, io
from archscale.study import attempts, slurm, sweep

# One cluster per machine: the test command distributes whole files (--dist loadfile), so every
# test here runs on one worker, against the one cluster this module starts.
SCRIPTS = REPO / "tests" / "slurm"
DEADLINE_S = 420
STEPS = 400  # the requeued run: long enough to be stopped between checkpoints


@pytest.fixture(scope="module")
def cluster():
  """A running one-node cluster with accounting, stopped (and its state removed) at the end."""
  if os.geteuid() != 0:
    pytest.skip("starting a local SLURM cluster needs root (apt-get and the daemons)")
  # Not under pytest's private (0700) temporary folders: munged runs as its own user.
  root = pathlib.Path(tempfile.mkdtemp(prefix="archscale-slurm-"))
  root.chmod(0o755)
  state = root / "state"
  env = dict(os.environ, SLURM_STATE=str(state), SLURM_ACCOUNTING="1", SLURM_CRED_EXPIRE="5")
  start = subprocess.run(["bash", str(SCRIPTS / "start-slurm.sh")], env=env, capture_output=True,
                         text=True, timeout=900)
  if start.returncode != 0:
    subprocess.run(["bash", str(SCRIPTS / "stop-slurm.sh")], env=env, timeout=300)
    pytest.fail(f"the local SLURM cluster did not start:\n{start.stdout[-3000:]}"
                f"\n{start.stderr[-3000:]}")
  previous = os.environ.get("SLURM_CONF")
  os.environ["SLURM_CONF"] = str(state / "slurm.conf")
  yield state
  subprocess.run(["bash", str(SCRIPTS / "stop-slurm.sh")], env=env, timeout=300)
  shutil.rmtree(root, ignore_errors=True)
  if previous is None:
    os.environ.pop("SLURM_CONF", None)
  else:
    os.environ["SLURM_CONF"] = previous


def _config(dataset, **sweep_fields):
  c = make_config(dataset, launch="slurm", poll_s=1.0, **sweep_fields)
  c.sweep.slurm.time_min = 10
  c.sweep.slurm.signal_s = 30
  c.train.eval_every = 0
  return c


def _wait_for(what, predicate, timeout=DEADLINE_S):
  return wait_for(predicate, timeout, what, poll_s=0.5)


def _jobs(workdir):
  return json.loads((workdir / slurm.SLURM_DIR / slurm.JOBS).read_text())


def _finished_rows(workdir):
  return [r for r in io.read_jsonl(workdir / attempts.RESULTS) if r["status"] == "finished"]


def test_a_sweep_runs_as_jobs_survives_a_scancel_and_never_double_submits(
    cluster, dataset, tmp_path):
  c = _config(dataset, d_over_sqrt_n=(0.12,))
  runs, _ = sweep.plan(c)
  assert len(runs) == 4
  lines = []
  counts = sweep.run_sweep(c, tmp_path, progress=lines.append)
  assert counts["submitted"] == 4 and len(set(counts["job_ids"])) == 4
  assert all("_" in j for j in counts["job_ids"]), "one job array for the sweep"
  sbatch = next((tmp_path / slurm.SLURM_DIR).rglob("*_submission.sh")).read_text()
  assert "#SBATCH --requeue" in sbatch and "#SBATCH --signal=USR2@30" in sbatch

  # Rerunning the driver while jobs are queued or running submits nothing new.
  first = _jobs(tmp_path)
  again = sweep.run_sweep(c, tmp_path, progress=lines.append)
  assert again["submitted"] == 0 and _jobs(tmp_path) == first
  assert again["queued"] + again["running"] + again["finished"] == 4
  assert "queued" in lines[-1] and first[runs[0].run_id][0] in lines[-1]

  # Cancel one job once the array runs: the next driver run submits that run, only it. A job
  # still waiting is the victim when there is one, as a running one may finish before scancel.
  def a_victim():
    view = slurm.reconcile(runs, tmp_path.resolve(), first, 3)
    by_state = {v["state"]: rid for rid, v in view.items()}
    return by_state.get("PENDING", by_state.get("RUNNING")) if "RUNNING" in by_state else None

  victim = _wait_for("a running job", a_victim)
  subprocess.run(["scancel", first[victim][0]], check=True)
  _wait_for("the cancellation", lambda: slurm.job_states([first[victim][0]])[
      first[victim][0]] not in slurm.ACTIVE)
  c.sweep.wait = True
  final = sweep.run_sweep(c, tmp_path, progress=lines.append)
  assert final["finished"] == 4 and final["failed"] == 0
  jobs = _jobs(tmp_path)
  assert len(jobs[victim]) == 2 and jobs[victim][0] == first[victim][0]
  assert all(jobs[r.run_id] == first[r.run_id] for r in runs if r.run_id != victim)
  rows = _finished_rows(tmp_path)
  assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in runs)
  assert all(r["loss"] > 0 and r["slurm_job_id"] in jobs[r["run_id"]] for r in rows)
  assert next(r for r in rows if r["run_id"] == victim)["slurm_job_id"] == jobs[victim][1]


def _steps(run_dir):
  return [r["step"] for r in io.read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def _interrupted_run_resumes(dataset, tmp_path, interrupt):
  c = _config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,), tokens=16 * 128 * STEPS)
  c.train.update(checkpoint_every=20, log_every=10)
  (run,) = sweep.plan(c)[0]
  counts = sweep.run_sweep(c, tmp_path)
  (job,) = counts["job_ids"]
  run_dir = tmp_path / attempts.RUNS_DIR / run.run_id
  ckpts = run_dir / "checkpoints"
  _wait_for("a checkpoint", lambda: ckpts.is_dir() and any(
      p.name.isdigit() and int(p.name) > 0 for p in ckpts.iterdir()))
  assert max(_steps(run_dir)) < STEPS
  interrupt(job)
  c.sweep.wait = True
  final = sweep.run_sweep(c, tmp_path)
  assert final["finished"] == 1 and final["submitted"] == 0, "the job itself was requeued"
  log = (run_dir / "train.log").read_text()
  assert "resumed from the checkpoint at step" in log
  steps = _steps(run_dir)
  assert steps.count(10) == 1, "the step count restarted"
  assert max(steps) == STEPS
  (row,) = _finished_rows(tmp_path)
  assert row["steps"] == STEPS and row["slurm_job_id"] == job
  return log


def test_scontrol_requeue_resumes_from_the_checkpoint(cluster, dataset, tmp_path):
  _interrupted_run_resumes(
      dataset, tmp_path, lambda job: subprocess.run(["scontrol", "requeue", job], check=True))


def test_the_time_limit_warning_checkpoints_and_requeues(cluster, dataset, tmp_path):
  # What SLURM sends sweep.slurm.signal_s before the time limit: SIGUSR2 to the job's processes.
  log = _interrupted_run_resumes(dataset, tmp_path, lambda job: subprocess.run(
      ["scancel", "--signal=USR2", job], check=True))
  assert "preempted; checkpointed at step" in log  # The child stopped cleanly, not killed.


def test_a_two_task_run_matches_the_one_process_run(cluster, dataset, tmp_path):
  one = _config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,))
  two = _config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,))
  two.sweep.slurm.tasks_per_node = 2
  one.sweep.wait = two.sweep.wait = True
  sweep.run_sweep(one, tmp_path / "one")
  sweep.run_sweep(two, tmp_path / "two")
  (a,), (b,) = _finished_rows(tmp_path / "one"), _finished_rows(tmp_path / "two")
  assert a["run_id"] == b["run_id"]
  assert b["provenance"]["process_count"] == 2 and a["provenance"]["process_count"] == 1
  run_dir = tmp_path / "two" / attempts.RUNS_DIR / b["run_id"]
  assert (run_dir / "train.task1.log").exists()
  assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=1e-4)
  assert a["steps"] == b["steps"]

  # An emitted command under a two-task srun (what launch/gpu_slurm.sh does): one run, two
  # jax.distributed processes, one row.
  emit = _config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,))
  emit.sweep.launch = "emit"
  sweep.run_sweep(emit, tmp_path / "emit")
  (line,) = [x for x in (tmp_path / "emit" / sweep.LAUNCH_COMMANDS).read_text().splitlines()
             if not x.startswith("#")]
  proc = subprocess.run(["sh", "-c", f"srun --ntasks=2 --cpus-per-task=1 {line}"],
                        capture_output=True, text=True, timeout=DEADLINE_S)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (e,) = _finished_rows(tmp_path / "emit")
  assert e["run_id"] == a["run_id"] and e["provenance"]["process_count"] == 2
  assert e["final_train_loss"] == pytest.approx(a["final_train_loss"], rel=1e-4)


def test_a_run_that_always_fails_is_submitted_max_attempts_times(cluster, dataset, tmp_path):
  # A dataset whose train shards are gone: the driver (which checks only that the dataset was
  # prepared) plans and submits the run, and every job fails when it opens the data.
  broken = tmp_path / "broken"
  shutil.copytree(dataset, broken)
  info = json.loads((broken / "metadata.json").read_text())
  for file, _, _ in info["shards"]["train"]:
    (broken / file).unlink()
  c = _config(broken, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,), max_attempts=2)
  c.sweep.wait = True
  workdir = tmp_path / "sweep"
  (run,) = sweep.plan(c)[0]
  final = sweep.run_sweep(c, workdir)
  assert final["failed"] == 1 and final["finished"] == 0 and final["submitted"] == 2
  jobs = _jobs(workdir)[run.run_id]
  assert len(jobs) == 2 and len(set(jobs)) == 2
  rows = list(io.read_jsonl(workdir / attempts.RESULTS))
  assert [r["status"] for r in rows] == ["failed", "failed"]
  assert sorted(r["slurm_job_id"] for r in rows) == sorted(jobs)
  log = workdir / attempts.RUNS_DIR / run.run_id / "train.log"
  assert "missing or truncated" in log.read_text()

  # The cap holds across driver runs: a rerun reports the failure and submits nothing.
  c.sweep.wait = False
  lines = []
  again = sweep.run_sweep(c, workdir, progress=lines.append)
  assert again["submitted"] == 0 and again["failed"] == 1 and _jobs(workdir)[run.run_id] == jobs
  line = next(x for x in lines[-1].splitlines() if x.startswith(run.run_id)).split()
  assert line[1] == "failed" and line[-1] == "2", lines[-1]
  assert exits.status_of(again) == exits.EXIT_FAILED


FLAKY = """#!/bin/sh
# The first {fails} calls fail as when the controller does not answer; later ones are real.
n=$(cat "{counter}" 2>/dev/null || echo 0)
echo $((n + 1)) > "{counter}"
if [ "$n" -lt {fails} ]; then
  echo "{name}: error: Unable to contact slurm controller (connect failure)" >&2
  exit 1
fi
exec "{real}" "$@"
"""


def test_a_scheduler_that_does_not_answer_is_waited_out_never_resubmitted(
    cluster, dataset, tmp_path):
  """sacct fails every call and squeue its first calls after the submission: the runs are
  unknown, not failed; the driver (the command line, as a script runs it) waits, then exits 0
  with each run finished by its one job."""
  wrappers = tmp_path / "bin"
  wrappers.mkdir()
  for name, fails in (("sacct", 10**6), ("squeue", 4)):
    script = wrappers / name
    script.write_text(FLAKY.format(fails=fails, counter=tmp_path / f"{name}.calls", name=name,
                                   real=shutil.which(name)))
    script.chmod(0o755)
  c = _config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(0.7, 1.5))
  c.sweep.wait = True
  config = config_lib.write_config_py(tmp_path / "sweep_config.py", c, "A flaky-scheduler sweep.")
  workdir = tmp_path / "sweep"
  env = dict(os.environ, PATH=f"{wrappers}:{os.environ['PATH']}")
  proc = subprocess.run([sys.executable, "-m", "archscale.main", f"--config={config}",
                         "--mode=sweep", f"--workdir={workdir}"], env=env, capture_output=True,
                        text=True, timeout=DEADLINE_S)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-3000:]
  assert "the scheduler did not answer for 2 job(s)" in out
  assert int((tmp_path / "squeue.calls").read_text()) > 4
  jobs = _jobs(workdir)
  assert len(jobs) == 2 and all(len(ids) == 1 for ids in jobs.values())
  rows = list(io.read_jsonl(workdir / attempts.RESULTS))
  assert sorted(r["run_id"] for r in rows) == sorted(jobs)
  assert all(r["status"] == "finished" for r in rows)


def test_a_job_evaluates_its_run_and_the_row_carries_the_eval(cluster, dataset, tmp_path):
  c = _config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,), evaluate=True,
              wait=True)
  c.eval.update(tasks="tiny_mc", include_path=str(write_tiny_tasks(tmp_path / "tasks")),
                device="cpu", bootstrap_iters=0)
  assert sweep.run_sweep(c, tmp_path / "sweep")["finished"] == 1
  (row,) = _finished_rows(tmp_path / "sweep")
  run_dir = tmp_path / "sweep" / attempts.RUNS_DIR / row["run_id"]
  evaluated = json.loads((run_dir / "eval.json").read_text())
  assert (run_dir / "eval.log").exists() and evaluated["step"] == row["steps"]
  assert row["eval"]["tasks"] == evaluated["tasks"]
  assert row["eval_average"] == evaluated["average"]


def test_bad_slurm_fields_fail_before_submitting(dataset, tmp_path):
  for field, value in (("time_min", 0), ("tasks_per_node", -1), ("signal_s", 900)):
    c = _config(dataset)
    c.sweep.slurm[field] = value
    with pytest.raises(ValueError, match=f"sweep.slurm.{field}"):
      sweep.run_sweep(c, tmp_path)
  assert not (tmp_path / slurm.SLURM_DIR).exists()
  assert pathlib.Path(tmp_path).exists()


def test_a_job_that_never_starts_ends_the_wait_with_an_error(cluster, dataset, tmp_path):
  """A held job stays PENDING: after sweep.wait_s with no run changing, the driver stops waiting
  with an error naming the job and the setting, and leaves the job in the queue."""
  c = _config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,), wait=True, wait_s=3.0)
  c.sweep.slurm.extra = {"hold": True}
  workdir = tmp_path / "sweep"
  with pytest.raises(io.ReportedError, match=r"no run changed status for 3s \(sweep.wait_s\)"):
    sweep.run_sweep(c, workdir)
  ((job,),) = _jobs(workdir).values()
  try:
    state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                           text=True, timeout=60).stdout.strip()
    assert state == "PENDING"
  finally:
    subprocess.run(["scancel", job], timeout=60)


def test_bad_sbatch_options_fail_before_submitting(dataset, tmp_path):
  for extra, field in (({"mem 4G": "1"}, "'mem 4G'"), ({"mem;reboot": "1"}, "'mem;reboot'"),
                       ({"mem": "4G\n#SBATCH --uid=0"}, "sweep.slurm.extra.mem"),
                       ({"comment": "$(id)"}, "sweep.slurm.extra.comment")):
    c = _config(dataset)
    c.sweep.slurm.extra = extra
    with pytest.raises(ValueError, match=re.escape(field)):
      sweep.run_sweep(c, tmp_path)
  c = _config(dataset)
  c.sweep.slurm.account = "lab\nreboot"
  with pytest.raises(ValueError, match=r"sweep.slurm.account="):
    sweep.run_sweep(c, tmp_path)
  assert not (tmp_path / slurm.SLURM_DIR).exists()


def _held(dataset, **fields):
  """A one-run sweep whose job stays PENDING until released (sbatch --hold)."""
  c = _config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,), **fields)
  c.sweep.slurm.extra = {"hold": True}
  return c


def test_a_second_driver_on_one_sweep_refuses(cluster, dataset, tmp_path):
  c = _held(dataset, wait=True)
  config = config_lib.write_config_py(tmp_path / "sweep_config.py", c, "A held sweep.")
  workdir = tmp_path / "sweep"
  first = subprocess.Popen([sys.executable, "-m", "archscale.main", f"--config={config}",
                            "--mode=sweep", f"--workdir={workdir}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    _wait_for("the first driver to submit", lambda: (workdir / slurm.SLURM_DIR / slurm.JOBS)
              .exists())
    with pytest.raises(io.WorkdirBusy, match=r"in use by pid"):
      sweep.run_sweep(_held(dataset), workdir)
  finally:
    first.kill()
    first.wait()
    for ids in _jobs(workdir).values():
      subprocess.run(["scancel", *ids], timeout=60)
  assert len(_jobs(workdir)) == 1 and all(len(ids) == 1 for ids in _jobs(workdir).values())


def test_a_driver_killed_between_submit_and_record_adopts_its_job(cluster, dataset, tmp_path):
  """What a driver killed right after sbatch leaves: its intent and a live job, no record. The
  next driver adopts the job instead of submitting the run again."""
  c = _held(dataset)
  workdir = (tmp_path / "sweep").resolve()
  (run,) = sweep.plan(c)[0]
  name = f"archscale-{c.name}-deadbeef"
  io.write_json_atomic(workdir / slurm.SLURM_DIR / slurm.INTENT,
                       {"job_name": name, "runs": [run.run_id]})
  (job,) = slurm.sbatch(slurm.SweepConfig.from_config(c).slurm, workdir, name,
                        [slurm.SlurmRun(str(workdir), run.run_id, "unused.py")])
  try:
    lines = []
    result = sweep.run_sweep(c, workdir, progress=lines.append)
    assert result["submitted"] == 0 and result["queued"] == 1
    assert _jobs(workdir) == {run.run_id: [job]}
    assert any(f"adopted job(s) {job}" in line for line in lines)
    assert not (workdir / slurm.SLURM_DIR / slurm.INTENT).exists()
  finally:
    subprocess.run(["scancel", job], timeout=60)


def test_verify_trains_the_picks_as_slurm_jobs(cluster, dataset, tmp_path):
  """--mode=verify with sweep.launch=slurm: the picks and the baseline run as jobs, which the
  verification waits for before it judges them; Panda and the baseline coincide here, so their
  run is submitted once."""
  from test_verify import _doc

  from archscale.study import verify

  c = _config(dataset, seeds=(0,))
  c.data.seq_len = 32
  workdir = tmp_path / "work"
  workdir.mkdir()
  steps = 3 * c.train.global_batch_size * c.data.seq_len
  doc = {**_doc(), "budget": {"n_nonembed": 12_000, "tokens": steps}}
  doc["surefire"].update(d_model=24, d_ff=16)
  (workdir / "search.json").write_text(json.dumps(doc))
  out = verify.run_verify(c, workdir)
  assert {e["name"] for e in out["picks"]} == {"panda", "surefire", "baseline"}
  vdir = workdir / verify.VERIFY_DIR
  jobs = _jobs(vdir)
  assert len(jobs) == 2 and all(len(ids) == 1 for ids in jobs.values())
  rows = _finished_rows(vdir)
  assert len(rows) == 2 and all(r["slurm_job_id"] for r in rows)
  picks = {e["name"]: e for e in out["picks"]}
  assert picks["panda"]["measured_losses"] == picks["baseline"]["measured_losses"]
