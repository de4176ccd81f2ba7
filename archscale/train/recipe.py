"""What a run was trained as, and the checks that keep it that way.

A run's recipe (`run_recipe`: its ArchSpec, every training field that is not bookkeeping, its
seed) and its dataset's fingerprint are written into its checkpoints and summary; continuing or
reusing a run under another recipe or on another dataset is refused, naming what changed.
`trained_recipe` reads a checkpoint's recipe back (export and evaluation build the model it
describes).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from archscale.core import io, settings
from archscale.core.settings import TrainConfig
from archscale.data import batches as data_lib
from archscale.model.arch import ArchSpec
from archscale.train import checkpoint


def run_recipe(config: Any, spec: ArchSpec) -> dict[str, Any]:
  """What a run's checkpoints were trained under: its spec, recipe (`settings`) and seed."""
  init_from = TrainConfig.from_config(config).init_from.strip()
  return {"arch": spec.to_dict(), **settings.training_recipe(config), "seed": int(config.seed),
          **({"init_from": init_from} if init_from else {})}


def recipe_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """"section.field: saved -> now" for every field that differs (nested one level)."""
  changes = []
  for section in sorted(set(saved) | set(now)):
    a, b = saved.get(section), now.get(section)
    if isinstance(a, dict) and isinstance(b, dict):
      changes += [f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}"
                  for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    elif a != b:
      changes.append(f"{section}: {a!r} -> {b!r}")
  return changes


def check_same_run(saved: dict[str, Any] | None, recipe: dict[str, Any], where: str) -> None:
  """Refuses to continue a run whose recipe changed; JSON round trips count as equal."""
  if saved is None:
    return
  changes = recipe_changes(saved, json.loads(json.dumps(recipe, default=str)))
  if changes:
    raise ValueError(
        f"{where} was trained under another recipe; changed: {'; '.join(changes)}. Restore "
        "those values to resume it (only train.steps may change, to extend the run), or train "
        "in a new --workdir")


def data_fingerprint(data_info: dict[str, Any]) -> str | None:
  """The fingerprint of the dataset a run reads (None without one: synthetic benchmarks)."""
  return data_lib.fingerprint(data_info) if data_info else None


def check_same_data(saved: str | None, now: str | None, where: str) -> None:
  """Refuses to continue (or reuse) a run on another dataset than it trained on."""
  settings.check(
      saved is None or now is None or saved == now,
      f"{where} was trained on another dataset (fingerprint {saved}) than data.path holds now "
      f"({now}): point data.path at that dataset, or train in a new --workdir")


def finished_summary(workdir: pathlib.Path, t: TrainConfig, recipe: dict[str, Any],
                      data: str | None) -> dict | None:
  """The summary of a run already trained to `t.steps` under this recipe and on this dataset
  (None: train on)."""
  path = workdir / "summary.json"
  if not path.exists():
    return None
  summary = json.loads(path.read_text())
  check_same_run(summary.get("recipe"), recipe, f"{workdir} (summary.json)")
  check_same_data(summary.get("data_fingerprint"), data, f"{workdir} (summary.json)")
  return summary if summary.get("steps") == t.steps else None


def trained_recipe(workdir: str | pathlib.Path, config: Any, step: int | None = None) -> dict:
  """The recipe (`run_recipe`: arch, training fields, seed) of a run's checkpoint (latest by
  default)."""
  ckpt = checkpoint.Checkpoints(io.as_path(workdir, "--workdir") / "checkpoints", config.train)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{workdir} holds no checkpoint")
    return ckpt.restore_meta(step)["recipe"]
  finally:
    ckpt.close()
