"""Progress of a sweep: counts by status, tokens trained of tokens planned, and an ETA that
weighs each run by its training FLOPs (runs of one sweep differ in cost by 10x or more)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence

from archscale.study.planning import Run

_ORDER = ("finished", "failed", "running", "queued", "planned", "unknown")


def run_flops(run: Run, seq_len: int) -> float:
  """Training FLOPs of a run: its tokens times the spec's FLOPs per token at `seq_len`."""
  return run.tokens * run.spec.train_flops_per_token(seq_len)


def clock(seconds: float) -> str:
  seconds = max(0, int(seconds))
  return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class SweepProgress:
  """Says one line per change of the runs' statuses, at most one a minute off a terminal.

  The ETA is the remaining runs' FLOPs over the FLOP rate measured since this object was made
  (runs that finished meanwhile, over the time they took to); none before the first finishes.
  """

  def __init__(self, runs: Sequence[Run], seq_len: int, say: Callable[[str], None],
               min_interval_s: float | None = None):
    self.runs, self.say = list(runs), say
    self.flops = {r.run_id: run_flops(r, seq_len) for r in self.runs}
    self.tokens = {r.run_id: r.tokens for r in self.runs}
    self.start, self.done_at_start, self.last_said, self.last_line = time.time(), None, 0.0, ""
    self.min_interval_s = (0.0 if sys.stderr.isatty() else 60.0) if min_interval_s is None \
        else min_interval_s

  def line(self, status: Mapping[str, str]) -> str:
    """"3 finished, 1 failed, 2 running, 8 queued; 2.1M of 9.4M tokens; ETA 00:12:30"."""
    finished = {r for r, s in status.items() if s == "finished"}
    if self.done_at_start is None:
      self.done_at_start = finished
    values = list(status.values())
    parts = ", ".join(f"{values.count(s)} {s}" for s in _ORDER if s in values)
    tokens = sum(self.tokens[r] for r in finished)
    new = sum(self.flops[r] for r in finished - self.done_at_start)
    left = sum(f for r, f in self.flops.items() if status.get(r) not in ("finished", "failed"))
    eta = clock(left / new * (time.time() - self.start)) if new and left else (
        "00:00:00" if not left else "-")
    return (f"{parts}; {_count(tokens)} of {_count(sum(self.tokens.values()))} tokens; "
            f"ETA {eta}")

  def update(self, status: Mapping[str, str]) -> None:
    """Says the line when it changed and the interval has passed (always when all are done)."""
    line = self.line(status)
    settled = all(s in ("finished", "failed") for s in status.values())
    due = time.time() - self.last_said >= self.min_interval_s
    if line.split("; ETA")[0] != self.last_line.split("; ETA")[0] and (due or settled):
      self.say(f"sweep: {line}")
      self.last_said, self.last_line = time.time(), line


def _count(n: float) -> str:
  for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= size:
      return f"{n / size:.3g}{unit}"
  return f"{n:.0f}"
