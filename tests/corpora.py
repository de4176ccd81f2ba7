"""Small corpora and readers shared by the data tests."""

import gzip
import json
import pathlib

import numpy as np

from archscale.data import batches as data
from archscale.data import tokenizer


def docs(n: int, words: int = 30) -> list[str]:
  """Distinct small documents: each starts with its own marker and has a line break."""
  rng = np.random.default_rng(n)
  vocab = ["alpha", "beta", "gamma", "delta", "ünïcode", "naïve", "café", "x", "yz", "ok"]
  return [f"doc {i:03d}: " + " ".join(rng.choice(vocab, words)) + "\nend of doc."
          for i in range(n)]


def write_jsonl(path: pathlib.Path, texts: list[str], field: str = "text") -> None:
  lines = "".join(json.dumps({"id": i, field: t}) + "\n\n" for i, t in enumerate(texts))
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "wt", encoding="utf-8") as f:
    f.write(lines)


def stream(out: pathlib.Path, split: str) -> np.ndarray:
  """A split's whole token stream."""
  tokens = data.TokenStream(out, split)
  return tokens.read(0, len(tokens))


def split_docs(out: pathlib.Path, split: str) -> list[str]:
  """The documents of a prepared split, decoded back to text."""
  info = data.dataset_info(out)
  tok = tokenizer.load_tokenizer(str(out))
  ids = stream(out, split).tolist()
  assert not ids or ids[-1] == info["eos_id"]
  texts, cur = [], []
  for i in ids:
    if i == info["eos_id"]:
      texts.append(tok.decode(cur))
      cur = []
    else:
      cur.append(i)
  return texts
