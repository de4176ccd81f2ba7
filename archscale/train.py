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
it into DIR/data. SIGTERM (preemption) checkpoints at the next step boundary and stops cleanly.

Rerunning with the same DIR resumes from the latest checkpoint. Batches are a pure function of
(data seed, step) (`archscale.data.Batches`), so the step stored in the train state is the whole
data-loader state: nothing is replayed, and a resumed run sees exactly the batches an
uninterrupted one would, whatever the mesh or process count. On CPU resumption is bitwise exact.

Numerics: parameters and optimiser state are stored in `compute.param_dtype` (float32 by default);
matmuls run in `compute.dtype` (bfloat16 for speed); logits, the loss and RMSNorm are float32.

MFU = achieved model FLOP/s / (peak FLOP/s per device x devices), with model FLOPs per token from
`ArchSpec.train_flops_per_token` (6 x matmul weights incl. the LM head, plus causal attention at
half the full square) and the dense bf16 peak of `costmodel.ACCELERATORS`; null where unknown.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from archscale import costmodel, io, sharding
from archscale import loss as loss_lib
from archscale import model as model_lib
from archscale.arch import ArchSpec

SCHEDULES = ("cosine", "wsd", "constant")
FINAL_LOSS_FRACTION = 0.02  # final_train_loss = mean loss over the last 2% of steps (at least 1)

def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind (the cost model's table); None if unknown."""
  key = costmodel.accelerator_for_device_kind(device_kind)
  return None if key is None else costmodel.ACCELERATORS[key].peak_flops


# ---------------------------------------------------------------------------- optimisation


def learning_rate(train_cfg: Any) -> Callable[[jax.Array], jax.Array]:
  """Linear warm-up to `train.lr`, then cosine or WSD decay to `lr * min_lr_ratio`.

  cosine: half a cosine from the end of warm-up to the last step. wsd (warm-up, stable, decay):
  constant until the final `decay_fraction` of steps, then linear decay. constant: flat.
  """
  t = train_cfg
  peak, floor = t.lr, t.lr * t.min_lr_ratio
  steps, warmup = t.steps, t.warmup_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    if t.schedule == "cosine":
      frac = jnp.clip((step - warmup) / max(steps - warmup - 1, 1), 0.0, 1.0)
      decayed = floor + (peak - floor) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    elif t.schedule == "wsd":
      decay_steps = max(int(round(t.decay_fraction * steps)), 1)
      start = steps - decay_steps
      frac = jnp.clip((step - start + 1) / decay_steps, 0.0, 1.0)
      decayed = peak + (floor - peak) * frac
    else:
      decayed = jnp.asarray(peak, jnp.float32)
    return jnp.where(step < warmup, warm, decayed)

  return schedule


def decay_mask(params: Any) -> Any:
  """True for weights that get weight decay: every matrix; RMSNorm scales (named "scale") not."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with decoupled, masked weight decay on the schedule."""
  t = train_cfg
  adamw = optax.adamw(learning_rate(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                      mask=decay_mask)
  if t.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)
  return adamw


def loss_fn(model: model_lib.Transformer, params: Any, tokens_BT1: jax.Array, z_loss: float,
            loss_chunk: int = 0,
            batch_shards: int = 1) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """Mean next-token cross-entropy plus `z_loss * mean(logsumexp^2)`; returns (total, (ce, z)).

  `loss_chunk` > 0 fuses the LM head into the loss, `loss_chunk` positions at a time, so the
  [B, T, V] logits are never materialised (`archscale.loss`; `batch_shards` as there).
  """
  inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  if loss_chunk:
    x_BTD, head_DV = model_lib.features(model, params, inputs_BT)
    total, ce, z = loss_lib.chunked_cross_entropy(x_BTD, head_DV, targets_BT, z_loss, loss_chunk,
                                                  batch_shards)
    return total, (ce, z_loss * z)
  ce, z = loss_lib.cross_entropy(model_lib.forward(model, params, inputs_BT), targets_BT)
  z = z_loss * z if z_loss else jnp.zeros((), jnp.float32)
  return ce + z, (ce, z)


def make_train_step(model: model_lib.Transformer, tx: optax.GradientTransformation,
                    train_cfg: Any, micro_sharding: NamedSharding | None = None,
                    batch_shards: int = 1) -> Callable:
  """`step(state, tokens_BT1) -> (state, metrics)`; gradients accumulate over `grad_accum`.

  With accumulation the global batch [B, ...] is viewed as [B/A, A, ...] and micro-batch a takes
  rows a, a + A, ...: every micro-batch stays spread over all data-parallel devices.
  """
  accum, z_coef, schedule = train_cfg.grad_accum, train_cfg.z_loss, learning_rate(train_cfg)
  grad_fn = jax.value_and_grad(
      lambda p, x: loss_fn(model, p, x, z_coef, train_cfg.loss_chunk, batch_shards), has_aux=True)

  def step(state, tokens_BT1):
    params = state["params"]
    if accum == 1:
      (_, (ce, z)), grads = grad_fn(params, tokens_BT1)
    else:
      def body(carry, micro_BT1):
        g_sum, ce_sum, z_sum = carry
        (_, (ce_i, z_i)), g_i = grad_fn(params, micro_BT1)
        return (jax.tree.map(jnp.add, g_sum, g_i), ce_sum + ce_i, z_sum + z_i), None

      zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32),
               jnp.zeros((), jnp.float32))
      (grads, ce, z), _ = jax.lax.scan(
          body, zeros, split_micro_batches(tokens_BT1, accum, micro_sharding))
      grads = jax.tree.map(lambda g: g / accum, grads)
      ce, z = ce / accum, z / accum
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": ce, "z_loss": z, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "lr": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return step


def split_micro_batches(tokens_BT1: jax.Array, accum: int,
                        micro_sharding: NamedSharding | None) -> jax.Array:
  """[B, T+1] -> [A, B/A, T+1]: micro-batch a takes rows a, a + A, ... (see make_train_step)."""
  b, t1 = tokens_BT1.shape
  micro_ABT1 = tokens_BT1.reshape(b // accum, accum, t1).swapaxes(0, 1)
  if micro_sharding is not None:
    micro_ABT1 = jax.lax.with_sharding_constraint(micro_ABT1, micro_sharding)
  return micro_ABT1


def make_eval_step(model: model_lib.Transformer, train_cfg: Any,
                   micro_sharding: NamedSharding | None = None, batch_shards: int = 1) -> Callable:
  """`eval(params, tokens_BT1) -> mean cross-entropy` (no z-loss).

  Runs over the same `grad_accum` micro-batches as the train step, so evaluation needs no more
  memory than training.
  """
  accum, chunk = train_cfg.grad_accum, train_cfg.loss_chunk
  cross_entropy = lambda params, x_BT1: loss_fn(model, params, x_BT1, 0.0, chunk,
                                                batch_shards)[1][0]

  def evaluate(params, tokens_BT1):
    if accum == 1:
      return cross_entropy(params, tokens_BT1)
    micro_ABT1 = split_micro_batches(tokens_BT1, accum, micro_sharding)
    return jnp.mean(jax.lax.map(lambda x_BT1: cross_entropy(params, x_BT1), micro_ABT1))

  return evaluate


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


def _check(cond: bool, message: str) -> None:
  if not cond:
    raise ValueError(message)


def validate_train_config(config: Any) -> None:
  """Checks `train.*` and the data/model fields that need no devices or files."""
  t = config.train
  for name in ("steps", "global_batch_size", "grad_accum", "log_every", "keep_checkpoints"):
    value = t[name]
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
           f"train.{name} must be a positive integer, got {value!r}")
  for name in ("warmup_steps", "eval_every", "checkpoint_every", "eval_batches"):
    value = t[name]
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
           f"train.{name} must be a non-negative integer (0 = off), got {value!r}")
  _check(t.lr > 0 and math.isfinite(t.lr), f"train.lr must be a positive number, got {t.lr!r}")
  _check(0 <= t.min_lr_ratio <= 1, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
  _check(t.schedule in SCHEDULES, f"train.schedule must be one of {SCHEDULES}, got {t.schedule!r}")
  _check(0 < t.decay_fraction <= 1,
         f"train.decay_fraction must be in (0, 1], got {t.decay_fraction}")
  _check(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
  for name in ("b1", "b2"):
    _check(0 <= t[name] < 1, f"train.{name} must be in [0, 1), got {t[name]}")
  _check(t.eps > 0, f"train.eps must be positive, got {t.eps}")
  _check(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
  _check(t.z_loss >= 0, f"train.z_loss must be >= 0 (0 = off), got {t.z_loss}")
  _check(isinstance(t.loss_chunk, int) and not isinstance(t.loss_chunk, bool)
         and t.loss_chunk >= 0,
         f"train.loss_chunk must be a non-negative integer (positions per chunk of the fused "
         f"head + loss; 0 = full logits), got {t.loss_chunk!r}")
  _check(t.global_batch_size % t.grad_accum == 0,
         f"train.global_batch_size={t.global_batch_size} must be divisible by "
         f"train.grad_accum={t.grad_accum}")
  seq_len = config.data.seq_len
  _check(isinstance(seq_len, int) and seq_len >= 1,
         f"data.seq_len must be a positive integer, got {seq_len!r}")
  _check(seq_len <= config.model.max_seq_len,
         f"data.seq_len={seq_len} exceeds model.max_seq_len={config.model.max_seq_len}; lower "
         "data.seq_len or raise model.max_seq_len")
  if t.tensorboard:
    try:
      import tensorboard  # noqa: F401
    except ImportError as e:
      raise ValueError("train.tensorboard=True needs the tensorboard package; install it or "
                       "set train.tensorboard=False") from e


def _dataset_info(config: Any) -> dict[str, Any]:
  """The prepared dataset's metadata; raises naming `data.path` when there is none."""
  from archscale import data as data_lib

  path = str(config.data.path).strip()
  _check(bool(path),
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
  validate_train_config(config)
  spec = ArchSpec.from_config(config)
  options = model_lib.ModelOptions.from_config(config)
  info = _dataset_info(config) if with_data else {}
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.parse_rules(config.mesh.get("rules", ""))
  t = config.train
  ways = sharding.batch_parallelism(mesh, rules)
  micro = t.global_batch_size // t.grad_accum
  if micro % ways:
    axes = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in dict(rules)["batch"])
    raise ValueError(
        f"train.global_batch_size={t.global_batch_size} (over train.grad_accum={t.grad_accum}: "
        f"{micro} rows per micro-batch) must be divisible by the batch axes {axes} = {ways}")

  model = model_lib.Transformer(spec, options)
  tx = make_optimizer(t)
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
  step = make_train_step(setup.model, setup.tx, train_cfg,
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
  evaluate = make_eval_step(setup.model, train_cfg, _micro_sharding(setup, train_cfg.grad_accum),
                            setup.batch_shards)
  jitted = jax.jit(evaluate,
                   in_shardings=(setup.state_shardings["params"], setup.batch_sharding),
                   out_shardings=sharding.replicated(setup.mesh))
  with _tracing_context(setup):
    return jitted.lower(setup.abstract_state["params"], batch).compile()


class BatchSource:
  """Global batches of one split: this process loads only the rows its devices hold."""

  def __init__(self, config: Any, setup: Setup, split: str):
    from archscale import data as data_lib

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


# ----------------------------------------------------------------------------- checkpoints


class Checkpoints:
  """orbax CheckpointManager holding {"state": train state, "meta": JSON running totals}.

  Saves every `train.checkpoint_every` steps (0: only at the end and on preemption), keeps the
  last `train.keep_checkpoints`, writes asynchronously when `train.async_checkpoint`, and is
  atomic: an interrupted save leaves only a temporary directory that is never restored from. The
  save decision is made here, not by orbax, so that it depends on the step alone.
  """

  def __init__(self, directory: pathlib.Path, train_cfg: Any):
    self.every = train_cfg.checkpoint_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=train_cfg.keep_checkpoints, create=True,
        enable_async_checkpointing=bool(train_cfg.get("async_checkpoint", True)))
    self.manager = ocp.CheckpointManager(directory.resolve(), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    # A copy: an async save serialises `meta` later, while the loop keeps updating the original.
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(copy.deepcopy(meta)))
    self.manager.save(step, args=args, force=True)

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The state at `step`, laid out as `abstract_state`'s shardings (any mesh, any devices)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    return self.manager.restore(step, args=args)["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def load_checkpoint(workdir: str | pathlib.Path, config: Any, step: int | None = None) -> Any:
  """The train state saved in `workdir` (latest step by default), sharded for this config's mesh."""
  setup = build(config)
  ckpt = Checkpoints(pathlib.Path(workdir) / "checkpoints", config.train)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{workdir} holds no checkpoint")
    return ckpt.restore(step, setup.abstract_state)
  finally:
    ckpt.close()


# -------------------------------------------------------------------------------- metrics


class _TensorBoard:
  """Scalar summaries as TensorBoard event files (tensorboard package only, no TensorFlow)."""

  def __init__(self, logdir: pathlib.Path):
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    self._event, self._summary = Event, Summary
    self._writer = EventFileWriter(str(logdir))

  def scalars(self, step: int, values: dict[str, Any]) -> None:
    summary = self._summary(value=[self._summary.Value(tag=k, simple_value=float(v))
                                   for k, v in values.items()
                                   if k != "step" and isinstance(v, (int, float))])
    self._writer.add_event(self._event(wall_time=time.time(), step=step, summary=summary))

  def close(self) -> None:
    self._writer.close()


class _Preemption:
  """Whether the run should checkpoint and stop now.

  One process: a SIGTERM handler sets a flag (checked at step boundaries). Several processes:
  JAX's preemption service (which catches SIGTERM) agrees on one step for all of them, about a
  second after the notice on localhost, so the stop may land a few steps later.
  """

  def __init__(self):
    self.flag = threading.Event()
    self._previous = None
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())

  def requested(self, step: int) -> bool:
    if self._multi:
      from jax.experimental import multihost_utils
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:
        return False
    return self.flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _truncate_metrics(path: pathlib.Path, last_step: int) -> None:
  """Drops rows past `last_step` (written before an interruption; those steps are rerun)."""
  if not path.exists():
    return
  rows = list(io.read_jsonl(path))
  kept = [r for r in rows if r.get("step", 0) <= last_step]
  if len(kept) != len(rows):
    io.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


# ------------------------------------------------------------------------------------ train


def train(config: Any, workdir: str | pathlib.Path,
          step_callback: Callable[[int, dict[str, float]], None] | None = None) -> dict[str, Any]:
  """Trains (or resumes) the config's model in `workdir`; returns the summary.

  `step_callback(step, metrics)` runs on every process after each step's metrics reach the host
  (one step late). A SIGTERM checkpoints and returns a summary with status "preempted" (no
  summary.json); a non-finite loss raises FloatingPointError, keeping the last good checkpoint.
  """
  wall_start = time.time()
  workdir = pathlib.Path(workdir)
  sharding.initialize_distributed(config.distributed)
  logging.info("%s", sharding.describe_topology())
  setup = build(config)
  t = config.train
  is_main = jax.process_index() == 0
  logging.info("mesh: %s", " x ".join(f"{a}={n}" for a, n in setup.mesh.shape.items()))

  finished = _finished_summary(workdir, config, setup.spec)
  if finished is not None:
    logging.info("train: %s already finished %d steps; returning its summary", workdir, t.steps)
    return finished

  n_total = model_lib.count_params(setup.abstract_state["params"])
  n_embed = setup.spec.params_embedding
  logging.info("params: %s total, %s embedding, %s non-embedding (ArchSpec: %s non-embedding)",
               f"{n_total:,}", f"{n_embed:,}", f"{n_total - n_embed:,}",
               f"{setup.spec.params_nonembed:,}")
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    io.write_json_atomic(workdir / "config.json", io.provenance(config))

  ckpt = Checkpoints(workdir / "checkpoints", t)
  preempt = _Preemption()
  tb = _TensorBoard(workdir / "tensorboard") if t.tensorboard and is_main else None
  try:
    return _train_loop(config, workdir, setup, ckpt, preempt, tb, step_callback, wall_start,
                       n_total)
  finally:
    preempt.close()
    if tb is not None:
      tb.close()
    ckpt.close()


def _finished_summary(workdir: pathlib.Path, config: Any, spec: ArchSpec) -> dict | None:
  path = workdir / "summary.json"
  if not path.exists():
    return None
  summary = json.loads(path.read_text())
  if summary.get("steps") == config.train.steps and summary.get("arch") == spec.to_dict():
    return summary
  return None


def _train_loop(config, workdir, setup, ckpt, preempt, tb, step_callback, wall_start, n_total):
  t = config.train
  is_main = jax.process_index() == 0
  metrics_path = workdir / "metrics.jsonl"
  flops_per_token = setup.spec.train_flops_per_token(setup.seq_len)
  device_kind = jax.devices()[0].device_kind
  peak = peak_flops(device_kind)
  peak_total = peak * jax.device_count() if peak else None
  tail_start = t.steps - max(1, math.ceil(FINAL_LOSS_FRACTION * t.steps))

  # Restore or initialise. The meta JSON carries running totals across restarts.
  latest = ckpt.latest_step()
  if latest is not None:
    meta = ckpt.restore_meta(latest)
    if meta.get("arch") != setup.spec.to_dict():
      raise ValueError(f"{workdir} holds checkpoints of a different model (ArchSpec "
                       f"{meta.get('arch')}); use a new --workdir")
    # Checkpoints from before timed_peak_flop was kept: their timed seconds ran on these devices.
    meta.setdefault("timed_peak_flop", meta["train_s"] * peak_total if peak_total else None)
    state = ckpt.restore(latest, setup.abstract_state)
    logging.info("train: resumed from the checkpoint at step %d", latest)
    if is_main:
      _truncate_metrics(metrics_path, latest)
  else:
    meta = {"arch": setup.spec.to_dict(), "tail_losses": {}, "train_s": 0.0, "timed_steps": 0,
            "timed_peak_flop": 0.0, "wall_s": 0.0, "eval_loss": None}
    if is_main:  # rows of an earlier attempt that failed before its first checkpoint
      _truncate_metrics(metrics_path, 0)
    init_start = time.time()
    state = init_state(setup, config.seed)
    jax.block_until_ready(state)
    logging.info("train: initialised the sharded state in %.1fs", time.time() - init_start)
  start_step = int(jax.device_get(state["step"]))

  compile_start = time.time()
  step_fn = compile_step(setup, t)
  eval_fn = compile_eval(setup, t) if t.eval_batches else None
  compile_s = time.time() - compile_start
  logging.info("train: compiled in %.1fs; steps %d..%d, %d tokens per step, %.3g FLOPs per token",
               compile_s, start_step, t.steps, setup.tokens_per_step, flops_per_token)

  train_batches = BatchSource(config, setup, "train")
  eval_batches = BatchSource(config, setup, "eval") if eval_fn is not None else None
  epochs = t.steps * t.global_batch_size / train_batches.batches.num_windows
  if epochs > 1:
    logging.info("train: %d steps make %.2f passes over the %d training windows", t.steps,
                 epochs, train_batches.batches.num_windows)
  if eval_batches is not None:
    eval_windows = t.eval_batches * t.global_batch_size
    if eval_windows > eval_batches.batches.num_windows:
      logging.warning(
          "train: an eval reads %d windows but the eval split has %d, so it counts some twice; "
          "lower train.eval_batches or raise data.eval_fraction", eval_windows,
          eval_batches.batches.num_windows)

  def evaluate(params) -> float:
    losses = [eval_fn(params, eval_batches(i)) for i in range(t.eval_batches)]
    return float(np.mean(jax.device_get(losses)))

  session_start = time.time()
  meta_wall_base = meta["wall_s"]
  window = {"t": None, "step": None}  # start of the current timing window
  last_good: dict[str, Any] = {}

  def log_row(step: int, m: dict[str, float], eval_loss: float | None) -> None:
    now = time.time()
    row = {"step": step, "loss": m["loss"], "grad_norm": m["grad_norm"], "lr": m["lr"]}
    if t.z_loss:
      row["z_loss"] = m["z_loss"]
    rate = m.get("tokens_per_sec")
    row.update(tokens_per_sec=rate, step_time_s=m.get("step_time_s"),
               mfu=rate * flops_per_token / peak_total if rate and peak_total else None,
               tokens=step * setup.tokens_per_step, elapsed_s=now - session_start)
    if eval_loss is not None:
      row["eval_loss"] = eval_loss
    if is_main:
      io.append_jsonl(metrics_path, row)
      if tb is not None:
        tb.scalars(step, row)
      eta = (t.steps - step) * m["step_time_s"] if m.get("step_time_s") else None
      logging.info(
          "step %d/%d  loss %.4f  gnorm %.3g  lr %.3g  %s tok/s  mfu %s  %s/step  eta %s%s",
          step, t.steps, m["loss"], m["grad_norm"], m["lr"],
          f"{rate:,.0f}" if rate else "-", f"{row['mfu']:.1%}" if row["mfu"] else "-",
          f"{m['step_time_s'] * 1e3:.1f}ms" if m.get("step_time_s") else "-",
          _fmt_duration(eta) if eta is not None else "-",
          f"  eval {eval_loss:.4f}" if eval_loss is not None else "")

  def finish_step(step: int, device_metrics: Any) -> dict[str, float]:
    """Fetches a step's metrics (blocking until it ran), checks them, times and logs them."""
    m = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    now = time.time()
    if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm", "param_norm")):
      ckpt.wait()
      good = ckpt.latest_step()
      raise FloatingPointError(
          f"non-finite training state at step {step}: loss={m['loss']}, grad_norm="
          f"{m['grad_norm']}, param_norm={m['param_norm']}. The last good checkpoint is "
          f"{'step ' + str(good) if good is not None else 'none'} in {workdir / 'checkpoints'} "
          "(rerunning resumes from it); lower train.lr, lengthen train.warmup_steps or set "
          "train.grad_clip")
    if window["t"] is not None and step > window["step"]:
      dt = now - window["t"]
      m["step_time_s"] = dt / (step - window["step"])
      m["tokens_per_sec"] = setup.tokens_per_step / m["step_time_s"]
      meta["train_s"] += dt
      meta["timed_steps"] += step - window["step"]
      # The FLOPs the devices could have done in the window: MFU stays right when a resumed run
      # has other devices than the sessions before it.
      if peak_total and meta.get("timed_peak_flop") is not None:
        meta["timed_peak_flop"] += dt * peak_total
      else:
        meta["timed_peak_flop"] = None
    window.update(t=now, step=step)
    if step > tail_start:
      meta["tail_losses"][str(step)] = m["loss"]
    last_good.update(step=step, metrics=m)
    if step_callback is not None:
      step_callback(step, m)
    return m

  def save(step: int) -> None:
    meta["wall_s"] = meta_wall_base + time.time() - wall_start
    ckpt.save(step, state, meta)
    logging.info("train: checkpoint at step %d", step)
    window["t"] = None  # the save's host time is not step time

  pending = None  # (step number after it, device metrics) of the step in flight
  preempted = False
  step = start_step
  while step < t.steps:
    if preempt.requested(step):
      preempted = True
      break
    state, device_metrics = step_fn(state, train_batches(step))
    if pending is not None:
      m = finish_step(*pending)
      if _is_log_step(pending[0], t) and not _is_eval_step(pending[0], t):
        log_row(pending[0], m, None)
    step += 1
    pending = (step, device_metrics)
    if _is_eval_step(step, t) or ckpt.should_save(step) or step == t.steps:
      m = finish_step(*pending)
      pending = None
      if ckpt.should_save(step) and step < t.steps:
        # Before the eval: an eval that fails must not cost the checkpoint. Its metadata keeps
        # the previous eval loss; the final summary's comes from the eval at the last step.
        save(step)
      eval_loss = None
      if _is_eval_step(step, t) and eval_fn is not None:
        eval_loss = meta["eval_loss"] = evaluate(state["params"])
        window["t"] = None
      if _is_log_step(step, t) or eval_loss is not None:
        log_row(step, m, eval_loss)
  if pending is not None:
    m = finish_step(*pending)
    log_row(pending[0], m, None)

  final_step = int(jax.device_get(state["step"]))
  if ckpt.latest_step() != final_step:
    save(final_step)
  ckpt.wait()
  if preempted:
    logging.warning("train: preempted; checkpointed at step %d. Rerun with the same workdir to "
                    "resume.", final_step)
    return {"status": "preempted", "steps": final_step}

  tail = [meta["tail_losses"][k] for k in sorted(meta["tail_losses"], key=int)
          if int(k) > tail_start]
  tokens_per_sec = (meta["timed_steps"] * setup.tokens_per_step / meta["train_s"]
                    if meta["train_s"] > 0 else None)
  summary = {
      "status": "finished",
      "arch": setup.spec.to_dict(),
      "params_nonembed": setup.spec.params_nonembed,
      "params_total": n_total,
      "steps": final_step,
      "tokens": final_step * setup.tokens_per_step,
      "epochs": epochs * final_step / t.steps,
      "seq_len": setup.seq_len,
      "global_batch_size": t.global_batch_size,
      "final_train_loss": float(np.mean(tail)) if tail else None,
      "final_train_loss_steps": len(tail),
      "eval_loss": meta["eval_loss"],
      "tokens_per_sec": tokens_per_sec,
      "mfu": (meta["timed_steps"] * setup.tokens_per_step * flops_per_token
              / meta["timed_peak_flop"] if meta["timed_steps"] and meta.get("timed_peak_flop")
              else None),
      "flops_per_token": flops_per_token,
      "wall_s": meta_wall_base + time.time() - wall_start,
      "compile_s": compile_s,
      "device_kind": device_kind,
      "device_count": jax.device_count(),
      "mesh": dict(setup.mesh.shape),
      "provenance": io.provenance(),
  }
  if is_main:
    io.write_json_atomic(workdir / "summary.json", summary)
  logging.info("train: done: final train loss %s, eval loss %s, %s tokens/s",
               summary["final_train_loss"], summary["eval_loss"], tokens_per_sec)
  return summary


def _is_log_step(step: int, t: Any) -> bool:
  return step % t.log_every == 0 or step == t.steps or step == 1


def _is_eval_step(step: int, t: Any) -> bool:
  return bool(t.eval_batches) and ((t.eval_every and step % t.eval_every == 0)
                                   or step == t.steps)


def run_train(config: Any, workdir: pathlib.Path) -> None:
  """`--mode=train`. With `data.path` empty and `data.source` set, prepares WORKDIR/data first."""
  sharding.initialize_distributed(config.distributed)
  if not str(config.data.path).strip() and str(config.data.get("source", "")).strip():
    from archscale import prepare

    path = pathlib.Path(workdir) / "data"
    if jax.process_index() == 0:
      prepare.run_prepare_data(config, workdir)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("archscale_prepare_data")
    config = config.copy_and_resolve_references()
    config.data.path = str(path)
  train(config, workdir)
