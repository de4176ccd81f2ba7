"""Shared test setup: CPU only, quiet logs, deterministic XLA."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402 - after the environment above
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from helpers import metrics, params_of, tiny_config  # noqa: E402

from archscale.data import prepare  # noqa: E402
from archscale.train import trainer as train  # noqa: E402

# The longest files, started first: `--dist loadfile` hands out whole files in collection order,
# so one collected last (the SLURM file, mostly waiting on its jobs) would run alone at the end.
FIRST = ("test_slurm.py", "test_train.py", "test_evaluate.py", "test_sweep.py",
         "test_run_safety.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: files stay whole


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """A compilation cache for this module's in-process runs and its subprocesses."""
  path = tmp_path_factory.mktemp("jax_cache")
  previous = {k: getattr(jax.config, k) for k in (
      "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
      "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield path
  for k, v in previous.items():
    jax.config.update(k, v)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A byte-tokenised toy corpus: sentences over a small vocabulary of words."""
  root = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = ["the", "lord", "said", "unto", "moses", "and", "he", "went", "up", "into", "mountain"]
  text = "\n\n".join(" ".join(rng.choice(words, size=40)) + "." for _ in range(300))
  (root / "corpus.txt").write_text(text)
  prepare.prepare(str(root / "corpus.txt"), root / "data", tokenizer="byte",
                   text_docs="paragraph", eval_fraction=0.05)
  return root / "data"


@pytest.fixture(scope="module")
def reference(corpus, cache_dir, tmp_path_factory):
  """One uninterrupted single-device run that other tests compare against."""
  workdir = tmp_path_factory.mktemp("reference")
  config = tiny_config(corpus)
  summary = train.train(config, workdir)
  return dict(workdir=workdir, config=config, summary=summary, metrics=metrics(workdir),
              params=params_of(workdir, config))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A tiny prepared byte-level corpus (the fake trainers never read it; the real one does)."""
  root = tmp_path_factory.mktemp("corpus")
  text = root / "corpus.txt"
  text.write_text("\n".join(f"line {i}: the quick brown fox jumps over the lazy dog" * 3
                            for i in range(400)))
  info = prepare.prepare(str(text), root / "prepared", "byte", eval_fraction=0.1,
                      text_docs="line")
  return info["path"]
