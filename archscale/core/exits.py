"""Exit statuses of `python -m archscale.main`, the same for every mode, for scripts and schedulers.

  0   everything asked for is done (a sweep with `sweep.wait=false`: every run finished or
      cleanly submitted)
  1   a failure: bad input, a step that failed, or a sweep with a run that failed or whose
      scheduler state could not be read
  73  the workdir (or, in a sweep, a run) is held by another live process (EX_CANTCREAT): not a
      failure; rerun once it is done
  75  stopped to be resumed (preemption, SIGTERM; EX_TEMPFAIL): rerun the same command
"""

from collections.abc import Mapping
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BUSY = 73
EXIT_PREEMPTED = 75


def status_of(result: Any) -> int:
  """The exit status of a mode that returned `result`: a sweep's counts (a mapping with `failed`,
  `unknown` and `skipped`) decide it; any other result of a mode that returned is a success."""
  if not isinstance(result, Mapping):
    return EXIT_OK
  if result.get("failed") or result.get("unknown"):
    return EXIT_FAILED
  return EXIT_BUSY if result.get("skipped") else EXIT_OK
