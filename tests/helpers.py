"""Helpers shared by the training, sweep, run-safety and evaluation tests."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np

from archscale.core import config_lib, io
from archscale.train import trainer as train

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 30


def tiny_config(data_path, **train_overrides) -> ml_collections.ConfigDict:
  c = config_lib.make_config("demo")
  c.model.update(d_model=32, d_ff=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=8,
                 max_seq_len=64)
  c.data.path = str(data_path)
  c.data.seq_len = 32
  c.train.update(steps=STEPS, global_batch_size=8, lr=1e-2, warmup_steps=5, log_every=1,
                 eval_every=10, eval_batches=2, checkpoint_every=10, keep_checkpoints=2)
  c.train.update(train_overrides)
  return c


def metrics(workdir) -> list[dict]:
  return list(io.read_jsonl(io.as_path(workdir, "workdir") / "metrics.jsonl"))


def untimed(row: dict) -> dict:
  """A metrics row without its wall-clock fields (which differ between any two runs)."""
  return {k: v for k, v in row.items()
          if k not in ("tokens_per_sec", "step_time_s", "mfu", "elapsed_s")}


def params_of(workdir, config) -> dict:
  state = train.load_checkpoint(workdir, config)
  return jax.tree.map(np.asarray, state["params"])


def flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def subprocess_env(cache_dir, devices: int = 1) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def run_script(script: str, env: dict, *args: str, timeout: int = 300):
  return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], env=env,
                        capture_output=True, text=True, timeout=timeout)


def make_config(dataset, **sweep_fields):
  c = config_lib.make_config("demo")
  c.data.path = str(dataset)
  c.sweep.scales = "50k:2:16,100k:2:16"
  c.sweep.tokens = 4096
  c.sweep.d_over_sqrt_n = (0.12, 0.32)
  c.sweep.r = (0.5, 4.0)
  c.sweep.gqa = (2,)
  c.sweep.d_model_multiple = 8
  c.sweep.d_ff_multiple = 16
  c.sweep.n_tolerance = 0.1
  c.sweep.r_tolerance = 0.3
  for k, v in sweep_fields.items():
    c.sweep[k] = v
  return c


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.1):
  """`predicate()`'s first truthy value, polling; fails the test after `timeout_s`."""
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(poll_s)
  raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# A tiny multiple-choice task over a local JSON file, for lm-evaluation-harness offline.
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


def write_tiny_tasks(folder) -> pathlib.Path:
  """`folder` with two task YAMLs: tiny_mc (over DOCS in a local file) and tiny_gone (whose data
  file does not exist); pass it as eval.include_path."""
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  data = folder / "tiny_mc.json"
  data.write_text(json.dumps(DOCS))
  (folder / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
  missing = TASK_YAML.format(data=folder / "absent.json")
  (folder / "tiny_gone.yaml").write_text(missing.replace("task: tiny_mc", "task: tiny_gone"))
  return folder
