"""lm-evaluation-harness on an exported tiny model, against archscale's own scoring."""

import json
import shutil

import jax
import numpy as np
import pytest
from helpers import DOCS, make_config, write_tiny_tasks

from archscale.core import config_lib, io, settings
from archscale.data import tokenizer as tok_lib
from archscale.interop import evaluate, hf
from archscale.model import transformer as model_lib
from archscale.model.arch import ArchSpec
from archscale.study import attempts, pipeline, runner, search, sweep, table

# The paper's fitted coefficients (DESIGN.md section 4) as a hand-written law.
PAPER_LAW = {"a0": 2.697, "a1": 0.0974, "a2": 0.0078, "b0": 0.3870, "b1": 0.0063, "b2": 0.0065}
SPEC = ArchSpec(d_model=40, n_layers=2, n_heads=6, n_kv_heads=2, d_head=8, d_ff=64,
                vocab_size=256, tie_embeddings=False, rope_theta=10000.0, rope_scaling="none",
                max_seq_len=128)


def _params() -> dict:
  model = model_lib.Transformer(SPEC)
  shapes = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda x: (rng.standard_normal(x.shape) / np.sqrt(x.shape[-1])).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  params = _params()
  hf.export(params, SPEC, root / "hf", tok_lib.ByteTokenizer())
  write_tiny_tasks(root / "tasks")
  return root, params


def test_harness_loglikelihoods_equal_archscale_scoring(exported):
  root, params = exported
  results = evaluate.evaluate_dir(root / "hf", ["tiny_mc"], include_path=str(root / "tasks"),
                                  batch_size=4, device="cpu", dtype="float32",
                                  bootstrap_iters=0, log_samples=True)
  samples = results["samples"]["tiny_mc"]
  assert len(samples) == len(DOCS)
  pairs = [tuple(arg[:2]) for s in samples for arg in s["arguments"]]
  harness = [float(r[0][0]) for s in samples for r in s["resps"]]
  assert len(pairs) == sum(len(d["choices"]) for d in DOCS)
  ours = evaluate.loglikelihoods(SPEC, params, tok_lib.ByteTokenizer(), pairs)
  np.testing.assert_allclose(ours, harness, rtol=0, atol=1e-4)
  assert len(set(np.round(ours, 3))) > len(DOCS)  # distinct scores: the comparison has teeth

  # acc is the share of documents whose label choice scores highest.
  per_doc = iter(ours)
  picks = [int(np.argmax([next(per_doc) for _ in d["choices"]])) for d in DOCS]
  want = np.mean([p == d["label"] for p, d in zip(picks, DOCS, strict=True)])
  summary = evaluate.summarize(results)
  assert summary["tasks"]["tiny_mc"]["acc"] == pytest.approx(want)
  assert summary["average_of"] == {"tiny_mc": "acc_norm"}
  assert summary["average"] == summary["tasks"]["tiny_mc"]["acc_norm"]


def test_evaluate_mode_writes_eval_json(exported, tmp_path):
  root, _ = exported
  config = config_lib.make_config("demo")
  config.eval.model = str(root / "hf")
  config.eval.tasks = "tiny_mc"
  config.eval.include_path = str(root / "tasks")
  config.eval.device = "cpu"
  config.eval.bootstrap_iters = 0
  evaluate.run_evaluate(config, tmp_path)
  out = json.loads((tmp_path / "eval.json").read_text())
  assert set(out["tasks"]) == {"tiny_mc"}
  assert {"acc", "acc_norm"} <= set(out["tasks"]["tiny_mc"])
  assert out["average"] == out["tasks"]["tiny_mc"]["acc_norm"]


def test_missing_task_data_names_the_task_and_the_fix(exported):
  root, _ = exported
  with pytest.raises(ValueError) as err:
    evaluate.load_tasks(["tiny_mc", "tiny_gone"], str(root / "tasks"))
  message = str(err.value)
  assert "['tiny_gone']" in message and "tiny_mc" not in message
  assert "HF_DATASETS_CACHE" in message and "eval.include_path" in message
  with pytest.raises(ValueError, match="not lm-evaluation-harness tasks"):
    evaluate.load_tasks(["no_such_task_xyz"], str(root / "tasks"))


def test_evaluate_mode_config_errors(tmp_path):
  config = config_lib.make_config("demo")
  assert config.eval.tasks.split(",") == list(settings.PAPER_TASKS)
  config.eval.tasks = " , "
  with pytest.raises(ValueError, match="eval.tasks is empty"):
    evaluate.run_evaluate(config, tmp_path)
  config.eval.tasks = "tiny_mc"
  with pytest.raises(ValueError, match="neither hf/ nor checkpoints/"):
    evaluate.run_evaluate(config, tmp_path)
  config.eval.model = str(tmp_path)
  with pytest.raises(ValueError, match="eval.model"):
    evaluate.run_evaluate(config, tmp_path)


# ------------------------------------------------------------------- sweep.evaluate: rows


def _sweep_config(dataset, tasks_dir, tasks="tiny_mc", isolation="none"):
  c = make_config(dataset, scales="50k:2:16", d_over_sqrt_n=(0.12, 0.2), r=(1.5,),
                  evaluate=True, isolation=isolation)
  c.train.update(checkpoint_every=0, async_checkpoint=False, eval_every=0, eval_batches=1)
  c.eval.update(tasks=tasks, include_path=str(tasks_dir), device="cpu", batch_size=4,
                bootstrap_iters=0)
  return c


def _table(workdir) -> dict[str, dict]:
  return {r["run_id"]: r for r in io.read_jsonl(workdir / attempts.RESULTS)}


def _evals(workdir) -> dict[str, dict]:
  return {d.name: json.loads((d / "eval.json").read_text())
          for d in (workdir / attempts.RUNS_DIR).iterdir()}


def test_sweep_evaluates_its_runs_and_rows_carry_the_results(dataset, tmp_path):
  tasks_dir = write_tiny_tasks(tmp_path / "tasks")
  config, workdir = _sweep_config(dataset, tasks_dir), tmp_path / "sweep"
  counts = sweep.run_sweep(config, workdir)
  assert counts["finished"] == 2 and counts["failed"] == 0
  evals, rows = _evals(workdir), _table(workdir)
  assert set(evals) == set(rows) and len(rows) == 2
  for rid, row in rows.items():
    e = evals[rid]
    assert e["step"] == row["steps"] > 0 and set(e["tasks"]) == {"tiny_mc"}
    assert row["eval"]["tasks"] == e["tasks"] and row["eval"]["step"] == e["step"]
    assert row["eval_average"] == row["eval"]["average"] == e["tasks"]["tiny_mc"]["acc_norm"]
  report = "\n".join(pipeline._report_sweep(workdir))
  assert "| loss | downstream average |" in report
  assert all(f"| {r['eval_average']:,.4g} |" in report for r in rows.values())
  # The fitter reads the table as before.
  loaded, _ = table.load_rows(workdir / attempts.RESULTS)
  assert len(table.prepare(loaded, arch=True, r_range=None).rows) == 2
  # sweep.evaluate leaves run ids alone.
  plain = _sweep_config(dataset, tasks_dir)
  plain.sweep.evaluate = False
  assert {r.run_id for r in sweep.plan(plain)[0]} == set(rows)

  # A rerun does not evaluate again, even for a run whose row is lost: training finds the run
  # finished and the eval.json of its last step and recipe is reused (here through the default
  # isolation, the train and evaluate modes in child processes).
  stamps = {rid: (workdir / attempts.RUNS_DIR / rid / "eval.json").stat().st_mtime_ns
            for rid in rows}
  lost = sorted(rows)[0]
  shutil.rmtree(workdir / attempts.RUNS_DIR / lost / attempts.ATTEMPTS_DIR)
  config.sweep.isolation = "process"
  assert sweep.run_sweep(config, workdir)["finished"] == 2
  assert '"reused"' in (workdir / attempts.RUNS_DIR / lost / "eval.log").read_text()
  assert {rid: (workdir / attempts.RUNS_DIR / rid / "eval.json").stat().st_mtime_ns
          for rid in rows} == stamps
  assert _table(workdir)[lost]["eval"] == rows[lost]["eval"]

  # A later --mode=evaluate of one run (another recipe: 2 documents) shows in its row.
  run_dir = workdir / attempts.RUNS_DIR / lost
  run_cfg = config_lib.load_config_file(run_dir / sweep.RUN_CONFIG)
  run_cfg.eval.limit = 2
  runner.run_evaluate(run_cfg, run_dir)
  again = json.loads((run_dir / "eval.json").read_text())
  assert again["recipe"]["limit"] == 2 and again["step"] == rows[lost]["steps"]
  assert _table(workdir)[lost]["eval"]["recipe"]["limit"] == 2
  assert _table(workdir)[lost]["eval_average"] == again["average"]

  _search_shows_evals(workdir, rows, tmp_path / "search")


def _search_shows_evals(workdir, rows, out_dir):
  """A search whose baseline is a trained run lists that run's eval next to the pick."""
  kept = sorted(rows)[1]
  law = out_dir / "fit.json"
  law.parent.mkdir()
  law.write_text(json.dumps({"form": "multiplicative", "params": PAPER_LAW}))
  c = config_lib.make_config("demo")
  c.search.update(law=str(law), results=str(workdir / attempts.RESULTS),
                  target=f"baseline:{workdir / attempts.RUNS_DIR / kept / sweep.RUN_CONFIG}",
                  throughput="model:a100-40gb", d_model_multiple=8, d_ff_multiple=16)
  out = search.run_search(c, out_dir)
  measured = json.loads((out_dir / search.SEARCH_JSON).read_text())["measured"]
  assert measured["results"] == str(workdir / attempts.RESULTS)
  assert measured["baseline"] == [{"run_id": kept, "tokens": rows[kept]["tokens"],
                                   "loss": rows[kept]["loss"], "eval": rows[kept]["eval"]}]
  lines = pipeline._search_measured(measured)
  assert f"- baseline: run `{kept}`, loss {rows[kept]['loss']:.5g}, downstream average " \
      f"{rows[kept]['eval_average']:.4g} (tiny_mc " in "\n".join(lines)
  arch = {rid: tuple(r[k] for k in search.ARCH_KEYS) for rid, r in rows.items()}
  for name in ("panda", "surefire"):
    same = [rid for rid, a in arch.items() if a == tuple(out[name][k] for k in search.ARCH_KEYS)]
    assert [m["run_id"] for m in measured[name]] == same
    if not same:
      assert f"- {name}: no trained run has this architecture" in lines


def test_sweep_with_unloadable_eval_task_fails_before_training(dataset, tmp_path):
  config = _sweep_config(dataset, write_tiny_tasks(tmp_path / "tasks"), tasks="tiny_mc,tiny_gone")
  with pytest.raises(ValueError, match=r"\['tiny_gone'\]"):
    sweep.run_sweep(config, tmp_path / "sweep")
  assert not (tmp_path / "sweep" / attempts.RUNS_DIR).exists()
  config.eval.update(tasks="tiny_mc", model=str(tmp_path))
  with pytest.raises(ValueError, match="leave eval.model empty"):
    sweep.run_sweep(config, tmp_path / "sweep")


def test_an_evaluation_attaches_to_the_training_it_evaluated(tmp_path):
  row = {"run_id": "r", "status": "finished", "steps": 8, "trained": "abc"}
  done = {"tasks": {}, "average": 0.5, "average_of": [], "step": 8, "recipe": {}}
  (tmp_path / evaluate.EVAL_FILE).write_text(json.dumps({**done, "trained": "abc"}))
  assert evaluate.attach(row, tmp_path)["eval_average"] == 0.5
  (tmp_path / evaluate.EVAL_FILE).write_text(json.dumps({**done, "trained": "other"}))
  assert "eval" not in evaluate.attach(row, tmp_path)  # another training of this folder
  (tmp_path / evaluate.EVAL_FILE).write_text(json.dumps(dict(done, step=4, trained="abc")))
  assert "eval" not in evaluate.attach(row, tmp_path)  # an earlier checkpoint
  (tmp_path / evaluate.EVAL_FILE).write_text(json.dumps(done))  # written before fingerprints
  assert evaluate.attach(row, tmp_path)["eval_average"] == 0.5
