"""Prepared token datasets and the deterministic batches training reads from them.

A prepared dataset (`data.path`, written by `archscale.data.prepare`) is a directory:

  metadata.json   how it was made and what it holds; "shards" is the index: for each split a
                  list of [file, start, tokens] parts whose concatenation is the split's token
                  stream (documents in source order, each followed by EOS)
  manifest.json   the units of the input and, per finished unit, its token counts and SHA-256
  shards/         <key>.train.bin, <key>.eval.bin: token ids as little-endian uint8 / uint16 /
                  uint32 (the narrowest that holds the vocabulary), one pair per unit
  tokenizer.json  the tokenizer, unless it is the byte tokenizer

Datasets of the single-file format (train.bin and eval.bin beside metadata.json) are read as
they are. A dataset in a bucket (data.path=gs://...) is read from a local copy (`local_copy`).

`Batches` serves fixed-length windows of a split so that the global batch of step s is a pure
function of (seed, s): resuming needs no replay and does not depend on how many hosts
read. Window i of a split is tokens [i*seq_len, i*seq_len + seq_len + 1), so inputs are [:-1]
and targets [1:], consecutive windows share one token, and a window may span a document
boundary (the EOS marks it; nothing is masked) or a shard boundary. Window positions are fixed,
so the last (n - 1) % seq_len tokens of a split are never served.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pathlib
import shutil
import threading
from typing import Any

import numpy as np

from archscale.core import io

FORMAT = "archscale-tokens-v2"
FORMATS = ("archscale-tokens-v1", FORMAT)   # v1: one train.bin / eval.bin per dataset
METADATA = "metadata.json"
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
SPLITS = ("train", "eval")
_OPEN_SHARDS = 256        # memory maps kept open per stream
_PREFETCH = 2             # batches read ahead of the step being trained


def dataset_info(path: str | os.PathLike) -> dict[str, Any]:
  """The metadata of the prepared dataset at `path` (with "path" added: where it is read from,
  a local copy for a URI, see `local_copy`)."""
  path = local_copy(path)
  if not (path / METADATA).is_file():
    raise _not_a_dataset(path)
  with open(path / METADATA, encoding="utf-8") as f:
    info = json.load(f)
  if info.get("format") not in FORMATS:
    raise ValueError(
        f"data.path={str(path)!r} holds a dataset of format {info.get('format')!r}, which this "
        f"version does not read ({FORMATS}); prepare it again with --mode=prepare_data")
  info["path"] = str(path)
  return info


def fingerprint(info: dict[str, Any]) -> str:
  """What identifies a prepared dataset's content: metadata.json's `fingerprint` (its recipe and
  the shards' hashes), or for a dataset prepared before fingerprints, a digest of its recipe,
  shard index and token counts."""
  return info.get("fingerprint") or io.digest(
      {k: info.get(k) for k in ("recipe", "shards", "tokens", "source_files")})


def local_copy(path: Any) -> pathlib.Path:
  """A prepared dataset as a local folder, which the loader can memory-map: `path` itself, or for
  a URI (gs://...) a copy under $ARCHSCALE_DATA_CACHE (default ~/.cache/archscale/data).

  The copy's folder is named after the URI and the remote metadata.json, so a dataset prepared
  again gets a fresh copy; each file lands under a temporary name and is renamed, and the
  metadata comes last, so an interrupted copy is resumed, never read.
  """
  path = io.as_path(path, "data.path")
  if io.is_local(path):
    return path.expanduser()
  if not (path / METADATA).exists():
    raise _not_a_dataset(path)
  text = (path / METADATA).read_text(encoding="utf-8")
  key = hashlib.sha256(f"{path}\n{text}".encode()).hexdigest()[:16]
  root = pathlib.Path(os.environ.get("ARCHSCALE_DATA_CACHE", "~/.cache/archscale/data"))
  local = root.expanduser() / f"{path.name}-{key}"
  if (local / METADATA).is_file():
    return local
  info = json.loads(text)
  index = info.get("shards") or {s: [[f"{s}.bin"]] for s in SPLITS}
  names = [part[0] for parts in index.values() for part in parts]
  names += [info["tokenizer_file"]] if info.get("tokenizer_file") else []
  for name in names:
    where = f"data.path={str(path)!r}: {METADATA}"
    source, target = io.contained(path, name, where), io.contained(local, name, where)
    if not target.exists():
      target.parent.mkdir(parents=True, exist_ok=True)
      tmp = io.temporary_name(target)
      if not source.exists():
        raise ValueError(f"data.path={str(path)!r}: {name} is missing; delete the dataset and "
                         "prepare it again")
      with source.open("rb") as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
      os.replace(tmp, target)
  io.write_text_atomic(local / METADATA, text)
  return local


def _not_a_dataset(path: Any) -> ValueError:
  if (path / MANIFEST).exists():
    return ValueError(
        f"data.path={str(path)!r} is a preparation that has not finished ({METADATA} is "
        f"written last); rerun --mode=prepare_data with the same settings to finish it")
  return ValueError(
      f"data.path={str(path)!r} holds no prepared dataset ({METADATA} is missing); run "
      "--mode=prepare_data with data.source set, or point data.path at a prepared dataset")


def data_path(config: Any, workdir: str | os.PathLike) -> Any:
  """Where a config's prepared dataset lives: `data.path` (a folder or a URI), or `workdir/data`
  when empty."""
  if config.data.path:
    path = io.as_path(config.data.path, "data.path")
    return path.expanduser() if io.is_local(path) else path
  return io.local_only(workdir, "--workdir", "with data.path empty the dataset is prepared into "
                       "WORKDIR/data, which the data loader memory-maps; set data.path to a "
                       "prepared dataset") / "data"


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
# Token streams


class TokenStream:
  """One split of a prepared dataset, read as a single token sequence across its shards."""

  def __init__(self, path: str | os.PathLike, split: str):
    if split not in SPLITS:
      raise ValueError(f"split={split!r}; choose one of {SPLITS}")
    self.info = dataset_info(path)
    self.dtype = np.dtype(self.info["dtype"]).newbyteorder("<")
    root = pathlib.Path(self.info["path"])
    index = self.info.get("shards") or {s: [[f"{s}.bin", 0, self.info["tokens"][s]]]
                                        for s in SPLITS}
    where = f"data.path={self.info['path']!r}: {METADATA} shards.{split}"
    self._parts = [(io.contained(root, file, where), int(start), int(count))
                   for file, start, count in index[split]]
    for file, start, count in self._parts:
      if not file.is_file() or file.stat().st_size < (start + count) * self.dtype.itemsize:
        raise ValueError(
            f"data.path={self.info['path']!r}: {file.relative_to(root)} is missing or truncated; "
            "delete the dataset and run --mode=prepare_data again")
    self._ends = np.cumsum([0] + [count for _, _, count in self._parts])
    self._maps: collections.OrderedDict[int, np.memmap] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._ends[-1])

  def read(self, start: int, stop: int) -> np.ndarray:
    """Tokens [start, stop) of the split (stop clipped to its end)."""
    stop = min(stop, len(self))
    pieces = []
    part = int(np.searchsorted(self._ends, start, side="right")) - 1
    while start < stop:
      lo, hi = start - self._ends[part], min(stop, self._ends[part + 1]) - self._ends[part]
      pieces.append(self._map(part)[lo:hi])
      start, part = int(self._ends[part] + hi), part + 1
    if len(pieces) == 1:
      return np.asarray(pieces[0])
    return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)

  def _map(self, part: int) -> np.memmap:
    """The memory map of one part; the least recently used are closed past `_OPEN_SHARDS`."""
    with self._lock:
      if part in self._maps:
        self._maps.move_to_end(part)
        return self._maps[part]
      file, start, count = self._parts[part]
      tokens = np.memmap(file, dtype=self.dtype, mode="r", offset=start * self.dtype.itemsize,
                         shape=(count,))
      self._maps[part] = tokens
      if len(self._maps) > _OPEN_SHARDS:
        self._maps.popitem(last=False)
      return tokens


class _Windows:
  """Random access to the (seq_len + 1)-token windows of a token stream, as int32."""

  def __init__(self, tokens: TokenStream, seq_len: int):
    self._tokens = tokens
    self._seq_len = seq_len

  def __len__(self) -> int:
    return (len(self._tokens) - 1) // self._seq_len

  def __getitem__(self, index: int) -> np.ndarray:
    start = int(index) * self._seq_len
    return self._tokens.read(start, start + self._seq_len + 1).astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Batches


class Batches:
  """This process's rows of the global batch of any step, for one split of a prepared dataset.

  Built on grain's random-access `MapDataset`: windows -> shuffle(seed) -> repeat -> batches of
  this process's rows. Row j of the global batch of step s is element s * global_batch_size + j,
  so a batch depends only on (seed, step): resuming at any step replays nothing, and the global
  batch is the same whatever the process count. Each epoch visits every window once in a fresh
  order. The eval split is served the same way, so its step-s batch is fixed for a given seed.
  Consecutive calls (step, step + 1, ...) are served from a grain iterator whose threads read
  the next `_PREFETCH` batches while the current step runs.
  """

  def __init__(self, path: str | os.PathLike, split: str, seq_len: int,
               global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    import grain  # Imported here: preparing data (in worker processes) does not need it.

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
    tokens = TokenStream(path, split)
    self.info = tokens.info
    self.split, self.seq_len, self.seed = split, seq_len, seed
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    if len(tokens) < seq_len + 1:
      raise ValueError(
          f"the {split} split of data.path={self.info['path']!r} has {len(tokens)} tokens, fewer "
          f"than one window of data.seq_len + 1 = {seq_len + 1}; lower data.seq_len, add data, "
          + ("or raise data.eval_fraction" if split == "eval" else "or lower data.eval_fraction"))
    windows = _Windows(tokens, seq_len)
    self.num_windows = len(windows)
    rows = grain.MapDataset.source(windows).shuffle(seed=_shuffle_seed(seed)).repeat()
    # Element k of `batches` is rows [k*b, (k+1)*b); this process's share of step s is element
    # s * process_count + process_index.
    self._by_step = rows.batch(self.local_batch_size, drop_remainder=True)[
        process_index::process_count]
    self._read_options = grain.ReadOptions(num_threads=_PREFETCH, prefetch_buffer_size=_PREFETCH)
    self._iterator: Any = None
    self._next_step = -1

  @property
  def steps_per_epoch(self) -> int:
    """Whole global batches per pass over the split's windows (0 when one batch needs more)."""
    return self.num_windows // self.global_batch_size

  def __call__(self, step: int) -> np.ndarray:
    """int32 [global_batch_size // process_count, seq_len + 1]: this process's rows of `step`."""
    if step < 0:
      raise ValueError(f"step={step} must be non-negative")
    if step != self._next_step:
      self._iterator = iter(self._by_step[step:].to_iter_dataset(self._read_options))
    self._next_step = step + 1
    return next(self._iterator)

  def read(self, step: int) -> np.ndarray:
    """The same rows as `self(step)`, read now in this thread (no prefetch)."""
    if step < 0:
      raise ValueError(f"step={step} must be non-negative")
    return self._by_step[step]


def _shuffle_seed(seed: int) -> int:
  """A 32-bit shuffle seed; hashed because grain seeds epoch e with seed + e."""
  digest = hashlib.blake2b(f"batches:{seed}".encode(), digest_size=4).digest()
  return int.from_bytes(digest, "little")
