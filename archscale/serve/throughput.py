"""Where a search's throughput comes from: the roofline cost model, or the decode harness here.

Both are callables `spec -> (output tokens/s or None, fits)` with a `name`, and `cheap` saying
whether the search may rate every candidate (the model) or should rate as few as it can (a
measurement, cached by spec in `WORKDIR/throughput_measured.jsonl`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import Any

from archscale.core import io, settings
from archscale.core.settings import BenchConfig, SearchConfig
from archscale.model.arch import ArchSpec
from archscale.serve import costmodel

MEASURE_CACHE = "throughput_measured.jsonl"


@dataclasses.dataclass(frozen=True)
class Scenario:
  """The serving workload throughput is measured or predicted for."""

  batch_size: int
  input_len: int
  output_len: int
  dtype_bytes: int = 2


class ModelThroughput:
  """The roofline cost model of one accelerator (calibrated when a calibration is given)."""

  cheap = True

  def __init__(self, accelerator: str, scenario: Scenario,
               calibration: dict[str, Any] | None = None):
    self.accelerator = costmodel.get_accelerator(accelerator).name
    self.scenario, self.calibration = scenario, calibration
    self.name = f"model:{self.accelerator}" + (" (calibrated)" if calibration else "")

  def __call__(self, spec: ArchSpec) -> tuple[float | None, bool]:
    s = self.scenario
    out = costmodel.throughput(spec, self.accelerator, s.batch_size, s.input_len, s.output_len,
                               s.dtype_bytes, calibration=self.calibration)
    return out["output_tokens_per_s"], bool(out["fits"])


class MeasuredThroughput:
  """The decode harness on this machine (random weights), cached in a JSONL file by spec."""

  cheap = False

  def __init__(self, scenario: Scenario, dtype: str, repeats: int, cache_path: pathlib.Path,
               seed: int = 0, attention: str = "auto", decode_attention: str = "auto"):
    self.scenario, self.dtype, self.repeats = scenario, dtype, repeats
    self.cache_path, self.seed = cache_path, seed
    self.attention, self.decode_attention = attention, decode_attention
    self.name = "measure"
    self._cache = {r["key"]: r for r in io.read_jsonl(cache_path) if "key" in r}

  def _key(self, spec: ArchSpec, device_kind: str) -> str:
    blob = json.dumps([spec.to_dict(), dataclasses.asdict(self.scenario), self.dtype,
                       self.repeats, device_kind, self.attention, self.decode_attention],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]

  def __call__(self, spec: ArchSpec) -> tuple[float | None, bool]:
    import jax

    from archscale.serve import decode_bench

    key = self._key(spec, jax.devices()[0].device_kind)
    if key not in self._cache:
      s = self.scenario
      bench = settings.BenchConfig(
          batch_sizes=(s.batch_size,), input_len=s.input_len, output_len=s.output_len,
          repeats=self.repeats, dtype=self.dtype, attention=self.attention,
          decode_attention=self.decode_attention, accelerator="")
      rows = decode_bench.bench_archs({"candidate": spec}, bench, seed=self.seed)
      row = rows[0]
      if row.get("error") and not row["error"].startswith("out of memory"):
        raise RuntimeError(f"measuring {spec.to_dict()} failed: {row['error']}")
      entry = {"key": key, "arch": spec.to_dict(), "scenario": dataclasses.asdict(s),
               "output_tokens_per_s": row.get("output_tokens_per_s"), "error": row.get("error")}
      io.append_jsonl(self.cache_path, entry)
      self._cache[key] = entry
    entry = self._cache[key]
    return entry["output_tokens_per_s"], not entry.get("error")


def source(config: Any, workdir: pathlib.Path, scenario: Scenario) -> Any:
  """The throughput source `search.throughput` names, for this serving scenario."""
  s = SearchConfig.from_config(config)
  text = str(s.throughput).strip()
  if text == "measure":
    b = BenchConfig.from_config(config)
    return MeasuredThroughput(scenario, b.dtype, b.repeats, pathlib.Path(workdir) / MEASURE_CACHE,
                              int(config.seed), b.attention, b.decode_attention)
  if not text.startswith("model:"):
    raise ValueError(f"search.throughput={text!r} must be 'measure' or 'model:<accelerator>' "
                     f"with an accelerator of {sorted(costmodel.ACCELERATORS)}")
  name = text[len("model:"):].strip()
  if name not in costmodel.ACCELERATORS:
    raise ValueError(f"search.throughput={text!r}: unknown accelerator {name!r}; choose one of "
                     f"{sorted(costmodel.ACCELERATORS)}")
  calib_path = pathlib.Path(str(s.calibration).strip() or pathlib.Path(workdir) /
                            "calibration.json").expanduser()
  if str(s.calibration).strip() and not calib_path.exists():
    raise ValueError(f"search.calibration={str(s.calibration)!r} does not exist")
  calibration = costmodel.load_calibration(calib_path, name)
  return ModelThroughput(name, scenario, calibration)
