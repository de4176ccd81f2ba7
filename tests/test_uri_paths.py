"""URIs as workdir, data and results paths: never a local folder named after the scheme."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import REPO, make_config, tiny_config

from archscale import io, sweep, table, train

NO_GCS = not any(importlib.util.find_spec(m) for m in io.URI_BACKENDS["gs"])


def _local_entries(root: pathlib.Path) -> list[str]:
  return sorted(p.name for p in root.iterdir())


def test_local_paths_stay_pathlib(tmp_path):
  assert io.as_path(tmp_path / "a b", "--workdir") == tmp_path / "a b"
  assert io.as_path(f"file://{tmp_path}/x", "--workdir") == tmp_path / "x"
  assert not io.is_uri(tmp_path) and io.is_uri("gs://bucket/x")


@pytest.mark.skipif(not NO_GCS, reason="a GCS backend is installed here")
def test_gs_without_a_backend_fails_naming_the_field(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match=r"--workdir=gs://bucket/run: .*gcsfs"):
    io.as_path("gs://bucket/run", "--workdir")
  with pytest.raises(ValueError, match=r"--workdir=gs://bucket/run"):
    io.make_dir("gs://bucket/run", "--workdir")
  with pytest.raises(ValueError, match=r"fit.results=gs://bucket/results.jsonl"):
    table.load_rows("gs://bucket/results.jsonl")
  assert _local_entries(tmp_path) == []


def test_training_into_a_uri_fails_before_any_compute(corpus, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for uri in ("gs://bucket/run", "gs:/bucket/run", "ftp://host/run"):
    with pytest.raises(ValueError, match="--workdir"):
      train.train(tiny_config(corpus), uri)
  assert _local_entries(tmp_path) == []


def test_a_sweep_into_a_uri_fails_before_any_run(dataset, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="--workdir=gs://bucket/sweep"):
    sweep.run_sweep(make_config(dataset), "gs://bucket/sweep")
  c = make_config(dataset)
  c.data.path = "gs://bucket/data"
  with pytest.raises(ValueError, match="data.path=gs://bucket/data"):
    sweep.run_sweep(c, tmp_path / "w")
  assert _local_entries(tmp_path) == []


def test_a_collapsed_uri_is_refused_not_created(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(ValueError, match="lost a slash"):
    io.make_dir(pathlib.Path("gs://bucket/run"), "--workdir")  # pathlib makes it gs:/bucket/run
  assert not (tmp_path / "gs:").exists()


@pytest.mark.skipif(not importlib.util.find_spec("huggingface_hub"), reason="needs huggingface_hub")
def test_a_uri_with_its_backend_installed_stays_a_uri():
  path = io.as_path("hf://datasets/x/y", "fit.results")
  assert not isinstance(path, pathlib.Path) and str(path / "z") == "hf://datasets/x/y/z"


def test_the_command_line_rejects_an_unwritable_workdir_scheme(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "archscale.main", f"--config={REPO / 'configs' / 'demo.py'}",
       "--mode=train", "--workdir=ftp://host/run"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "--workdir=ftp://host/run: ftp:// storage is not supported" in proc.stderr
  assert _local_entries(tmp_path) == []
