"""The pipeline end to end at toy size, interrupted mid-sweep and resumed."""

import json
import pathlib

import pytest

from archscale.core import config_lib, io
from archscale.study import attempts, pipeline, runner, sweep

CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def tiny_config(corpus):
  """configs/demo.py shrunk: one 12k-parameter scale, six shapes of three steps with two seeds
  each, tiny bench."""
  c = config_lib.load_config_file(CONFIGS / "demo.py")
  c.data.source = str(corpus)
  c.data.text_docs = "line"
  c.data.eval_fraction = 0.1
  c.data.seq_len = 32
  c.train.global_batch_size = 4
  c.train.eval_batches = 1
  c.train.log_every = 1
  c.train.compilation_cache = ""
  c.sweep.scales = "12k:1:8"
  c.sweep.tokens = 3 * 4 * 32
  c.sweep.d_over_sqrt_n = (0.12, 0.2, 0.3, 0.45)
  c.sweep.r = (0.7, 1.5, 3.5)
  c.sweep.design = "cross"
  c.sweep.isolation = "none"
  c.fit.bootstrap = 0
  c.bench.batch_sizes = (2,)
  c.bench.input_len = 8
  c.bench.output_len = 4
  c.bench.repeats = 1
  c.search.n_nonembed = 12_000
  c.search.n_layers = 1
  c.search.d_head = 8
  c.search.tokens = 384
  c.search.batch_size = 4
  c.search.input_len = 32
  c.search.output_len = 16
  c.search.gqa_max = 4
  return c


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("\n".join(f"In the beginning {i} was the word, and the word was {i % 7}."
                            for i in range(300)))
  return path


class Interrupt(KeyboardInterrupt):
  pass


def fake_train(cfg, run_dir):
  """A summary without training (keeps the test fast): loss falls with width, rises with r,
  and varies a little with the seed."""
  m = cfg.model
  loss = 5.3 + 0.3 / (m.d_model ** 0.5) + 0.02 * abs(m.d_ff / (m.d_head * m.n_heads) - 1.5)
  loss += 1e-4 * (-1) ** cfg.seed
  tokens = cfg.train.steps * cfg.train.global_batch_size * cfg.data.seq_len
  return {"status": "finished", "eval_loss": loss, "final_train_loss": loss, "tokens": tokens,
          "steps": cfg.train.steps, "seq_len": cfg.data.seq_len,
          "global_batch_size": cfg.train.global_batch_size}


def test_pipeline_runs_end_to_end_and_resumes_after_an_interruption(corpus, tmp_path,
                                                                   monkeypatch, capsys):
  c = tiny_config(corpus)
  runs, _ = sweep.plan(c)
  assert len(runs) == 12 and {r.seed for r in runs} == {0, 1}
  workdir = tmp_path / "work"
  real_train = runner.train_in_process
  trained = []

  def interrupting(cfg, run_dir):
    if len(trained) == 1:
      raise Interrupt("Ctrl-C during the second run")
    trained.append(cfg.name)
    return real_train(cfg, run_dir)

  monkeypatch.setattr(runner, "train_in_process", interrupting)
  with pytest.raises(Interrupt):
    pipeline.run_pipeline(c, workdir)
  assert (workdir / ".done" / "prepare_data").exists()
  assert not (workdir / ".done" / "sweep").exists()
  table = workdir / attempts.RESULTS
  first_rows = table.read_bytes()
  assert [r["run_id"] for r in io.read_jsonl(table)] == trained
  for run_id in trained:
    assert (workdir / attempts.RUNS_DIR / run_id / "summary.json").exists()

  resumed = []

  def resuming(cfg, run_dir):
    # Really trains the run that was interrupted; the last four only pretend, for speed.
    resumed.append(cfg.name)
    return real_train(cfg, run_dir) if len(resumed) == 1 else fake_train(cfg, run_dir)

  monkeypatch.setattr(runner, "train_in_process", resuming)
  capsys.readouterr()
  times = pipeline.run_pipeline(c, workdir)
  out = capsys.readouterr().out
  assert "prepare_data: done before" in out and "[2/7] sweep" in out
  assert resumed == [r.run_id for r in runs if r.run_id not in trained]
  assert set(times) == set(pipeline.STEPS)

  rows = list(io.read_jsonl(table))
  assert table.read_bytes().startswith(first_rows)
  assert sorted(r["run_id"] for r in rows) == sorted(r.run_id for r in runs)
  assert all(r["status"] == "finished" and r["loss"] > 0 for r in rows)

  fit = json.loads((workdir / "fit.json").read_text())
  assert fit["form"] == "multiplicative"
  assert fit["diagnostics"]["noise"]["replicated_points"] == 6
  bench = json.loads((workdir / "decode_bench.json").read_text())
  assert bench and all(r["output_tokens_per_s"] > 0 for r in bench)
  result = json.loads((workdir / "search.json").read_text())
  assert result["loss_units"] == "factor"
  assert result["panda"]["params_nonembed"] == pytest.approx(12_000, rel=0.05)
  for name in ("panda", "surefire"):
    if result[name] is not None:
      loaded = config_lib.load_config_file(workdir / f"{name}.py")
      assert loaded.model.d_model == result[name]["d_model"]
  report = (workdir / pipeline.REPORT).read_text()
  for piece in ("## What the data support", "Seed noise: sigma", "## Sweep", "## Fit",
                "## Decode benchmark", "## Search", "pareto.png", "sweep.png"):
    assert piece in report
  assert (workdir / "pareto.png").exists() and (workdir / "sweep.png").exists()

  # A third call finds every step done and trains nothing.
  resumed.clear()
  pipeline.run_pipeline(c, workdir)
  assert resumed == []
  out = capsys.readouterr().out
  assert "all steps done" in out and "redoing" not in out

  # Changed fit settings redo the fit and what reads it, and nothing before it.
  c.fit.delta = 2e-3
  pipeline.run_pipeline(c, workdir)
  out = capsys.readouterr().out
  assert resumed == []
  assert "fit: redoing: the config it reads changed" in out
  assert "search: redoing: fit redone" in out and "verify: redoing: search redone" in out
  assert "report: redoing: fit, search, verify redone" in out
  for step in ("prepare_data", "sweep", "decode_bench"):
    assert f"{step}: done before" in out
  assert json.loads((workdir / "fit.json").read_text())["settings"]["delta"] == 2e-3

  # Bookkeeping (log cadence, which runs to take) redoes nothing.
  c.train.log_every, c.sweep.isolation = 7, "process"
  pipeline.run_pipeline(c, workdir)
  assert "redoing" not in capsys.readouterr().out


def test_a_pipeline_stops_before_the_fit_when_runs_failed_unless_allowed(corpus, tmp_path,
                                                                        monkeypatch):
  c = tiny_config(corpus)
  broken = sweep.plan(c)[0][3].run_id

  def one_fails(cfg, run_dir):
    if cfg.name == broken:
      raise RuntimeError("CUDA error: an illegal memory access")
    return fake_train(cfg, run_dir)

  monkeypatch.setattr(runner, "train_in_process", one_fails)
  workdir = tmp_path / "work"
  with pytest.raises(ValueError, match=rf"11 of 12 runs finished; not finished: {broken} "
                                       r"\(failed\).*pipeline.allow_failed_runs=True"):
    pipeline.run_pipeline(c, workdir)
  assert not (workdir / "fit.json").exists() and not (workdir / ".done" / "sweep").exists()
  c.pipeline.allow_failed_runs = True
  pipeline.run_pipeline(c, workdir)
  fit = json.loads((workdir / "fit.json").read_text())
  assert len(fit["rows_used"]) == 11 and broken not in {r["run_id"] for r in fit["rows_used"]}
  assert not (workdir / ".done" / "sweep").exists()  # the next call retries the failed run


def test_pipeline_rejects_an_emitting_sweep_before_training(corpus, tmp_path):
  c = tiny_config(corpus)
  c.sweep.launch = "emit"
  with pytest.raises(ValueError, match="sweep.launch"):
    pipeline.run_pipeline(c, tmp_path)
  assert not (tmp_path / attempts.RESULTS).exists()


def test_the_report_opens_with_whether_the_data_support_a_recommendation(tmp_path):
  tests = {"tested": True, "terms": ["d_over_sqrt_n", "r"], "shape_effect_p": 1e-9,
           "explained": 0.93, "lack_of_fit_p": 0.4}
  fit = {"verdict": {"supported": False, "reasons": ["the rows identify none of the fitted terms"],
                     "caveats": [], "tests": tests}}
  search = {"panda": {"extrapolated": True, "extrapolated_axes": ["gqa", "n_params"]},
            "surefire": {"extrapolated": True, "extrapolated_axes": ["n_params", "tokens"]},
            "uncertainty": {"panda": {"within_uncertainty": False},
                            "surefire": {"within_uncertainty": True}}}
  (tmp_path / "fit.json").write_text(json.dumps(fit))
  (tmp_path / "search.json").write_text(json.dumps(search))
  (first, _) = pipeline.verdict(tmp_path)
  assert first.startswith("**The data of this run do not support a recommendation**")
  for reason in ("identify none of the fitted terms",
                 "panda lies outside the rows' support on gqa (extrapolated)",
                 "surefire's predicted difference is within the fit's uncertainty"):
    assert reason in first
  assert "panda's predicted difference" not in first
  assert "surefire lies outside" not in first  # beyond the runs' scale: stated, not a verdict

  fit["verdict"].update(supported=True, reasons=[],
                        caveats=["the rows do not identify the r term, so ..."])
  search["panda"]["extrapolated"] = False
  search["uncertainty"]["surefire"]["within_uncertainty"] = False
  (tmp_path / "fit.json").write_text(json.dumps(fit))
  (tmp_path / "search.json").write_text(json.dumps(search))
  lines = pipeline.verdict(tmp_path)
  assert lines[0].startswith("The data support a recommendation: the shapes' losses differ "
                             "beyond each budget's seed noise (combined p = 1e-09), the law's "
                             "shape term explains 93%")
  assert "- caveat: the rows do not identify the r term, so ..." in lines
  assert pipeline.verdict(tmp_path / "empty") == []
  (tmp_path / "fit.json").write_text(json.dumps({"form": "chinchilla"}))
  assert "the fit carries no verdict" in pipeline.verdict(tmp_path)[0]

  fit = {"diagnostics": {"identifiable": {"d_over_sqrt_n": True, "r": True}, "warnings": []},
         "metrics": {"in_sample": {"r2": 0.93}}}
  budgets = [{"params_nonembed": n, "tokens": 4e5, "points": 5, "spread": s, "f": f, "p": p,
              "beyond_noise": p <= 0.05}
             for n, s, f, p in ((6e4, 0.3, 40.0, 1e-6), (1.2e5, 0.01, 0.9, 0.5))]
  fit["diagnostics"]["noise"] = {"seed_std": 0.02, "seed_std_relative": 0.008, "dof": 10,
                                 "replicated_points": 10, "points": 10, "budgets": budgets,
                                 "fit_rms": 0.03, "fit_rms_over_noise": 1.5}
  (tmp_path / "fit.json").write_text(json.dumps(fit))
  (tmp_path / "search.json").unlink()
  report = pipeline.write_report(config_lib.make_config("demo"), tmp_path, lambda _: None)
  text = report.read_text()
  assert text.index("## What the data support") < text.index("Seed noise: sigma = 0.02 (0.80%")
  assert "| 120,000 | 400,000 | 5 | 0.01 | 0.9 | 0.5 | **no** |" in text
