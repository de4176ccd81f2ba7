"""lm-evaluation-harness on an exported tiny model, against archscale's own scoring."""

import json

import jax
import numpy as np
import pytest

from archscale import config_lib, evaluate, hf, settings
from archscale import data as data_lib
from archscale import model as model_lib
from archscale.arch import ArchSpec

SPEC = ArchSpec(d_model=40, n_layers=2, n_heads=6, n_kv_heads=2, d_head=8, d_ff=64,
                vocab_size=256, tie_embeddings=False, rope_theta=10000.0, rope_scaling="none",
                max_seq_len=128)
DOCS = [
    {"question": "What colour is the sky?", "choices": ["blue", "green", "red"], "label": 0},
    {"question": "How many legs has a cat?", "choices": ["two", "four", "six"], "label": 1},
    {"question": "Which is a fruit?", "choices": ["carrot", "potato", "apple"], "label": 2},
    {"question": "Opposite of hot?", "choices": ["cold", "warm"], "label": 0},
]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


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
  hf.export(params, SPEC, root / "hf", data_lib.ByteTokenizer())
  (root / "tasks").mkdir()
  data = root / "tiny_mc.json"
  data.write_text(json.dumps(DOCS))
  (root / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
  missing = TASK_YAML.format(data=root / "absent.json").replace("task: tiny_mc", "task: tiny_gone")
  (root / "tasks" / "tiny_gone.yaml").write_text(missing)
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
  ours = evaluate.loglikelihoods(SPEC, params, data_lib.ByteTokenizer(), pairs)
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
