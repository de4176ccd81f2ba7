"""No silent wrong results: changed recipes, concurrent trainers, orphaned children, preemption
exit status and failed checkpoint saves."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from helpers import STEPS, flat, make_config, params_of, subprocess_env, tiny_config, wait_for

from archscale.core import config_lib, exits, io
from archscale.study import attempts, sweep
from archscale.train import checkpoint
from archscale.train import trainer as train

REPO = pathlib.Path(__file__).resolve().parent.parent


def write_config(config, path) -> pathlib.Path:
  return config_lib.write_config_py(path, config, "A test config.")


def cli(config_path, workdir, env, mode="train", **popen):
  cmd = [sys.executable, "-m", "archscale.main", f"--config={config_path}", f"--mode={mode}",
         f"--workdir={workdir}"]
  return subprocess.Popen(cmd, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, **popen)


def lock_holder_pid(workdir: pathlib.Path) -> int | None:
  try:
    return json.loads((workdir / io.WorkdirLock.NAME).read_text() or "{}").get("pid")
  except (OSError, json.JSONDecodeError):
    return None


def alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  return True


# --------------------------------------------------------------------------- changed recipes


def test_a_finished_run_refuses_a_changed_recipe_and_returns_its_summary_unchanged(corpus,
                                                                                   tmp_path):
  config = tiny_config(corpus, steps=4, eval_every=0, checkpoint_every=2)
  summary = train.train(config, tmp_path)
  assert summary["status"] == "finished"
  assert train.train(config, tmp_path) == json.loads((tmp_path / "summary.json").read_text())

  changed = config.copy_and_resolve_references()
  changed.train.lr = 5e-3
  with pytest.raises(ValueError, match=r"train\.lr: 0\.01 -> 0\.005"):
    train.train(changed, tmp_path)
  assert json.loads((tmp_path / "summary.json").read_text()) == summary


def test_a_resume_refuses_a_changed_batch_and_an_extension_is_recorded(corpus, tmp_path):
  config = tiny_config(corpus, steps=6, eval_every=0, checkpoint_every=2)

  def preempt(step, _):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  assert train.train(config, tmp_path, step_callback=preempt)["status"] == "preempted"
  saved_config = (tmp_path / "config.json").read_text()
  changed = config.copy_and_resolve_references()
  changed.train.update(global_batch_size=16, lr=2e-2)
  with pytest.raises(ValueError) as err:
    train.train(changed, tmp_path)
  assert "train.global_batch_size: 8 -> 16" in str(err.value)
  assert "train.lr: 0.01 -> 0.02" in str(err.value)
  assert (tmp_path / "config.json").read_text() == saved_config  # nothing rewritten

  summary = train.train(config, tmp_path)
  assert summary["steps"] == 6 and summary["tokens"] == 6 * 8 * 32
  longer = config.copy_and_resolve_references()
  longer.train.steps = 8
  summary = train.train(longer, tmp_path)
  assert summary["steps"] == 8 and summary["tokens"] == 8 * 8 * 32
  assert summary["steps_requested"] == [6, 8]
  shorter = config.copy_and_resolve_references()
  shorter.train.steps = 4
  with pytest.raises(ValueError, match="train.steps=4 is below the checkpoint's step 8"):
    train.train(shorter, tmp_path)


# ------------------------------------------------------------------------- concurrent trainers


HOLD = """
import sys, time
from archscale.core import io
lock = io.WorkdirLock(__import__("pathlib").Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_trainer_stops_at_once_and_a_dead_holder_is_taken_over(corpus, cache_dir,
                                                                         tmp_path):
  config = tiny_config(corpus, steps=2, eval_every=0, checkpoint_every=0)
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env(cache_dir))
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(io.WorkdirBusy, match=f"in use by pid {holder.pid} on "):
      train.train(config, tmp_path)
    proc = cli(write_config(config, tmp_path.parent / f"{tmp_path.name}.py"), tmp_path,
               subprocess_env(cache_dir))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == exits.EXIT_BUSY, out[-3000:]
    assert f"pid {holder.pid}" in out and not (tmp_path / "checkpoints").exists()
  finally:
    holder.kill()
    holder.wait()
  assert train.train(config, tmp_path)["status"] == "finished"  # the dead holder's lock is stale


def test_a_sweep_skips_a_run_whose_trainer_is_still_alive(dataset, cache_dir, tmp_path):
  c = make_config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,))
  (run,) = sweep.plan(c)[0]
  run_dir = tmp_path / attempts.RUNS_DIR / run.run_id
  run_dir.mkdir(parents=True)
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env=subprocess_env(cache_dir))
  try:
    assert holder.stdout.readline().strip() == "held"
    counts = sweep.run_sweep(c, tmp_path)
  finally:
    holder.kill()
    holder.wait()
  assert counts["skipped"] == 1 and counts["failed"] == 0
  assert list(io.read_jsonl(tmp_path / attempts.RESULTS)) == []  # no row for a run held elsewhere


def test_no_trainer_outlives_a_killed_sweep(dataset, cache_dir, tmp_path):
  c = make_config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,))
  c.sweep.tokens = 10_000_000  # far more steps than the test waits for
  c.train.update(checkpoint_every=0, eval_every=0)
  (run,) = sweep.plan(c)[0]
  run_dir = tmp_path / "sweep" / attempts.RUNS_DIR / run.run_id
  env = subprocess_env(cache_dir)
  sweep_proc = cli(write_config(c, tmp_path / "sweep.py"), tmp_path / "sweep", env, mode="sweep")
  try:
    trainer = wait_for(lambda: lock_holder_pid(run_dir), 180, "the trainer to take its lock")
    wait_for(lambda: (run_dir / "metrics.jsonl").exists(), 180, "the trainer to step")
    sweep_proc.kill()
    sweep_proc.wait()
    wait_for(lambda: not alive(trainer), 10, f"trainer {trainer} to stop after its sweep died")
  finally:
    sweep_proc.kill()
  assert (run_dir / "checkpoints").exists()  # it checkpointed on the way out: a rerun resumes


# ---------------------------------------------------------------------------------- preemption


def test_sigterm_exits_with_the_resume_status_and_the_rerun_is_bitwise(reference, cache_dir,
                                                                       tmp_path):
  config = reference["config"]
  config_path = write_config(config, tmp_path.parent / f"{tmp_path.name}.py")
  env = subprocess_env(cache_dir)
  proc = cli(config_path, tmp_path, env)
  wait_for(lambda: len(list(io.read_jsonl(tmp_path / "metrics.jsonl"))) >= 12, 180, "step 12")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == exits.EXIT_PREEMPTED, out[-3000:]
  assert not (tmp_path / "summary.json").exists()
  proc = cli(config_path, tmp_path, env)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["steps"] == STEPS
  assert summary["final_train_loss"] == reference["summary"]["final_train_loss"]
  resumed, ref = flat(params_of(tmp_path, config)), flat(reference["params"])
  for k in ref:
    np.testing.assert_array_equal(resumed[k], ref[k], err_msg=k)


# ---------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
  """A 64 MB tmpfs mounted at tmp_path/checkpoints (needs root, as CI has)."""
  mount = tmp_path / "checkpoints"
  mount.mkdir()
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(path: pathlib.Path) -> None:
  """Grows `path` (made before training, so no new file is needed) until its disk is full."""
  try:
    with open(path, "ab") as f:
      while True:
        f.write(b"\0" * 65536)
        f.flush()
  except OSError:  # full: on tmpfs even opening can fail once no page is left
    pass


@pytest.mark.parametrize("background", [False, True])
def test_a_full_disk_fails_the_save_in_one_line_and_the_last_checkpoint_restores(
    reference, small_disk, background):
  config = tiny_config(reference["config"].data.path, async_checkpoint=background)
  workdir = small_disk.parent
  filler = small_disk / "filler"
  filler.touch()
  filled = []

  def fill_after_first_checkpoint(step, _):
    if step == 12 and not filled:
      wait_for(lambda: (small_disk / "10").exists(), 60, "the checkpoint of step 10")
      fill(filler)
      filled.append(step)

  with pytest.raises(checkpoint.CheckpointError) as err:
    train.train(config, workdir, step_callback=fill_after_first_checkpoint)
  message = str(err.value)
  assert "\n" not in message and "No space left on device" in message
  assert "checkpoint of step 20" in message and "last good checkpoint is step 10" in message
  assert io.one_line_error(err.value) == message

  filler.unlink()
  summary = train.train(config, workdir)
  assert summary["steps"] == STEPS
  assert summary["final_train_loss"] == reference["summary"]["final_train_loss"]
  resumed, ref = flat(params_of(workdir, config)), flat(reference["params"])
  for k in ref:
    np.testing.assert_array_equal(resumed[k], ref[k], err_msg=k)


def test_temporary_names_are_unique_across_hosts_and_processes(tmp_path):
  target = tmp_path / "results.jsonl"
  a, b = io.temporary_name(target), io.temporary_name(target)
  assert a != b and a.parent == tmp_path
  assert a.name.startswith(".results.jsonl.tmp-") and socket.gethostname()[:4] in a.name
  assert f"-{os.getpid()}-" in a.name
  # A leftover of a process that is gone is found; a live process's file is not.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  left = tmp_path / a.name.replace(f"-{os.getpid()}-", f"-{dead}-")
  left.mkdir()
  a.mkdir()
  assert io.dead_temporaries(target) == [left]
