"""Training end to end on a tiny corpus: learning, exact resumes, preemption, sharded equivalence.

Runs that need 8 devices or 2 processes start subprocesses (the device count is fixed when JAX
starts). A persistent compilation cache shared by all of them keeps the repeated compiles cheap.
"""

import gzip
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import (
  STEPS,
  flat,
  metrics,
  params_of,
  run_script,
  subprocess_env,
  tiny_config,
  untimed,
)

from archscale.data import batches as data_lib
from archscale.model import transformer as model_lib
from archscale.train import checkpoint, monitor
from archscale.train import step as step_lib
from archscale.train import trainer as train

KILL_AT = 15  # the killed run dies after step 15; its last checkpoint is step 10


# ---------------------------------------------------------------------------------- fixtures


# ------------------------------------------------------------------------------ unit pieces


def assert_step_close(got: dict, want: dict) -> None:
  """One step's state: Adam's moments (the gradients) to 1e-5, parameters to 1e-4, in norm."""
  params = [k for k in want if k.startswith("['params']")]
  assert_trees_close({k: got[k] for k in want if k not in params},
                     {k: want[k] for k in want if k not in params}, rtol=1e-5)
  assert_trees_close({k: got[k] for k in params}, {k: want[k] for k in params}, rtol=1e-4)


def test_peak_flops_table():
  assert train.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert train.peak_flops("NVIDIA H100 PCIe") is None  # not the SXM part: no guessed peak
  assert train.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
  assert train.peak_flops("TPU v5 lite") == 197e12
  assert train.peak_flops("TPU v5") == 459e12
  assert train.peak_flops("cpu") is None


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_learning_rate_schedules(schedule):
  t = ml_collections.ConfigDict(dict(lr=1.0, min_lr_ratio=0.1, steps=100, warmup_steps=10,
                                     schedule=schedule, decay_fraction=0.2))
  lr = [float(step_lib.learning_rate(t)(s)) for s in range(100)]
  assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # linear warm-up
  assert max(lr) == pytest.approx(1.0)
  if schedule == "constant":
    assert lr[99] == pytest.approx(1.0)
  else:
    assert lr[99] == pytest.approx(0.1)
    assert all(a >= b - 1e-7 for a, b in zip(lr[10:], lr[11:], strict=False))
  if schedule == "wsd":
    assert lr[79] == pytest.approx(1.0) and lr[80] < 1.0


def test_weight_decay_skips_norm_scales():
  params = {"embedding": np.ones((4, 2)), "final_norm": {"scale": np.ones(2)},
            "layers": {"attn_norm": {"scale": np.ones((2, 2))}, "mlp": {"up": np.ones((2, 2))}}}
  mask = step_lib.decay_mask(params)
  assert mask["embedding"] and mask["layers"]["mlp"]["up"]
  assert not mask["final_norm"]["scale"] and not mask["layers"]["attn_norm"]["scale"]


def test_tensorboard_scalars(tmp_path):
  pytest.importorskip("tensorboard")
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  writer = monitor._TensorBoard(tmp_path)
  writer.scalars(1, {"step": 1, "loss": 2.5, "mfu": None})
  writer.scalars(2, {"step": 2, "loss": 2.0, "mfu": None})
  writer.close()
  events = EventAccumulator(str(tmp_path))
  events.Reload()
  assert events.Tags()["scalars"] == ["loss"]
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 2.5), (2, 2.0)]


def one_step(config) -> tuple[dict, dict]:
  """Metrics and parameters after one train step from the seed's initialisation."""
  setup = train.build(config)
  step = train.compile_step(setup, config.train)
  state = train.init_state(setup, config.seed)
  state, m = step(state, train.BatchSource(config, setup, "train")(0))
  return jax.device_get(m), flat(jax.device_get({"params": state["params"],
                                                   "opt_state": state["opt_state"]}))


def assert_trees_close(a: dict, b: dict, rtol: float) -> None:
  """Every leaf within `rtol` of the other in norm: ||a - b|| <= rtol * ||b||.

  Not elementwise: Adam's update g / (|g| + eps) amplifies the last-bit differences of any
  gradient element near eps in size (different reduction orders give such differences): after
  one step the gradients (Adam's moments) agree to ~1e-6 in norm, the parameters to ~1e-5.
  """
  assert a.keys() == b.keys()
  for k in a:
    err = np.linalg.norm((a[k] - b[k]).ravel()) / np.linalg.norm(b[k].ravel())
    assert err <= rtol, f"{k}: relative error {err:.2e} > {rtol}"


# ------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("change, field", [
    (lambda c: setattr(c.data, "path", ""), "data.path"),
    (lambda c: setattr(c.data, "path", "/nonexistent/dataset"), "data.path"),
    (lambda c: setattr(c.data, "seq_len", 128), "data.seq_len"),
    (lambda c: setattr(c.model, "vocab_size", 128), "model.vocab_size"),
    (lambda c: setattr(c.train, "grad_accum", 3), "train.global_batch_size"),
    (lambda c: setattr(c.mesh, "data", 2), "mesh.data"),
    (lambda c: setattr(c.mesh, "rules", "embed=tensor"), "mesh.rules"),
    (lambda c: setattr(c.train, "schedule", "linear"), "train.schedule"),
    (lambda c: setattr(c.train, "steps", 0), "train.steps"),
    (lambda c: setattr(c.train, "loss_chunk", -1), "train.loss_chunk"),
])
def test_bad_inputs_fail_fast_naming_the_field(corpus, tmp_path, change, field):
  config = tiny_config(corpus)
  change(config)
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    train.train(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


# --------------------------------------------------------------------------- whole runs


def test_loss_falls_and_outputs_are_complete(reference):
  rows, summary = reference["metrics"], reference["summary"]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  first, last = rows[0]["loss"], summary["final_train_loss"]
  assert first == pytest.approx(np.log(256), rel=0.05)
  assert last < first - 2.0
  assert summary["eval_loss"] < first - 2.0
  assert summary["final_train_loss"] == rows[-1]["loss"]  # 2% of 30 steps: the last step
  on_disk = json.loads((reference["workdir"] / "summary.json").read_text())
  for key in ("final_train_loss", "eval_loss", "tokens", "steps", "params_nonembed",
              "tokens_per_sec", "mfu", "wall_s", "compile_s"):
    assert key in on_disk, key
  assert on_disk["tokens"] == STEPS * 8 * 32 and on_disk["steps"] == STEPS
  assert on_disk["mfu"] is None  # no peak FLOP/s is known for CPU
  windows = data_lib.Batches(reference["config"].data.path, "train", 32, 8, 0).num_windows
  assert on_disk["epochs"] == pytest.approx(STEPS * 8 / windows)
  assert sum("eval_loss" in r for r in rows) == 3


def test_rerun_of_a_finished_run_returns_its_summary(reference):
  again = train.train(reference["config"], reference["workdir"])
  assert again == json.loads((reference["workdir"] / "summary.json").read_text())


_KILLED_RUN = """
import json, os, pathlib, signal, sys, time
import ml_collections
from archscale.train import trainer as train

config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
workdir, kill_at, wait_for = pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def die(step, metrics):
  if step == kill_at:  # once checkpoint `wait_for` is final, die without any cleanup
    while not (workdir / "checkpoints" / str(wait_for)).exists():
      time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGKILL)

train.train(config, workdir, step_callback=die)
"""


def test_killed_and_restarted_run_matches_bitwise(reference, cache_dir, tmp_path):
  config = reference["config"]
  out = run_script(_KILLED_RUN, subprocess_env(cache_dir), json.dumps(config.to_dict()),
                   str(tmp_path), str(KILL_AT), "10")
  assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
  assert max(r["step"] for r in metrics(tmp_path)) >= KILL_AT - 1  # rows past checkpoint 10
  assert not (tmp_path / "summary.json").exists()

  summary = train.train(config, tmp_path)
  # Rows of steps 11..15 from before the kill were replaced by the rerun ones.
  assert [untimed(r) for r in metrics(tmp_path)] == [untimed(r) for r in reference["metrics"]]
  assert summary["final_train_loss"] == reference["summary"]["final_train_loss"]
  assert summary["eval_loss"] == reference["summary"]["eval_loss"]
  resumed, ref = flat(params_of(tmp_path, config)), flat(reference["params"])
  for k in ref:
    np.testing.assert_array_equal(resumed[k], ref[k], err_msg=k)


_PLAIN_RUN = """
import json, pathlib, sys
import ml_collections
from archscale.train import trainer as train
train.train(ml_collections.ConfigDict(json.loads(sys.argv[1])), pathlib.Path(sys.argv[2]))
"""


def test_compilation_cache_stores_the_compiled_step_where_the_config_says(corpus, cache_dir,
                                                                          tmp_path):
  config = tiny_config(corpus, steps=2, eval_every=0, checkpoint_every=0)
  config.train.compilation_cache = str(tmp_path / "jax cache")
  env = subprocess_env(cache_dir)
  env.pop("JAX_COMPILATION_CACHE_DIR")
  out = run_script(_PLAIN_RUN, env, json.dumps(config.to_dict()), str(tmp_path / "run"))
  assert out.returncode == 0, out.stderr[-3000:]
  entries = {p.name.split("-")[0] for p in (tmp_path / "jax cache").iterdir()}
  assert "jit_step" in entries, entries


def test_sigterm_checkpoints_then_resumes(reference, tmp_path, monkeypatch):
  config = reference["config"]

  def preempt(step, _):
    if step == 12:
      os.kill(os.getpid(), signal.SIGTERM)

  # The resumed session runs on "devices" twice as fast as the first one's.
  monkeypatch.setattr(train, "peak_flops", lambda kind: 1e12)
  result = train.train(config, tmp_path, step_callback=preempt)
  assert result["status"] == "preempted"
  saved = checkpoint.Checkpoints(tmp_path / "checkpoints", config.train)
  first = saved.latest_step()
  assert first in (12, 13)  # the step boundary after the signal
  first_train_s = saved.restore_meta(first)["train_s"]
  saved.close()
  assert not (tmp_path / "summary.json").exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is uninstalled

  monkeypatch.setattr(train, "peak_flops", lambda kind: 2e12)
  summary = train.train(config, tmp_path)
  assert summary["final_train_loss"] == reference["summary"]["final_train_loss"]
  # MFU over both sessions: the achieved FLOPs against each session's own peak for its time.
  saved = checkpoint.Checkpoints(tmp_path / "checkpoints", config.train)
  total_train_s = saved.restore_meta(STEPS)["train_s"]
  saved.close()
  achieved = summary["tokens_per_sec"] * summary["flops_per_token"] * total_train_s
  available = (first_train_s * 1e12 + (total_train_s - first_train_s) * 2e12) * jax.device_count()
  assert first_train_s > 0 and total_train_s > first_train_s
  assert summary["mfu"] == pytest.approx(achieved / available, rel=1e-9)
  resumed, ref = flat(params_of(tmp_path, config)), flat(reference["params"])
  for k in ref:
    np.testing.assert_array_equal(resumed[k], ref[k], err_msg=k)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, tmp_path,
                                                                  monkeypatch, cache_dir):
  config = tiny_config(corpus, steps=10, checkpoint_every=5, eval_every=0)
  original = data_lib.Batches.__call__

  def poisoned(self, step):
    batch = original(self, step)
    return batch + 1000 if step >= 6 else batch  # ids beyond the vocabulary embed to NaN

  monkeypatch.setattr(data_lib.Batches, "__call__", poisoned)
  with pytest.raises(FloatingPointError, match=r"step 7.*last good checkpoint is step 5"):
    train.train(config, tmp_path)
  monkeypatch.undo()
  saved = checkpoint.Checkpoints(tmp_path / "checkpoints", config.train)
  assert saved.manager.all_steps() == [5]
  saved.close()
  params = flat(params_of(tmp_path, config))
  assert all(np.isfinite(v).all() for v in params.values())


def test_rerun_after_a_failure_before_any_checkpoint_starts_a_clean_log(corpus, tmp_path,
                                                                        monkeypatch):
  config = tiny_config(corpus, steps=6, checkpoint_every=0, eval_every=0)
  original = data_lib.Batches.__call__
  monkeypatch.setattr(data_lib.Batches, "__call__",
                      lambda self, step: original(self, step) + (1000 if step >= 2 else 0))
  with pytest.raises(FloatingPointError, match="last good checkpoint is none"):
    train.train(config, tmp_path)
  assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
  monkeypatch.undo()
  train.train(config, tmp_path)
  assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 7))


def test_an_eval_larger_than_the_eval_split_is_reported(corpus, tmp_path, caplog):
  windows = data_lib.Batches(corpus, "eval", 32, 8, 0).num_windows
  config = tiny_config(corpus, steps=1, eval_batches=windows // 8 + 1)
  train.train(config, tmp_path)
  assert "lower train.eval_batches or raise data.eval_fraction" in caplog.text


_EIGHT_DEVICES = """
import json, pathlib, sys
import jax, ml_collections, numpy as np
from archscale.train import trainer as train

assert jax.device_count() == 8
config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
out = pathlib.Path(sys.argv[2])

def flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]}

results = {}
for name, (mesh, loss_chunk) in {"2x4": ((2, 4, 1), 0), "2x2x2": ((2, 2, 2), 0),
                                  "2x2x2_chunked_loss": ((2, 2, 2), 5)}.items():
  c = ml_collections.ConfigDict(config.to_dict())
  c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
  c.train.loss_chunk = loss_chunk
  setup = train.build(c)
  step = train.compile_step(setup, c.train)
  state = train.init_state(setup, c.seed)
  state, m = step(state, train.BatchSource(c, setup, "train")(0))
  np.savez(out / f"step_{name}.npz", loss=m["loss"], grad_norm=m["grad_norm"],
           **flat({"params": state["params"], "opt_state": state["opt_state"]}))

# Restore the single-device run's final checkpoint onto a 2x4 mesh, and resume its step-20
# checkpoint on a 2x2x2 mesh to the end.
c = ml_collections.ConfigDict(config.to_dict())
c.mesh.update(data=2, fsdp=4, tensor=1)
restored = train.load_checkpoint(sys.argv[3], c)
assert restored["params"]["embedding"].sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
np.savez(out / "restored.npz", **flat(restored["params"]))
c.mesh.update(data=2, fsdp=2, tensor=2)
train.train(c, sys.argv[4])

c.train.global_batch_size = 12  # 12 rows cannot be split over data x fsdp = 8
c.mesh.update(data=2, fsdp=4, tensor=1)
try:
  train.build(c)
  raise SystemExit("batch 12 on 8 data-parallel devices was accepted")
except ValueError as e:
  assert "train.global_batch_size=12" in str(e) and "mesh.fsdp=4" in str(e), e
print("OK")
"""


def _resume_copy(reference, dest: pathlib.Path, step: int) -> pathlib.Path:
  """A workdir holding only the reference run's checkpoint at `step` (and its metrics)."""
  shutil.copytree(reference["workdir"] / "checkpoints", dest / "checkpoints")
  for other in (dest / "checkpoints").iterdir():
    if other.name.isdigit() and int(other.name) != step:
      shutil.rmtree(other)
  shutil.copy(reference["workdir"] / "metrics.jsonl", dest / "metrics.jsonl")
  return dest


def test_eight_device_meshes_match_one_device(reference, cache_dir, tmp_path):
  config = reference["config"]
  resume_dir = _resume_copy(reference, tmp_path / "resume", 20)
  out = run_script(_EIGHT_DEVICES, subprocess_env(cache_dir, devices=8),
                   json.dumps(config.to_dict()), str(tmp_path), str(reference["workdir"]),
                   str(resume_dir))
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-5000:]

  m1, p1 = one_step(config)
  for name in ("2x4", "2x2x2", "2x2x2_chunked_loss"):
    got = dict(np.load(tmp_path / f"step_{name}.npz"))
    assert float(got.pop("loss")) == pytest.approx(float(m1["loss"]), rel=1e-5)
    assert float(got.pop("grad_norm")) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    assert_step_close(got, p1)

  restored, ref = dict(np.load(tmp_path / "restored.npz")), flat(reference["params"])
  for k in ref:
    np.testing.assert_array_equal(restored[k], ref[k], err_msg=k)
  resumed = flat(params_of(resume_dir, config))
  assert_trees_close(resumed, ref, rtol=1e-4)
  losses = {r["step"]: r["loss"] for r in metrics(resume_dir)}
  for r in reference["metrics"][20:]:
    assert losses[r["step"]] == pytest.approx(r["loss"], rel=1e-5)


_PROCESS = """
import json, os, signal, sys, time
import jax, ml_collections
from archscale.train import trainer as train

config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
config.distributed.update(coordinator_address=sys.argv[3], num_processes=2,
                          process_id=int(sys.argv[4]))
sigterm_at = int(sys.argv[5])  # 0: never; else every process gets SIGTERM after this step

def preempt(step, _):
  if step == sigterm_at:
    os.kill(os.getpid(), signal.SIGTERM)
  if sigterm_at and step >= sigterm_at:
    time.sleep(0.3)  # the processes agree on a stop step about a second after the notice

summary = train.train(config, sys.argv[2], step_callback=preempt)
assert jax.process_count() == 2 and jax.device_count() == 2
print("OK", summary["status"])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(config, workdir, cache_dir, sigterm_at: int) -> list[str]:
  address = f"localhost:{_free_port()}"
  procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_PROCESS),
                             json.dumps(config.to_dict()), str(workdir), address, str(i),
                             str(sigterm_at)],
                            env=subprocess_env(cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, stderr) in zip(procs, outs, strict=True):
    assert p.returncode == 0, stderr[-5000:]
  return [stdout for stdout, _ in outs]


def test_two_processes_match_one_through_a_preemption(reference, cache_dir, tmp_path):
  """Resumed from the reference's step-20 checkpoint, SIGTERM to both processes after step 21
  (the scheduler's preemption notice), then resumed again: the same losses and parameters."""
  config = reference["config"]
  workdir = _resume_copy(reference, tmp_path / "run", 20)
  outs = _two_processes(config, workdir, cache_dir, sigterm_at=21)
  assert all("OK preempted" in out for out in outs), outs
  saved = checkpoint.Checkpoints(workdir / "checkpoints", config.train)
  assert 21 <= saved.latest_step() < STEPS  # both stopped at the agreed step and saved it
  saved.close()
  outs = _two_processes(config, workdir, cache_dir, sigterm_at=0)
  assert all("OK finished" in out for out in outs), outs

  losses = {r["step"]: r["loss"] for r in metrics(workdir)}
  for r in reference["metrics"][20:]:
    assert losses[r["step"]] == pytest.approx(r["loss"], rel=1e-5)
  assert_trees_close(flat(params_of(workdir, config)), flat(reference["params"]), rtol=1e-4)


# ------------------------------------------------------------------- step-level numerics


def test_gradient_accumulation_matches_the_full_batch(corpus, cache_dir):
  m1, p1 = one_step(tiny_config(corpus))
  m2, p2 = one_step(tiny_config(corpus, grad_accum=4))
  assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
  assert float(m1["grad_norm"]) == pytest.approx(float(m2["grad_norm"]), rel=1e-5)
  assert_step_close(p2, p1)


def test_eval_runs_over_the_training_micro_batches(corpus):
  config = tiny_config(corpus)
  config.model.vocab_size = 4096  # so that logits dominate the eval step's memory
  setup = train.build(config)
  params = model_lib.init_params(setup.model, jax.random.key(0))
  tokens = train.BatchSource(config, setup, "eval")(0)
  full = train.compile_eval(setup, config.train)
  config.train.grad_accum = 4
  micro = train.compile_eval(setup, config.train)
  assert float(micro(params, tokens)) == pytest.approx(float(full(params, tokens)), rel=1e-6)
  temp = lambda fn: fn.memory_analysis().temp_size_in_bytes
  assert temp(micro) < 0.5 * temp(full)


@pytest.mark.parametrize("loss_chunk", [8, 5])  # 5 does not divide seq_len=32: padded chunks
def test_chunked_fused_loss_step_matches_full_logits(corpus, loss_chunk):
  m1, p1 = one_step(tiny_config(corpus, z_loss=1e-2))
  m2, p2 = one_step(tiny_config(corpus, z_loss=1e-2, loss_chunk=loss_chunk))
  for key in ("loss", "z_loss", "grad_norm"):
    assert float(m2[key]) == pytest.approx(float(m1[key]), rel=1e-5), key
  assert_step_close(p2, p1)


def test_z_loss_is_added_to_the_objective(corpus):
  config = tiny_config(corpus)
  setup = train.build(config)
  params = model_lib.init_params(setup.model, jax.random.key(0))
  tokens = jnp.asarray(data_lib.Batches(corpus, "train", 32, 8, 0)(0))
  loss = jax.jit(lambda p, x, z: step_lib.loss_fn(setup.model, p, x, z), static_argnums=2)
  total, (ce, z) = loss(params, tokens, 1e-2)
  total0, (ce0, z0) = loss(params, tokens, 0.0)
  assert float(z0) == 0.0 and float(ce0) == float(total0) == pytest.approx(float(ce))
  # Freshly initialised logits are near zero, so logsumexp is about log(256).
  assert float(z) == pytest.approx(1e-2 * np.log(256) ** 2, rel=0.01)
  assert float(total) == pytest.approx(float(ce) + float(z), rel=1e-6)


def test_profile_steps_trace_the_chosen_steps_and_not_the_compile(dataset, tmp_path):
  config = tiny_config(dataset, steps=6, eval_every=0, checkpoint_every=0)
  config.train.profile_steps = "3:5"
  train.train(config, tmp_path / "run")
  traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  (perfetto,) = (tmp_path / "run" / "profile").rglob("perfetto_trace.json.gz")
  events = json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]
  starts = sorted(e["ts"] for e in events if e.get("name") == "PjitFunction(jit(step))")
  # Each call shows as two nested events: count the gaps between calls.
  calls = 1 + sum(b - a > 100 for a, b in zip(starts, starts[1:], strict=False))
  assert calls == 2  # steps 3 and 4
  assert not [e for e in events if "compile" in str(e.get("name", "")).lower()]
  config.train.profile_steps = "1:3"
  with pytest.raises(ValueError, match=r"train.profile_steps='1:3' must be 'a:b' with 2 <= a < b"):
    train.train(config, tmp_path / "other")


def test_the_checkpoints_own_metrics_row_survives_a_crash_after_the_commit(dataset, tmp_path):
  """A crash between a checkpoint's commit and the write of that step's row: the resumed run
  puts the row back from the checkpoint, so metrics.jsonl is whole up to the checkpoint."""
  config = tiny_config(dataset, steps=8, eval_every=0, checkpoint_every=4,
                       async_checkpoint=False)
  workdir = tmp_path / "run"

  def crash(step, metrics):
    if step == 6:
      raise KeyboardInterrupt("simulated crash")

  with pytest.raises(KeyboardInterrupt):
    train.train(config, workdir, step_callback=crash)
  before = {r["step"]: r for r in metrics(workdir)}
  (workdir / "metrics.jsonl").write_text(  # what the crash would have lost: row 4 and after
      "".join(json.dumps(before[s]) + "\n" for s in range(1, 4)))
  train.train(config, workdir)
  rows = metrics(workdir)
  assert [r["step"] for r in rows] == list(range(1, 9))
  assert rows[3]["loss"] == before[4]["loss"] and rows[3]["lr"] == before[4]["lr"]
