"""`--mode=prepare_data`: a corpus tokenized into token shards, resumably and in parallel.

The input is split into units (`sources.plan_units`); each unit becomes its own shard pair
`shards/<key>.train.bin` / `<key>.eval.bin` plus a record `shards/<key>.json` (token and
document counts, SHA-256 of each shard), written only once the shards are in place. A unit is
finished when its record and shards are, so a killed preparation resumes with the unfinished
units only, and the temporary files of dead attempts are removed on the next run.

`data.workers` processes tokenize units side by side, each holding about one batch of
`_CHUNK_CHARS` characters. `data.partition="i/n"` gives this job every n-th unit from the i-th,
so n jobs (a SLURM array, for instance) fill the same output; whichever job finds every unit
finished runs the final step: it checks the records against the shards, writes `manifest.json`
and then `metadata.json` with the index of shards per split (`archscale.data.batches` documents it).
Until then each job rewrites `manifest.json` now and then with the records it has seen; the
records under `shards/` are what counts. Rerunning a finished or partial preparation in one job
is always safe. Nothing relies on file locks: a unit's files have one writer, and shared files
are replaced atomically.

The token streams do not depend on the division of work: a split is the concatenation of its
unit shards in source order, and which documents are held out depends only on their keys.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from archscale.core import io, settings
from archscale.data import batches as data
from archscale.data import sources
from archscale.data import tokenizer as tok_lib

UNIT_BYTES = 64 << 20     # target input bytes per unit of an uncompressed file
_CHUNK_CHARS = 4 << 20    # characters tokenized per batch call
_LOG_EVERY_S = 10.0
_WAIT_FOR_TOKENIZER_S = 5.0


@dataclasses.dataclass(frozen=True)
class Tokenization:
  """What a unit's tokens depend on, as a worker process needs it (picklable)."""

  out_dir: str
  tokenizer_file: str | None   # None: the byte tokenizer
  eos_token: str
  dtype: str
  seed: int
  eval_fraction: float
  text_field: str
  text_docs: str


def prepare(source: str, out_dir: str | os.PathLike, tokenizer: str = "byte", *,
            text_field: str = "text", eval_fraction: float = 0.01, bpe_vocab_size: int = 1024,
            seed: int = 0, text_docs: str = "file", eos_token: str = "", workers: int = 1,
            partition: str = "0/1", unit_bytes: int = UNIT_BYTES,
            wait_s: float = 3600.0) -> dict[str, Any] | None:
  """Tokenizes `source` into shards under `out_dir`; returns the metadata once all are done.

  Returns None when this job's share is done but other partitions' units are not. Idempotent: a
  finished dataset made the same way is returned as is. Metadata keys: format, recipe (what
  decides the content; compared for idempotency), source, source_files, tokenizer ("byte" |
  "bpe" | "hf"), tokenizer_file, eos_token, vocab_size, eos_id, dtype, tokens and docs
  ({"train", "eval"} counts; tokens include one EOS per document), shards (the index), units,
  seconds (summed over units), created, code_revision; the returned dict also has "path".
  """
  out_dir = io.local_only(out_dir, "data.path", "preparing writes its shards through local file "
                         "APIs; prepare into a local folder and copy it to the bucket").expanduser()
  files = sources.resolve_inputs(source)
  recipe, tok = _recipe(files, tokenizer, text_field, text_docs, eval_fraction, seed,
                        bpe_vocab_size, eos_token)
  if workers < 1:
    raise ValueError(f"data.workers={workers} must be at least 1")
  if unit_bytes < 1:
    raise ValueError(f"unit_bytes={unit_bytes} must be positive")
  part = settings.parse_partition(partition)
  existing = _existing_dataset(out_dir, recipe)
  if existing is not None:
    logging.info("data: %s already holds this dataset (%s tokens train, %s eval); skipping",
                 out_dir, existing["tokens"]["train"], existing["tokens"]["eval"])
    return existing

  plan = sources.plan_units(files, text_docs, unit_bytes, io.digest(_without_stats(recipe)))
  shards = out_dir / data.SHARDS_DIR
  shards.mkdir(parents=True, exist_ok=True)
  if part[1] == 1:
    _remove_leftovers(out_dir, {u.key for u in plan}, root=True)
  if not (out_dir / data.MANIFEST).exists():
    _write_manifest(out_dir, recipe, plan, {})
  tok = _install_tokenizer(out_dir, tok, recipe, plan, part, wait_s)
  how = Tokenization(
      str(out_dir), None if tok.kind == "byte" else str(out_dir / tok_lib.TOKENIZER_FILE),
      tok.eos_token or "", _token_dtype(tok.vocab_size).name, int(seed), float(eval_fraction),
      text_field, text_docs)
  _prepare_share(how, recipe, plan, part, workers)
  records = _finished(out_dir, plan, how.dtype)
  if len(records) < len(plan):
    _write_manifest(out_dir, recipe, plan, records)
    logging.info("data: this job's units are done; %d of %d units belong to other partitions "
                 "and are unfinished; the job that finishes last writes %s (or rerun "
                 "--mode=prepare_data with data.partition='0/1')",
                 len(plan) - len(records), len(plan), data.METADATA)
    return None
  info = dict(source=str(source), tokenizer_spec=str(tokenizer),
              source_files=[str(sources.kjv_path())] if files is None else recipe["source"],
              tokenizer=tok.kind, tokenizer_file=None if tok.kind == "byte" else
              tok_lib.TOKENIZER_FILE, eos_token=tok.eos_token, vocab_size=tok.vocab_size,
              eos_id=tok.eos_id, dtype=how.dtype)
  return _finalize(out_dir, recipe, plan, records, info)


def _recipe(files: list[pathlib.Path] | None, tokenizer: str, text_field: str, text_docs: str,
            eval_fraction: float, seed: int, bpe_vocab_size: int,
            eos_token: str) -> tuple[dict[str, Any], tok_lib.Tokenizer | None]:
  """What decides the dataset's content, and the tokenizer (None: a BPE still to train)."""
  if text_docs not in sources.TEXT_DOCS:
    raise ValueError(f"data.text_docs={text_docs!r}; choose one of {sources.TEXT_DOCS}")
  if not 0.0 <= eval_fraction < 1.0:
    raise ValueError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
  tokenizer = str(tokenizer)
  recipe: dict[str, Any] = dict(
      source=sources.KJV if files is None else [str(p) for p in files], text_field=text_field,
      text_docs=text_docs, eval_fraction=float(eval_fraction), seed=int(seed), tokenizer=tokenizer)
  if files is not None:  # a source file changed in place is a different corpus
    recipe["source_stats"] = [[p.stat().st_size, p.stat().st_mtime_ns] for p in files]
  tok: tok_lib.Tokenizer | None = None
  if tokenizer == "bpe":
    if bpe_vocab_size <= 257:
      raise ValueError(
          f"data.bpe_vocab_size={bpe_vocab_size} leaves no room for merges: the byte alphabet "
          "(256) and EOS come first; use e.g. 1024")
    recipe.update(bpe_vocab_size=int(bpe_vocab_size), eos_token=eos_token or tok_lib.BPE_EOS)
  else:
    tok = tok_lib.load_tokenizer(tokenizer, eos_token=eos_token)
    if isinstance(tok, tok_lib.HFTokenizer):
      # The file's content, not where it lies, decides the tokens.
      recipe.update(tokenizer=tok.kind, eos_token=tok.eos_token, tokenizer_sha256=_sha256(tok.path))
  return json.loads(json.dumps(recipe)), tok


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest little-endian unsigned integer that holds every id."""
  return np.dtype("u1" if vocab_size <= 2**8 else "<u2" if vocab_size <= 2**16 else "<u4")


def _existing_dataset(out_dir: pathlib.Path, recipe: dict) -> dict | None:
  """A finished dataset at `out_dir` made by `recipe`; None when `out_dir` is new, empty or
  a preparation of the same recipe in progress. Anything else is refused."""
  if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
    return None
  if (out_dir / data.METADATA).exists():
    found = data.dataset_info(out_dir)
  elif (out_dir / data.MANIFEST).exists():
    found = json.loads((out_dir / data.MANIFEST).read_text())
  else:
    raise ValueError(
        f"data.path={str(out_dir)!r} exists and is not a prepared dataset; choose an empty or "
        "new data.path")
  had = found.get("recipe", {})
  if "source_stats" not in had or not (out_dir / data.METADATA).exists():
    # Prepared before source files were checked, or still in progress (a unit's key holds its
    # file's size and time, so the units of a changed file are redone).
    recipe, had = _without_stats(recipe), _without_stats(had)
  if found.get("format") not in data.FORMATS or had != recipe:
    changed = sorted(k for k in set(recipe) | set(had) if recipe.get(k) != had.get(k))
    if changed == ["source_stats"]:
      raise ValueError(
          f"data.path={str(out_dir)!r} was prepared from source files that have changed since "
          "(size or modification time); prepare into a new data.path, or delete this one to "
          "prepare it again")
    raise ValueError(
        f"data.path={str(out_dir)!r} holds a dataset prepared differently (differs in "
        f"{changed or ['format']}); choose another data.path or delete it")
  return found if (out_dir / data.METADATA).exists() else None


def _without_stats(recipe: dict) -> dict:
  return {k: v for k, v in recipe.items() if k != "source_stats"}


def _write_json(path: pathlib.Path, obj: Any) -> None:
  """Atomic write under a name no other process uses (jobs may share the directory)."""
  tmp = io.temporary_name(path)
  tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
  os.replace(tmp, path)


def _write_manifest(out_dir: pathlib.Path, recipe: dict, plan: Sequence[sources.Unit],
                    records: dict[str, dict]) -> None:
  """manifest.json: the recipe, the units in order, and the records of the finished ones."""
  units = [dict(key=u.key, file=u.path, start=u.start, end=u.end) for u in plan]
  _write_json(out_dir / data.MANIFEST, dict(
      format=data.FORMAT, recipe=recipe, units=units,
      finished={u.key: records[u.key] for u in plan if u.key in records}))


def _install_tokenizer(out_dir: pathlib.Path, tok: tok_lib.Tokenizer | None, recipe: dict,
                       plan: Sequence[sources.Unit], part: tuple[int, int],
                       wait_s: float) -> tok_lib.Tokenizer:
  """Puts the tokenizer beside the shards; a BPE is trained by partition 0, the others wait."""
  target = out_dir / tok_lib.TOKENIZER_FILE
  if isinstance(tok, tok_lib.HFTokenizer):
    if not target.exists():
      tmp = io.temporary_name(target)
      shutil.copyfile(tok.path, tmp)
      os.replace(tmp, target)
    return tok
  if tok is not None:
    return tok
  if part[0] == 0:
    _train_bpe_once(target, plan, recipe)
  else:
    _wait_for_bpe(target, wait_s)
  bpe = tok_lib.load_tokenizer(str(target), eos_token=recipe["eos_token"])
  bpe.kind = "bpe"
  return bpe


def _train_bpe_once(target: pathlib.Path, plan: Sequence[sources.Unit], recipe: dict) -> None:
  """Partition 0 trains the BPE into `target`, holding a flock on `.<target>.lock` meanwhile, so a
  waiting partition can tell a partition 0 that is training from one that died. The lock file is
  made fresh, locked, then moved into place: it is never seen unlocked while training."""
  if target.exists():
    return
  lock = target.with_name(f".{target.name}.lock")
  tmp = io.temporary_name(lock)
  fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.replace(tmp, lock)
    start = time.time()
    logging.info("data: training a byte-level BPE (vocab %d) on the train split",
                 recipe["bpe_vocab_size"])
    bpe = tok_lib.train_bpe(_train_texts(plan, recipe), recipe["bpe_vocab_size"],
                            recipe["eos_token"])
    out = io.temporary_name(target)
    bpe.hf.save(str(out))
    os.replace(out, target)
    logging.info("data: BPE trained in %.1fs, vocab %d", time.time() - start, bpe.vocab_size)
  finally:
    os.close(fd)


def _wait_for_bpe(target: pathlib.Path, wait_s: float) -> None:
  """Waits for partition 0's BPE; an io.ReportedError when partition 0 stopped without writing it
  (its lock exists but is free) or after `wait_s` seconds."""
  lock, end = target.with_name(f".{target.name}.lock"), time.monotonic() + wait_s
  if not target.exists():
    logging.info("data: waiting for partition 0 to train the BPE into %s", target)
  while not target.exists():
    if _lock_is_free(lock) and not target.exists():
      raise io.ReportedError(f"partition 0 stopped before it wrote the BPE to {target}; run "
                             "partition 0 (data.partition=0/n) again, then this one")
    if time.monotonic() > end:
      raise io.ReportedError(f"waited {wait_s:g}s for partition 0 to write the BPE to {target}; "
                             "start partition 0 (data.partition=0/n), or raise data.wait_s if it "
                             "is still training")
    time.sleep(_WAIT_FOR_TOKENIZER_S)


def _lock_is_free(path: pathlib.Path) -> bool:
  """True when the file at `path` exists and no process holds a flock on it."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  else:  # Free, unless a newly locked file replaced the one opened here.
    try:
      return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      return False
  finally:
    os.close(fd)


def _train_texts(plan: Iterable[sources.Unit], recipe: dict) -> Iterable[str]:
  for unit in plan:
    for key, text in sources.unit_documents(unit, recipe["text_field"], recipe["text_docs"]):
      if not sources.is_held_out(recipe["seed"], key, recipe["eval_fraction"]):
        yield text


# ------------------------------------------------------------------------------------------------
# Units of work


def _shard_path(out_dir: pathlib.Path | str, key: str, split: str) -> pathlib.Path:
  return pathlib.Path(out_dir) / data.SHARDS_DIR / f"{key}.{split}.bin"


def _record_path(out_dir: pathlib.Path | str, key: str) -> pathlib.Path:
  return pathlib.Path(out_dir) / data.SHARDS_DIR / f"{key}.json"


class _ShardWriter:
  """Appends documents (each followed by EOS) to a temporary shard, hashing as it goes."""

  def __init__(self, path: pathlib.Path, dtype: np.dtype, eos_id: int):
    self.path, self.dtype = path, dtype
    self.tmp = io.temporary_name(path)
    self._eos = np.asarray([eos_id], dtype)
    self._file = open(self.tmp, "wb")
    self._hash = hashlib.sha256()
    self.tokens = self.docs = self.last_doc = 0

  def write(self, ids: list[np.ndarray]) -> None:
    if not ids:
      return
    block = np.concatenate([p for a in ids for p in (a.astype(self.dtype, copy=False), self._eos)])
    data_bytes = block.tobytes()
    self._file.write(data_bytes)
    self._hash.update(data_bytes)
    self.tokens += block.size
    self.docs += len(ids)
    self.last_doc = ids[-1].size + 1

  def commit(self) -> str:
    """Makes the shard durable under its final name; returns its SHA-256."""
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    os.replace(self.tmp, self.path)
    return self._hash.hexdigest()

  def discard(self) -> None:
    if not self._file.closed:
      self._file.close()
    self.tmp.unlink(missing_ok=True)


_TOKENIZERS: dict[tuple[str | None, str], tok_lib.Tokenizer] = {}


def _worker_tokenizer(s: Tokenization) -> tok_lib.Tokenizer:
  """The tokenizer, loaded once per process."""
  spec = (s.tokenizer_file, s.eos_token)
  if spec not in _TOKENIZERS:
    _TOKENIZERS[spec] = tok_lib.load_tokenizer(s.tokenizer_file or "byte", eos_token=s.eos_token)
  return _TOKENIZERS[spec]


def tokenize_unit(s: Tokenization, unit: sources.Unit) -> dict[str, Any]:
  """Tokenizes one unit into its shards and record; returns the record.

  A thread encodes each batch while this one reads the next and turns the previous into ids
  and writes them (the tokenizers library releases the interpreter lock while it encodes).
  """
  start = time.time()
  tok = _worker_tokenizer(s)
  writers = {split: _ShardWriter(_shard_path(s.out_dir, unit.key, split), np.dtype(s.dtype),
                                 tok.eos_id) for split in data.SPLITS}
  last_split = None
  try:
    with concurrent.futures.ThreadPoolExecutor(1) as encoder:
      encoding = None
      for texts, last in _batches(s, unit):
        following = encoder.submit(_encode, tok, texts)
        if encoding is not None:
          _write(encoding.result(), writers)
        encoding, last_split = following, last or last_split
      if encoding is not None:
        _write(encoding.result(), writers)
    sha = {split: w.commit() for split, w in writers.items()}
  finally:
    for w in writers.values():
      w.discard()
  record = dict(
      key=unit.key, index=unit.index, tokens={k: w.tokens for k, w in writers.items()},
      docs={k: w.docs for k, w in writers.items()}, sha256=sha,
      last_doc=None if last_split is None else dict(
          split=last_split, tokens=writers[last_split].last_doc),
      seconds=round(time.time() - start, 3))
  _write_json(_record_path(s.out_dir, unit.key), record)
  return record


def _batches(s: Tokenization,
             unit: sources.Unit) -> Iterator[tuple[dict[str, list[str]], str | None]]:
  """The unit's documents by split in batches of about `_CHUNK_CHARS` characters, each with the
  split of its last document."""
  texts: dict[str, list[str]] = {split: [] for split in data.SPLITS}
  last, chars = None, 0
  for key, text in sources.unit_documents(unit, s.text_field, s.text_docs):
    last = "eval" if sources.is_held_out(s.seed, key, s.eval_fraction) else "train"
    texts[last].append(text)
    chars += len(text)
    if chars >= _CHUNK_CHARS:
      yield texts, last
      texts, last, chars = {split: [] for split in data.SPLITS}, None, 0
  yield texts, last


def _encode(tok: tok_lib.Tokenizer,
            texts: dict[str, list[str]]) -> dict[str, Callable[[], list[np.ndarray]]]:
  """Encodes a batch; the ids come from the returned functions, which need the interpreter lock
  and so run in the writing thread, beside the next batch's encoding."""
  return {split: tok.encode_batch_deferred(batch) for split, batch in texts.items() if batch}


def _write(ids: dict[str, Callable[[], list[np.ndarray]]],
           writers: dict[str, _ShardWriter]) -> None:
  for split, batch in ids.items():
    writers[split].write(batch())


def _prepare_share(s: Tokenization, recipe: dict, plan: Sequence[sources.Unit],
                   part: tuple[int, int], workers: int) -> None:
  """Tokenizes this job's unfinished units, `workers` at a time, logging progress."""
  out_dir = pathlib.Path(s.out_dir)
  mine = [u for u in plan if u.index % part[1] == part[0]]
  _remove_leftovers(out_dir, {u.key for u in mine})
  records = _finished(out_dir, plan, s.dtype)
  todo = [u for u in mine if u.key not in records]
  logging.info("data: %d units, %d in partition %d/%d: %d finished before, %d to do with %d "
               "worker(s)", len(plan), len(mine), *part, len(mine) - len(todo), len(todo),
               workers)
  progress = _Progress(len(plan), len(records), sum(u.size for u in todo))
  last_manifest = time.time()
  try:
    for unit, record in _run(s, todo, workers):
      records[unit.key] = record
      progress.add(unit, record)
      if time.time() - last_manifest >= _LOG_EVERY_S:
        _write_manifest(out_dir, recipe, plan, records)
        last_manifest = time.time()
  except BaseException:
    if part[1] == 1 and not _finished(out_dir, plan, s.dtype):
      shutil.rmtree(out_dir, ignore_errors=True)  # Nothing worth keeping.
    raise
  progress.log()


def _run(s: Tokenization, todo: Sequence[sources.Unit],
         workers: int) -> Iterable[tuple[sources.Unit, dict[str, Any]]]:
  """(unit, record) as units finish: in this process, or in a pool of spawned workers."""
  if workers == 1 or len(todo) <= 1:
    for unit in todo:
      yield unit, tokenize_unit(s, unit)
    return
  # The tokenizers library encodes a batch on every core; share the cores among the workers.
  threads = max(1, (os.cpu_count() or 1) // workers)
  pool = concurrent.futures.ProcessPoolExecutor(
      min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker, initargs=(threads,))
  try:
    futures = {pool.submit(tokenize_unit, s, unit): unit for unit in todo}
    for future in concurrent.futures.as_completed(futures):
      yield futures[future], future.result()
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _init_worker(threads: int) -> None:
  os.environ["RAYON_NUM_THREADS"] = str(threads)  # Read when the library first encodes.


class _Progress:
  """Units and tokens done, rate and ETA (from input bytes), logged every `_LOG_EVERY_S`."""

  def __init__(self, units: int, done: int, todo_bytes: int):
    self.units, self.done, self.todo_bytes = units, done, todo_bytes
    self.bytes = self.tokens = 0
    self.start = self.last = time.time()

  def add(self, unit: sources.Unit, record: dict[str, Any]) -> None:
    self.done += 1
    self.bytes += unit.size
    self.tokens += sum(record["tokens"].values())
    if time.time() - self.last >= _LOG_EVERY_S:
      self.log()

  def log(self) -> None:
    self.last = time.time()
    elapsed = max(self.last - self.start, 1e-9)
    left = (self.todo_bytes - self.bytes) * elapsed / self.bytes if self.bytes else float("nan")
    eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left == left else "unknown"
    logging.info("data: %d/%d units, %.1fM tokens in %.0fs (%.2fM tokens/s), ETA %s",
                 self.done, self.units, self.tokens / 1e6, elapsed, self.tokens / 1e6 / elapsed,
                 eta)


def _finished(out_dir: pathlib.Path, plan: Sequence[sources.Unit],
              dtype: str) -> dict[str, dict[str, Any]]:
  """Records of the planned units whose shards are in place with the recorded sizes."""
  itemsize = np.dtype(dtype).itemsize
  records = {}
  for unit in plan:
    try:
      record = json.loads(_record_path(out_dir, unit.key).read_text())
      sizes = [_shard_path(out_dir, unit.key, split).stat().st_size for split in data.SPLITS]
    except (OSError, json.JSONDecodeError):
      continue
    if sizes == [record["tokens"][split] * itemsize for split in data.SPLITS]:
      records[unit.key] = record
  return records


def _remove_leftovers(out_dir: pathlib.Path, keys: set[str], root: bool = False) -> None:
  """Deletes temporary files of dead attempts at the units `keys` (`root`: every leftover).

  Jobs sharing `out_dir` only touch their own units' files, which no live job writes.
  """
  removed = 0
  for path in (out_dir / data.SHARDS_DIR).glob(".*.tmp-*"):
    if root or path.name[1:].split(".")[0] in keys:
      path.unlink(missing_ok=True)
      removed += 1
  if root:
    for path in out_dir.glob(".*.tmp-*"):
      path.unlink(missing_ok=True)
      removed += 1
    # Temporary folders of the single-file format's preparation.
    for path in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
      shutil.rmtree(path, ignore_errors=True)
      removed += 1
  if removed:
    logging.info("data: removed %d temporary files of earlier, interrupted runs", removed)


# ------------------------------------------------------------------------------------------------
# The final step


def _finalize(out_dir: pathlib.Path, recipe: dict, plan: Sequence[sources.Unit],
              records: dict[str, dict], info: dict[str, Any]) -> dict[str, Any]:
  """Checks the counts, writes the manifest and then metadata.json; removes stale files."""
  index: dict[str, list[list]] = {split: [] for split in data.SPLITS}
  for unit in plan:
    for split in data.SPLITS:
      if records[unit.key]["tokens"][split]:
        index[split].append([f"{data.SHARDS_DIR}/{unit.key}.{split}.bin", 0,
                             records[unit.key]["tokens"][split]])
  docs = {split: sum(r["docs"][split] for r in records.values()) for split in data.SPLITS}
  if recipe["eval_fraction"] > 0 and not docs["eval"] and docs["train"] > 1:
    # So that small corpora still get a held-out split, the last document goes to eval.
    last = next(records[u.key] for u in reversed(plan) if records[u.key]["docs"]["train"])
    file, start, count = index["train"][-1]
    moved = last["last_doc"]["tokens"]
    index["train"][-1][2] -= moved
    index["eval"].append([file, start + count - moved, moved])
    index["train"] = [part for part in index["train"] if part[2]]
    docs = dict(train=docs["train"] - 1, eval=1)
  try:
    _check_counts(docs, recipe["eval_fraction"])
  except ValueError:
    shutil.rmtree(out_dir, ignore_errors=True)  # A recipe that cannot work: nothing to keep.
    raise
  tokens = {split: sum(part[2] for part in index[split]) for split in data.SPLITS}
  content = {"recipe": recipe, "shards": index,
             "sha256": [records[u.key].get("sha256") for u in plan]}
  metadata = dict(
      format=data.FORMAT, recipe=recipe, fingerprint=io.digest(content), **info, tokens=tokens,
      docs=docs, shards=index,
      units=len(plan), seconds=round(sum(r["seconds"] for r in records.values()), 3),
      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      code_revision=io.code_revision())
  _write_manifest(out_dir, recipe, plan, records)
  _write_json(out_dir / data.METADATA, metadata)
  _remove_stale(out_dir, {u.key for u in plan})
  logging.info("data: wrote %s: %d train / %d eval documents, %d / %d tokens, vocab %d, %d units",
               out_dir, docs["train"], docs["eval"], tokens["train"], tokens["eval"],
               info["vocab_size"], len(plan))
  return dict(metadata, path=str(out_dir))


def _check_counts(docs: dict[str, int], eval_fraction: float) -> None:
  if not docs["train"] and not docs["eval"]:
    raise ValueError("data.source holds no documents (every file or text field is empty)")
  if not docs["train"]:
    raise ValueError(
        f"every document went to eval; lower data.eval_fraction={eval_fraction}")
  if eval_fraction > 0 and not docs["eval"]:
    raise ValueError(
        "data.source holds a single document, so none can be held out: split files into "
        "documents (data.text_docs='paragraph' or 'line') or set data.eval_fraction=0")


def _remove_stale(out_dir: pathlib.Path, keys: set[str]) -> None:
  """Deletes shards and records of units no longer planned (a source file changed) and any
  temporary file left (every unit is finished, so no job is writing)."""
  for path in (out_dir / data.SHARDS_DIR).iterdir():
    name = path.name[1:] if path.name.startswith(".") else path.name
    if path.name.startswith(".") or name.split(".")[0] not in keys:
      path.unlink(missing_ok=True)


def run_prepare_data(config: Any, workdir: pathlib.Path) -> None:
  """`--mode=prepare_data`: tokenizes `data.source` into `data.path` (default workdir/data)."""
  d = settings.DataConfig.from_config(config)
  path = data.data_path(config, workdir)
  if not d.source.strip() and (path / data.METADATA).exists():
    info = data.dataset_info(path)
    logging.info("data: data.source is empty; using the dataset already at %s", path)
  else:
    info = prepare(d.source, path, d.tokenizer, text_field=d.text_field,
                   eval_fraction=d.eval_fraction, bpe_vocab_size=d.bpe_vocab_size,
                   text_docs=d.text_docs, eos_token=d.eos_token, workers=d.workers,
                   partition=d.partition, wait_s=d.wait_s)
  if info is not None and info["vocab_size"] > config.model.vocab_size:
    logging.warning("data: the tokenizer has %d ids but model.vocab_size=%d; training will refuse",
                    info["vocab_size"], config.model.vocab_size)
