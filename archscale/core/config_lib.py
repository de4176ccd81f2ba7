"""The configuration tree every mode reads, and the named architectures of the paper.

Config files in `configs/` call `make_config(arch)` and override what they need; every field can be
overridden from the command line as `--config.section.field=value`. Sections:

  model    ArchSpec fields (archscale.model.arch.ArchSpec)
  compute  how the model runs (archscale.core.settings.ModelOptions)
  data, train, sweep, fit, search, bench, export, eval, pipeline   typed sections of
           archscale.core.settings,
           which hold their defaults, documentation and checks
  mesh     device mesh axis sizes (-1 = the rest) distributed  multi-host initialisation
"""

from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
import pprint
from collections.abc import Sequence
from typing import Any

import ml_collections

from archscale.core import io, settings
from archscale.core.settings import ModelOptions

# Table 1 of the paper (arXiv 2510.18245) plus a tiny CPU demo. Values are ArchSpec fields.
_LLAMA = dict(vocab_size=128256, tie_embeddings=True, rope_theta=500000.0, rope_scaling="llama3",
              norm_eps=1e-5, max_seq_len=131072)
ARCHS: dict[str, dict] = {
    "llama3_2_1b": dict(_LLAMA, d_model=2048, d_ff=8192, n_layers=16, n_heads=32, n_kv_heads=8,
                        d_head=64),
    "panda_1b": dict(_LLAMA, d_model=2560, d_ff=4096, n_layers=16, n_heads=72, n_kv_heads=18,
                     d_head=64),
    "surefire_1b": dict(_LLAMA, d_model=2560, d_ff=6144, n_layers=16, n_heads=36, n_kv_heads=4,
                        d_head=64),
    "llama3_2_3b": dict(_LLAMA, d_model=3072, d_ff=8192, n_layers=28, n_heads=24, n_kv_heads=8,
                        d_head=128),
    "panda_3b": dict(_LLAMA, d_model=4096, d_ff=4096, n_layers=28, n_heads=36, n_kv_heads=12,
                     d_head=128),
    "surefire_3b": dict(_LLAMA, d_model=4096, d_ff=4096, n_layers=28, n_heads=42, n_kv_heads=6,
                        d_head=128),
    "demo": dict(d_model=64, d_ff=256, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16,
                 vocab_size=256, tie_embeddings=True, rope_theta=10000.0, rope_scaling="none",
                 norm_eps=1e-5, max_seq_len=512),
}

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"


def make_config(arch: str = "demo") -> ml_collections.ConfigDict:
  """The full default configuration for one named architecture."""
  if arch not in ARCHS:
    raise ValueError(f"arch={arch!r} is not a known architecture; choose one of {sorted(ARCHS)}")
  c = ml_collections.ConfigDict()
  c.name = arch
  c.mode = "describe"
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(ARCHS[arch]))

  c.compute = ml_collections.ConfigDict(ModelOptions.defaults())
  c.data = ml_collections.ConfigDict(settings.DataConfig.defaults())
  c.train = ml_collections.ConfigDict(settings.TrainConfig.defaults())

  # Mesh axis sizes (-1 = the rest); rules: overrides of archscale.model.sharding.LOGICAL_RULES as
  # "logical=axis[+axis],...", e.g. "embed=,mlp=fsdp+tensor" (empty right side: replicated).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=""))

  # initialize: auto (when a launcher or coordinator_address says so) | always | never
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1, initialize="auto"))

  c.bench = ml_collections.ConfigDict(dict(settings.BenchConfig.defaults(), archs=arch))
  c.fit = ml_collections.ConfigDict(settings.FitConfig.defaults())
  c.search = ml_collections.ConfigDict(settings.SearchConfig.defaults())
  c.sweep = ml_collections.ConfigDict(dict(
      settings.SweepConfig.defaults(),
      slurm=dataclasses.asdict(settings.SlurmConfig())))
  c.export = ml_collections.ConfigDict(settings.ExportConfig.defaults())
  c.eval = ml_collections.ConfigDict(settings.EvalConfig.defaults())
  c.pipeline = ml_collections.ConfigDict(settings.PipelineConfig.defaults())
  c.metrics = ml_collections.ConfigDict(settings.MetricsConfig.defaults())
  return c


def write_config_py(path: str | os.PathLike, config: Any, doc: str, *, base: str | None = None,
                    tail: Sequence[str] = ()) -> Any:
  """Writes a standalone config file whose `get_config()` returns `config`; returns its path.

  With `base` (an architecture name) the file starts from `make_config(base)` and sets only the
  fields that differ, which reads well (panda.py); without, it spells out the whole tree. `tail`:
  further statements run before returning (`c` is the config; `pathlib` is imported).
  """
  path = io.as_path(path, "config file")
  if base is None:
    body = pprint.pformat(config.to_dict(), indent=1, width=96, sort_dicts=True)
    lines = ["import ml_collections", "", "", "def get_config():",
             f"  c = ml_collections.ConfigDict(\n{_indent(body, 6)}  )"]
  else:
    changed = _differences(make_config(base), config)
    bad = [key for key, _ in changed if not all(k.isidentifier() for k in key.split("."))]
    settings.check(not bad, f"config keys {bad} are not Python names; rename them")
    lines = ["import pathlib", "", "from archscale.core import config_lib", "", "",
             "def get_config():", f"  c = config_lib.make_config({base!r})",
             *(f"  c.{key} = {value!r}" for key, value in changed)]
  lines += [f"  {line}" for line in tail] + ["  return c"]
  io.write_text_atomic(path, _docstring(doc) + "\n\n" + "\n".join(lines) + "\n")
  return path


def command_line_overrides() -> dict[str, Any]:
  """The `--config.a.b=v` overrides on this process's command line, by dotted key ({} when the
  process did not start from archscale.main)."""
  from absl import flags
  from ml_collections import config_flags

  if "config" not in flags.FLAGS or not flags.FLAGS.is_parsed():
    return {}
  return config_flags.get_override_values(flags.FLAGS["config"])


def _docstring(doc: str) -> str:
  """`doc` as a module docstring: triple-quoted where that reads back as exactly `doc`, else its
  repr (a doc holding quotes or backslashes, e.g. from a folder's name, never becomes code)."""
  quoted = f'"""{doc}"""'
  try:
    if ast.literal_eval(quoted) == doc:
      return quoted
  except (SyntaxError, ValueError):
    pass
  return repr(doc)


def _differences(base: Any, config: Any, prefix: str = "") -> list[tuple[str, Any]]:
  """(dotted key, value) of every leaf of `config` that `base` lacks or holds otherwise."""
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and isinstance(base.get(key), type(value)):
      out += _differences(base[key], value, f"{prefix}{key}.")
    elif isinstance(value, ml_collections.ConfigDict):
      out.append((f"{prefix}{key}", value.to_dict()))
    elif key not in base or base[key] != value:
      out.append((f"{prefix}{key}", value))
  return out


def _indent(text: str, n: int) -> str:
  return "".join(" " * n + line + "\n" for line in text.splitlines())


def arch_config(name: str) -> dict:
  """ArchSpec fields for `name`: a known architecture or a path to a config file."""
  if name in ARCHS:
    return dict(ARCHS[name])
  path = pathlib.Path(name)
  if not path.suffix:
    path = CONFIG_DIR / f"{name}.py"
  if not path.exists():
    raise ValueError(
        f"architecture {name!r} is neither a known name ({sorted(ARCHS)}) nor a config file")
  return load_config_file(path).model.to_dict()


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Runs a config file's `get_config()`, as `--config=path` does."""
  import importlib.util

  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"archscale_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
