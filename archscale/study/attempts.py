"""A sweep's results without locks: each attempt of a run writes its own row file, atomically,
and the results table (`results.jsonl`, what the fitter reads) is derived from those files.

`finished_row` and `failed_row` build an attempt's row (fields: see archscale.study.sweep).

Layout under a sweep's WORKDIR: `runs/<run_id>/attempts/<time_ns>-<host>-<pid>.json`, one row per
attempt (finished, failed or preempted), and `results.jsonl`, every attempt's row oldest first,
each finished row with its run's downstream evaluation (eval.json) attached. Shared file systems
and object stores without POSIX locks (gcsfuse, gs://) can hold both.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import time
from collections.abc import Iterable
from typing import Any

from archscale.core import io
from archscale.interop import evaluate
from archscale.study.planning import Run

RESULTS = "results.jsonl"
RUNS_DIR = "runs"
ATTEMPTS_DIR = "attempts"


def results_path(workdir: str | os.PathLike) -> Any:
  return io.as_path(workdir, "--workdir") / RESULTS


def latest_rows(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """The latest row of every run id in a results table (a finished row always wins)."""
  return latest(io.read_jsonl(path))


def latest(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  out: dict[str, dict[str, Any]] = {}
  for row in rows:
    rid = row.get("run_id")
    if rid is None:
      continue
    if out.get(rid, {}).get("status") == "finished":
      continue
    out[rid] = row
  return out


def finished_ids(path: str | os.PathLike) -> set[str]:
  """Run ids with a finished row."""
  return {rid for rid, row in latest_rows(path).items() if row.get("status") == "finished"}


def record_attempt(workdir: pathlib.Path, row: dict[str, Any]) -> pathlib.Path:
  """Writes one attempt's row as its own file, atomically: runs need no lock to record rows."""
  name = f"{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}.json"
  path = workdir / RUNS_DIR / row["run_id"] / ATTEMPTS_DIR / name
  io.write_json_atomic(path, row, indent=None)
  return path


def run_rows(workdir: pathlib.Path, run_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
  """Every attempt row recorded under `workdir/runs` (of `run_ids` only, if given), oldest first."""
  runs = workdir / RUNS_DIR
  dirs = ([runs / rid for rid in run_ids] if run_ids is not None
          else sorted(runs.iterdir()) if runs.is_dir() else [])
  files = [f for d in dirs if (d / ATTEMPTS_DIR).is_dir()
           for f in (d / ATTEMPTS_DIR).iterdir() if f.suffix == ".json"]
  rows = []
  for f in sorted(files, key=lambda f: (f.name, f.parent.parent.name)):
    try:
      row = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):  # Removed or unreadable meanwhile: not a result.
      continue
    if isinstance(row, dict) and row.get("run_id"):
      rows.append(row)
  return rows


def run_states(workdir: pathlib.Path) -> dict[str, dict[str, Any]]:
  """The latest attempt row of every run with one (a finished row always wins)."""
  return latest(run_rows(workdir))


def materialise(workdir: pathlib.Path) -> pathlib.Path:
  """Rebuilds `results.jsonl` from the runs' attempt files and eval.json; returns its path.

  Replaced atomically, and rebuilt again if attempts or evaluations landed meanwhile (no row
  is left out or stale).
  """
  path = workdir / RESULTS
  read = lambda: [evaluate.attach(r, workdir / RUNS_DIR / r["run_id"]) for r in run_rows(workdir)]
  text = lambda: "".join(json.dumps(r, default=str) + "\n" for r in read())
  table = text()
  for _ in range(5):
    io.write_text_atomic(path, table)
    again = text()
    if again == table:  # by content: an attempt or an evaluation that landed meanwhile counts
      break
    table = again
  return path


def _host_provenance(config: Any) -> dict[str, Any]:
  """Provenance without touching an accelerator (the parent of isolated runs must not)."""
  return {
      "code_revision": io.code_revision(),
      "host": socket.gethostname(),
      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "config": config.to_dict() if hasattr(config, "to_dict") else config,
  }


def finished_row(run: Run, summary: dict[str, Any], run_config: Any, loss: str,
                 wall_s: float) -> dict[str, Any]:
  """The results row of a run that trained to the end."""
  eval_loss, train_loss = summary.get("eval_loss"), summary.get("final_train_loss")
  if loss == "eval" and eval_loss is not None:
    value, source = eval_loss, "eval"
  else:
    value, source = train_loss, "train"
  provenance = {**_host_provenance(run_config), **(summary.get("provenance") or {}),
                "config": run_config.to_dict()}
  provenance.setdefault("device_kind", summary.get("device_kind"))
  return {
      **run.fields(),
      "status": "finished",
      "tokens": summary.get("tokens", run.tokens),
      "loss": value,
      "loss_source": source,
      "eval_loss": eval_loss,
      "final_train_loss": train_loss,
      "steps": summary.get("steps"),
      "trained": io.digest(summary["recipe"]) if summary.get("recipe") else None,
      "data_fingerprint": summary.get("data_fingerprint"),
      "seq_len": summary.get("seq_len"),
      "global_batch_size": summary.get("global_batch_size"),
      "train_wall_s": summary.get("wall_s"),
      "wall_s": wall_s,
      "provenance": provenance,
  }


def failed_row(run: Run, status: str, error: str, run_config: Any, wall_s: float) -> dict[str, Any]:
  """The results row of a run that crashed or was preempted (retried by the next sweep)."""
  return {
      **run.fields(),
      "status": status,
      "tokens": None,
      "loss": None,
      "error": error[-4000:],
      "wall_s": wall_s,
      "provenance": _host_provenance(run_config),
  }
