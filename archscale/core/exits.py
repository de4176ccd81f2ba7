"""Exit statuses of `python -m archscale.main`, the same for every mode, for scripts and schedulers.

  0   everything asked for is done
  1   a failure: bad input, or a run or step that failed
  73  the workdir is held by another live process (EX_CANTCREAT): not a failure of the run
  75  stopped to be resumed (preemption, SIGTERM; EX_TEMPFAIL): rerun the same command
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BUSY = 73
EXIT_PREEMPTED = 75
