"""archscale command line: `python -m archscale.main --config=configs/X.py --mode=MODE`."""

import importlib
import logging as py_logging
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from archscale.core import exits, io, schema

# mode -> "module:function"; each function takes (config, workdir) and does the whole job.
MODES = {
    "describe": "archscale.model.arch:run_describe",
    "prepare_data": "archscale.data.prepare:run_prepare_data",
    "train": "archscale.train.trainer:run_train",
    "decode_bench": "archscale.serve.decode_bench:run_decode_bench",
    "sweep": "archscale.study.sweep:run_sweep",
    "fit": "archscale.study.fit:run_fit",
    "search": "archscale.study.search:run_search",
    "verify": "archscale.study.verify:run_verify",
    "pipeline": "archscale.study.pipeline:run_pipeline",
    "export": "archscale.interop.hf:run_export",
    "evaluate": "archscale.study.runner:run_evaluate",
}

# Modes whose every file goes through etils.epath, so that --workdir may be a URI (gs://...).
URI_MODES = ("describe", "train", "sweep", "evaluate")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_MODE = flags.DEFINE_enum("mode", None, list(MODES), "What to run (default: the config's `mode`).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (default: runs/<config name>).")


class _LibraryInfoFilter(py_logging.Filter):
  """Keeps INFO chatter of checkpointing and backend probing out of the run's log."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = "/orbax/" in record.pathname or record.pathname.endswith("xla_bridge.py")
    return record.levelno > py_logging.INFO or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  mode = _MODE.value or config.mode
  if mode not in MODES:
    raise app.UsageError(f"mode {mode!r} is unknown; choose one of {sorted(MODES)}")
  for handler in py_logging.getLogger().handlers:
    handler.addFilter(_LibraryInfoFilter())
  try:
    schema.safe_name(config.get("name"), "config.name")
    workdir = io.as_path(_WORKDIR.value or pathlib.Path("runs") / config.name, "--workdir")
    if mode not in URI_MODES:
      workdir = io.local_only(workdir, "--workdir", f"--mode={mode} writes through local file "
                              f"APIs (only {', '.join(URI_MODES)} take a URI)")
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if workdir.exists() and not workdir.is_dir():
    raise app.UsageError(f"--workdir={workdir} is a file, not a directory; choose another")
  logging.info("archscale: mode=%s workdir=%s", mode, workdir)
  module_name, fn_name = MODES[mode].split(":")
  try:
    result = getattr(importlib.import_module(module_name), fn_name)(config, workdir)
  except Exception as e:  # noqa: BLE001 - reported in one line; other errors raise.
    # ValueError is how every check of a config or an input says what to fix; I/O failures and
    # ReportedErrors say it too. The traceback stays available with --verbosity=1.
    message = str(e) if isinstance(e, ValueError) else io.one_line_error(e)
    if message is None:
      raise
    logging.debug("archscale: %s failed", mode, exc_info=True)
    logging.error("archscale: %s failed: %s", mode, message)
    sys.exit(exits.EXIT_FAILED)
  sys.exit(exits.status_of(result))


if __name__ == "__main__":
  app.run(main)
