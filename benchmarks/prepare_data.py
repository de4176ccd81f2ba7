"""Data preparation throughput: `prepare` against the `tokenizers` library's own batch encoding.

Builds a JSONL corpus (one document per Python standard-library source file, cycled up to
`--mb` megabytes, split into `--files` files so there are units to share), trains a byte-level
BPE on its first megabytes, then in the same process times
  - reference: `tokenizers.Tokenizer.encode_batch_fast` over every document, already in memory
    (no reading, no parsing, no writing), in batches of about `prepare._CHUNK_CHARS` characters;
  - prepare: `archscale.data.prepare.prepare` from the JSONL files to a finished dataset (reading,
    JSON parsing, held-out split, tokenizing, writing, checksums, final step), for each count of
    `--workers`.
Prints one JSON object with tokens/s of each and the ratios prepare / reference (1 worker) and
2 workers / 1 worker. Runs are interleaved and each figure is the best of `--repeats` by wall
time; CPU seconds (this process and its workers) are reported too, since on a shared machine they
measure the work done more steadily than the clock.

  python benchmarks/prepare_data.py --mb=50
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from archscale.data import prepare, tokenizer  # noqa: E402

_MB = flags.DEFINE_float("mb", 50.0, "Corpus size in megabytes of document text.")
_FILES = flags.DEFINE_integer("files", 8, "JSONL files the corpus is split into.")
_VOCAB = flags.DEFINE_integer("vocab", 8192, "BPE vocabulary size.")
_TRAIN_MB = flags.DEFINE_float("train_mb", 4.0, "Megabytes of text the BPE is trained on.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"], "data.workers settings to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs of each; the fastest is reported.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")


def _documents() -> Iterator[str]:
  """Standard-library source files, sorted, cycled forever."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.glob("**/*.py")
                 if "site-packages" not in p.parts and "test" not in p.parts)
  while True:
    for path in files:
      try:
        text = path.read_text(encoding="utf-8")
      except (UnicodeDecodeError, OSError):
        continue
      if text.strip():
        yield text


def _write_corpus(root: pathlib.Path, mb: float, n_files: int) -> list[str]:
  """The corpus as JSONL files; returns the documents (for the reference run)."""
  texts, size = [], 0
  for text in _documents():
    if size >= mb * 1e6:
      break
    texts.append(text)
    size += len(text.encode())
  per_file = -(-len(texts) // n_files)
  for i in range(n_files):
    with open(root / f"part{i:02d}.jsonl", "w", encoding="utf-8") as f:
      for text in texts[i * per_file:(i + 1) * per_file]:
        f.write(json.dumps({"text": text}) + "\n")
  return texts


def _reference(tok: tokenizer.HFTokenizer, texts: list[str]) -> tuple[int, float, float]:
  """Tokens (with one EOS per document, as prepare counts), seconds and CPU seconds of plain
  batch encoding."""
  encode = tok.hf.encode_batch_fast
  start, cpu, tokens, batch, chars = time.perf_counter(), _cpu_seconds(), 0, [], 0
  for text in texts + [None]:
    if text is not None:
      batch.append(text)
      chars += len(text)
    if batch and (text is None or chars >= prepare._CHUNK_CHARS):
      tokens += sum(len(e.ids) + 1 for e in encode(batch, add_special_tokens=False))
      batch, chars = [], 0
  return tokens, time.perf_counter() - start, _cpu_seconds() - cpu


def _cpu_seconds() -> float:
  """CPU time of this process and its finished children: the work done, whatever the load."""
  own, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _time_prepare(corpus: pathlib.Path, tok_file: pathlib.Path, workers: int,
                  scratch: pathlib.Path) -> tuple[int, float, float]:
  out = scratch / f"prepared-{workers}"
  start, cpu = time.perf_counter(), _cpu_seconds()
  info = prepare.prepare(str(corpus), out, str(tok_file), eval_fraction=0.01, workers=workers)
  seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
  shutil.rmtree(out)
  return info["tokens"]["train"] + info["tokens"]["eval"], seconds, cpu


def main(argv: list[str]) -> None:
  del argv
  scratch = pathlib.Path(tempfile.mkdtemp(prefix="prepare_bench-"))
  try:
    corpus = scratch / "corpus"
    corpus.mkdir()
    texts = _write_corpus(corpus, _MB.value, _FILES.value)
    mb = sum(f.stat().st_size for f in corpus.iterdir()) / 1e6
    train_texts, size = [], 0
    for text in texts:
      if size >= _TRAIN_MB.value * 1e6:
        break
      train_texts.append(text)
      size += len(text)
    tok = tokenizer.train_bpe(train_texts, _VOCAB.value, tokenizer.BPE_EOS)
    tok_file = scratch / "tokenizer.json"
    tok.hf.save(str(tok_file))
    tok = tokenizer.load_tokenizer(str(tok_file))

    # Interleaved, so that load from other processes falls on every contender alike.
    refs, timed = [], {int(w): [] for w in _WORKERS.value}
    for _ in range(_REPEATS.value):
      refs.append(_reference(tok, texts))
      for workers, results in timed.items():
        results.append(_time_prepare(corpus, tok_file, workers, scratch))
    ref = min(refs, key=lambda r: r[1])
    runs = {w: min(results, key=lambda r: r[1]) for w, results in timed.items()}
  finally:
    shutil.rmtree(scratch, ignore_errors=True)

  result = dict(
      corpus_mb=round(mb, 1), files=_FILES.value, documents=len(texts),
      tokenizer=dict(kind="bpe", vocab_size=tok.vocab_size), cpu_count=os.cpu_count(),
      reference=dict(tokens=ref[0], seconds=round(ref[1], 3), cpu_seconds=round(ref[2], 3),
                     tokens_per_s=round(ref[0] / ref[1])),
      prepare={str(w): dict(tokens=t, seconds=round(s, 3), cpu_seconds=round(c, 3),
                            tokens_per_s=round(t / s))
               for w, (t, s, c) in runs.items()})
  if 1 in runs:
    if runs[1][0] != ref[0]:
      raise RuntimeError(f"prepare wrote {runs[1][0]} tokens, the reference counted {ref[0]}")
    result["ratio_prepare_1_worker_vs_reference"] = round(ref[1] / runs[1][1], 3)
  if 1 in runs and 2 in runs:
    result["ratio_2_workers_vs_1"] = round(runs[1][1] / runs[2][1], 3)
  text = json.dumps(result, indent=1)
  print(text)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(text + "\n")


if __name__ == "__main__":
  app.run(main)
