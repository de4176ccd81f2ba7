"""Tokenizers: text to token ids and back, for preparing corpora and reading generations.

Three kinds share one interface: `byte` (UTF-8 bytes, no dependency), a Hugging Face
`tokenizer.json` (LLaMA-3's or any other), and `bpe`, a byte-level BPE trained on the corpus by
`--mode=prepare_data` and saved beside the prepared dataset.
"""

from __future__ import annotations

import array
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from archscale.core import io
from archscale.data import batches as data

TOKENIZER_FILE = "tokenizer.json"
# Tried in order when a tokenizer.json does not say which token ends a document.
KNOWN_EOS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")
BPE_EOS = "<|endoftext|>"



class Tokenizer:
  """Text to ids and back; `eos_id` ends every document in the token stream."""

  kind: str = ""
  vocab_size: int = 0
  eos_id: int = 0
  eos_token: str | None = None

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, with no special tokens added."""
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; EOS decodes to its own symbol, so decoding is faithful to the ids."""
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Ids of many texts at once (the fast path `prepare` uses)."""
    return [np.asarray(self.encode(t), np.int64) for t in texts]

  def encode_batch_deferred(self, texts: Sequence[str]) -> Callable[[], list[np.ndarray]]:
    """`encode_batch` in two steps: this call encodes, the returned function gives the ids.

    Where encoding runs without the interpreter lock (Hugging Face tokenizers), the function
    holds the part that needs it, so a pipeline can run it while the next batch encodes.
    """
    ids = self.encode_batch(texts)
    return lambda: ids


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255 with no dependencies; the NUL byte (id 0) doubles as EOS.

  The vocabulary stays at 256, a power of two matching the demo model. NUL does not occur in
  natural text, and `encode` drops any that do, so id 0 in a token stream always means EOS.
  """

  kind = "byte"
  vocab_size = 256
  eos_id = 0

  def encode(self, text: str) -> list[int]:
    return list(_utf8(text))

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.frombuffer(_utf8(t), np.uint8) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
      raise ValueError(f"byte tokenizer ids lie in [0, 255]; got {arr.min()}..{arr.max()}")
    # A window can cut a multi-byte character in two; show that as U+FFFD instead of failing.
    return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _utf8(text: str) -> bytes:
  return text.encode("utf-8").replace(b"\0", b"")


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (LLaMA-3's, or the byte-level BPE that `prepare` trains).

  Special-token strings inside the text are encoded as ordinary text, so a corpus that quotes
  "<|endoftext|>" cannot forge a document boundary; no BOS or other template tokens are added.
  """

  def __init__(self, tokenizer: Any, eos_token: str = "", kind: str = "hf",
               path: pathlib.Path | None = None):
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    eos_token = eos_token or next((t for t in KNOWN_EOS if t in vocab), "")
    if not eos_token:
      raise ValueError(
          f"the tokenizer has none of the usual end-of-text tokens {list(KNOWN_EOS)}; set "
          "data.eos_token to the token that ends a document")
    if eos_token not in vocab:
      raise ValueError(f"data.eos_token={eos_token!r} is not in the tokenizer's vocabulary")
    tokenizer.encode_special_tokens = True
    self.hf = tokenizer
    self.kind = kind
    self.path = path
    self.eos_token = eos_token
    self.eos_id = vocab[eos_token]
    self.vocab_size = max(vocab.values()) + 1

  def encode(self, text: str) -> list[int]:
    return self.hf.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return self.encode_batch_deferred(texts)()

  def encode_batch_deferred(self, texts: Sequence[str]) -> Callable[[], list[np.ndarray]]:
    # encode_batch_fast skips character offsets, which only slow tokenization down here.
    encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
    encodings = encode(list(texts), add_special_tokens=False)
    # Through array.array: twice as fast as numpy at turning a list of ints into a buffer.
    return lambda: [np.frombuffer(array.array("I", e.ids), np.uint32) for e in encodings]

  def decode(self, ids: Iterable[int]) -> str:
    return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str, *, eos_token: str = "") -> Tokenizer:
  """The tokenizer named by `data.tokenizer`: "byte", a tokenizer.json, or a prepared dataset.

  A prepared dataset directory (`data.path`) yields the tokenizer its shards were written with,
  including a BPE trained by `prepare`.
  """
  spec = str(spec)
  if spec == "byte":
    return ByteTokenizer()
  if spec == "bpe":
    raise ValueError(
        "data.tokenizer='bpe' is trained by --mode=prepare_data; load it from the prepared "
        "dataset instead: load_tokenizer(<data.path>)")
  if io.is_uri(spec):  # A prepared dataset in a bucket: read from its local copy.
    spec = data.dataset_info(spec)["path"]
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    if (path / data.METADATA).exists():
      info = data.dataset_info(path)
      if info["tokenizer"] == "byte":
        return ByteTokenizer()
      file = io.contained(path, info["tokenizer_file"], f"{path / data.METADATA} tokenizer_file")
      return _load_hf(file, info["eos_token"], info["tokenizer"])
    if (path / TOKENIZER_FILE).exists():
      return _load_hf(path / TOKENIZER_FILE, eos_token)
  elif path.is_file():
    return _load_hf(path, eos_token)
  raise ValueError(
      f"data.tokenizer={spec!r} is not 'byte', 'bpe', a tokenizer.json file or a prepared "
      "dataset directory")


def _load_hf(path: pathlib.Path, eos_token: str, kind: str = "hf") -> HFTokenizer:
  import tokenizers  # Imported here so the byte tokenizer works without the library.

  try:
    tok = tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # The library raises a bare Exception on malformed files.
    raise ValueError(f"data.tokenizer: {path} is not a readable tokenizer.json ({e})") from e
  return HFTokenizer(tok, eos_token, kind, path)


def train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str) -> HFTokenizer:
  """A byte-level BPE (GPT-2 style pre-tokenizer, every byte in the alphabet) fit to `texts`."""
  from tokenizers import Tokenizer as HFTok
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = HFTok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer=trainer)
  return HFTokenizer(tok, eos_token, kind="bpe")

