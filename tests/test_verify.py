"""--mode=verify: the search's picks and the baseline trained, and held to their predictions."""

import json

import pytest
from test_pipeline import corpus, tiny_config  # noqa: F401 - corpus is a fixture

from archscale.core import io
from archscale.study import attempts, pipeline, verify


def _doc(units="factor"):
  spec = {"n_layers": 1, "d_model": 16, "d_ff": 32, "n_heads": 2, "n_kv_heads": 1, "d_head": 8,
          "vocab_size": 256}
  pick = lambda loss: {**spec, "predicted_loss": loss}
  return {"loss_units": units, "target": 1.0, "baseline": pick(1.0), "panda": pick(0.97),
          "surefire": pick(0.99), "uncertainty": {"panda": {"interval": [0.965, 0.975]}}}


def test_measured_losses_are_held_to_the_predictions():
  measured = {"panda": [2.90, 2.91, 2.89], "surefire": [3.20, 3.21, 3.19],
              "baseline": [3.00, 3.01, 2.99]}
  out = {e["name"]: e for e in verify.judge(_doc(), measured)}
  panda, surefire, base = out["panda"], out["surefire"], out["baseline"]
  # A factor law is anchored on the measured baseline (mean 3.0): panda is predicted 2.91.
  assert panda["predicted_loss"] == pytest.approx(2.91)
  assert panda["predicted_interval"] == pytest.approx([3.0 * 0.965, 3.0 * 0.975])
  assert panda["measured_mean"] == pytest.approx(2.90)
  assert panda["measured_stderr"] == pytest.approx(0.01 / 3**0.5)
  assert panda["meets_target"] is True and panda["prediction_held"] is True
  assert surefire["meets_target"] is False and surefire["prediction_held"] is False
  assert base["meets_target"] is None and base["prediction_held"] is True
  one_seed = verify.judge(_doc(), {k: v[:1] for k, v in measured.items()})
  assert all(e["meets_target"] is None and e["prediction_held"] is None for e in one_seed)
  close = verify.judge(_doc(), {**measured, "panda": [2.99, 3.02, 2.98]})
  assert close[0]["meets_target"] is None  # noise decides neither way


def test_verify_trains_the_picks_and_the_baseline(corpus, tmp_path):  # noqa: F811
  """A search.json of three tiny picks (as --mode=search writes it); verify trains each with the
  sweep's two seeds for real, in this process."""
  c = tiny_config(corpus)
  workdir = tmp_path / "work"
  workdir.mkdir()
  doc = {**_doc(), "budget": {"n_nonembed": 12_000, "tokens": 3 * 4 * 32}}
  doc["surefire"].update(d_model=24, d_ff=16)
  doc["baseline"].update(n_kv_heads=2)
  (workdir / "search.json").write_text(json.dumps(doc))
  staged = pipeline._stage_config(c, workdir)
  out = verify.run_verify(staged, workdir)
  entries = {e["name"]: e for e in json.loads((workdir / verify.VERIFY_JSON).read_text())}
  assert set(entries) == {"panda", "surefire", "baseline"} and out["picks"]
  for name, e in entries.items():
    assert e["spec"]["d_model"] == doc[name]["d_model"] and len(e["measured_losses"]) == 2
    assert e["measured_mean"] > 0 and e["measured_stderr"] is not None
    assert e["predicted_loss"] is not None and e["prediction_held"] in (True, False, None)
  rows = list(io.read_jsonl(workdir / verify.VERIFY_DIR / attempts.RESULTS))
  assert len(rows) == 6 and all(r["status"] == "finished" and r["steps"] == 3 for r in rows)
  report = "\n".join(pipeline._report_verify(workdir))
  assert "## Verification" in report and "| panda |" in report
  # Done once: a rerun reuses the trained picks.
  verify.run_verify(staged, workdir)
  assert len(list(io.read_jsonl(workdir / verify.VERIFY_DIR / attempts.RESULTS))) == 6
  with pytest.raises(ValueError, match=r"run --mode=search with the same --workdir first"):
    verify.run_verify(staged, tmp_path / "elsewhere")
