"""Files from elsewhere and shared machines: names read from files stay inside their folder, and
a process never uses a temporary folder another user could have planted."""

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from archscale.core import io
from archscale.data import batches
from archscale.model import hf_format


def _dataset_copy(dataset, tmp_path):
  copy = tmp_path / "data"
  shutil.copytree(dataset, copy)
  return copy


@pytest.mark.parametrize("name", ["../outside.bin", "/etc/passwd", "shards/../../outside.bin"])
def test_a_shard_index_naming_a_file_outside_the_dataset_is_refused(dataset, tmp_path, name):
  data = _dataset_copy(dataset, tmp_path)
  (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
  info = json.loads((data / batches.METADATA).read_text())
  info["shards"]["train"][0][0] = name
  (data / batches.METADATA).write_text(json.dumps(info))
  with pytest.raises(ValueError, match=r"metadata.json shards.train names .* not a file inside"):
    batches.TokenStream(data, "train")


def test_a_shard_that_links_outside_the_dataset_is_refused(dataset, tmp_path):
  data = _dataset_copy(dataset, tmp_path)
  info = json.loads((data / batches.METADATA).read_text())
  first = data / info["shards"]["train"][0][0]
  (tmp_path / "elsewhere.bin").write_bytes(first.read_bytes())
  first.unlink()
  first.symlink_to(tmp_path / "elsewhere.bin")
  with pytest.raises(ValueError, match=r"resolves outside .* \(a link\?\)"):
    batches.TokenStream(data, "train")
  assert len(batches.TokenStream(dataset, "train")) > 0  # the untouched dataset still reads


def test_an_hf_index_naming_a_file_outside_its_directory_is_refused(tmp_path):
  model = tmp_path / "hf"
  model.mkdir()
  save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "x.safetensors"))
  index = {"metadata": {}, "weight_map": {"w": "../x.safetensors"}}
  (model / hf_format.INDEX_FILE).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"weight_map names '../x.safetensors'"):
    hf_format.load_weights(model)


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
  return tmp_path / f"archscale-mirror-{os.getuid()}"


def test_the_mirror_folder_is_private_and_a_planted_one_is_refused(runtime_dir):
  remote = pathlib.PurePosixPath("/bucket/sweep/runs/r1")
  mirror = io.local_mirror(remote)
  assert mirror.parent == runtime_dir and mirror.name.startswith("r1-")
  assert (os.stat(runtime_dir).st_mode & 0o777) == 0o700
  assert io.local_mirror(remote) == mirror  # the same folder every time

  runtime_dir.chmod(0o777)  # as if another user had made it, open to all
  with pytest.raises(io.ReportedError, match=r"not this user's private folder .* mode 777"):
    io.local_mirror(remote)
  shutil.rmtree(runtime_dir)
  planted = runtime_dir.parent / "planted"
  planted.mkdir(mode=0o700)
  (planted / "run_config.py").write_text("raise SystemExit('planted code ran')\n")
  runtime_dir.symlink_to(planted)
  with pytest.raises(io.ReportedError, match=r"a link, another owner"):
    io.local_mirror(remote)
  runtime_dir.unlink()
  if os.geteuid() == 0:  # Only root can give a folder to another owner.
    runtime_dir.mkdir(mode=0o700)
    os.chown(runtime_dir, 65534, 65534)
    with pytest.raises(io.ReportedError, match=r"another owner"):
      io.local_mirror(remote)
