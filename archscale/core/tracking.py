"""Experiment tracking in Weights & Biases (`metrics.wandb_*`), never in the way of the work.

`Tracker.start(config, workdir, name, job, run_config)` opens a W&B run (None when tracking is
off); `log(step, values)`, `log_files(summary, images)` and `close()` feed it. A run's id is
derived from its workdir, so a resumed training run continues its W&B run. Any failure of
wandb (no network, a full disk, a changed API) is logged once and ends tracking: the training,
fit or search goes on.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from archscale.core import io, settings


class Tracker:
  """One W&B run; every call is guarded (see the module doc)."""

  def __init__(self, run: Any):
    self._run = run

  @classmethod
  def start(cls, config: Any, workdir: Any, *, name: str, job: str,
            run_config: Mapping[str, Any], group: str = "") -> Tracker | None:
    if "metrics" not in config:
      return None
    m = settings.MetricsConfig.from_config(config)
    if not m.wandb_project or m.wandb_mode == "disabled":
      return None
    local = workdir if io.is_local(workdir) else io.local_mirror(workdir)
    try:
      import wandb

      run = wandb.init(
          project=m.wandb_project, entity=m.wandb_entity or None,
          group=m.wandb_group or group or None, job_type=job, name=name, mode=m.wandb_mode,
          id=hashlib.sha1(f"{workdir}|{job}".encode()).hexdigest()[:16], resume="allow",
          dir=str(local), config=dict(run_config), reinit="create_new")
    except Exception as e:  # noqa: BLE001 - tracking must never stop the work.
      logging.warning("metrics: W&B tracking is off for this run: %s", e)
      return None
    return cls(run)

  def log(self, step: int, values: Mapping[str, Any]) -> None:
    self._call(lambda: self._run.log(
        {k: v for k, v in values.items() if k != "step" and isinstance(v, (int, float))},
        step=step))

  def log_files(self, summary: Mapping[str, Any], images: Sequence[str | pathlib.Path]) -> None:
    """A fit's or search's numbers into the run's summary and its figures as images."""
    import wandb

    self._call(lambda: (self._run.summary.update(dict(summary)), self._run.log(
        {pathlib.Path(p).stem: wandb.Image(str(p)) for p in images if pathlib.Path(p).exists()})))

  def close(self) -> None:
    self._call(lambda: self._run.finish())
    self._run = None

  def _call(self, fn: Any) -> None:
    if self._run is None:
      return
    try:
      fn()
    except Exception as e:  # noqa: BLE001 - tracking must never stop the work.
      logging.warning("metrics: W&B tracking stopped: %s", e)
      self._run = None
