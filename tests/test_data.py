"""Tests for archscale.data.batches: prepared datasets, token streams across shards, batches."""

import json
import os

import corpora
import numpy as np
import pytest

from archscale.core import config_lib
from archscale.data import batches as data
from archscale.data import prepare


@pytest.fixture
def corpus(tmp_path):
  """A prepared byte-level dataset of 60 JSONL documents in several shards, and the documents."""
  texts = corpora.docs(60, words=60)
  corpora.write_jsonl(tmp_path / "c.jsonl", texts)
  out = tmp_path / "ds"
  info = prepare.prepare(str(tmp_path / "c.jsonl"), out, "byte", eval_fraction=0.2,
                         unit_bytes=4096)
  assert len(info["shards"]["train"]) > 3
  return out, texts


def test_check_against_model():
  config = config_lib.make_config("demo")
  data.check_against_model(config, {"vocab_size": 256, "tokenizer": "byte"})
  with pytest.raises(ValueError, match="model.vocab_size"):
    data.check_against_model(config, {"vocab_size": 1024, "tokenizer": "bpe"})
  config.data.seq_len = config.model.max_seq_len + 1
  with pytest.raises(ValueError, match=r"data.seq_len.*model.max_seq_len"):
    data.check_against_model(config)


def test_batches_are_a_pure_function_of_seed_and_step(corpus):
  out, _ = corpus
  a = data.Batches(out, "train", seq_len=16, global_batch_size=8, seed=3)
  b = data.Batches(out, "train", seq_len=16, global_batch_size=8, seed=3)
  first = a(5)
  assert first.shape == (8, 17) and first.dtype == np.int32
  for step in [0, 7, 5, 1000]:
    np.testing.assert_array_equal(a(step), b(step))
  np.testing.assert_array_equal(a(5), first)
  assert not np.array_equal(a(0), a(1))
  other = data.Batches(out, "train", seq_len=16, global_batch_size=8, seed=4)
  assert not np.array_equal(other(5), first)


def test_batch_rows_are_windows_and_each_epoch_visits_all(corpus):
  out, _ = corpus
  seq_len = 16
  stream = corpora.stream(out, "train").astype(np.int32)
  one = data.Batches(out, "train", seq_len=seq_len, global_batch_size=1, seed=0)
  n = one.num_windows
  assert n == (len(stream) - 1) // seq_len and one.steps_per_epoch == n
  windows = [stream[i * seq_len:i * seq_len + seq_len + 1].tobytes() for i in range(n)]
  epochs = [[one(s)[0].tobytes() for s in range(e * n, (e + 1) * n)] for e in (0, 1)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(windows)
  assert epochs[0] != epochs[1] and epochs[0] != windows


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(corpus, process_count):
  out, _ = corpus
  whole = data.Batches(out, "train", seq_len=8, global_batch_size=8, seed=1)
  parts = [data.Batches(out, "train", seq_len=8, global_batch_size=8, seed=1,
                        process_index=p, process_count=process_count)
           for p in range(process_count)]
  for step in [0, 3, 250]:
    local = [p(step) for p in parts]
    assert all(x.shape == (8 // process_count, 9) for x in local)
    np.testing.assert_array_equal(np.concatenate(local), whole(step))


def test_eval_split_batches_are_held_out_and_fixed(corpus):
  out, _ = corpus
  ev = data.Batches(out, "eval", seq_len=8, global_batch_size=4, seed=0)
  np.testing.assert_array_equal(ev(2), data.Batches(out, "eval", 8, 4, 0)(2))
  eval_stream = corpora.stream(out, "eval").astype(np.int32).tobytes()
  assert all(row.tobytes() in eval_stream for row in ev(0))


def test_batches_errors_name_the_field(corpus, tmp_path):
  out, _ = corpus
  with pytest.raises(ValueError, match="train.global_batch_size"):
    data.Batches(out, "train", 8, global_batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match="data.seq_len"):
    data.Batches(out, "eval", seq_len=10**6, global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match="split"):
    data.Batches(out, "test", 8, 4, 0)
  with pytest.raises(ValueError, match="data.path"):
    data.Batches(tmp_path / "nowhere", "train", 8, 4, 0)
  with pytest.raises(ValueError, match="step"):
    data.Batches(out, "train", 8, 4, 0)(-1)
  shard = out / data.dataset_info(out)["shards"]["train"][-1][0]
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) - 1)
  with pytest.raises(ValueError, match="truncated"):
    data.Batches(out, "train", 8, 4, 0)


def test_a_split_reads_as_one_stream_across_its_shards(corpus):
  out, _ = corpus
  info = data.dataset_info(out)
  for split in data.SPLITS:
    whole = np.concatenate([np.fromfile(out / file, info["dtype"])[start:start + count]
                            for file, start, count in info["shards"][split]])
    tokens = data.TokenStream(out, split)
    assert len(tokens) == len(whole) == info["tokens"][split]
    ends = np.cumsum([count for _, _, count in info["shards"][split]])
    for start, stop in [(0, 5), (ends[0] - 3, ends[0] + 4), (ends[0] - 2, ends[2] + 1),
                        (len(whole) - 4, len(whole) + 10), (7, 7)]:
      np.testing.assert_array_equal(tokens.read(start, stop), whole[start:stop])


def test_prefetched_batches_equal_batches_read_on_demand(corpus):
  out, _ = corpus
  batches = data.Batches(out, "train", seq_len=16, global_batch_size=4, seed=2)
  for step in [0, 1, 2, 3, 9, 10, 4, 0, 1]:  # runs of consecutive steps, and jumps
    np.testing.assert_array_equal(batches(step), batches.read(step))


def test_single_file_datasets_still_read(corpus, tmp_path):
  """A dataset of the earlier format (train.bin / eval.bin) serves the same batches."""
  out, _ = corpus
  old = tmp_path / "v1"
  old.mkdir()
  info = data.dataset_info(out)
  for split in data.SPLITS:
    corpora.stream(out, split).tofile(old / f"{split}.bin")
  meta = {k: v for k, v in info.items() if k not in ("shards", "units", "path")}
  (old / data.METADATA).write_text(json.dumps(dict(meta, format="archscale-tokens-v1")))
  for split in data.SPLITS:
    new, legacy = (data.Batches(p, split, 8, 4, seed=1) for p in (out, old))
    for step in [0, 5]:
      np.testing.assert_array_equal(legacy(step), new(step))
  (old / data.METADATA).write_text(json.dumps(dict(meta, format="archscale-tokens-v0")))
  with pytest.raises(ValueError, match="prepare it again"):
    data.dataset_info(old)
