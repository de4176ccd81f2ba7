"""Tests for archscale.data.prepare and .sources: corpora to resumable, partitioned shards."""

import gzip
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import corpora
import numpy as np
import pytest

from archscale.core import config_lib, settings
from archscale.data import batches as data
from archscale.data import prepare, sources, tokenizer


def test_folder_of_text_files_becomes_eos_separated_documents(tmp_path):
  texts = corpora.docs(12)
  src = tmp_path / "src"
  (src / "nested").mkdir(parents=True)
  (src / ".hidden").mkdir()
  for i, t in enumerate(texts):
    (src / ("nested" if i % 2 else "") / f"{i:02d}.txt").write_text(t, encoding="utf-8")
  (src / ".hidden" / "skip.txt").write_text("hidden")
  (src / "notes.bin").write_bytes(b"\xff\xfe")
  with gzip.open(src / "extra.txt.gz", "wt", encoding="utf-8") as f:
    f.write("compressed document")
  out = tmp_path / "ds"
  info = prepare.prepare(str(src), out, "byte", eval_fraction=0.25)

  train, held_out = corpora.split_docs(out, "train"), corpora.split_docs(out, "eval")
  assert sorted(train + held_out) == sorted(texts + ["compressed document"])
  assert not set(train) & set(held_out) and held_out
  assert info["docs"] == {"train": len(train), "eval": len(held_out)}
  assert info["tokens"]["train"] == len(corpora.stream(out, "train"))
  assert info["dtype"] == "uint8" and len(info["source_files"]) == 13


def test_jsonl_inputs_plain_and_compressed(tmp_path):
  texts = corpora.docs(30)
  corpora.write_jsonl(tmp_path / "a.jsonl", texts[:10], field="content")
  corpora.write_jsonl(tmp_path / "b.jsonl.gz", texts[10:20], field="content")
  corpora.write_jsonl(tmp_path / "c.json.gz", texts[20:], field="content")  # Dolma's naming.
  src = ",".join(str(tmp_path / n) for n in ["a.jsonl", "b.jsonl.gz", "c.json.gz"])
  out = tmp_path / "ds"
  prepare.prepare(src, out, text_field="content", eval_fraction=0.2)
  train, held_out = corpora.split_docs(out, "train"), corpora.split_docs(out, "eval")
  assert sorted(train + held_out) == sorted(texts)
  # Each split keeps source order.
  assert train == [t for t in texts if t in set(train)]
  # A glob over the same files gives the same dataset.
  out2 = tmp_path / "glob"
  prepare.prepare(str(tmp_path / "*.json*"), out2, text_field="content", eval_fraction=0.2)
  both = corpora.split_docs(out2, "train") + corpora.split_docs(out2, "eval")
  assert sorted(both) == sorted(texts)


def test_heldout_split_is_by_document_and_deterministic(tmp_path):
  texts = corpora.docs(200)
  corpora.write_jsonl(tmp_path / "c.jsonl", texts)
  runs = {}
  for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
    prepare.prepare(str(tmp_path / "c.jsonl"), tmp_path / name, eval_fraction=0.1, seed=seed)
    runs[name] = tuple(corpora.split_docs(tmp_path / name, split) for split in data.SPLITS)
  train, held_out = runs["a"]
  assert not set(train) & set(held_out)
  assert sorted(train + held_out) == sorted(texts)
  assert 5 <= len(held_out) <= 40
  assert runs["b"] == runs["a"]
  assert runs["c"][1] != held_out


def test_small_corpus_still_holds_out_a_document(tmp_path):
  texts = corpora.docs(3)
  corpora.write_jsonl(tmp_path / "c.jsonl", texts)
  info = prepare.prepare(str(tmp_path / "c.jsonl"), tmp_path / "ds", eval_fraction=0.001)
  assert info["docs"] == {"train": 2, "eval": 1}
  assert corpora.split_docs(tmp_path / "ds", "eval") == [texts[-1]]
  cut = prepare.prepare(str(tmp_path / "c.jsonl"), tmp_path / "cut", eval_fraction=0.001,
                        unit_bytes=100)  # a unit per line: the last unit gives up its document
  assert cut["units"] >= 3 and cut["docs"] == info["docs"]
  _same_streams(tmp_path / "ds", tmp_path / "cut")

  (tmp_path / "one.txt").write_text("just one document")
  with pytest.raises(ValueError, match="data.eval_fraction"):
    prepare.prepare(str(tmp_path / "one.txt"), tmp_path / "one")
  assert not (tmp_path / "one").exists()
  info = prepare.prepare(str(tmp_path / "one.txt"), tmp_path / "one", eval_fraction=0.0)
  assert info["docs"] == {"train": 1, "eval": 0}


def test_text_docs_split_files_by_paragraph_or_line(tmp_path):
  (tmp_path / "t.txt").write_text("p1 line1\np1 line2\n\n\np2\n  \np3\n")
  counts = {}
  for mode in sources.TEXT_DOCS:
    info = prepare.prepare(str(tmp_path / "t.txt"), tmp_path / mode, text_docs=mode,
                        eval_fraction=0.0)
    counts[mode] = info["docs"]["train"]
  assert counts == {"file": 1, "paragraph": 3, "line": 4}
  assert corpora.split_docs(tmp_path / "paragraph", "train") == ["p1 line1\np1 line2", "p2", "p3"]


def test_kjv_documents_are_chapters():
  docs = list(sources._kjv_documents())
  assert len(docs) == 1189
  assert docs[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.")
  assert docs[-1].startswith("Revelation 22\n")


@pytest.mark.parametrize("source,field", [
    ("", "data.source"),
    ("{tmp}/missing.txt", "data.source"),
    ("{tmp}/nomatch*.jsonl", "data.source"),
    ("{tmp}/empty_dir", "data.source"),
    ("{tmp}/bad.jsonl", "data.source"),
    ("{tmp}/latin1.txt", "data.source"),
    ("{tmp}/other_field.jsonl", "data.text_field"),
])
def test_bad_sources_name_the_field(tmp_path, source, field):
  (tmp_path / "empty_dir").mkdir()
  (tmp_path / "empty_dir" / "data.csv").write_text("a,b")
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  corpora.write_jsonl(tmp_path / "other_field.jsonl", ["x", "y"], field="body")
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=field):
    prepare.prepare(source.format(tmp=tmp_path), out)
  assert not out.exists()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_settings_name_the_field(tmp_path):
  (tmp_path / "t.txt").write_text("text")
  src = str(tmp_path / "t.txt")
  for kwargs, field in [(dict(eval_fraction=1.0), "data.eval_fraction"),
                        (dict(text_docs="page"), "data.text_docs"),
                        (dict(tokenizer="bpe", bpe_vocab_size=200), "data.bpe_vocab_size"),
                        (dict(tokenizer="gpt9"), "data.tokenizer"),
                        (dict(workers=0), "data.workers"),
                        (dict(partition="2/2"), "data.partition"),
                        (dict(partition="half"), "data.partition")]:
    with pytest.raises(ValueError, match=field):
      prepare.prepare(src, tmp_path / "out", **kwargs)


def test_failure_midway_leaves_nothing_that_looks_complete(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  corpora.write_jsonl(src / "a.jsonl", corpora.docs(20))
  corpora.write_jsonl(src / "b.jsonl", ["no text field here"], field="body")
  out = tmp_path / "out"
  with pytest.raises(ValueError, match="data.text_field"):
    prepare.prepare(str(src), out)
  # The finished unit (a.jsonl) is kept for the next run; nothing looks like a dataset.
  with pytest.raises(ValueError, match="not finished"):
    data.dataset_info(out)
  with pytest.raises(ValueError, match="data.path"):
    data.Batches(out, "train", 8, 4, 0)
  assert not [p for p in tmp_path.rglob(".*")]
  kept = {p: p.stat().st_mtime_ns for p in (out / data.SHARDS_DIR).iterdir()}
  assert len(kept) == 3  # a.jsonl's train and eval shards and its record

  corpora.write_jsonl(src / "b.jsonl", ["now with text"])
  info = prepare.prepare(str(src), out)
  assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
  fresh = prepare.prepare(str(src), tmp_path / "fresh")
  for split in data.SPLITS:
    np.testing.assert_array_equal(corpora.stream(out, split), corpora.stream(tmp_path / "fresh",
                                                                            split))
  assert info["docs"] == fresh["docs"] and sum(info["docs"].values()) == 21


def test_prepare_is_idempotent_and_refuses_to_mix_datasets(tmp_path):
  corpora.write_jsonl(tmp_path / "c.jsonl", corpora.docs(20))
  out = tmp_path / "ds"
  out.mkdir()  # An empty directory is fine to fill.
  first = prepare.prepare(str(tmp_path / "c.jsonl"), out, eval_fraction=0.2)
  stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
  second = prepare.prepare(str(tmp_path / "c.jsonl"), out, eval_fraction=0.2)
  assert second == first and first["path"] == str(out)
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
  with pytest.raises(ValueError, match=r"data.path.*eval_fraction"):
    prepare.prepare(str(tmp_path / "c.jsonl"), out, eval_fraction=0.3)
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "x").write_text("x")
  with pytest.raises(ValueError, match="data.path"):
    prepare.prepare(str(tmp_path / "c.jsonl"), tmp_path / "junk")
  with pytest.raises(ValueError, match="data.path"):
    data.dataset_info(tmp_path / "nowhere")


def test_run_prepare_data_uses_config_fields(tmp_path):
  corpora.write_jsonl(tmp_path / "c.jsonl", corpora.docs(20), field="body")
  config = config_lib.make_config("demo")
  config.data.source = str(tmp_path / "c.jsonl")
  config.data.text_field = "body"
  config.data.eval_fraction = 0.2
  workdir = tmp_path / "run"
  prepare.run_prepare_data(config, workdir)
  assert data.data_path(config, workdir) == workdir / "data"
  info = data.dataset_info(workdir / "data")
  assert info["docs"]["train"] + info["docs"]["eval"] == 20
  prepare.run_prepare_data(config, workdir)  # Idempotent.

  config.data.source = ""
  prepare.run_prepare_data(config, workdir)  # Uses the existing dataset.
  config.data.path = str(tmp_path / "elsewhere")
  with pytest.raises(ValueError, match="data.source"):
    prepare.run_prepare_data(config, workdir)


def test_workers_and_partition_are_checked_and_leave_the_run_identity_alone(tmp_path):
  config = config_lib.make_config("demo")
  assert (config.data.workers, config.data.partition) == (1, "0/1")
  base = settings.DataConfig.from_config(config)
  config.data.workers, config.data.partition = 8, "3/4"
  tuned = settings.DataConfig.from_config(config)
  assert tuned.identity() == base.identity() and tuned.prepare_fields == base.prepare_fields
  assert settings.parse_partition("3/4") == (3, 4)
  for field, value in [("workers", 0), ("partition", "4/4"), ("partition", "1")]:
    bad = config_lib.make_config("demo")
    bad.data[field] = value
    bad.data.source = "kjv"
    with pytest.raises(ValueError, match=f"data.{field}"):
      prepare.run_prepare_data(bad, tmp_path)
  assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- division of work


def _mixed_corpus(root: pathlib.Path) -> pathlib.Path:
  """JSONL (plain, large enough to cut, and gzip) and paragraph text, in a folder."""
  src = root / "src"
  src.mkdir()
  texts = corpora.docs(240, words=25)
  corpora.write_jsonl(src / "a.jsonl", texts[:150])
  corpora.write_jsonl(src / "b.jsonl.gz", texts[150:180])
  paragraphs = "\r\n\r\n  \n".join(t.replace("\n", "\r\n") for t in texts[180:])
  (src / "c.txt").write_bytes(paragraphs.encode())
  return src


def _same_streams(a: pathlib.Path, b: pathlib.Path) -> None:
  for split in data.SPLITS:
    assert corpora.stream(a, split).tobytes() == corpora.stream(b, split).tobytes(), split


def test_streams_do_not_depend_on_workers_partitions_or_units(tmp_path):
  src = _mixed_corpus(tmp_path)
  tok_file = tmp_path / "tokenizer.json"
  tokenizer.train_bpe(corpora.docs(50), 400, "<|endoftext|>").hf.save(str(tok_file))
  common = dict(tokenizer=str(tok_file), eval_fraction=0.1, text_docs="paragraph")
  ref = prepare.prepare(str(src), tmp_path / "ref", **common)
  assert ref["units"] == 3 and ref["dtype"] == "uint16"
  one = prepare.prepare(str(src), tmp_path / "one", **common, unit_bytes=2048)
  two = prepare.prepare(str(src), tmp_path / "two", **common, unit_bytes=2048, workers=2)
  assert one["units"] == two["units"] > 10
  parts = tmp_path / "parts"
  assert prepare.prepare(str(src), parts, **common, unit_bytes=2048, partition="1/2") is None
  with pytest.raises(ValueError, match="not finished"):
    data.dataset_info(parts)
  both = prepare.prepare(str(src), parts, **common, unit_bytes=2048, partition="0/2")
  for out, info in [(tmp_path / "one", one), (tmp_path / "two", two), (parts, both)]:
    _same_streams(tmp_path / "ref", out)
    assert (info["tokens"], info["docs"]) == (ref["tokens"], ref["docs"])
  assert ref["docs"]["eval"] >= 10 and sum(ref["docs"].values()) == 240

  texts = corpora.docs(240, words=25)
  assert sorted(corpora.split_docs(parts, "train") + corpora.split_docs(parts, "eval")) == sorted(
      texts)
  manifest = json.loads((parts / data.MANIFEST).read_text())
  assert [u["key"] for u in manifest["units"]] == list(manifest["finished"])
  for key, record in manifest["finished"].items():
    for split in data.SPLITS:
      shard = (parts / data.SHARDS_DIR / f"{key}.{split}.bin").read_bytes()
      assert record["sha256"][split] == hashlib.sha256(shard).hexdigest()
      assert len(shard) == 2 * record["tokens"][split]


def test_a_trained_bpe_is_shared_by_partitions(tmp_path, monkeypatch, caplog):
  src = _mixed_corpus(tmp_path)
  common = dict(tokenizer="bpe", bpe_vocab_size=300, eval_fraction=0.1, unit_bytes=4096)
  ref = prepare.prepare(str(src), tmp_path / "ref", **common)
  # Partition 1 starts first and waits for partition 0 to train the BPE.
  monkeypatch.setattr(prepare, "_WAIT_FOR_TOKENIZER_S", 0.05)
  caplog.set_level("INFO")
  results = {}
  waiting = threading.Thread(target=lambda: results.update(
      one=prepare.prepare(str(src), tmp_path / "parts", **common, partition="1/2")))
  waiting.start()
  time.sleep(0.2)
  results["zero"] = prepare.prepare(str(src), tmp_path / "parts", **common, partition="0/2")
  waiting.join(timeout=60)
  assert "waiting for partition 0 to train the BPE" in caplog.text
  info = results["one"] or results["zero"]
  assert info["tokenizer"] == "bpe" and info["vocab_size"] == ref["vocab_size"]
  _same_streams(tmp_path / "ref", tmp_path / "parts")


_SLOW_PREPARE = """
import sys, time
from archscale.data import prepare
from archscale.data import tokenizer
encode = tokenizer.ByteTokenizer.encode_batch
tokenizer.ByteTokenizer.encode_batch = lambda self, texts: (time.sleep(0.1), encode(self, texts))[1]
prepare._CHUNK_CHARS = 1000
prepare.prepare(sys.argv[1], sys.argv[2], "byte", eval_fraction=0.1, unit_bytes=6000)
"""


def test_a_killed_preparation_resumes_with_unfinished_units_only(tmp_path):
  texts = corpora.docs(400, words=20)
  corpora.write_jsonl(tmp_path / "c.jsonl", texts)
  out = tmp_path / "ds"
  child = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(tmp_path / "c.jsonl"),
                            str(out)])
  shards = out / data.SHARDS_DIR
  deadline = time.time() + 120
  while time.time() < deadline and child.poll() is None:
    if len(list(shards.glob("*.json"))) >= 2 and list(shards.glob(".*.tmp-*")):
      break
    time.sleep(0.02)
  child.kill()  # SIGKILL: no cleanup runs
  child.wait()
  finished = {p: p.stat().st_mtime_ns for p in shards.iterdir() if not p.name.startswith(".")}
  assert len(finished) >= 6 and list(shards.glob(".*.tmp-*"))
  assert not (out / data.METADATA).exists()
  legacy = tmp_path / ".ds.tmp-123-abcdef12"  # left by the single-file format's preparation
  legacy.mkdir()

  info = prepare.prepare(str(tmp_path / "c.jsonl"), out, "byte", eval_fraction=0.1,
                         unit_bytes=6000)
  assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
  assert not list(tmp_path.rglob(".*"))
  ref = prepare.prepare(str(tmp_path / "c.jsonl"), tmp_path / "ref", "byte", eval_fraction=0.1)
  _same_streams(out, tmp_path / "ref")
  assert info["docs"] == ref["docs"] and info["units"] > len(finished) // 3


_PEAK_MEMORY = """
import resource, sys
from archscale.data import prepare
prepare._CHUNK_CHARS = 1 << 16
prepare.prepare(sys.argv[1], sys.argv[2], "byte", eval_fraction=0.01)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_peak_memory_does_not_grow_with_corpus_size(tmp_path):
  rng = np.random.default_rng(0)
  words = np.asarray(["alpha", "beta", "gamma", "delta", "café", "x", "yz", "ok"])
  peaks = []
  for n_docs in [2_000, 24_000]:  # about 2 MB and 24 MB of JSONL, one unit each
    path = tmp_path / f"{n_docs}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
      for _ in range(n_docs):
        f.write(json.dumps({"text": " ".join(rng.choice(words, 160))}) + "\n")
    run = subprocess.run([sys.executable, "-c", _PEAK_MEMORY, str(path), str(tmp_path / "out")],
                         capture_output=True, text=True, check=True, timeout=300)
    shutil.rmtree(tmp_path / "out")
    peaks.append(int(run.stdout.split()[-1]) / 1024)  # ru_maxrss is in KiB on Linux
  assert os.path.getsize(tmp_path / "24000.jsonl") > 18e6
  # Holding the corpus would add more than 18 MB (text and ids); streaming adds noise only.
  assert peaks[1] - peaks[0] < 8, peaks


# ---------------------------------------------------------------------------- units and keys


@pytest.mark.parametrize("name,text_docs", [("c.jsonl", "file"), ("t.txt", "line"),
                                            ("t.txt", "paragraph")])
def test_documents_and_keys_do_not_depend_on_where_files_are_cut(tmp_path, name, text_docs):
  texts = corpora.docs(120)
  if name.endswith(".jsonl"):
    corpora.write_jsonl(tmp_path / name, texts)
  else:  # Mixed line endings, a Unicode line separator and blank lines holding spaces.
    body = "\r\n \n\n".join(t.replace("\n", "\r") + "\u2028tail" for t in texts)
    (tmp_path / name).write_bytes(body.encode())
  files = [tmp_path / name]
  whole = sources.plan_units(files, text_docs, 1 << 30, salt="s")
  cut = sources.plan_units(files, text_docs, 700, salt="s")
  assert len(whole) == 1 and len(cut) > 8
  assert [(u.start, u.end) for u in cut][0][0] == 0 and cut[-1].end == whole[0].size
  assert all(a.end == b.start for a, b in zip(cut, cut[1:], strict=False))

  def docs_of(units):
    return [d for u in units for d in sources.unit_documents(u, "text", text_docs)]

  assert docs_of(cut) == docs_of(whole)
  assert len({key for key, _ in docs_of(whole)}) == len(docs_of(whole))
  if text_docs == "line":  # The lines of the file read as text, as str.splitlines cuts them.
    lines = (tmp_path / name).read_text(encoding="utf-8").splitlines()
    assert [text for _, text in docs_of(cut)] == [line for line in lines if line.strip()]
  if text_docs == "paragraph":
    assert len(docs_of(cut)) == 120
  # Keys name the unit's file and range: they change when the file or the recipe does.
  assert [u.key for u in sources.plan_units(files, text_docs, 700, salt="t")] != [
      u.key for u in cut]


def test_a_source_changed_in_place_is_detected_and_the_dataset_has_a_fingerprint(tmp_path):
  src = tmp_path / "c.jsonl"
  corpora.write_jsonl(src, corpora.docs(60, words=20))
  info = prepare.prepare(str(src), tmp_path / "ds", "byte", eval_fraction=0.1)
  assert data.fingerprint(info) == info["fingerprint"]
  again = prepare.prepare(str(src), tmp_path / "ds", "byte", eval_fraction=0.1)  # unchanged: reused
  assert again["fingerprint"] == info["fingerprint"]
  corpora.write_jsonl(src, corpora.docs(60, words=21))  # the same file, other text
  with pytest.raises(ValueError, match=r"prepared from source files that have changed since"):
    prepare.prepare(str(src), tmp_path / "ds", "byte", eval_fraction=0.1)
  other = prepare.prepare(str(src), tmp_path / "ds2", "byte", eval_fraction=0.1)
  assert other["fingerprint"] != info["fingerprint"]
