"""Training: sharded init, a jitted step with donated state, held-out eval, orbax checkpoints.

`python -m archscale.main --config=configs/X.py --mode=train --workdir=DIR` writes to DIR:

  config.json     the config and provenance (code revision, devices) of the latest start
  metrics.jsonl   one row per logged step: step, loss, grad_norm, lr, tokens_per_sec, step_time_s,
                  mfu, tokens (and eval_loss at eval steps)
  checkpoints/    orbax checkpoints: the train state (step, params, optimiser state) plus a small
                  JSON with the run's running totals
  summary.json    written once the run finishes: arch (the ArchSpec), params_nonembed, tokens,
                  steps, final_train_loss (mean over the last 2% of steps, at least one),
                  eval_loss (at the last step), tokens_per_sec and mfu (steady state: compile,
                  eval and checkpoint pauses excluded), wall_s (all sessions), compile_s

Data: `train()` reads the prepared dataset at `data.path` and refuses to start without one (a sweep
shares one dataset); `--mode=train` with `data.path` empty and `data.source` set first prepares
it into DIR/data. SIGTERM (preemption) checkpoints at the next step boundary and stops;
`--mode=train` then exits with status 75 (`exits.EXIT_PREEMPTED`, "resume me"). The trainer
holds DIR/.lock for its whole life (`io.WorkdirLock`), and a rerun whose recipe differs from the
checkpoint's or summary's is refused, naming the changed fields.

Rerunning with the same DIR resumes from the latest checkpoint. Batches are a pure function of
(data seed, step) (`data.batches.Batches`), so the step stored in the train state is the whole
data-loader state: nothing is replayed, and a resumed run sees exactly the batches an
uninterrupted one would, whatever the mesh or process count. On CPU resumption is bitwise exact.

Numerics: parameters and optimiser state are stored in `compute.param_dtype` (float32 by default);
matmuls run in `compute.dtype` (bfloat16 for speed); logits, the loss and RMSNorm are float32.

MFU = achieved model FLOP/s / (peak FLOP/s per device x devices), with model FLOPs per token from
`ArchSpec.train_flops_per_token` (6 x matmul weights incl. the LM head, plus causal attention at
half the full square) and the dense bf16 peak of `hardware.ACCELERATORS`; null where unknown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from archscale.core import exits, hardware, io, settings, tracking
from archscale.core.settings import DataConfig, TrainConfig
from archscale.model import hf_format, sharding
from archscale.model import transformer as model_lib
from archscale.model.arch import ArchSpec
from archscale.train import checkpoint, monitor
from archscale.train import recipe as recipe_lib
from archscale.train import step as step_lib

FINAL_LOSS_FRACTION = 0.02  # final_train_loss = mean loss over the last 2% of steps (at least 1)

def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind (the cost model's table); None if unknown."""
  key = hardware.accelerator_for_device_kind(device_kind)
  return None if key is None else hardware.ACCELERATORS[key].peak_flops


# ------------------------------------------------------------------------- validation, setup


@dataclasses.dataclass
class Setup:
  """Everything derived from a config before anything is compiled."""

  spec: ArchSpec
  model: model_lib.Transformer
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  data_info: dict[str, Any]
  tx: optax.GradientTransformation
  abstract_state: Any   # ShapeDtypeStructs with shardings
  state_shardings: Any
  batch_sharding: NamedSharding
  seq_len: int
  tokens_per_step: int
  batch_shards: int  # how many ways a batch is split over devices


def validate(config: Any) -> TrainConfig:
  """The typed train section, after the checks that span sections (needing no devices or files)."""
  t = TrainConfig.from_config(config)
  seq_len = DataConfig.from_config(config).seq_len
  settings.check(seq_len <= config.model.max_seq_len,
         f"data.seq_len={seq_len} exceeds model.max_seq_len={config.model.max_seq_len}; lower "
         "data.seq_len or raise model.max_seq_len")
  return t


def _dataset_info(config: Any) -> dict[str, Any]:
  """The prepared dataset's metadata; raises naming `data.path` when there is none."""
  from archscale.data import batches as data_lib

  path = str(config.data.path).strip()
  settings.check(bool(path),
         "data.path is empty: training reads a prepared dataset. Run --mode=prepare_data (with "
         "data.source set) and pass its output as --config.data.path, or set data.source and let "
         "--mode=train prepare it into WORKDIR/data")
  info = data_lib.dataset_info(path)
  data_lib.check_against_model(config, info)
  return info


def _opt_state_shardings(abstract_opt: Any, param_shardings: Any, mesh: jax.sharding.Mesh) -> Any:
  """Optimiser-state shardings: a leaf whose path ends with a parameter's path shares its sharding.

  Adam's moments mirror the parameter tree, so their paths end with the parameter paths; scalar
  leaves (step counts) are replicated.
  """
  by_path = {tuple(map(str, path)): s for path, s in
             jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

  def one(path, leaf):
    keys = tuple(map(str, path))
    for start in range(len(keys)):
      if keys[start:] in by_path:
        return by_path[keys[start:]]
    if leaf.ndim == 0:
      return sharding.replicated(mesh)
    raise ValueError(f"optimiser state {jax.tree_util.keystr(path)} matches no parameter")

  return jax.tree_util.tree_map_with_path(one, abstract_opt)


def build(config: Any, with_data: bool = True) -> Setup:
  """Validates the config and derives model, mesh, shardings and data: no compilation yet.

  `with_data=False` skips the dataset (for benchmarks that feed synthetic tokens).
  """
  t = validate(config)
  spec = ArchSpec.from_config(config)
  options = model_lib.ModelOptions.from_config(config)
  info = _dataset_info(config) if with_data else {}
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.parse_rules(config.mesh.get("rules", ""))
  ways = sharding.batch_parallelism(mesh, rules)
  micro = t.global_batch_size // t.grad_accum
  if micro % ways:
    axes = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in dict(rules)["batch"])
    raise ValueError(
        f"train.global_batch_size={t.global_batch_size} (over train.grad_accum={t.grad_accum}: "
        f"{micro} rows per micro-batch) must be divisible by the batch axes {axes} = {ways}")

  model = model_lib.Transformer(spec, options)
  tx = step_lib.make_optimizer(t)
  abstract = jax.eval_shape(lambda: _init_state(model, tx, jax.random.key(0)))
  param_shardings = sharding.logical_shardings(
      abstract["params"], model_lib.logical_axes(model), mesh, rules)
  state_shardings = {
      "step": sharding.replicated(mesh),
      "params": param_shardings,
      "opt_state": _opt_state_shardings(abstract["opt_state"], param_shardings, mesh),
  }
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          abstract, state_shardings)
  return Setup(spec=spec, model=model, mesh=mesh, rules=rules, data_info=info, tx=tx,
               abstract_state=abstract, state_shardings=state_shardings,
               batch_sharding=sharding.batch_sharding(mesh, rules),
               seq_len=config.data.seq_len,
               tokens_per_step=t.global_batch_size * config.data.seq_len, batch_shards=ways)


def _init_state(model: model_lib.Transformer, tx: optax.GradientTransformation,
                rng: jax.Array) -> dict[str, Any]:
  params = model_lib.init_params(model, rng)
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def init_state(setup: Setup, seed: int) -> Any:
  """A freshly initialised, already sharded train state (never materialised on one device)."""
  init = jax.jit(lambda rng: _init_state(setup.model, setup.tx, rng),
                 out_shardings=setup.state_shardings)
  return init(jax.random.key(seed))


def _flax_rules(rules: sharding.Rules) -> tuple:
  return tuple((name, None if not axes else axes[0] if len(axes) == 1 else axes)
               for name, axes in rules)


@contextlib.contextmanager
def _tracing_context(setup: Setup):
  """Mesh and activation rules in scope while tracing the model (for its sharding constraints)."""
  act = _flax_rules(sharding.activation_rules(setup.rules))
  with jax.set_mesh(setup.mesh), nn.logical_axis_rules(act):
    yield


def _micro_sharding(setup: Setup, accum: int) -> NamedSharding | None:
  """Sharding of the [A, B/A, T+1] micro-batches: each spread over the data-parallel devices."""
  if accum == 1:
    return None
  return NamedSharding(setup.mesh, PartitionSpec(None, *setup.batch_sharding.spec))


def compile_step(setup: Setup, train_cfg: Any) -> Any:
  """The train step compiled ahead of time for the state and batch shardings (state donated)."""
  step = step_lib.make_train_step(setup.model, setup.tx, train_cfg,
                                  _micro_sharding(setup, train_cfg.grad_accum), setup.batch_shards)
  batch = jax.ShapeDtypeStruct((train_cfg.global_batch_size, setup.seq_len + 1), jnp.int32,
                               sharding=setup.batch_sharding)
  jitted = jax.jit(step, in_shardings=(setup.state_shardings, setup.batch_sharding),
                   out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
                   donate_argnums=0)
  with _tracing_context(setup):
    return jitted.lower(setup.abstract_state, batch).compile()


def compile_eval(setup: Setup, train_cfg: Any) -> Any:
  """The eval step for global batches of `train.global_batch_size`, compiled ahead of time."""
  batch = jax.ShapeDtypeStruct((train_cfg.global_batch_size, setup.seq_len + 1), jnp.int32,
                               sharding=setup.batch_sharding)
  evaluate = step_lib.make_eval_step(setup.model, train_cfg,
                                     _micro_sharding(setup, train_cfg.grad_accum),
                                     setup.batch_shards)
  jitted = jax.jit(evaluate,
                   in_shardings=(setup.state_shardings["params"], setup.batch_sharding),
                   out_shardings=sharding.replicated(setup.mesh))
  with _tracing_context(setup):
    return jitted.lower(setup.abstract_state["params"], batch).compile()


class BatchSource:
  """Global batches of one split: this process loads only the rows its devices hold."""

  def __init__(self, config: Any, setup: Setup, split: str):
    from archscale.data import batches as data_lib

    b = config.train.global_batch_size
    self.shape = (b, setup.seq_len + 1)
    self.sharding = setup.batch_sharding
    rows = [idx[0] for idx in self.sharding.addressable_devices_indices_map(self.shape).values()]
    lo = min(r.start or 0 for r in rows)
    hi = max(b if r.stop is None else r.stop for r in rows)
    block = hi - lo
    if b % block or lo % block:
      raise ValueError(f"process {jax.process_index()} holds batch rows [{lo}, {hi}), which do not "
                       "tile the global batch; reorder the mesh axes")
    self.batches = data_lib.Batches(config.data.path, split, setup.seq_len, b, config.seed,
                                    process_index=lo // block, process_count=b // block)

  def __call__(self, step: int) -> jax.Array:
    local = self.batches(step)
    return jax.make_array_from_process_local_data(self.sharding, local, self.shape)


# ----------------------------------------------------------------------------- the run


def load_checkpoint(workdir: str | pathlib.Path, config: Any, step: int | None = None) -> Any:
  """The train state saved in `workdir` (latest step by default), sharded for this config's mesh."""
  setup = build(config)
  ckpt = checkpoint.Checkpoints(io.as_path(workdir, "--workdir") / "checkpoints", config.train)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{workdir} holds no checkpoint")
    return ckpt.restore(step, setup.abstract_state)
  finally:
    ckpt.close()


# ------------------------------------------------------------------------------------ train


def train(config: Any, workdir: str | pathlib.Path,
          step_callback: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the config's model in `workdir`; returns the summary.

  `step_callback(step, metrics)` runs on every process after each step's metrics reach the host
  (one step late). A SIGTERM checkpoints and returns a summary with status "preempted" (no
  summary.json); a non-finite loss raises FloatingPointError, keeping the last good checkpoint.
  A workdir whose checkpoint or summary was made under another recipe is refused (ValueError);
  one held by a live trainer raises `io.WorkdirBusy`.
  """
  wall_start = time.time()
  workdir = io.as_path(workdir, "--workdir")
  if config.train.tensorboard and not io.is_local(workdir):
    raise ValueError(f"train.tensorboard=True writes event files through local file APIs, which "
                     f"--workdir={workdir} is not; set train.tensorboard=False or use a local "
                     "--workdir")
  workdir = io.make_dir(workdir, "--workdir")
  sharding.initialize_distributed(config.distributed)
  use_compilation_cache(config.train.compilation_cache)
  lock = io.WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
  preempt = monitor.Preemption(multi_process=jax.process_count() > 1)
  try:
    logging.info("%s", sharding.describe_topology())
    config = hf_format.with_init_from(config)  # train.init_from: model section from its config
    setup = build(config)
    logging.info("mesh: %s", " x ".join(f"{a}={n}" for a, n in setup.mesh.shape.items()))
    return _train_session(config, workdir, setup, preempt, step_callback, wall_start)
  except monitor.Preempted:
    logging.warning("train: stopped by SIGTERM before the first step; rerun to start or resume")
    return {"status": "preempted", "steps": None}
  finally:
    preempt.close()
    lock.release()


def use_compilation_cache(path: str) -> None:
  """Points JAX's persistent compilation cache at `path` (`train.compilation_cache`; "" = off)."""
  if path:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def _train_session(config, workdir, setup, preempt, step_callback, wall_start) -> dict[str, Any]:
  """Restore or initialise, compile, run the loop, then write the summary."""
  t = TrainConfig.from_config(config)
  recipe = recipe_lib.run_recipe(config, setup.spec)
  data = recipe_lib.data_fingerprint(setup.data_info)
  finished = recipe_lib.finished_summary(workdir, t, recipe, data)
  if finished is not None:
    logging.info("train: %s already finished %d steps; returning its summary", workdir, t.steps)
    return finished
  n_total = model_lib.count_params(setup.abstract_state["params"])
  logging.info("params: %s total, %s embedding, %s non-embedding (ArchSpec: %s non-embedding)",
               f"{n_total:,}", f"{setup.spec.params_embedding:,}",
               f"{n_total - setup.spec.params_embedding:,}", f"{setup.spec.params_nonembed:,}")
  is_main = jax.process_index() == 0
  ckpt = checkpoint.Checkpoints(workdir / "checkpoints", t)
  tracker = tracking.Tracker.start(
      config, workdir, name=str(config.name), job="train",
      run_config={"name": str(config.name), **json.loads(json.dumps(recipe, default=str))}
  ) if is_main else None
  log = monitor.MetricsLog(workdir, t.steps, is_main, t.tensorboard, tracker)
  try:
    state, meta = _restore_or_init(config, t, setup, ckpt, log, recipe)
    if is_main:
      io.write_json_atomic(workdir / "config.json", io.provenance(config))
    session = _Session.start(config, t, workdir, setup, ckpt, log, meta, step_callback,
                             wall_start)
    start_step = int(jax.device_get(state["step"]))
    state, preempted = session.run(state, start_step, preempt)
    final_step = int(jax.device_get(state["step"]))
    if ckpt.latest_step() != final_step:
      session.save(final_step, state)
    ckpt.wait()
  finally:
    log.close()
    ckpt.close()
  if preempted:
    logging.warning("train: preempted; checkpointed at step %d. Rerun with the same workdir to "
                    "resume.", final_step)
    return {"status": "preempted", "steps": final_step}
  summary = session.summary(final_step, n_total)
  if is_main:
    io.write_json_atomic(workdir / "summary.json", summary)
  logging.info("train: done: final train loss %s, eval loss %s, %s tokens/s",
               summary["final_train_loss"], summary["eval_loss"], summary["tokens_per_sec"])
  return summary


# -------------------------------------------------------------------- restore or initialise


def _restore_or_init(config, t, setup, ckpt, log, recipe) -> tuple[Any, dict[str, Any]]:
  """The state and running totals to start from: the latest checkpoint's, or fresh ones."""
  latest = ckpt.latest_step()
  if latest is None:
    log.truncate(0)  # rows of an earlier attempt that failed before its first checkpoint
    meta = {"recipe": recipe, "steps_requested": [t.steps], "tail_losses": {}, "train_s": 0.0,
            "timed_steps": 0, "timed_peak_flop": 0.0, "wall_s": 0.0, "eval_loss": None,
            "data_fingerprint": recipe_lib.data_fingerprint(setup.data_info)}
    init_start = time.time()
    state = init_state(setup, config.seed)
    if t.init_from:
      state["params"] = hf_format.place_params(t.init_from, setup.spec,
                                               setup.abstract_state["params"])
      logging.info("train: starting from the weights in %s", t.init_from)
    jax.block_until_ready(state)
    logging.info("train: initialised the sharded state in %.1fs", time.time() - init_start)
    return state, meta
  meta = ckpt.restore_meta(latest)
  if "recipe" not in meta:  # Written before recipes were recorded: only its spec can be checked.
    logging.warning("train: the checkpoint at step %d records no recipe; only its spec is checked",
                    latest)
    meta.update(recipe=dict(recipe, arch=meta["arch"]), steps_requested=[t.steps])
  where = f"the checkpoint at step {latest} in {ckpt.directory}"
  recipe_lib.check_same_run(meta["recipe"], recipe, where)
  data = recipe_lib.data_fingerprint(setup.data_info)
  recipe_lib.check_same_data(meta.get("data_fingerprint"), data, where)
  meta.setdefault("data_fingerprint", data)
  settings.check(t.steps >= latest,
         f"train.steps={t.steps} is below the checkpoint's step {latest}; a run can be extended, "
         "not shortened: raise train.steps or train in a new --workdir")
  if meta["steps_requested"][-1] != t.steps:
    logging.info("train: train.steps changed from %d to %d at step %d",
                 meta["steps_requested"][-1], t.steps, latest)
    meta["steps_requested"].append(t.steps)
  state = ckpt.restore(latest, setup.abstract_state)
  log.truncate(latest, meta.get("last_row"))
  logging.info("train: resumed from the checkpoint at step %d", latest)
  return state, meta


# -------------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class _Session:
  """One session of a run: compiled functions, batches, and the totals kept in `meta`."""

  t: TrainConfig
  workdir: pathlib.Path
  setup: Setup
  ckpt: checkpoint.Checkpoints
  log: monitor.MetricsLog
  clock: monitor.StepClock
  meta: dict[str, Any]
  step_fn: Any
  eval_fn: Any
  train_batches: BatchSource
  eval_batches: BatchSource | None
  step_callback: Callable[[int, dict[str, float]], None] | None
  wall_start: float
  compile_s: float

  @classmethod
  def start(cls, config, t, workdir, setup, ckpt, log, meta, step_callback, wall_start):
    """Compiles the step and eval functions and opens the batch sources."""
    peak = peak_flops(jax.devices()[0].device_kind)
    clock = monitor.StepClock(meta, setup.tokens_per_step,
                              setup.spec.train_flops_per_token(setup.seq_len),
                              peak * jax.device_count() if peak else None)
    compile_start = time.time()
    step_fn = compile_step(setup, t)
    eval_fn = compile_eval(setup, t) if t.eval_batches else None
    compile_s = time.time() - compile_start
    logging.info("train: compiled in %.1fs; %d tokens per step, %.3g FLOPs per token", compile_s,
                 setup.tokens_per_step, clock.flops_per_token)
    session = cls(t, workdir, setup, ckpt, log, clock, meta, step_fn, eval_fn,
                  BatchSource(config, setup, "train"),
                  BatchSource(config, setup, "eval") if eval_fn is not None else None,
                  step_callback, wall_start - meta["wall_s"], compile_s)
    session._warn_about_data()
    return session

  def _warn_about_data(self) -> None:
    t, windows = self.t, self.train_batches.batches.num_windows
    if t.steps * t.global_batch_size > windows:
      logging.info("train: %d steps make %.2f passes over the %d training windows", t.steps,
                   t.steps * t.global_batch_size / windows, windows)
    if self.eval_batches is not None:
      needed, held = t.eval_batches * t.global_batch_size, self.eval_batches.batches.num_windows
      if needed > held:
        logging.warning(
            "train: an eval reads %d windows but the eval split has %d, so it counts some twice; "
            "lower train.eval_batches or raise data.eval_fraction", needed, held)

  def run(self, state: Any, step: int, preempt: monitor.Preemption) -> tuple[Any, bool]:
    """Steps until train.steps or a preemption; returns (state, preempted).

    Each step's metrics are fetched while the next step runs, except at boundaries (eval,
    checkpoint, last step), where the state is needed on the host.
    """
    preempt.arm()
    pending = None  # (step number after it, device metrics) of the step in flight
    profiler = monitor.StepProfiler(
        settings.parse_step_range(self.t.profile_steps, "train.profile_steps"),
        self.workdir / "profile", first_step=step + 1)
    while step < self.t.steps and not preempt.requested(step):
      profiler.before(step + 1)
      state, device_metrics = self.step_fn(state, self.train_batches(step))
      profiler.after(step + 1, device_metrics)
      if pending is not None:
        self.finish_step(*pending, log=_is_log_step(pending[0], self.t))
      step += 1
      pending = (step, device_metrics)
      if _is_eval_step(step, self.t) or self.ckpt.should_save(step) or step == self.t.steps:
        self.boundary(step, device_metrics, state)
        pending = None
    if pending is not None:
      self.finish_step(*pending, log=True)
    profiler.stop(state)  # a run that ended (or stopped) inside the range
    return state, step < self.t.steps

  def boundary(self, step: int, device_metrics: Any, state: Any) -> None:
    """A step whose state is needed: checkpoint, then eval, then log."""
    m = self.finish_step(step, device_metrics, log=False)
    saved = self.ckpt.should_save(step) and step < self.t.steps
    if saved:  # The rows up to this step become durable with the checkpoint: those before it
      # are flushed first, its own travels in the checkpoint's meta for a resume to restore.
      self.log.flush()
      self.meta["last_row"] = self._row(step, m, None)
      # Before the eval: an eval that fails must not cost the checkpoint. Its metadata keeps
      # the previous eval loss; the final summary's comes from the eval at the last step.
      self.save(step, state)
    eval_loss = None
    if _is_eval_step(step, self.t) and self.eval_fn is not None:
      eval_loss = self.meta["eval_loss"] = self.evaluate(state["params"])
      self.clock.pause()
    if _is_log_step(step, self.t) or eval_loss is not None:
      self._log(step, m, eval_loss)
    if saved:  # A resume reruns only the steps after this one: their rows must be on storage.
      self.log.flush()

  def finish_step(self, step: int, device_metrics: Any, log: bool) -> dict[str, float]:
    """Fetches a step's metrics (blocking until it ran), checks them, times and logs them."""
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "param_norm")):
      self.ckpt.wait()
      good = self.ckpt.latest_step()
      raise FloatingPointError(
          f"non-finite training state at step {step}: loss={m['loss']}, grad_norm="
          f"{m['grad_norm']}, param_norm={m['param_norm']}. The last good checkpoint is "
          f"{'step ' + str(good) if good is not None else 'none'} in {self.ckpt.directory} "
          "(rerunning resumes from it); lower train.lr, lengthen train.warmup_steps or set "
          "train.grad_clip")
    m.update(self.clock.tick(step))
    if step > _tail_start(self.t):
      self.meta["tail_losses"][str(step)] = m["loss"]
    if self.step_callback is not None:
      self.step_callback(step, m)
    if log:
      self._log(step, m, None)
    return m

  def _log(self, step: int, m: dict[str, float], eval_loss: float | None) -> None:
    self.log.write(self._row(step, m, eval_loss))

  def _row(self, step: int, m: dict[str, float], eval_loss: float | None) -> dict[str, Any]:
    row = {"step": step, "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"]}
    if self.t.z_loss:
      row["z_loss"] = m["z_loss"]
    rate = m.get("tokens_per_sec")
    row.update(tokens_per_sec=rate, step_time_s=m.get("step_time_s"), mfu=self.clock.mfu(rate),
               tokens=step * self.setup.tokens_per_step)
    if eval_loss is not None:
      row["eval_loss"] = eval_loss
    return row

  def evaluate(self, params: Any) -> float:
    losses = [self.eval_fn(params, self.eval_batches(i)) for i in range(self.t.eval_batches)]
    return float(np.mean(jax.device_get(losses)))

  def save(self, step: int, state: Any) -> None:
    self.meta["wall_s"] = time.time() - self.wall_start
    self.ckpt.save(step, state, self.meta)
    self.clock.pause()  # the save's host time is not step time

  def summary(self, final_step: int, n_total: int) -> dict[str, Any]:
    """summary.json of a run that reached train.steps."""
    t, spec, meta = self.t, self.setup.spec, self.meta
    tail = [meta["tail_losses"][k] for k in sorted(meta["tail_losses"], key=int)
            if int(k) > _tail_start(t)]
    device_kind = jax.devices()[0].device_kind
    return {
        "status": "finished",
        "arch": spec.to_dict(),
        "recipe": meta["recipe"],
        "data_fingerprint": meta.get("data_fingerprint"),
        "params_nonembed": spec.params_nonembed,
        "params_total": n_total,
        "steps": final_step,
        "steps_requested": meta["steps_requested"],
        "tokens": final_step * self.setup.tokens_per_step,
        "epochs": final_step * t.global_batch_size / self.train_batches.batches.num_windows,
        "seq_len": self.setup.seq_len,
        "global_batch_size": t.global_batch_size,
        "final_train_loss": float(np.mean(tail)) if tail else None,
        "final_train_loss_steps": len(tail),
        "eval_loss": meta["eval_loss"],
        **self.clock.totals(),
        "flops_per_token": self.clock.flops_per_token,
        "wall_s": time.time() - self.wall_start,
        "compile_s": self.compile_s,
        "device_kind": device_kind,
        "device_count": jax.device_count(),
        "mesh": dict(self.setup.mesh.shape),
        "provenance": io.provenance(),
    }


def _tail_start(t: TrainConfig) -> int:
  """final_train_loss averages the steps after this one."""
  return t.steps - max(1, math.ceil(FINAL_LOSS_FRACTION * t.steps))


def _is_log_step(step: int, t: TrainConfig) -> bool:
  return step % t.log_every == 0 or step == t.steps or step == 1


def _is_eval_step(step: int, t: TrainConfig) -> bool:
  return bool(t.eval_batches) and ((t.eval_every and step % t.eval_every == 0)
                                   or step == t.steps)


def run_train(config: Any, workdir: pathlib.Path) -> None:
  """`--mode=train`. With `data.path` empty and `data.source` set, prepares WORKDIR/data first.

  Exits with `exits.EXIT_PREEMPTED` when the run stopped before its last step (resume it by
  rerunning) and `exits.EXIT_BUSY` when another trainer holds the workdir.
  """
  sharding.initialize_distributed(config.distributed)
  if not str(config.data.path).strip() and str(config.data.source).strip():
    from archscale.data import batches as data_lib
    from archscale.data import prepare

    path = data_lib.data_path(config, workdir)
    if jax.process_index() == 0:
      prepare.run_prepare_data(config, workdir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("archscale_prepare_data")
    config = config.copy_and_resolve_references()
    config.data.path = str(path)
  try:
    summary = train(config, workdir)
  except io.WorkdirBusy as e:
    logging.error("train: %s", e)
    sys.exit(exits.EXIT_BUSY)
  if summary["status"] != "finished":
    sys.exit(exits.EXIT_PREEMPTED)
