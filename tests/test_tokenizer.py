"""Tests for archscale.data.tokenizer: byte, Hugging Face and trained BPE tokenizers."""

from pydoc_data.topics import topics

import corpora
import numpy as np
import pytest

from archscale.data import batches as data
from archscale.data import prepare, tokenizer


def test_byte_tokenizer_round_trips_and_reserves_nul_for_eos():
  tok = tokenizer.load_tokenizer("byte")
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
    tokenizer.load_tokenizer(str(tmp_path / "missing.json"))
  with pytest.raises(ValueError, match="data.path"):
    tokenizer.load_tokenizer("bpe")
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="data.tokenizer"):
    tokenizer.load_tokenizer(str(bad))


def test_bpe_trains_saves_and_reloads(tmp_path):
  texts = [topics[k] for k in sorted(topics)[:40]]
  src = tmp_path / "docs"
  src.mkdir()
  for i, t in enumerate(texts):
    (src / f"{i:02d}.txt").write_text(t, encoding="utf-8")
  out = tmp_path / "bpe"
  info = prepare.prepare(str(src), out, "bpe", bpe_vocab_size=400, eval_fraction=0.1)
  assert info["tokenizer"] == "bpe" and (out / info["tokenizer_file"]).is_file()
  assert 257 < info["vocab_size"] <= 400 and info["dtype"] == "uint16"

  tok = tokenizer.load_tokenizer(str(out))
  assert (tok.vocab_size, tok.eos_id) == (info["vocab_size"], info["eos_id"])
  assert tok.hf.token_to_id("<|endoftext|>") == tok.eos_id
  for text in ["def f(x):\n    return x  # ok", "unseen: Ωmega ✓ 日本"]:
    assert tok.decode(tok.encode(text)) == text
  # Text that quotes the EOS token must not produce a document boundary.
  assert tok.eos_id not in tok.encode("before <|endoftext|> after")
  assert sorted(corpora.split_docs(out, "train") + corpora.split_docs(out, "eval")) == sorted(texts)
  assert len(tok.encode(texts[0])) < 0.75 * len(texts[0].encode())  # Merges were learned.
  # The batch paths give each text's ids, in order, whether the ids are taken at once or later.
  later = tok.encode_batch_deferred(texts[:3])
  for ids in (tok.encode_batch(texts[:3]), later()):
    assert [a.tolist() for a in ids] == [tok.encode(t) for t in texts[:3]]

  # The saved tokenizer.json is an ordinary HF tokenizer: reusable by path, same tokens.
  again = prepare.prepare(str(src), tmp_path / "hf", str(out / "tokenizer.json"), eval_fraction=0.1)
  assert again["tokenizer"] == "hf" and again["eos_id"] == info["eos_id"]
  assert (tmp_path / "hf" / "tokenizer.json").is_file()
  for split in data.SPLITS:
    np.testing.assert_array_equal(corpora.stream(tmp_path / "hf", split),
                                  corpora.stream(out, split))


def test_hf_tokenizer_eos_is_detected_or_configured(tmp_path):
  texts = ["a small text to learn from", "another small text"]
  for special, given in [("</s>", ""), ("<|end_of_text|>", ""), ("<|stop|>", "<|stop|>")]:
    path = tmp_path / f"{len(special)}.json"
    tokenizer.train_bpe(texts, 300, special).hf.save(str(path))
    tok = tokenizer.load_tokenizer(str(path), eos_token=given)
    assert tok.eos_id == tok.hf.token_to_id(special)
    assert tok.decode(tok.encode("a small text")) == "a small text"
  with pytest.raises(ValueError, match="data.eos_token"):
    tokenizer.load_tokenizer(str(path))
  with pytest.raises(ValueError, match="data.eos_token"):
    tokenizer.load_tokenizer(str(path), eos_token="<|nope|>")


def test_large_vocab_tokenizer_writes_uint32(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  # Word-level, 70k ids with EOS at the top, laid out like LLaMA-3's (ids past 65535).
  vocab = {f"w{i}": i for i in range(70_000)} | {"<unk>": 70_000, "<|end_of_text|>": 70_001}
  hf = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf.save(str(tmp_path / "tokenizer.json"))
  texts = [" ".join(f"w{69_990 + (i * j) % 10}" for j in range(20)) for i in range(10)]
  corpora.write_jsonl(tmp_path / "c.jsonl", texts)
  info = prepare.prepare(str(tmp_path / "c.jsonl"), tmp_path / "ds",
                         str(tmp_path / "tokenizer.json"), eval_fraction=0.2)
  assert (info["dtype"], info["vocab_size"], info["eos_id"]) == ("uint32", 70_002, 70_001)
  stream = corpora.stream(tmp_path / "ds", "train")
  assert stream.max() == 70_001 and stream.min() >= 69_990
  rows = data.Batches(tmp_path / "ds", "train", seq_len=8, global_batch_size=2, seed=0)(0)
  assert rows.min() >= 69_990
