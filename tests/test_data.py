"""Tests for archscale.data: sources, tokenizers, the held-out split, shards and step batches."""

import gzip
import json
import os
import pathlib
from pydoc_data.topics import topics

import numpy as np
import pytest

from archscale import config_lib, data


def _docs(n: int, words: int = 30) -> list[str]:
  """Distinct small documents: each starts with its own marker and has a line break."""
  rng = np.random.default_rng(n)
  vocab = ["alpha", "beta", "gamma", "delta", "ünïcode", "naïve", "café", "x", "yz", "ok"]
  return [f"doc {i:03d}: " + " ".join(rng.choice(vocab, words)) + "\nend of doc."
          for i in range(n)]


def _write_jsonl(path: pathlib.Path, texts: list[str], field: str = "text") -> None:
  lines = "".join(json.dumps({"id": i, field: t}) + "\n\n" for i, t in enumerate(texts))
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.write(lines)


def _stream(out: pathlib.Path, split: str) -> np.ndarray:
  info = data.dataset_info(out)
  return np.fromfile(out / f"{split}.bin", dtype=info["dtype"])


def _split_docs(out: pathlib.Path, split: str) -> list[str]:
  """The documents of a prepared split, decoded back to text."""
  info = data.dataset_info(out)
  tok = data.load_tokenizer(str(out))
  ids = _stream(out, split).tolist()
  assert not ids or ids[-1] == info["eos_id"]
  docs, cur = [], []
  for i in ids:
    if i == info["eos_id"]:
      docs.append(tok.decode(cur))
      cur = []
    else:
      cur.append(i)
  return docs


@pytest.fixture
def corpus(tmp_path):
  """A prepared byte-level dataset of 60 JSONL documents, and the documents."""
  texts = _docs(60, words=60)
  _write_jsonl(tmp_path / "c.jsonl", texts)
  out = tmp_path / "ds"
  data.prepare(str(tmp_path / "c.jsonl"), out, "byte", eval_fraction=0.2)
  return out, texts


# ---------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_and_reserves_nul_for_eos():
  tok = data.load_tokenizer("byte")
  text = "Héllo, wörld ✓\n\ttabs"
  ids = tok.encode(text)
  assert (tok.vocab_size, tok.eos_id) == (256, 0)
  assert all(0 < i < 256 for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, np.int32)) == text
  assert tok.encode("a\0b") == [97, 98]
  assert [a.tolist() for a in tok.encode_batch(["ab", "ü"])] == [[97, 98], [195, 188]]
  with pytest.raises(ValueError, match="0, 255"):
    tok.decode([256])


def test_load_tokenizer_rejects_unknown_specs(tmp_path):
  with pytest.raises(ValueError, match="data.tokenizer"):
    data.load_tokenizer(str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match="data.path"):
    data.load_tokenizer("bpe")
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="data.tokenizer"):
    data.load_tokenizer(str(bad))


def test_bpe_trains_saves_and_reloads(tmp_path):
  texts = [topics[k] for k in sorted(topics)[:40]]
  src = tmp_path / "docs"
  src.mkdir()
  for i, t in enumerate(texts):
    (src / f"{i:02d}.txt").write_text(t, encoding="utf-8")
  out = tmp_path / "bpe"
  info = data.prepare(str(src), out, "bpe", bpe_vocab_size=400, eval_fraction=0.1)
  assert info["tokenizer"] == "bpe" and (out / info["tokenizer_file"]).is_file()
  assert 257 < info["vocab_size"] <= 400 and info["dtype"] == "uint16"

  tok = data.load_tokenizer(str(out))
  assert (tok.vocab_size, tok.eos_id) == (info["vocab_size"], info["eos_id"])
  assert tok.hf.token_to_id("<|endoftext|>") == tok.eos_id
  for text in ["def f(x):\n    return x  # ok", "unseen: Ωmega ✓ 日本"]:
    assert tok.decode(tok.encode(text)) == text
  # Text that quotes the EOS token must not produce a document boundary.
  assert tok.eos_id not in tok.encode("before <|endoftext|> after")
  assert sorted(_split_docs(out, "train") + _split_docs(out, "eval")) == sorted(texts)
  assert len(tok.encode(texts[0])) < 0.75 * len(texts[0].encode())  # Merges were learned.

  # The saved tokenizer.json is an ordinary HF tokenizer: reusable by path, same tokens.
  again = data.prepare(str(src), tmp_path / "hf", str(out / "tokenizer.json"), eval_fraction=0.1)
  assert again["tokenizer"] == "hf" and again["eos_id"] == info["eos_id"]
  assert (tmp_path / "hf" / "tokenizer.json").is_file()
  for split in data.SPLITS:
    np.testing.assert_array_equal(_stream(tmp_path / "hf", split), _stream(out, split))


def test_hf_tokenizer_eos_is_detected_or_configured(tmp_path):
  texts = ["a small text to learn from", "another small text"]
  for special, given in [("</s>", ""), ("<|end_of_text|>", ""), ("<|stop|>", "<|stop|>")]:
    path = tmp_path / f"{len(special)}.json"
    data._train_bpe(texts, 300, special).hf.save(str(path))
    tok = data.load_tokenizer(str(path), eos_token=given)
    assert tok.eos_id == tok.hf.token_to_id(special)
    assert tok.decode(tok.encode("a small text")) == "a small text"
  with pytest.raises(ValueError, match="data.eos_token"):
    data.load_tokenizer(str(path))
  with pytest.raises(ValueError, match="data.eos_token"):
    data.load_tokenizer(str(path), eos_token="<|nope|>")


def test_large_vocab_tokenizer_writes_uint32(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  # Word-level, 70k ids with EOS at the top, laid out like LLaMA-3's (ids past 65535).
  vocab = {f"w{i}": i for i in range(70_000)} | {"<unk>": 70_000, "<|end_of_text|>": 70_001}
  hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf.save(str(tmp_path / "tokenizer.json"))
  texts = [" ".join(f"w{69_990 + (i * j) % 10}" for j in range(20)) for i in range(10)]
  _write_jsonl(tmp_path / "c.jsonl", texts)
  info = data.prepare(str(tmp_path / "c.jsonl"), tmp_path / "ds", str(tmp_path / "tokenizer.json"),
                      eval_fraction=0.2)
  assert (info["dtype"], info["vocab_size"], info["eos_id"]) == ("uint32", 70_002, 70_001)
  stream = _stream(tmp_path / "ds", "train")
  assert stream.max() == 70_001 and stream.min() >= 69_990
  rows = data.Batches(tmp_path / "ds", "train", seq_len=8, global_batch_size=2, seed=0)(0)
  assert rows.min() >= 69_990


# ---------------------------------------------------------------------------- sources and splits


def test_folder_of_text_files_becomes_eos_separated_documents(tmp_path):
  texts = _docs(12)
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
  info = data.prepare(str(src), out, "byte", eval_fraction=0.25)

  train, held_out = _split_docs(out, "train"), _split_docs(out, "eval")
  assert sorted(train + held_out) == sorted(texts + ["compressed document"])
  assert not set(train) & set(held_out) and held_out
  assert info["docs"] == {"train": len(train), "eval": len(held_out)}
  assert info["tokens"]["train"] == len(_stream(out, "train"))
  assert info["dtype"] == "uint8" and len(info["source_files"]) == 13


def test_jsonl_inputs_plain_and_compressed(tmp_path):
  texts = _docs(30)
  _write_jsonl(tmp_path / "a.jsonl", texts[:10], field="content")
  _write_jsonl(tmp_path / "b.jsonl.gz", texts[10:20], field="content")
  _write_jsonl(tmp_path / "c.json.gz", texts[20:], field="content")  # Dolma's naming.
  src = ",".join(str(tmp_path / n) for n in ["a.jsonl", "b.jsonl.gz", "c.json.gz"])
  out = tmp_path / "ds"
  data.prepare(src, out, text_field="content", eval_fraction=0.2)
  train, held_out = _split_docs(out, "train"), _split_docs(out, "eval")
  assert sorted(train + held_out) == sorted(texts)
  # Each split keeps source order.
  assert train == [t for t in texts if t in set(train)]
  # A glob over the same files gives the same dataset.
  out2 = tmp_path / "glob"
  data.prepare(str(tmp_path / "*.json*"), out2, text_field="content", eval_fraction=0.2)
  assert sorted(_split_docs(out2, "train") + _split_docs(out2, "eval")) == sorted(texts)


def test_heldout_split_is_by_document_and_deterministic(tmp_path):
  texts = _docs(200)
  _write_jsonl(tmp_path / "c.jsonl", texts)
  runs = {}
  for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
    data.prepare(str(tmp_path / "c.jsonl"), tmp_path / name, eval_fraction=0.1, seed=seed)
    runs[name] = (_split_docs(tmp_path / name, "train"), _split_docs(tmp_path / name, "eval"))
  train, held_out = runs["a"]
  assert not set(train) & set(held_out)
  assert sorted(train + held_out) == sorted(texts)
  assert 5 <= len(held_out) <= 40
  assert runs["b"] == runs["a"]
  assert runs["c"][1] != held_out


def test_small_corpus_still_holds_out_a_document(tmp_path):
  texts = _docs(3)
  _write_jsonl(tmp_path / "c.jsonl", texts)
  info = data.prepare(str(tmp_path / "c.jsonl"), tmp_path / "ds", eval_fraction=0.001)
  assert info["docs"] == {"train": 2, "eval": 1}
  assert _split_docs(tmp_path / "ds", "eval") == [texts[-1]]

  (tmp_path / "one.txt").write_text("just one document")
  with pytest.raises(ValueError, match="data.eval_fraction"):
    data.prepare(str(tmp_path / "one.txt"), tmp_path / "one")
  assert not (tmp_path / "one").exists()
  info = data.prepare(str(tmp_path / "one.txt"), tmp_path / "one", eval_fraction=0.0)
  assert info["docs"] == {"train": 1, "eval": 0}


def test_text_docs_split_files_by_paragraph_or_line(tmp_path):
  (tmp_path / "t.txt").write_text("p1 line1\np1 line2\n\n\np2\n  \np3\n")
  counts = {}
  for mode in data.TEXT_DOCS:
    info = data.prepare(str(tmp_path / "t.txt"), tmp_path / mode, text_docs=mode,
                        eval_fraction=0.0)
    counts[mode] = info["docs"]["train"]
  assert counts == {"file": 1, "paragraph": 3, "line": 4}
  assert _split_docs(tmp_path / "paragraph", "train") == ["p1 line1\np1 line2", "p2", "p3"]


def test_kjv_documents_are_chapters():
  pytest.importorskip("bible")
  docs = list(data._kjv_documents())
  assert len(docs) == 1189
  assert docs[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.")
  assert docs[-1].startswith("Revelation 22\n")


# ---------------------------------------------------------------------------- errors


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
  _write_jsonl(tmp_path / "other_field.jsonl", ["x", "y"], field="body")
  out = tmp_path / "out"
  with pytest.raises(ValueError, match=field):
    data.prepare(source.format(tmp=tmp_path), out)
  assert not out.exists()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_settings_name_the_field(tmp_path):
  (tmp_path / "t.txt").write_text("text")
  src = str(tmp_path / "t.txt")
  for kwargs, field in [(dict(eval_fraction=1.0), "data.eval_fraction"),
                        (dict(text_docs="page"), "data.text_docs"),
                        (dict(tokenizer="bpe", bpe_vocab_size=200), "data.bpe_vocab_size"),
                        (dict(tokenizer="gpt9"), "data.tokenizer")]:
    with pytest.raises(ValueError, match=field):
      data.prepare(src, tmp_path / "out", **kwargs)


def test_failure_midway_leaves_nothing_that_looks_complete(tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  _write_jsonl(src / "a.jsonl", _docs(20))
  _write_jsonl(src / "b.jsonl", ["no text field here"], field="body")
  with pytest.raises(ValueError, match="data.text_field"):
    data.prepare(str(src), tmp_path / "out")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---------------------------------------------------------------------------- idempotence


def test_prepare_is_idempotent_and_refuses_to_mix_datasets(tmp_path):
  _write_jsonl(tmp_path / "c.jsonl", _docs(20))
  out = tmp_path / "ds"
  out.mkdir()  # An empty directory is fine to fill.
  first = data.prepare(str(tmp_path / "c.jsonl"), out, eval_fraction=0.2)
  stamp = (out / "train.bin").stat().st_mtime_ns
  second = data.prepare(str(tmp_path / "c.jsonl"), out, eval_fraction=0.2)
  assert second == first and first["path"] == str(out)
  assert (out / "train.bin").stat().st_mtime_ns == stamp
  with pytest.raises(ValueError, match=r"data.path.*eval_fraction"):
    data.prepare(str(tmp_path / "c.jsonl"), out, eval_fraction=0.3)
  (tmp_path / "junk").mkdir()
  (tmp_path / "junk" / "x").write_text("x")
  with pytest.raises(ValueError, match="data.path"):
    data.prepare(str(tmp_path / "c.jsonl"), tmp_path / "junk")
  with pytest.raises(ValueError, match="data.path"):
    data.dataset_info(tmp_path / "nowhere")


def test_run_prepare_data_uses_config_fields(tmp_path):
  _write_jsonl(tmp_path / "c.jsonl", _docs(20), field="body")
  config = config_lib.make_config("demo")
  config.data.source = str(tmp_path / "c.jsonl")
  config.data.text_field = "body"
  config.data.eval_fraction = 0.2
  workdir = tmp_path / "run"
  data.run_prepare_data(config, workdir)
  assert data.data_path(config, workdir) == workdir / "data"
  info = data.dataset_info(workdir / "data")
  assert info["docs"]["train"] + info["docs"]["eval"] == 20
  data.run_prepare_data(config, workdir)  # Idempotent.

  config.data.source = ""
  data.run_prepare_data(config, workdir)  # Uses the existing dataset.
  config.data.path = str(tmp_path / "elsewhere")
  with pytest.raises(ValueError, match="data.source"):
    data.run_prepare_data(config, workdir)


def test_check_against_model():
  config = config_lib.make_config("demo")
  data.check_against_model(config, {"vocab_size": 256, "tokenizer": "byte"})
  with pytest.raises(ValueError, match="model.vocab_size"):
    data.check_against_model(config, {"vocab_size": 1024, "tokenizer": "bpe"})
  config.data.seq_len = config.model.max_seq_len + 1
  with pytest.raises(ValueError, match=r"data.seq_len.*model.max_seq_len"):
    data.check_against_model(config)


# ---------------------------------------------------------------------------- batches


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
  stream = _stream(out, "train").astype(np.int32)
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
  eval_stream = _stream(out, "eval").astype(np.int32).tobytes()
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
  with open(out / "train.bin", "r+b") as f:
    f.truncate(os.path.getsize(out / "train.bin") - 1)
  with pytest.raises(ValueError, match="truncated"):
    data.Batches(out, "train", 8, 4, 0)
