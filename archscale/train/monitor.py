"""What a training run watches while it runs: step timing and MFU, preemption, metric logs.

`StepProfiler` traces chosen steps (`train.profile_steps`). `StepClock` turns step boundaries
into steady-state step times, tokens/s and MFU, keeping its running totals in the checkpoint's
meta so they survive restarts. `Preemption` says when to checkpoint and stop. `MetricsLog`
writes metrics.jsonl, the console line, TensorBoard and (through core.tracking) W&B.
"""

from __future__ import annotations

import json
import math
import pathlib
import signal
import threading
import time
from typing import Any

from absl import logging

from archscale.core import io


class StepProfiler:
  """A jax.profiler trace of steps a..b-1 (`train.profile_steps="a:b"`) in `directory`.

  `before(n)` is called before step n runs and `after(n, out)` once it was dispatched; the trace
  stops when step b-1's outputs are ready, so it holds whole steps.
  """

  def __init__(self, steps: tuple[int, int] | None, directory: Any, first_step: int):
    if steps is not None and steps[0] <= first_step:  # this session compiles at first_step
      steps = (first_step + 1, steps[1]) if first_step + 1 < steps[1] else None
    self.steps, self.directory, self.active = steps, directory, False

  def before(self, n: int) -> None:
    if self.steps is not None and n == self.steps[0]:
      import jax

      jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
      self.active = True
      logging.info("profile: tracing steps %d..%d into %s", *self.steps, self.directory)

  def after(self, n: int, outputs: Any) -> None:
    if self.active and (n == self.steps[1] - 1):
      self.stop(outputs)

  def stop(self, outputs: Any = None) -> None:
    if self.active:
      import jax

      jax.block_until_ready(outputs)
      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile: trace written to %s (TensorBoard's profile plugin or Perfetto)",
                   self.directory)


class StepClock:
  """Steady-state timing between step boundaries; totals live in `meta` (the checkpoint's JSON).

  Time outside steps (compilation, evaluation, checkpoint saves) is left out by `pause()`. The
  FLOPs the devices could have done in timed windows are summed as well, so MFU stays right when
  a resumed run has other devices than the sessions before it.
  """

  def __init__(self, meta: dict[str, Any], tokens_per_step: int, flops_per_token: float,
               peak_flops_total: float | None):
    self.meta = meta
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.peak_total = peak_flops_total
    self._t: float | None = None
    self._step: int | None = None

  def pause(self) -> None:
    """The next window starts at the next `tick`: the time until then is not step time."""
    self._t = None

  def tick(self, step: int) -> dict[str, float]:
    """Marks the end of `step`; returns step_time_s and tokens_per_sec of the window it closes."""
    now, out = time.time(), {}
    if self._t is not None and step > self._step:
      dt = now - self._t
      out["step_time_s"] = dt / (step - self._step)
      out["tokens_per_sec"] = self.tokens_per_step / out["step_time_s"]
      self.meta["train_s"] += dt
      self.meta["timed_steps"] += step - self._step
      if self.peak_total and self.meta["timed_peak_flop"] is not None:
        self.meta["timed_peak_flop"] += dt * self.peak_total
      else:
        self.meta["timed_peak_flop"] = None
    self._t, self._step = now, step
    return out

  def mfu(self, tokens_per_sec: float | None) -> float | None:
    """Model FLOP utilisation at this rate (None where the peak is unknown)."""
    if not tokens_per_sec or not self.peak_total:
      return None
    return tokens_per_sec * self.flops_per_token / self.peak_total

  def totals(self) -> dict[str, float | None]:
    """Steady-state tokens/s and MFU over every timed window of every session."""
    m = self.meta
    rate = m["timed_steps"] * self.tokens_per_step / m["train_s"] if m["train_s"] > 0 else None
    mfu = (m["timed_steps"] * self.tokens_per_step * self.flops_per_token / m["timed_peak_flop"]
           if m["timed_steps"] and m["timed_peak_flop"] else None)
    return {"tokens_per_sec": rate, "mfu": mfu}


class Preempted(Exception):
  """Raised when a stop was asked for before the first step: there is nothing to save yet."""


class Preemption:
  """Whether the run should checkpoint and stop now.

  One process: SIGTERM during set-up and compilation stops the run at once (`Preempted`: no state
  exists yet that a checkpoint could keep); once `arm()`ed by the training loop it sets a flag
  checked at step boundaries. Several processes: JAX's preemption service (which catches SIGTERM)
  agrees on one step for all of them, about a second after the notice on localhost, so the stop
  may land a few steps later.
  """

  def __init__(self, multi_process: bool):
    self.flag = threading.Event()
    self._armed = False
    self._previous = None
    self._multi = multi_process
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, *_: Any) -> None:
    self.flag.set()
    if not self._armed:
      raise Preempted("SIGTERM before the first step")

  def arm(self) -> None:
    """From now on a SIGTERM only sets the flag (the loop checkpoints at the next boundary)."""
    self._armed = True

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


class MetricsLog:
  """metrics.jsonl rows, the console progress line (with ETA) and optional TensorBoard scalars.

  Only the main process writes; every process may call it. A local file gets each row appended
  as it comes. An object (gs://) cannot be appended to, and an object store limits how often one
  object may be rewritten, so a remote log is rewritten whole at most every `FLUSH_S` seconds and
  at every `flush()` (the trainer flushes before each checkpoint, so a resumed run never lacks
  the rows of the steps it does not rerun).
  """

  FLUSH_S = 10.0

  def __init__(self, workdir: Any, total_steps: int, is_main: bool, tensorboard: bool,
               tracker: Any = None):
    self.path = workdir / "metrics.jsonl"
    self.tracker = tracker  # a core.tracking.Tracker (W&B) or None
    self.total_steps = total_steps
    self.is_main = is_main
    self.start = time.time()
    self._tb = _TensorBoard(workdir / "tensorboard") if tensorboard and is_main else None
    self._rows: list[dict[str, Any]] | None = None if io.is_local(self.path) else []
    self._pending = False
    self._flushed = time.time()

  def truncate(self, last_step: int, last_row: dict[str, Any] | None = None) -> None:
    """Drops rows past `last_step` (written before an interruption; those steps are rerun) and
    puts back `last_row`, the checkpoint's own row, when an interruption cost it."""
    if not self.is_main:
      return
    rows = list(io.read_jsonl(self.path)) if self.path.exists() else []
    kept = [r for r in rows if r.get("step", 0) <= last_step]
    if last_row and last_row.get("step") == last_step and not any(
        r.get("step") == last_step for r in kept):
      kept.append(last_row)
    if self._rows is not None:
      self._rows = kept
    if kept != rows:
      io.write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

  def write(self, row: dict[str, Any]) -> None:
    """Appends one row (step, loss, grad_norm, lr, rates, ...) and prints its console line."""
    row = dict(row, elapsed_s=time.time() - self.start)
    if not self.is_main:
      return
    if self._rows is None:
      io.append_jsonl(self.path, row)
    else:
      self._rows.append(row)
      self._pending = True
      if time.time() - self._flushed >= self.FLUSH_S:
        self.flush()
    if self._tb is not None:
      self._tb.scalars(row["step"], row)
    if self.tracker is not None:
      self.tracker.log(row["step"], row)
    step_s, rate, mfu = row.get("step_time_s"), row.get("tokens_per_sec"), row.get("mfu")
    eta = (self.total_steps - row["step"]) * step_s if step_s else None
    eval_loss = row.get("eval_loss")
    logging.info(
        "step %d/%d  loss %.4f  gnorm %.3g  lr %.3g  %s tok/s  mfu %s  %s/step  eta %s%s",
        row["step"], self.total_steps, row["loss"], row["grad_norm"], row["lr"],
        f"{rate:,.0f}" if rate else "-", f"{mfu:.1%}" if mfu else "-",
        f"{step_s * 1e3:.1f}ms" if step_s else "-", format_duration(eta),
        f"  eval {eval_loss:.4f}" if eval_loss is not None else "")

  def flush(self) -> None:
    """Writes a remote log's rows not yet written (a local log has none)."""
    if self._pending:
      io.write_text_atomic(self.path, "".join(json.dumps(r, default=str) + "\n"
                                              for r in self._rows))
      self._pending, self._flushed = False, time.time()

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()
    if self.tracker is not None:
      self.tracker.close()


def format_duration(seconds: float | None) -> str:
  """h:mm:ss, or "-" when unknown."""
  if seconds is None or not math.isfinite(seconds):
    return "-"
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


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
