"""Weights & Biases tracking (offline: files only, no network): what a run leaves, and that a
failing tracker never stops training."""

import json
import logging

import pytest
from helpers import make_config, tiny_config

from archscale.core import tracking
from archscale.study import planning
from archscale.train import trainer as train

wandb = pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))


def _tracked(dataset, **train):
  c = tiny_config(dataset, steps=6, eval_every=3, checkpoint_every=0, **train)
  c.metrics.update(wandb_project="archscale-tests", wandb_mode="offline", wandb_group="g")
  return c


def _records(path):
  """The protobuf records of an offline run's transaction log (a LevelDB-style log: 32 KiB
  blocks of records, each with a 7-byte header, after the file's 7-byte W&B header)."""
  from wandb.proto import wandb_internal_pb2

  data, pos, out, part = path.read_bytes(), 7, [], b""
  assert data[:4] == b":W&B"
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
    part += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # a whole record, or the last part of one
      record = wandb_internal_pb2.Record()
      record.ParseFromString(part)
      out.append(record)
      part = b""
  return out


def _history(records):
  return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
          for r in records if r.WhichOneof("record_type") == "history"]


def test_an_offline_run_leaves_its_metrics_and_recipe(dataset, tmp_path):
  workdir = tmp_path / "run"
  summary = train.train(_tracked(dataset), workdir)
  (log,) = (workdir / "wandb").glob("offline-run-*/run-*.wandb")
  records = _records(log)
  run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
  assert (run.project, run.run_group, run.job_type) == ("archscale-tests", "g", "train")
  config = {i.key: json.loads(i.value_json) for i in run.config.update}
  assert config["arch"]["d_model"] == 32 and config["train"]["lr"] == 0.01  # the recipe
  history = _history(records)
  assert [h["_step"] for h in history] == list(range(1, 7))
  assert history[-1]["loss"] == pytest.approx(summary["final_train_loss"], rel=0.5)
  assert "eval_loss" in history[2] and "tokens_per_sec" in history[-1]


def test_a_tracker_that_raises_does_not_stop_training(dataset, tmp_path, monkeypatch, caplog):
  def broken(self, *args, **kwargs):
    raise ConnectionError("the service is unreachable")

  monkeypatch.setattr(wandb.Run, "log", broken)
  caplog.set_level(logging.WARNING)
  summary = train.train(_tracked(dataset), tmp_path / "run")
  assert summary["status"] == "finished" and summary["steps"] == 6
  assert "W&B tracking stopped: the service is unreachable" in caplog.text


def test_tracking_is_off_without_a_project_and_sweep_runs_share_a_group(dataset, tmp_path):
  c = make_config(dataset)
  assert tracking.Tracker.start(c, tmp_path, name="x", job="train", run_config={}) is None
  (run, *_), _ = planning.plan(c)
  assert planning.run_config(c, run, dataset).metrics.wandb_group == c.name
  c.metrics.wandb_group = "mine"
  assert planning.run_config(c, run, dataset).metrics.wandb_group == "mine"


def test_a_fit_logs_its_summary_and_figures_to_the_sweep_group(tmp_path):
  from test_fitting import PAPER_MULT, synthetic_rows

  from archscale.core import config_lib
  from archscale.study import fit as fit_stage

  results = tmp_path / "results.jsonl"
  results.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(
      "multiplicative", PAPER_MULT, n_x=4, n_r=4)))
  config = config_lib.load_config_file(config_lib.CONFIG_DIR / "fit.py")
  config.fit.update(results=str(results), bootstrap=0, starts="random", n_starts=8)
  config.metrics.update(wandb_project="archscale-tests", wandb_mode="offline")
  fit_stage.run_fit(config, tmp_path / "out")
  (log,) = (tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb")
  records = _records(log)
  run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
  assert (run.run_group, run.job_type) == (config.name, "fit")
  logged = {i.key or i.nested_key[0] for r in records
            if r.WhichOneof("record_type") == "history" for i in r.history.item}
  pngs = {p.stem for p in (tmp_path / "out").glob("*.png")}
  assert len(pngs) >= 3 and pngs <= logged, (pngs, logged)  # every figure, as an image
  summary = {i.key or i.nested_key[0] for r in records
             if r.WhichOneof("record_type") == "summary" for i in r.summary.update}
  assert {"params", "verdict"} <= summary
