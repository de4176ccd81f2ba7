"""The results table of the scaling-law fitter: loading, row checks, filtering and grouping.

Rows: `params_nonembed`, `tokens`, `loss` (all forms) and `d_model`, `mlp_attn_ratio` (forms with
architecture terms), finite and positive; other fields are kept. Rows whose `status` is not
"finished" (failed sweep attempts), rows outside `r_range` and earlier rows of a run_id that
appears again (the latest row stands for the run, with a warning) are excluded and listed. Torn
JSONL lines (a write cut short) are skipped and counted. Scales are
the rows' `scale` (the sweep's requested N) when every row has one, else groups of N within
SCALE_FACTOR; budgets are groups of D within a scale; design points are rows of one budget with
the same architecture (seed replicates). The empirical L_opt of a row is the lowest loss of its
(N, D) budget, design points averaged over their seeds.

Public API:
  load_rows(path) -> (rows, torn_lines)    JSONL or CSV
  prepare(rows, arch=, r_range=) -> Table  checked, filtered rows as float64 arrays with groups,
                                           `warnings` about the rows and the `grouping` used
  points(table), point_means(table), empirical_l_opt(table), best_rows(table), n_spreads(table),
  n_spread_warning(table)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from archscale.core import io

REQUIRED_FIELDS = ("params_nonembed", "tokens", "loss")
ARCH_FIELDS = ("d_model", "mlp_attn_ratio")
# A new scale starts where N exceeds the smallest N of the current one by more than this factor.
SCALE_FACTOR = 1.25
# Realised N may differ from its budget's by this much before an empirical L_opt warns.
N_SPREAD_WARNING = 0.02


def is_finite_number(v: Any) -> bool:
  if isinstance(v, bool):
    return False
  try:
    return math.isfinite(float(v))
  except (TypeError, ValueError):
    return False


def _parse_cell(text: str) -> Any:
  text = text.strip()
  if text == "":
    return None
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def load_rows(path: str | pathlib.Path) -> tuple[list[dict[str, Any]], int]:
  """Rows of a results table, JSONL (one object a line) or CSV with a header, and the number of
  torn JSONL lines skipped (a write cut short by a crash; CSV has none)."""
  path = io.as_path(path, "fit.results")
  if not path.exists():
    raise ValueError(f"results table {path} does not exist; set config.fit.results to the sweep's "
                     "results.jsonl or a CSV")
  suffix = path.suffix.lower()
  torn = 0
  if suffix in (".jsonl", ".json"):
    rows, torn = _read_jsonl(path)
  elif suffix == ".csv":
    with path.open(encoding="utf-8", newline="") as f:
      rows = [{k: _parse_cell(v or "") for k, v in row.items() if k is not None}
              for row in csv.DictReader(f)]
  else:
    raise ValueError(f"results table {path} must end in .jsonl or .csv, not {suffix!r}")
  if not rows:
    torn_note = f" ({torn} torn lines)" if torn else ""
    raise ValueError(f"results table {path} has no rows{torn_note}")
  return rows, torn


def _read_jsonl(path: pathlib.Path) -> tuple[list[dict[str, Any]], int]:
  """Rows of a JSONL file and the count of non-blank lines that are not a JSON object."""
  rows, torn = [], 0
  with path.open(encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        row = None
      if isinstance(row, dict):
        rows.append(row)
      else:
        torn += 1
  return rows, torn


def _row_name(i: int, row: Mapping[str, Any]) -> str:
  for key in ("run_id", "id", "name"):
    if row.get(key) not in (None, ""):
      return f"row {i} ({key}={row[key]})"
  return f"row {i}"


def _cluster(values: np.ndarray) -> np.ndarray:
  """Integer ids of groups of nearby positive values, in increasing order (see SCALE_FACTOR)."""
  order = np.argsort(values, kind="stable")
  ids = np.empty(len(values), int)
  current, start = -1, -np.inf
  for i in order:
    if values[i] > start * SCALE_FACTOR:
      current, start = current + 1, values[i]
    ids[i] = current
  return ids


@dataclasses.dataclass
class Table:
  """Validated, filtered rows as float64 arrays, with their scale and budget groups."""
  rows: list[dict[str, Any]]
  excluded: list[dict[str, Any]]
  n: np.ndarray
  d: np.ndarray
  loss: np.ndarray
  x: np.ndarray
  r: np.ndarray
  scale: np.ndarray
  budget: np.ndarray
  point: np.ndarray  # design point: rows of one budget and architecture (seed replicates)
  warnings: list[str] = dataclasses.field(default_factory=list)  # problems found in the rows
  grouping: str = ""  # how rows were grouped into scales, for the log

  def take(self, mask: np.ndarray) -> Table:
    idx = np.flatnonzero(mask)
    arrays = {k: getattr(self, k)[idx] for k in ("n", "d", "loss", "x", "r")}
    return make_table([self.rows[i] for i in idx], [], **arrays)


def make_table(rows: list[dict[str, Any]], excluded: list[dict[str, Any]], n: np.ndarray,
               d: np.ndarray, loss: np.ndarray, x: np.ndarray, r: np.ndarray) -> Table:
  """Scales are the rows' `scale` (the sweep's requested N) when all have one, else clusters of
  N; budgets are clusters of D within a scale."""
  nominal = [row.get("scale") for row in rows]
  by_field = bool(rows) and all(is_finite_number(v) and float(v) > 0 for v in nominal)
  if by_field:
    scale = np.unique(np.array(nominal, np.float64), return_inverse=True)[1].reshape(-1)
  else:
    scale = _cluster(n)
  budget = np.zeros(len(n), int)
  for s in np.unique(scale):
    in_s = scale == s
    budget[in_s] = _cluster(d[in_s]) + budget.max() + 1
  _, budget = np.unique(budget, return_inverse=True)
  key_R5 = np.stack([budget, *(np.round(np.log(v), 9) for v in (n, d, x, r))], axis=1)
  point = np.unique(key_R5, axis=0, return_inverse=True)[1].reshape(-1) if len(n) else budget
  table = Table(rows, excluded, n, d, loss, x, r, scale, budget, point)
  table.grouping = _describe_grouping(table, by_field)
  partial = sum(v is not None for v in nominal)
  if not by_field and partial:
    table.warnings.append(
        f"{partial} of {len(rows)} rows have a `scale` field but not all do, so scales are "
        f"groups of params_nonembed within a factor {SCALE_FACTOR}; give every row a positive "
        "`scale` (or none) to group by it")
  return table


def _describe_grouping(table: Table, by_field: bool) -> str:
  """One line saying how the rows were grouped, with each scale's N and its (N, D) budgets."""
  how = ("by the rows' `scale` field" if by_field else
         f"by params_nonembed (groups within a factor {SCALE_FACTOR}; no `scale` field)")
  parts = []
  for s in np.unique(table.scale):
    i = table.scale == s
    tokens = sorted({f"{np.median(table.d[table.budget == b]):.3g}"
                     for b in np.unique(table.budget[i])})
    parts.append(f"N~{np.median(table.n[i]):.3g} ({int(i.sum())} rows, D {', '.join(tokens)})")
  return f"scales {how}: " + "; ".join(parts)


def prepare(rows: Sequence[Mapping[str, Any]], arch: bool,
            r_range: tuple[float, float] | None) -> Table:
  """Checks every row (raising on malformed ones) and applies the r filter.

  arch: whether the rows need the architecture fields (d_model, mlp_attn_ratio); without them
  x = r = 1 and r_range is ignored. r_range: (lo, hi) with 0 < lo < hi (FitConfig.r_bounds), or
  None to keep every row.
  """
  if not rows:
    raise ValueError("the results table is empty: nothing to fit")
  fields = REQUIRED_FIELDS + (ARCH_FIELDS if arch else ())
  superseded, warnings = _superseded(rows)
  problems, unfinished, finished = [], [], []
  for i, row in enumerate(rows):
    if not isinstance(row, Mapping):
      problems.append(f"row {i}: not a mapping of fields")
    elif i in superseded:
      unfinished.append(dict(row, reason=f"superseded by a later row of run_id={row['run_id']}"))
    elif row.get("status") not in (None, "finished"):
      unfinished.append(dict(row, reason=f"status={row['status']!r}: not a finished run"))
    else:
      bad = [f"{k}={row.get(k)!r}" for k in fields
             if not (is_finite_number(row.get(k)) and float(row[k]) > 0)]
      if bad:
        problems.append(f"{_row_name(i, row)}: " + ", ".join(bad))
      finished.append(row)
  if problems:
    shown = "; ".join(problems[:10]) + (f"; ... {len(problems) - 10} more" if len(problems) > 10
                                         else "")
    raise ValueError(f"{len(problems)} malformed row(s) in the results table: {shown}. Every row "
                     f"needs finite positive {list(fields)}; fix or remove these rows.")
  if not finished:
    raise ValueError(f"none of the {len(rows)} rows has status 'finished': nothing to fit")
  sources = sorted({str(row["loss_source"]) for row in finished if "loss_source" in row})
  if len(sources) > 1:
    raise ValueError(f"the rows' loss comes from different sources {sources} (field loss_source); "
                     "held-out and training losses are not comparable: rerun the 'train' runs with "
                     "train.eval_batches > 0, or fit the rows of one source at a time")
  rows = finished
  cols = {k: np.array([float(row[k]) for row in rows]) for k in fields}
  n, d, loss = cols["params_nonembed"], cols["tokens"], cols["loss"]
  if not arch:
    x = r = np.ones_like(n)
  else:
    x, r = cols["d_model"] / np.sqrt(n), cols["mlp_attn_ratio"]
  keep = np.ones(len(rows), bool)
  excluded = unfinished
  if arch and r_range:
    lo, hi = r_range
    keep = (r >= lo) & (r <= hi)
    excluded += [dict(rows[i], reason=f"mlp_attn_ratio={r[i]:.4g} outside r_range [{lo}, {hi}]")
                 for i in np.flatnonzero(~keep)]
  kept = [dict(rows[i]) for i in np.flatnonzero(keep)]
  table = make_table(kept, excluded, n[keep], d[keep], loss[keep], x[keep], r[keep])
  table.warnings[:0] = warnings
  return table


def _superseded(rows: Sequence[Any]) -> tuple[set[int], list[str]]:
  """Indices of rows whose run_id appears again later (the latest row stands for the run), and
  the warning naming those runs."""
  last: dict[Any, int] = {}
  counts: dict[Any, int] = {}
  for i, row in enumerate(rows):
    if isinstance(row, Mapping) and row.get("run_id") not in (None, ""):
      last[row["run_id"]] = i
      counts[row["run_id"]] = counts.get(row["run_id"], 0) + 1
  superseded = {i for i, row in enumerate(rows) if isinstance(row, Mapping)
                and row.get("run_id") not in (None, "") and last[row["run_id"]] != i}
  repeated = {k: v for k, v in counts.items() if v > 1}
  if not repeated:
    return superseded, []
  named = ", ".join(f"{k} (x{v})" for k, v in list(repeated.items())[:10])
  more = f" and {len(repeated) - 10} more" if len(repeated) > 10 else ""
  return superseded, [f"{len(repeated)} run_id(s) appear more than once: {named}{more}; each "
                      "counts once, as its latest row"]


def distinct(values: np.ndarray) -> int:
  return len(np.unique(np.round(np.log(values), 9)))



def points(table: Table) -> tuple[np.ndarray, np.ndarray]:
  """Per design point: how many rows (seed replicates) it has and their mean loss."""
  counts_G = np.bincount(table.point)
  return counts_G, np.bincount(table.point, weights=table.loss) / counts_G


def point_means(table: Table) -> np.ndarray:
  """Each row's mean loss over its design point (its seed replicates)."""
  return points(table)[1][table.point]


def empirical_l_opt(table: Table) -> np.ndarray:
  """The lowest loss of each row's (N, D) budget (of design points averaged over seeds, so one
  lucky seed does not set it)."""
  best = np.full(table.budget.max() + 1, np.inf)
  np.minimum.at(best, table.budget, point_means(table))
  return best[table.budget]


def best_rows(table: Table) -> np.ndarray:
  """Index of a row of the lowest-loss design point of each budget."""
  means = point_means(table)
  return np.array([i[np.argmin(means[i])] for i in
                   (np.flatnonzero(table.budget == g) for g in range(table.budget.max() + 1))])


def n_spreads(table: Table) -> list[float]:
  """Per budget, the largest relative distance of a row's realised N from its best row's N."""
  best = best_rows(table)
  return [float(np.max(np.abs(table.n[table.budget == g] / table.n[best[g]] - 1)))
          for g in range(len(best))]


def n_spread_warning(table: Table) -> str | None:
  """The warning an empirical L_opt deserves when realised N varies within a budget."""
  spread = max(n_spreads(table))
  if spread <= N_SPREAD_WARNING:
    return None
  return (f"with an empirical L_opt every row of a budget shares its best loss, but realised N "
          f"varies by up to {100 * spread:.1f}% within a budget; its loss effect is then read as "
          "an architecture effect. Use fit.l_opt=chinchilla (or a fit.json with Chinchilla "
          "params), which evaluates L_opt at each row's own N, or a smaller sweep.n_tolerance.")
