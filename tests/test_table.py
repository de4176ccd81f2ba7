"""Tests of the results table: loading JSONL and CSV, row checks, filtering and grouping."""

import json

import numpy as np
import pytest

from archscale.study import table


def grid_rows():
  """27 finished runs: three scales, three widths, three ratios; loss falls with N."""
  rows = []
  for n in (80e6, 145e6, 297e6):
    for x in (0.05, 0.1, 0.2):
      for r in (0.7, 1.4, 2.8):
        rows.append(dict(run_id=f"n{n:.0f}_x{x}_r{r}", params_nonembed=n, tokens=20 * n,
                         loss=3.0 - 0.1 * np.log10(n) + x + 0.01 * r, d_model=x * np.sqrt(n),
                         mlp_attn_ratio=r))
  return rows


def test_csv_tables_load_like_jsonl(tmp_path):
  path = tmp_path / "results.csv"
  path.write_text("run_id,params_nonembed,tokens,loss,d_model,mlp_attn_ratio,gqa\n"
                  "a,80000000,1.6e9,3.1,2048,1.5,4\nb,80000000,1.6e9,,2048,1.5,4\n")
  rows, torn = table.load_rows(path)
  assert torn == 0
  assert rows[0] == dict(run_id="a", params_nonembed=80000000, tokens=1.6e9, loss=3.1,
                         d_model=2048, mlp_attn_ratio=1.5, gqa=4)
  assert rows[1]["loss"] is None


def test_load_rows_refuses_missing_unknown_and_empty_tables(tmp_path):
  with pytest.raises(ValueError, match=r"does not exist"):
    table.load_rows(tmp_path / "missing.jsonl")
  (tmp_path / "t.parquet").write_text("x")
  with pytest.raises(ValueError, match=r"must end in .jsonl or .csv"):
    table.load_rows(tmp_path / "t.parquet")
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(ValueError, match=r"has no rows"):
    table.load_rows(tmp_path / "empty.jsonl")


def test_prepare_groups_scales_and_budgets_and_filters_r(tmp_path):
  rows = grid_rows() + [dict(run_id="crashed", status="failed")]
  path = tmp_path / "results.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  t = table.prepare(table.load_rows(path)[0], arch=True, r_range=(0.5, 2.0))
  assert len(t.rows) == 18
  assert sorted(r["run_id"] for r in t.excluded)[0] == "crashed"
  assert sum("outside r_range" in r["reason"] for r in t.excluded) == 9
  assert list(np.unique(t.scale)) == [0, 1, 2] and list(np.unique(t.budget)) == [0, 1, 2]
  np.testing.assert_allclose(t.x, [r["d_model"] / np.sqrt(r["params_nonembed"]) for r in t.rows])
  best = table.empirical_l_opt(t)
  for s in range(3):
    assert np.all(best[t.scale == s] == t.loss[t.scale == s].min())
  no_arch = table.prepare([dict(params_nonembed=1e6, tokens=2e7, loss=3.0)], arch=False,
                          r_range=(0.5, 2.0))
  assert no_arch.x[0] == 1.0 and no_arch.r[0] == 1.0 and not no_arch.excluded


def test_duplicate_run_ids_collapse_to_the_latest_row():
  rows = grid_rows()
  rows += [dict(rows[5], loss=9.0), dict(rows[5], loss=2.5), dict(rows[7], status="failed")]
  t = table.prepare(rows, arch=True, r_range=None)
  assert len(t.rows) == 26  # rows[7]'s latest attempt failed
  assert [r["loss"] for r in t.rows if r["run_id"] == rows[5]["run_id"]] == [2.5]
  reasons = [r["reason"] for r in t.excluded]
  assert sum(r.startswith("superseded by a later row") for r in reasons) == 3
  assert len(t.warnings) == 1
  assert f"{rows[5]['run_id']} (x3)" in t.warnings[0]
  assert f"{rows[7]['run_id']} (x2)" in t.warnings[0]


def test_torn_jsonl_lines_are_counted(tmp_path):
  path = tmp_path / "results.jsonl"
  good = json.dumps(grid_rows()[0])
  path.write_text(f"{good}\n{good[:20]}\n\n[1, 2]\n{good}\n")
  rows, torn = table.load_rows(path)
  assert len(rows) == 2 and torn == 2


def test_scale_field_groups_rows_and_the_grouping_is_described():
  rows = grid_rows()
  for row in rows:  # realised N drifts; the requested scale does not
    row["params_nonembed"] *= 1.3 if row["mlp_attn_ratio"] > 1 else 1.0
  by_n = table.prepare(rows, arch=True, r_range=None)
  assert by_n.scale.max() + 1 > 3 and "by params_nonembed" in by_n.grouping
  for row, n in zip(rows, np.repeat([80e6, 145e6, 297e6], 9), strict=True):
    row["scale"] = n
  by_scale = table.prepare(rows, arch=True, r_range=None)
  assert by_scale.scale.max() + 1 == 3 and "by the rows' `scale` field" in by_scale.grouping
  assert "9 rows" in by_scale.grouping and not by_scale.warnings
  rows[0].pop("scale")
  partial = table.prepare(rows, arch=True, r_range=None)
  assert "26 of 27 rows have a `scale` field" in partial.warnings[0]
