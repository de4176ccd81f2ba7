"""URIs as workdir, data and results paths: never a local folder named after the scheme.

Training and local sweeps into gs:// run against a GCS emulator on localhost (tests/gcs_emulator.py,
started here): gcsfs serves epath's files and tensorstore orbax's arrays, both pointed at it.
"""

import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from helpers import (
  REPO,
  flat,
  make_config,
  metrics,
  params_of,
  run_script,
  subprocess_env,
  tiny_config,
  untimed,
  wait_for,
  write_tiny_tasks,
)

from archscale.core import io
from archscale.data import batches as data_lib
from archscale.data import prepare
from archscale.study import attempts, sweep, table
from archscale.train import trainer as train

HAS_GCS_EMULATOR = all(importlib.util.find_spec(m) for m in ("gcsfs", "gcp_storage_emulator"))
needs_gcs = pytest.mark.skipif(not HAS_GCS_EMULATOR,
                               reason="needs gcsfs and gcp-storage-emulator (the dev extra)")


@pytest.fixture(scope="module")
def gcs():
  """A bucket on a GCS emulator started for this module; its gs:// root (e.g. gs://b)."""
  if not HAS_GCS_EMULATOR:
    pytest.skip("needs gcsfs and gcp-storage-emulator (the dev extra)")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url, bucket = f"http://127.0.0.1:{port}", "archscale-test"
  server = subprocess.Popen(
      [sys.executable, str(REPO / "tests" / "gcs_emulator.py"), str(port), bucket],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

  def listening():
    with socket.socket() as s:
      return s.connect_ex(("127.0.0.1", port)) == 0

  env = {"STORAGE_EMULATOR_HOST": url,  # gcsfs (epath's files)
         "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax's arrays)
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GCE_METADATA_ROOT": "127.0.0.1:1"}
  previous = {k: os.environ.get(k) for k in env}
  try:
    wait_for(listening, 30, "the GCS emulator")
    os.environ.update(env)
    yield f"gs://{bucket}"
  finally:
    for k, v in previous.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.terminate()
    server.wait(timeout=30)


def _fresh(root: str) -> str:
  return f"{root}/{uuid.uuid4().hex[:8]}"


def _without_backend(monkeypatch, scheme="gs"):
  """As on a machine where `scheme`'s backend is not installed."""
  monkeypatch.setitem(io.URI_BACKENDS, scheme, ("archscale_no_such_backend",))


def _local_entries(root: pathlib.Path) -> list[str]:
  return sorted(p.name for p in root.iterdir())


def test_local_paths_stay_pathlib(tmp_path):
  assert io.as_path(tmp_path / "a b", "--workdir") == tmp_path / "a b"
  assert io.as_path(f"file://{tmp_path}/x", "--workdir") == tmp_path / "x"
  assert not io.is_uri(tmp_path) and io.is_uri("gs://bucket/x")


def test_gs_without_a_backend_fails_naming_the_field(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _without_backend(monkeypatch)
  with pytest.raises(ValueError, match=r"--workdir=gs://bucket/run: .*needs archscale_no_such"):
    io.as_path("gs://bucket/run", "--workdir")
  with pytest.raises(ValueError, match=r"--workdir=gs://bucket/run"):
    io.make_dir("gs://bucket/run", "--workdir")
  with pytest.raises(ValueError, match=r"fit.results=gs://bucket/results.jsonl"):
    table.load_rows("gs://bucket/results.jsonl")
  assert _local_entries(tmp_path) == []


def test_training_into_a_uri_fails_before_any_compute(corpus, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _without_backend(monkeypatch)
  for uri in ("gs://bucket/run", "gs:/bucket/run", "ftp://host/run"):
    with pytest.raises(ValueError, match="--workdir"):
      train.train(tiny_config(corpus), uri)
  assert _local_entries(tmp_path) == []


def test_a_sweep_into_a_uri_fails_before_any_run(dataset, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _without_backend(monkeypatch)
  with pytest.raises(ValueError, match="--workdir=gs://bucket/sweep"):
    sweep.run_sweep(make_config(dataset), "gs://bucket/sweep")
  c = make_config(dataset)
  c.data.path = "gs://bucket/data"
  with pytest.raises(ValueError, match="data.path=gs://bucket/data"):
    sweep.run_sweep(c, tmp_path / "w")
  assert _local_entries(tmp_path) == []


@needs_gcs
@pytest.mark.parametrize("launch", ["emit", "slurm"])
def test_only_a_local_sweep_takes_a_remote_workdir(dataset, tmp_path, monkeypatch, launch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=f"--workdir=gs://bucket/sweep: sweep.launch={launch}"):
    sweep.run_sweep(make_config(dataset, launch=launch), "gs://bucket/sweep")
  assert _local_entries(tmp_path) == []


def test_a_collapsed_uri_is_refused_not_created(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="lost a slash"):
    io.make_dir(pathlib.Path("gs://bucket/run"), "--workdir")  # pathlib makes it gs:/bucket/run
  assert not (tmp_path / "gs:").exists()


@pytest.mark.skipif(not importlib.util.find_spec("huggingface_hub"), reason="needs huggingface_hub")
def test_a_uri_with_its_backend_installed_stays_a_uri():
  path = io.as_path("hf://datasets/x/y", "fit.results")
  assert not isinstance(path, pathlib.Path) and str(path / "z") == "hf://datasets/x/y/z"


def _demo_cli(cwd, *args):
  """`python -m archscale.main --config=configs/demo.py ARGS` run in `cwd` on CPU."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "archscale.main", f"--config={REPO / 'configs' / 'demo.py'}", *args],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_command_line_rejects_an_unwritable_workdir_scheme(tmp_path):
  proc = _demo_cli(tmp_path, "--mode=train", "--workdir=ftp://host/run")
  assert proc.returncode != 0
  assert "--workdir=ftp://host/run: ftp:// storage is not supported" in proc.stderr
  assert _local_entries(tmp_path) == []


def test_modes_that_write_locally_refuse_a_uri_workdir(tmp_path):
  proc = _demo_cli(tmp_path, "--mode=fit", "--workdir=gs://bucket/fit")
  assert proc.returncode != 0
  assert "--workdir=gs://bucket/fit" in proc.stderr
  if HAS_GCS_EMULATOR:  # With the backend installed the URI is valid, but not for this mode.
    assert "--mode=fit writes through local file APIs" in proc.stderr
  assert _local_entries(tmp_path) == []


# ------------------------------------------------------------------------ against the emulator

_KILLED_RUN = """
import json, os, signal, sys
import ml_collections
from archscale.core import io
from archscale.train import trainer as train

config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
workdir, kill_at, wait_for = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
done = io.as_path(workdir, "workdir") / "checkpoints" / str(wait_for) / "commit_success.txt"

def die(step, metrics):
  if step == kill_at:  # once checkpoint `wait_for` is committed, die without any cleanup
    while not done.exists():
      pass
    os.kill(os.getpid(), signal.SIGKILL)

train.train(config, workdir, step_callback=die)
"""


def test_training_into_gcs_is_killed_and_resumes_exactly(gcs, reference, cache_dir, tmp_path,
                                                         monkeypatch):
  monkeypatch.chdir(tmp_path)
  config, uri = reference["config"], _fresh(gcs) + "/run"
  out = run_script(_KILLED_RUN, subprocess_env(cache_dir), json.dumps(config.to_dict()), uri,
                   "15", "10")
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  workdir = io.as_path(uri, "--workdir")
  assert not isinstance(workdir, pathlib.Path)
  assert not (workdir / "summary.json").exists()
  assert max(r["step"] for r in metrics(workdir)) >= 10  # flushed before checkpoint 10
  held = json.loads((workdir / ".lock").read_text())  # the dead trainer's lease is left behind
  assert held["host"] == socket.gethostname() and time.time() - held["heartbeat"] < 300

  # Same host, dead pid: the rerun takes the lease over at once and resumes from step 10.
  summary = train.train(config, uri)
  assert [untimed(r) for r in metrics(workdir)] == [untimed(r) for r in reference["metrics"]]
  assert summary["final_train_loss"] == reference["summary"]["final_train_loss"]
  assert summary["eval_loss"] == reference["summary"]["eval_loss"]
  assert json.loads((workdir / "summary.json").read_text()) == json.loads(json.dumps(summary))
  assert json.loads((workdir / "config.json").read_text())["config"]["seed"] == config.seed
  assert not (workdir / ".lock").exists()
  resumed, ref = flat(params_of(uri, config)), flat(reference["params"])
  for k in ref:
    np.testing.assert_array_equal(resumed[k], ref[k], err_msg=k)
  assert train.train(config, uri) == summary  # a finished run returns its summary
  assert _local_entries(tmp_path) == []


def test_a_remote_lease_keeps_out_a_second_trainer(gcs, monkeypatch):
  monkeypatch.setattr(io._Lease, "SETTLE_S", 0.1)
  workdir = io.as_path(_fresh(gcs), "--workdir")
  first = io.WorkdirLock(workdir)
  first.acquire()
  with pytest.raises(io.WorkdirBusy, match=f"in use by pid {os.getpid()}"):
    io.WorkdirLock(workdir).acquire()
  first.release()
  assert not (workdir / ".lock").exists()

  # A holder on another host that stopped refreshing: live until its lease expires.
  record = {"pid": 1, "host": "elsewhere", "argv": ["train"], "since": "then",
            "token": "theirs", "heartbeat": time.time() - 60}
  (workdir / ".lock").write_text(json.dumps(record))
  with pytest.raises(io.WorkdirBusy, match="on elsewhere"):
    io.WorkdirLock(workdir).acquire()
  (workdir / ".lock").write_text(json.dumps(dict(record, heartbeat=time.time() - 400)))
  taken = io.WorkdirLock(workdir)
  taken.acquire()
  assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()

  # A live holder refreshes its lease.
  monkeypatch.setattr(io._Lease, "LEASE_S", 0.5)
  taken.release()
  holder = io.WorkdirLock(workdir)
  holder.acquire()
  beat = json.loads((workdir / ".lock").read_text())["heartbeat"]
  wait_for(lambda: json.loads((workdir / ".lock").read_text())["heartbeat"] > beat, 10,
           "a refreshed lease")
  holder.release()


def test_a_local_sweep_into_gcs_trains_and_derives_its_table(gcs, dataset, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(io._Lease, "SETTLE_S", 0.1)
  c = make_config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,), tokens=16 * 128 * 8,
                  evaluate=True)
  c.train.update(eval_every=0, checkpoint_every=4, log_every=1)
  tasks = write_tiny_tasks(tmp_path.parent / f"{tmp_path.name}-tasks")
  c.eval.update(tasks="tiny_mc", include_path=str(tasks), device="cpu", bootstrap_iters=0)
  uri = _fresh(gcs) + "/sweep"
  (run,) = sweep.plan(c)[0]
  counts = sweep.run_sweep(c, uri)
  assert counts["finished"] == 1 and counts["failed"] == 0
  workdir = io.as_path(uri, "--workdir")
  (row,) = list(io.read_jsonl(workdir / attempts.RESULTS))
  assert row["run_id"] == run.run_id and row["status"] == "finished" and row["loss"] > 0
  run_dir = workdir / attempts.RUNS_DIR / run.run_id
  summary = json.loads((run_dir / "summary.json").read_text())
  assert row["steps"] == summary["steps"] == 8
  evaluated = json.loads((run_dir / "eval.json").read_text())  # evaluated, its row says so
  assert evaluated["step"] == 8 and row["eval_average"] == evaluated["average"]
  assert [r["step"] for r in metrics(run_dir)] == list(range(1, 9))
  assert "train: done" in (run_dir / "train.log").read_text()
  assert "def get_config" in (run_dir / sweep.RUN_CONFIG).read_text()
  assert (workdir / sweep.PLAN).exists()
  assert not (run_dir / ".lock").exists() and not (run_dir / ".sweep.lock").exists()
  assert table.load_rows(f"{uri}/{attempts.RESULTS}")  # the fit reads the table from the bucket

  again = sweep.run_sweep(c, uri)  # finished: nothing retrained, the table unchanged
  assert again["finished"] == 1 and list(io.read_jsonl(workdir / attempts.RESULTS)) == [row]
  assert _local_entries(tmp_path) == []


def test_a_dataset_in_gcs_is_read_through_a_local_copy(gcs, corpus, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("ARCHSCALE_DATA_CACHE", str(tmp_path.parent / f"{tmp_path.name}-cache"))
  remote = io.as_path(_fresh(gcs) + "/data", "data.path")
  files = [f for f in pathlib.Path(corpus).rglob("*") if f.is_file()]
  for f in files:
    (remote / f.relative_to(corpus).as_posix()).write_bytes(f.read_bytes())
  local = data_lib.local_copy(remote)
  assert local.parent == pathlib.Path(os.environ["ARCHSCALE_DATA_CACHE"])
  info = data_lib.dataset_info(str(remote))
  assert info["path"] == str(local) and info == dict(data_lib.dataset_info(corpus), path=str(local))
  for split in data_lib.SPLITS:
    np.testing.assert_array_equal(data_lib.Batches(str(remote), split, 16, 4, 0).read(3),
                                  data_lib.Batches(corpus, split, 16, 4, 0).read(3))

  # Training reads it as it reads the local dataset: the same losses.
  steps = dict(steps=4, eval_every=2, checkpoint_every=0)
  here = train.train(tiny_config(corpus, **steps), tmp_path / "local")
  there = train.train(tiny_config(str(remote), **steps), tmp_path / "remote")
  assert there["final_train_loss"] == here["final_train_loss"]
  assert there["eval_loss"] == here["eval_loss"]

  # Preparing into a bucket is refused before any work.
  c = tiny_config(str(remote) + "-new")
  c.data.source = str(pathlib.Path(corpus).parent / "corpus.txt")
  with pytest.raises(ValueError, match="data.path=gs://.*preparing writes its shards"):
    prepare.run_prepare_data(c, tmp_path / "w")
  assert not (tmp_path / "w").exists() and "gs:" not in _local_entries(tmp_path)
