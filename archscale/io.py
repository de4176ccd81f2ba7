"""Small, safe file helpers shared by every stage: atomic JSON, append-only JSONL, provenance."""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

PathLike = str | os.PathLike

# URI scheme -> the modules that let etils.epath read and write it (any one suffices).
URI_BACKENDS = {"gs": ("gcsfs", "tensorflow"), "s3": ("s3fs", "tensorflow"), "az": ("adlfs",),
                "hf": ("huggingface_hub",)}
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_MANGLED_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/(?!/)")


def is_uri(path: Any) -> bool:
  """Whether `path` names remote storage (gs://bucket/x), not a local file."""
  return bool(_URI.match(str(path))) and not str(path).startswith("file://")


def as_path(path: Any, field: str) -> Any:
  """A workdir, data or results location as a path object; `field` names it in errors.

  Local paths (and file://) become pathlib.Path. A URI becomes an `etils.epath.Path` when the
  backend for its scheme is installed, and otherwise raises ValueError naming the field before
  any work starts. A URI is never turned into a local folder: pathlib would collapse "gs://b/x"
  into a directory "gs:" holding "b/x", so such a collapsed path is refused as well.
  """
  text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
  match = _URI.match(text)
  if match is None:
    mangled = _MANGLED_URI.match(text)
    if mangled and mangled.group(1).lower() in URI_BACKENDS:
      raise ValueError(f"{field}={text} looks like a {mangled.group(1)}:// URI that lost a slash "
                       f"(a local folder named '{mangled.group(1)}:' would be made); write "
                       f"{mangled.group(1)}://{text[len(mangled.group(0)):]}")
    return pathlib.Path(text)
  scheme = match.group(1).lower()
  if scheme == "file":
    return pathlib.Path(text[len("file://"):])
  modules = URI_BACKENDS.get(scheme)
  if modules is None:
    raise ValueError(f"{field}={text}: {scheme}:// storage is not supported; use a local path or "
                     f"one of {', '.join(s + '://' for s in URI_BACKENDS)}")
  if not any(importlib.util.find_spec(m) for m in modules):
    raise ValueError(f"{field}={text}: writing to {scheme}:// needs {' or '.join(modules)} "
                     f"installed here (pip install {modules[0]}), or use a local path")
  from etils import epath  # Imported lazily: it pulls in fsspec machinery.

  return epath.Path(text)


def local_only(path: Any, field: str, why: str) -> pathlib.Path:
  """`path` as a local pathlib.Path; a URI raises ValueError saying why it must be local."""
  path = as_path(path, field)
  if not isinstance(path, pathlib.Path):
    raise ValueError(f"{field}={path}: {why}; use a local (or mounted, e.g. gcsfuse) path")
  return path


def make_dir(path: PathLike, field: str) -> Any:
  """`path` as an existing directory (created if missing); `field` names it in the error."""
  path = as_path(path, field)
  if path.exists() and not path.is_dir():
    raise ValueError(f"{field}={path} is a file, not a directory; choose another {field}")
  path.mkdir(parents=True, exist_ok=True)
  return path


def write_json_atomic(path: PathLike, obj: Any, indent: int = 2) -> None:
  """Writes JSON to a temporary file and renames it over `path`: readers never see half a file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=indent, default=_json_default)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_text_atomic(path: PathLike, text: str) -> None:
  """Atomically replaces `path` with `text`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
  tmp.write_text(text, encoding="utf-8")
  os.replace(tmp, path)


def append_jsonl(path: PathLike, row: dict[str, Any]) -> None:
  """Appends one row as a single write under an exclusive lock.

  Concurrent writers never interleave, and a crash can at worst leave a torn final line, which
  `read_jsonl` skips; rows already in the file are never touched.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  line = (json.dumps(row, default=_json_default) + "\n").encode("utf-8")
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    # A torn last line from an earlier crash must not swallow this row: start on a fresh line.
    size = os.fstat(fd).st_size
    if size:
      with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) != b"\n":
          line = b"\n" + line
    os.write(fd, line)
    os.fsync(fd)
  finally:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def read_jsonl(path: PathLike) -> Iterator[dict[str, Any]]:
  """Yields the well-formed rows of a JSONL file, skipping blank or torn lines."""
  path = as_path(path, "results table")
  if not path.exists():
    return
  with path.open(encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict):
        yield row


class ReportedError(RuntimeError):
  """A failure whose message says all a user needs: the command line prints it in one line."""


def root_cause(error: BaseException) -> BaseException:
  """The innermost OSError behind `error` (a full disk, a permission), else `error` itself."""
  seen, e = set(), error
  while e is not None and id(e) not in seen:
    if isinstance(e, OSError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return error


def describe_error(error: BaseException) -> str:
  """One line: the root cause's message and the file it concerns."""
  cause = root_cause(error)
  if isinstance(cause, OSError) and cause.strerror:
    where = f" ({cause.filename})" if cause.filename else ""
    return f"{cause.strerror}{where}"
  text = str(cause).strip()
  return f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"


def one_line_error(error: BaseException) -> str | None:
  """The one-line report of a ReportedError or an I/O failure; None for anything else."""
  if isinstance(error, ReportedError):
    return str(error)
  return describe_error(error) if isinstance(root_cause(error), OSError) else None


class WorkdirBusy(ReportedError):
  """Another live process trains in this directory."""


class WorkdirLock:
  """Held by a trainer for its whole life: an exclusive `flock` on `workdir/.lock`.

  The holder's pid, host and command are written inside, so a second trainer stops at once naming
  it; the kernel drops the lock when its holder dies, so a killed trainer never blocks a rerun.
  """

  NAME = ".lock"

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / self.NAME
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirBusy naming its holder."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirBusy(f"{self.path.parent} is in use by {self.holder()}; wait for it to "
                        "finish or stop it, or train in another --workdir") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
              "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    self._fd = fd

  def holder(self) -> str:
    """The recorded holder, as text."""
    try:
      h = json.loads(self.path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
      h = {}
    return (f"pid {h.get('pid', '?')} on {h.get('host', '?')} (since {h.get('since', '?')}: "
            f"{' '.join(h.get('argv', [])) or '?'})")

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def code_revision() -> str | None:
  """The git commit of the archscale checkout (with `+dirty` when modified), or None."""
  root = pathlib.Path(__file__).resolve().parent.parent
  try:
    rev = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
        timeout=5, check=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
        text=True, timeout=5, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return rev + ("+dirty" if dirty else "")


def provenance(config: Any = None) -> dict[str, Any]:
  """Where a result came from: code revision, host, device, time and (optionally) the config."""
  import jax  # Imported lazily: provenance is also written by jax-free tools.

  devices = jax.devices()
  out = {
      "code_revision": code_revision(),
      "host": socket.gethostname(),
      "device_kind": devices[0].device_kind,
      "platform": devices[0].platform,
      "device_count": jax.device_count(),
      "process_count": jax.process_count(),
      "jax_version": jax.__version__,
      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
  }
  if config is not None:
    out["config"] = config.to_dict() if hasattr(config, "to_dict") else config
  return out


def _json_default(obj: Any) -> Any:
  if hasattr(obj, "tolist"):
    return obj.tolist()
  if isinstance(obj, pathlib.Path):
    return str(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
