"""Every wait ends: when the other side dies or hangs, the waiter stops with an error that names
what it waited for and the setting that lengthens the wait (the SLURM queue's wait is in
test_slurm)."""

import logging
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import make_config, wait_for

from archscale.core import io
from archscale.data import prepare
from archscale.study import planning, runner

_PARTITION_0 = """
import sys, time
from archscale.data import prepare, tokenizer
tokenizer.train_bpe = lambda *args: time.sleep(600)  # a partition 0 that trains for a long time
prepare.prepare(sys.argv[1], sys.argv[2], "bpe", bpe_vocab_size=300, partition="0/2")
"""


def test_partitions_waiting_for_the_bpe_notice_a_dead_partition_0(tmp_path, monkeypatch):
  monkeypatch.setattr(prepare, "_WAIT_FOR_TOKENIZER_S", 0.05)
  (tmp_path / "c.txt").write_text("some words to tokenize\n\nand a second document\n")
  src, out = str(tmp_path / "c.txt"), tmp_path / "ds"
  wait = dict(tokenizer="bpe", bpe_vocab_size=300, partition="1/2")
  with pytest.raises(io.ReportedError, match=r"waited 0.2s for partition 0 .* data.wait_s"):
    prepare.prepare(src, out, **wait, wait_s=0.2)  # no partition 0 at all

  zero = subprocess.Popen([sys.executable, "-c", _PARTITION_0, src, str(out)])
  try:
    wait_for(lambda: (out / ".tokenizer.json.lock").exists(), 120, "partition 0 to start")
    with pytest.raises(io.ReportedError, match=r"waited 0.5s"):  # alive: only the timeout ends it
      prepare.prepare(src, out, **wait, wait_s=0.5)
  finally:
    zero.kill()
    zero.wait()
  start = time.monotonic()
  with pytest.raises(io.ReportedError, match=r"partition 0 stopped before it wrote the BPE"):
    prepare.prepare(src, out, **wait, wait_s=3600)
  assert time.monotonic() - start < 10


def test_a_silent_child_trainer_is_stopped_after_stall_s(dataset, tmp_path, monkeypatch):
  monkeypatch.setattr(runner, "_STOP_GRACE_S", 1.0)
  c = make_config(dataset, stall_s=2.0)
  (run,) = planning.plan(c)[0][:1]
  cfg = planning.run_config(c, run, dataset)
  children = []

  def hang(child):  # the child hangs before it writes a line (as in a dead collective)
    children.append(child)
    os.kill(child.pid, signal.SIGSTOP)

  start = time.monotonic()
  with pytest.raises(RuntimeError, match=r"wrote nothing to .*train.log for 2s .* sweep.stall_s"):
    runner.train_in_subprocess(cfg, tmp_path / "run", on_start=hang)
  assert time.monotonic() - start < 30
  assert children[0].poll() is not None  # stopped, not left behind


def test_release_does_not_hang_on_storage_that_stopped_answering(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(io._Lease, "LEASE_S", 0.5)
  monkeypatch.setattr(io._Lease, "SETTLE_S", 0.0)
  monkeypatch.setattr(io._Lease, "JOIN_S", 0.5)
  record = tmp_path / ".lock"
  lease = io._Lease(record)
  lease.acquire()
  record.unlink()
  os.mkfifo(record)  # reading it blocks until a writer comes: the next refresh hangs
  time.sleep(0.3)
  caplog.set_level(logging.ERROR)
  start = time.monotonic()
  lease.release()
  assert time.monotonic() - start < 5
  assert "did not stop within 0.5s" in caplog.text
  fd = os.open(record, os.O_WRONLY | os.O_NONBLOCK)  # lets the stuck refresh finish
  os.close(fd)
