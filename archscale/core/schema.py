"""The schema's building blocks: `check`, the list parser, and `Section`, the mixin every typed
config section (archscale.core.settings) is built on, with its shared value checks.

`bookkeeping(default)` marks a field that does not change what a run learns, so it stays out of
run ids; `safe_name` guards identifiers that reach a shell, a scheduler or a file name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any, ClassVar

_BOOKKEEPING = "bookkeeping"


def bookkeeping(default: Any) -> Any:
  """A field that does not change what a run learns, so it is left out of the run id."""
  return dataclasses.field(default=default, metadata={_BOOKKEEPING: True})


# ------------------------------------------------------------------------------------ checks


def check(cond: bool, message: str) -> None:
  """Raises ValueError(message) unless `cond`."""
  if not cond:
    raise ValueError(message)


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


def safe_name(value: Any, field: str) -> str:
  """`value` if it is a name that is safe in a shell word, a scheduler directive and a file name
  (letters, digits and ._+- , starting with a letter or digit); otherwise a ValueError naming
  `field`."""
  check(isinstance(value, str) and SAFE_NAME.fullmatch(value) is not None,
        f"{field}={value!r} must be 1-128 letters, digits or '._+-' (starting with a letter or "
        "digit): it names jobs, folders and files; rename it")
  return value


def items(value: Any) -> list[Any]:
  """A list-valued field as a list: "a, b,c" (commas, blanks dropped) or a sequence as given.

  The one parser of list-valued fields (grids, seeds, batch sizes, names); each caller casts and
  checks the items, naming its field.
  """
  if value is None:
    return []
  if isinstance(value, str):
    return [v.strip() for v in value.split(",") if v.strip()]
  if hasattr(value, "__iter__"):
    return list(value)
  return [value]


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


class Section:
  """Mixin of the typed sections: construction from a config and shared checks."""

  SECTION: ClassVar[str]

  @classmethod
  def from_config(cls, config: Any) -> Any:
    """The section `cls.SECTION` of `config` (a ConfigDict or a dict) as a checked dataclass."""
    section = config[cls.SECTION]
    values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    check(not unknown, f"{cls.SECTION}: unknown field(s) {unknown}; the fields are {known}")
    return cls(**values)

  @classmethod
  def defaults(cls) -> dict[str, Any]:
    """Every field's default, as `config_lib.make_config` puts them in the ConfigDict."""
    return {f.name: f.default for f in dataclasses.fields(cls)}

  def identity(self) -> dict[str, Any]:
    """The fields that define a trained run (everything not marked `bookkeeping`)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if not f.metadata.get(_BOOKKEEPING)}

  def _field(self, name: str) -> str:
    return f"{self.SECTION}.{name}"

  def _positive_ints(self, *names: str) -> None:
    for name in names:
      value = getattr(self, name)
      check(is_int(value) and value >= 1,
            f"{self._field(name)} must be a positive integer, got {value!r}")

  def _non_negative_ints(self, *names: str, meaning: str = "0 = off") -> None:
    for name in names:
      value = getattr(self, name)
      check(is_int(value) and value >= 0,
            f"{self._field(name)} must be a non-negative integer ({meaning}), got {value!r}")

  def _positive_numbers(self, *names: str) -> None:
    for name in names:
      value = getattr(self, name)
      check(is_number(value) and value > 0,
            f"{self._field(name)} must be a positive number, got {value!r}")

  def _non_negative_numbers(self, *names: str) -> None:
    for name in names:
      value = getattr(self, name)
      check(is_number(value) and value >= 0,
            f"{self._field(name)} must be a number >= 0 (0 = off), got {value!r}")

  def _one_of(self, name: str, choices: Sequence[str]) -> None:
    value = getattr(self, name)
    check(value in choices, f"{self._field(name)} must be one of {tuple(choices)}, got {value!r}")

  def _in_range(self, name: str, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> None:
    value = getattr(self, name)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    check(is_number(value) and above and below,
          f"{self._field(name)} must be in {interval}, got {value!r}")
