"""A run's orbax checkpoints: {"state": train state, "meta": running totals and the recipe}.

A save that fails, in the foreground or in the background, raises `CheckpointError` with one line
naming the step, the path and the cause; the checkpoints written before it stay restorable.
"""

from __future__ import annotations

import copy
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from archscale.core import io


class CheckpointError(io.ReportedError):
  """A checkpoint could not be written."""


class Checkpoints:
  """orbax CheckpointManager for one run.

  Saves every `train.checkpoint_every` steps (0: only at the end and on preemption), keeps the
  last `train.keep_checkpoints`, writes in the background when `train.async_checkpoint`, and is
  atomic: an interrupted save leaves only a temporary directory that is never restored from. The
  save decision is made here, not by orbax, so that it depends on the step alone.
  """

  def __init__(self, directory: Any, train_cfg: Any):
    self.directory = io.absolute(directory)
    self.every = train_cfg.checkpoint_every
    self.background = bool(train_cfg.async_checkpoint)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=train_cfg.keep_checkpoints, create=True,
        enable_async_checkpointing=self.background)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._in_flight: int | None = None  # the step a background save is writing
    self._written = self.manager.latest_step()  # the last step known to be on disk
    self._failed = False  # a failure was raised already: closing must not raise it again

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves `state` and a copy of `meta` at `step`; raises CheckpointError when it fails."""
    self.wait()
    # A copy: a background save serialises `meta` later, while the loop keeps updating it.
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(copy.deepcopy(meta)))
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way.
      raise self._error(step, e) from e
    if self.background:
      self._in_flight = step
      logging.info("train: writing the checkpoint of step %d in the background", step)
    else:
      self._written = step
      logging.info("train: checkpoint of step %d written", step)

  def wait(self) -> None:
    """Blocks until a background save is done; raises CheckpointError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._error(self._in_flight, e) from e
    self._raise_background_failure()
    if self._in_flight is not None:
      logging.info("train: checkpoint of step %d written", self._in_flight)
      self._written, self._in_flight = self._in_flight, None

  def _raise_background_failure(self) -> None:
    try:
      self.manager.check_for_errors()
    except Exception as e:  # noqa: BLE001
      raise self._error(self._in_flight, e) from e

  def _error(self, step: int | None, e: BaseException) -> CheckpointError:
    self._failed = True
    last = self._written
    return CheckpointError(
        f"saving the checkpoint of step {step} to {self.directory} failed: {io.describe_error(e)}. "
        f"The last good checkpoint is {'step ' + str(last) if last is not None else 'none'}; "
        "free the space (or fix the path) and rerun to resume from it")

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any) -> Any:
    """The state at `step`, laid out as `abstract_state`'s shardings (any mesh, any devices)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    return self.manager.restore(step, args=args)["state"]

  def close(self) -> None:
    try:
      self.manager.close()
    except Exception:  # noqa: BLE001
      if not self._failed:
        raise
