"""Sweep planning, run ids, crash isolation, resume, emit, and results-table integrity."""

import json
import logging
import multiprocessing
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
from helpers import make_config

from archscale.core import config_lib, exits, io
from archscale.study import attempts, progress, sweep
from archscale.train import trainer as train


class FakeTrainer:
  """Stands in for training: a loss from the architecture; raises for run ids in `crash`."""

  def __init__(self, crash=()):
    self.crash = set(crash)
    self.calls = []

  def __call__(self, cfg, run_dir):
    self.calls.append(cfg.name)
    assert pathlib.Path(cfg.data.path).exists()
    if cfg.name in self.crash:
      raise RuntimeError(f"simulated crash of {cfg.name}")
    m = cfg.model
    loss = 3.0 + 1e-3 * m.d_model / m.d_ff
    tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
    return {"status": "finished", "eval_loss": loss, "final_train_loss": loss - 0.1,
            "tokens": tokens, "steps": cfg.train.steps, "seq_len": cfg.data.seq_len,
            "global_batch_size": cfg.train.global_batch_size, "wall_s": 0.01,
            "provenance": {"device_kind": "fake"}}


def test_parse_scales_accepts_suffixes_and_rejects_garbage():
  c = config_lib.make_config("demo")
  scales = sweep.parse_scales("80M:12:64, 1.2B:16:64,5e4:2:16", c.model)
  assert [(s.n_nonembed, s.n_layers, s.d_head) for s in scales] == [
      (80e6, 12, 64), (1.2e9, 16, 64), (5e4, 2, 16)]
  only = sweep.parse_scales("", c.model)
  assert only[0].n_nonembed == 123200 and only[0].n_layers == 2 and only[0].d_head == 16
  for bad in ("80M:12", "eighty:12:64", "80M:12:63", "-5:2:16"):
    with pytest.raises(ValueError, match="sweep.scales"):
      sweep.parse_scales(bad, c.model)


def test_plan_keeps_runs_on_budget_and_explains_every_drop(dataset):
  c = make_config(dataset, d_over_sqrt_n=(0.12, 0.2, 0.32, 3.0), r=(0.5, 0.55, 1.5, 4.0))
  runs, dropped = sweep.plan(c)
  grid = 2 * 4 * 4
  assert len(runs) + len(dropped) == grid
  assert runs, "the grid must plan some runs"
  for run in runs:
    assert abs(run.spec.params_nonembed / run.scale.n_nonembed - 1) <= 0.1
    assert abs(run.spec.mlp_attn_ratio / run.requested["r"] - 1) <= 0.3
    assert run.spec.n_heads % run.spec.n_kv_heads == 0
    assert run.tokens == 4096
  reasons = [d["reason"] for d in dropped]
  # x = 3.0 cannot be built at these budgets; r = 0.5 and 0.55 round to the same architecture.
  assert any(r.startswith("infeasible") for r in reasons)
  assert any(r.startswith("duplicate of") for r in reasons)
  assert all(r.split()[0] in ("infeasible:", "duplicate", "N", "r") for r in reasons)
  assert len({r.run_id for r in runs}) == len(runs)


def test_run_ids_are_stable_and_depend_on_spec_tokens_seed_and_recipe(dataset):
  c = make_config(dataset)
  first = [r.run_id for r in sweep.plan(c)[0]]
  assert first == [r.run_id for r in sweep.plan(c)[0]]
  spec = sweep.plan(c)[0][0].spec
  rid = sweep.run_id(spec, 4096, 0)
  assert rid != sweep.run_id(spec, 8192, 0)
  assert rid != sweep.run_id(spec, 4096, 1)
  assert rid != sweep.run_id(spec.replace(d_ff=spec.d_ff + 16), 4096, 0)
  changed = make_config(dataset)
  changed.train.lr *= 2
  assert [r.run_id for r in sweep.plan(changed)[0]] != first
  changed = make_config(dataset)
  changed.train.log_every += 1  # bookkeeping only: the same runs
  assert [r.run_id for r in sweep.plan(changed)[0]] == first


def test_cross_design_varies_one_factor_at_a_time(dataset):
  c = make_config(dataset, scales="100k:2:16", d_over_sqrt_n=(0.12, 0.2, 0.32), r=(0.5, 1.5, 4.0),
                  design="cross", n_tolerance=1.0, r_tolerance=10.0)
  runs, dropped = sweep.plan(c)
  points = {(r.requested["d_over_sqrt_n"], r.requested["r"]) for r in runs}
  points |= {(d["d_over_sqrt_n"], d["r"]) for d in dropped}
  assert points == {(0.12, 1.5), (0.2, 1.5), (0.32, 1.5), (0.2, 0.5), (0.2, 4.0)}


def test_seeds_replicate_every_point_with_its_own_run_and_bad_seeds_are_refused(dataset):
  single = sweep.plan(make_config(dataset))[0]
  runs = sweep.plan(make_config(dataset, seeds=(0, 7)))[0]
  assert len(runs) == 2 * len(single) and len({r.run_id for r in runs}) == len(runs)
  assert [(r.spec, r.seed) for r in runs] == [(s.spec, seed) for s in single for seed in (0, 7)]
  assert {r.run_id for r in runs if r.seed == 0} == {r.run_id for r in single}
  assert [sweep.run_config(make_config(dataset, seeds=(0, 7)), r, dataset).seed
          for r in runs] == [r.seed for r in runs]
  for bad in ((1, 1), (-1,), (0.5,)):
    with pytest.raises(ValueError, match="sweep.seeds"):
      sweep.plan(make_config(dataset, seeds=bad))


def test_bad_sweep_fields_raise_before_any_work(dataset, tmp_path):
  for field, value in (("launch", "cluster"), ("isolation", "thread"), ("loss", "best"),
                       ("design", "random"), ("n_tolerance", 0.0)):
    c = make_config(dataset, **{field: value})
    with pytest.raises(ValueError, match=f"sweep.{field}"):
      sweep.run_sweep(c, tmp_path, trainer=FakeTrainer())
  assert not (tmp_path / attempts.RESULTS).exists()
  c = make_config(dataset, only="no-such-run")
  with pytest.raises(ValueError, match="sweep.only"):
    sweep.run_sweep(c, tmp_path, trainer=FakeTrainer())


def test_a_crashed_run_is_recorded_and_the_sweep_goes_on(dataset, tmp_path):
  c = make_config(dataset)
  runs, _ = sweep.plan(c)
  victim = runs[1].run_id
  trainer = FakeTrainer(crash={victim})
  counts = sweep.run_sweep(c, tmp_path, trainer=trainer)
  assert trainer.calls == [r.run_id for r in runs]
  assert counts["finished"] == len(runs) - 1 and counts["failed"] == 1
  rows = list(io.read_jsonl(tmp_path / attempts.RESULTS))
  assert len(rows) == len(runs)
  failed = [r for r in rows if r["status"] != "finished"]
  assert [r["run_id"] for r in failed] == [victim]
  assert "simulated crash" in failed[0]["error"] and failed[0]["loss"] is None
  for row in rows:
    if row["status"] == "finished":
      for key in ("params_nonembed", "tokens", "loss", "d_model", "mlp_attn_ratio", "gqa",
                  "d_over_sqrt_n", "eval_loss", "final_train_loss"):
        assert row[key] > 0, key
      assert row["loss"] == row["eval_loss"] and row["loss_source"] == "eval"
      assert row["tokens"] >= 4096
      assert row["provenance"]["config"]["model"]["d_model"] == row["d_model"]
      assert "code_revision" in row["provenance"]


def test_a_sigterm_stops_an_in_process_sweep_which_resumes_on_rerun(dataset, tmp_path,
                                                                    caplog):
  c = make_config(dataset, scales="12k:1:8", d_over_sqrt_n=(0.2,), r=(0.7, 3.5))
  c.train.update(checkpoint_every=2, eval_every=0, global_batch_size=4)
  c.data.seq_len = 32
  c.sweep.tokens = 6 * 4 * 32
  runs, _ = sweep.plan(c)
  started = []

  def sigterm_at_step_3(cfg, run_dir):
    started.append(cfg.name)

    def preempt(step, _):
      if step == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return train.train(cfg, run_dir, step_callback=preempt if len(started) == 1 else None)

  with pytest.raises(SystemExit) as stop:
    sweep.run_sweep(c, tmp_path, trainer=sigterm_at_step_3)
  assert stop.value.code == exits.EXIT_PREEMPTED
  assert started == [runs[0].run_id]  # the next run was not started
  (row,) = io.read_jsonl(tmp_path / attempts.RESULTS)
  assert row["status"] == "preempted"

  with caplog.at_level(logging.INFO):
    counts = sweep.run_sweep(c, tmp_path, trainer=sigterm_at_step_3)
  assert counts["finished"] == len(runs) == 2
  assert "resumed from the checkpoint at step 4" in caplog.text  # the callback runs a step late


def test_rerun_skips_finished_runs_and_retries_failed_ones(dataset, tmp_path):
  c = make_config(dataset)
  runs, _ = sweep.plan(c)
  victim = runs[0].run_id
  sweep.run_sweep(c, tmp_path, trainer=FakeTrainer(crash={victim}))
  before = (tmp_path / attempts.RESULTS).read_bytes()

  no_retry = make_config(dataset, retry_failed=False)
  again = FakeTrainer()
  sweep.run_sweep(no_retry, tmp_path, trainer=again)
  assert again.calls == []

  again = FakeTrainer()
  counts = sweep.run_sweep(c, tmp_path, trainer=again)
  assert again.calls == [victim]
  assert counts["finished"] == len(runs) and counts["failed"] == 0
  after = (tmp_path / attempts.RESULTS).read_bytes()
  assert after.startswith(before), "rows already written must never change"
  assert attempts.finished_ids(tmp_path / attempts.RESULTS) == {r.run_id for r in runs}

  third = FakeTrainer()
  sweep.run_sweep(c, tmp_path, trainer=third)
  assert third.calls == []
  assert (tmp_path / attempts.RESULTS).read_bytes() == after


def test_a_torn_append_never_corrupts_the_table(dataset, tmp_path):
  c = make_config(dataset)
  runs, _ = sweep.plan(c)
  sweep.run_sweep(c, tmp_path, trainer=FakeTrainer(crash={runs[-1].run_id}))
  table = tmp_path / attempts.RESULTS
  good = list(io.read_jsonl(table))
  # A writer killed in the middle of its row leaves a partial line without a newline.
  torn = json.dumps({"run_id": runs[-1].run_id, "status": "finished", "loss": 1.0})[:40]
  with open(table, "a", encoding="utf-8") as f:
    f.write(torn)
  assert list(io.read_jsonl(table)) == good
  assert runs[-1].run_id not in attempts.finished_ids(table)

  trainer = FakeTrainer()
  sweep.run_sweep(c, tmp_path, trainer=trainer)
  assert trainer.calls == [runs[-1].run_id]
  rows = list(io.read_jsonl(table))
  assert rows[:len(good)] == good and len(rows) == len(good) + 1
  assert rows[-1]["status"] == "finished"
  lines = table.read_text().splitlines()
  # The table is rebuilt from the runs' own row files: the torn line is gone, no row is lost.
  assert torn not in lines and json.loads(lines[-1])["run_id"] == runs[-1].run_id


def _append_many(path, worker, n):
  for i in range(n):
    io.append_jsonl(path, {"run_id": f"w{worker}-{i}", "status": "finished", "pad": "x" * 5000})


def test_concurrent_writers_never_interleave_rows(tmp_path):
  path = tmp_path / attempts.RESULTS
  ctx = multiprocessing.get_context("spawn")
  procs = [ctx.Process(target=_append_many, args=(path, w, 40)) for w in range(4)]
  for p in procs:
    p.start()
  for p in procs:
    p.join()
  assert all(p.exitcode == 0 for p in procs)
  lines = path.read_text().splitlines()
  assert len(lines) == 160
  assert {json.loads(line)["run_id"] for line in lines} == {
      f"w{w}-{i}" for w in range(4) for i in range(40)}


def _concurrent_sweep(dataset, workdir, log):
  import time

  class Slow(FakeTrainer):
    def __call__(self, cfg, run_dir):
      time.sleep(0.3)
      with open(log, "a") as f:
        f.write(f"{cfg.name}\n")
      return super().__call__(cfg, run_dir)

  sweep.run_sweep(make_config(dataset), workdir, trainer=Slow())


def test_two_concurrent_sweeps_train_each_run_once(dataset, tmp_path):
  log = tmp_path / "trained.txt"
  ctx = multiprocessing.get_context("spawn")
  procs = [ctx.Process(target=_concurrent_sweep, args=(dataset, tmp_path, log))
           for _ in range(2)]
  for p in procs:
    p.start()
  for p in procs:
    p.join()
  assert all(p.exitcode == 0 for p in procs)
  runs, _ = sweep.plan(make_config(dataset))
  trained = log.read_text().split()
  assert sorted(trained) == sorted(r.run_id for r in runs)
  rows = list(io.read_jsonl(tmp_path / attempts.RESULTS))
  assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in runs)


def test_emit_writes_one_self_contained_command_per_run(dataset, tmp_path):
  c = make_config(dataset, launch="emit")
  counts = sweep.run_sweep(c, tmp_path, trainer=FakeTrainer())
  runs, _ = sweep.plan(c)
  assert counts["emitted"] == len(runs)
  assert not (tmp_path / attempts.RESULTS).exists()
  script = (tmp_path / sweep.LAUNCH_COMMANDS).read_text().splitlines()
  commands = [shlex.split(line) for line in script if not line.startswith("#")]
  assert len(commands) == len(runs)
  for argv, run in zip(commands, runs, strict=True):
    assert argv[:3] == [sys.executable, "-m", "archscale.main"] and "--mode=sweep" in argv
    assert f"--workdir={tmp_path.resolve()}" in argv
    own = config_lib.load_config_file(argv[3].removeprefix("--config="))
    assert own.sweep.only == run.run_id and own.sweep.launch == "local"
    assert pathlib.Path(argv[3].removeprefix("--config=")).parent.name == run.run_id
  assert os.access(tmp_path / sweep.LAUNCH_COMMANDS, os.X_OK)
  frozen = config_lib.load_config_file(tmp_path / sweep.SWEEP_CONFIG)
  assert frozen.sweep.launch == "local"
  assert frozen.data.path == str(pathlib.Path(dataset).resolve())  # jobs prepare no data
  assert [r.run_id for r in sweep.plan(frozen)[0]] == [r.run_id for r in runs]
  # What one emitted command does: train only its run, append only its row.
  frozen.sweep.only = runs[1].run_id
  trainer = FakeTrainer()
  sweep.run_sweep(frozen, tmp_path, trainer=trainer)
  assert trainer.calls == [runs[1].run_id]
  assert [r["run_id"] for r in io.read_jsonl(tmp_path / attempts.RESULTS)] == [runs[1].run_id]


def test_a_failing_training_process_is_recorded_with_its_error(dataset, tmp_path):
  c = make_config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,))
  c.model.max_seq_len = c.data.seq_len // 2  # Training refuses this: the child exits non-zero.
  counts = sweep.run_sweep(c, tmp_path)
  assert counts["failed"] == 1
  (row,) = io.read_jsonl(tmp_path / attempts.RESULTS)
  assert row["status"] == "failed"
  assert f"exceeds model.max_seq_len={c.model.max_seq_len}" in row["error"]
  run_dir = tmp_path / attempts.RUNS_DIR / row["run_id"]
  assert (run_dir / "train.log").exists()
  loaded = config_lib.load_config_file(run_dir / sweep.RUN_CONFIG)
  assert loaded.model.d_model == row["d_model"]
  assert loaded.model.max_seq_len == c.model.max_seq_len


def test_a_sweep_with_a_failed_run_exits_non_zero_naming_it(dataset, tmp_path):
  """The command line, as a script or `afterok` sees it: one run failed before (and is not
  retried), the other trains; the sweep prints which run did not finish and exits 1."""
  c = make_config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(0.7, 1.5))
  c.sweep.retry_failed = False
  c.sweep.isolation = "none"
  c.train.eval_every = 0
  workdir = tmp_path / "sweep"
  broken, good = sweep.plan(c)[0]
  run_cfg = sweep.run_config(c, broken, dataset)
  attempts.record_attempt(workdir, attempts.failed_row(
      broken, "failed", "RuntimeError: out of memory\ntrace", run_cfg, 1.0))
  config = config_lib.write_config_py(tmp_path / "sweep_config.py", c, "One failed run.")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "archscale.main", f"--config={config}",
                         "--mode=sweep", f"--workdir={workdir}"], env=env, capture_output=True,
                        text=True, timeout=600)
  out = proc.stdout + proc.stderr
  assert proc.returncode == exits.EXIT_FAILED, out[-3000:]
  assert "1 run(s) not finished" in out
  assert any(line.split()[:2] == [broken.run_id, "failed"] and "out of memory" in line
             for line in out.splitlines()), out[-3000:]
  rows = {r["run_id"]: r["status"] for r in io.read_jsonl(workdir / attempts.RESULTS)}
  assert rows == {broken.run_id: "failed", good.run_id: "finished"}
  assert exits.status_of({"failed": 0, "unknown": 0, "skipped": 1}) == exits.EXIT_BUSY


def test_emitted_commands_run_from_a_workdir_with_spaces(dataset, tmp_path):
  workdir = tmp_path / "my sweep's dir"
  c = make_config(dataset, launch="emit", scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,))
  c.train.eval_every = 0
  sweep.run_sweep(c, workdir)
  (line,) = [x for x in (workdir / sweep.LAUNCH_COMMANDS).read_text().splitlines()
             if not x.startswith("#")]
  elsewhere = tmp_path / "other place"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(["sh", "-c", line], cwd=elsewhere, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = io.read_jsonl(workdir / attempts.RESULTS)
  assert row["status"] == "finished" and row["loss"] > 0
  assert (workdir / attempts.RUNS_DIR / row["run_id"] / "summary.json").exists()
  assert not list(elsewhere.iterdir())  # nothing written relative to the current directory


def test_each_run_keeps_its_own_rows_and_the_table_is_derived_from_them(dataset, tmp_path):
  c = make_config(dataset)
  runs, _ = sweep.plan(c)
  victim = runs[0].run_id
  sweep.run_sweep(c, tmp_path, trainer=FakeTrainer(crash={victim}))
  sweep.run_sweep(c, tmp_path, trainer=FakeTrainer())
  files = sorted((tmp_path / attempts.RUNS_DIR / victim / attempts.ATTEMPTS_DIR).iterdir())
  assert [json.loads(f.read_text())["status"] for f in files] == ["failed", "finished"]
  assert [json.loads(f.read_text())["attempt"] for f in files] == [1, 2]
  table = tmp_path / attempts.RESULTS
  full = table.read_bytes()
  assert len(full.splitlines()) == len(runs) + 1
  table.unlink()  # A lost or stale table is rebuilt from the runs' files, training nothing.
  trainer = FakeTrainer()
  counts = sweep.run_sweep(c, tmp_path, trainer=trainer)
  assert trainer.calls == [] and counts["finished"] == len(runs)
  assert table.read_bytes() == full
  assert attempts.run_states(tmp_path)[victim]["status"] == "finished"


def test_progress_counts_through_a_failed_run_and_a_resumed_sweep(dataset, tmp_path):
  c = make_config(dataset)
  runs, _ = sweep.plan(c)
  lines = []
  sweep.run_sweep(c, tmp_path, trainer=FakeTrainer(crash=[runs[1].run_id]), progress=lines.append)
  n, planned = len(runs), sum(r.tokens for r in runs)
  last = [x for x in lines if "; ETA" in x][-1]
  assert f"{n - 1} finished, 1 failed;" in last and last.endswith("ETA 00:00:00"), last
  assert f"of {planned / 1e3:.3g}k tokens" in last
  first = next(x for x in lines if "finished: loss" in x)
  assert f"1 finished, {n - 1} queued; {runs[0].tokens / 1e3:.3g}k of " in first
  tokens = progress.SweepProgress(runs, c.data.seq_len, print).line(
      {r.run_id: "finished" for r in runs})
  assert tokens.startswith(f"{n} finished; ")

  # The resumed sweep retrains the failed run only; the runs finished before count as done and
  # stay out of the ETA's rate.
  lines.clear()
  trainer = FakeTrainer()
  sweep.run_sweep(c, tmp_path, trainer=trainer, progress=lines.append)
  assert trainer.calls == [runs[1].run_id]
  (line,) = [x for x in lines if "finished: loss" in x]
  assert f"{n} finished;" in line and line.endswith("ETA 00:00:00")


def test_the_eta_weighs_runs_by_their_flops(dataset):
  runs, _ = sweep.plan(make_config(dataset))
  small, big = sorted(runs, key=lambda r: progress.run_flops(r, 128))[::len(runs) - 1]
  p = progress.SweepProgress([small, big], 128, print)
  p.line({small.run_id: "queued", big.run_id: "queued"})
  p.start -= 10.0  # the small run took 10 s
  eta = p.line({small.run_id: "finished", big.run_id: "queued"}).split("ETA ")[1]
  h, m, s = (int(v) for v in eta.split(":"))
  ratio = progress.run_flops(big, 128) / progress.run_flops(small, 128)
  assert ratio > 1.5 and abs(3600 * h + 60 * m + s - 10 * ratio) <= 1.5


def test_a_sweep_on_another_corpus_prepared_in_the_same_path_is_refused(tmp_path):
  """Finished rows trained on corpus A are not reused once data.path holds corpus B."""
  from archscale.data import prepare

  def corpus(text):
    (tmp_path / "c.txt").write_text("\n\n".join(f"{text} {i}" for i in range(400)))
    shutil.rmtree(tmp_path / "data", ignore_errors=True)
    prepare.prepare(str(tmp_path / "c.txt"), tmp_path / "data", "byte", text_docs="paragraph",
                    eval_fraction=0.05)

  corpus("and the light was good, and it was so")
  c = make_config(tmp_path / "data", scales="50k:2:16", d_over_sqrt_n=(0.2,), r=(1.5,),
                  isolation="none")
  c.train.update(eval_every=0, checkpoint_every=0)
  assert sweep.run_sweep(c, tmp_path / "sweep")["finished"] == 1
  corpus("in the beginning was a different text altogether")
  with pytest.raises(ValueError, match=r"1 finished run\(s\) of this sweep .* trained on another "
                     r"dataset"):
    sweep.run_sweep(c, tmp_path / "sweep")
  (row,) = io.read_jsonl(tmp_path / "sweep" / attempts.RESULTS)
  run_dir = tmp_path / "sweep" / attempts.RUNS_DIR / row["run_id"]
  with pytest.raises(ValueError, match="was trained on another dataset"):  # and the trainer too
    train.train(config_lib.load_config_file(run_dir / sweep.RUN_CONFIG), run_dir)
