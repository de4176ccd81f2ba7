"""Small, safe file helpers shared by every stage: paths that may be URIs (gs://), atomic JSON,
append-only JSONL, workdir locks, provenance."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from absl import logging

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
  into a directory "gs:" holding "b/x", so such a collapsed path is refused as well, and so is
  one holding a control character (a newline would start a new line of an sbatch script).
  """
  text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
  if not text.isprintable():
    raise ValueError(f"{field}={text!r} holds a newline or another control character, which "
                     "would break the scripts and logs that name it; choose another path")
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
  return _remote_path(scheme, text)


def _remote_path(scheme: str, text: str) -> Any:
  """An epath.Path for a URI whose backend is installed.

  Listings are not cached: runs, sweeps and their drivers read objects that other processes
  write (attempt rows, summaries, leases), and fsspec would otherwise keep serving the listing it
  saw first.
  """
  import fsspec  # Imported lazily: they pull in fsspec machinery.
  from etils import epath

  fsspec.config.conf.setdefault(scheme, {}).setdefault("use_listings_cache", False)
  return epath.Path(text)


def local_only(path: Any, field: str, why: str) -> pathlib.Path:
  """`path` as a local pathlib.Path; a URI raises ValueError saying why it must be local."""
  path = as_path(path, field)
  if not isinstance(path, pathlib.Path):
    raise ValueError(f"{field}={path}: {why}; use a local (or mounted, e.g. gcsfuse) path")
  return path


def is_local(path: Any) -> bool:
  """Whether `path` (as `as_path` returns it) is a local file, not a remote object."""
  return isinstance(path, pathlib.Path)


def absolute(path: Any) -> Any:
  """`path` made absolute; a URI is already (epath's resolve() would make it a local folder)."""
  return path.resolve() if is_local(path) else path


def make_dir(path: PathLike, field: str) -> Any:
  """`path` as an existing directory (created if missing); `field` names it in the error."""
  path = as_path(path, field)
  if path.exists() and not path.is_dir():
    raise ValueError(f"{field}={path} is a file, not a directory; choose another {field}")
  path.mkdir(parents=True, exist_ok=True)
  return path


def write_json_atomic(path: PathLike, obj: Any, indent: int = 2) -> None:
  """Writes JSON so that readers never see half a file (see `write_text_atomic`)."""
  write_text_atomic(path, json.dumps(obj, indent=indent, default=_json_default) + "\n")


def digest(obj: Any) -> str:
  """A short content fingerprint of a JSON-able value (key order does not matter)."""
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def temporary_name(path: Any) -> Any:
  """A sibling `.<name>.tmp-<host>-<pid>-<random>` of `path`: unique across the hosts and
  processes that share a filesystem, and matched by the `.*.tmp-*` clean-ups."""
  return path.with_name(f".{path.name}.tmp-{_host_tag()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def dead_temporaries(path: Any) -> list[Any]:
  """`temporary_name`s of `path` left by processes of this host that are gone."""
  host, out = _host_tag(), []
  for tmp in path.parent.glob(f".{path.name}.tmp-{host}-*"):
    pid = tmp.name[len(f".{path.name}.tmp-{host}-"):].split("-")[0]
    if pid.isdigit() and not _alive(pid):
      out.append(tmp)
  return out


def _host_tag() -> str:
  return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:32]


def write_text_atomic(path: PathLike, text: str) -> None:
  """Replaces `path` with `text` atomically.

  A local file is written to a temporary name, synced and renamed over `path`; a remote object
  (gs://) is uploaded whole, and an object store shows either the old or the new object.
  """
  path = as_path(path, "output file")
  path.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(path):
    path.write_text(text, encoding="utf-8")
    return
  tmp = temporary_name(path)
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def append_text(path: PathLike, text: str) -> None:
  """Adds `text` at the end of `path`; a remote object (which cannot grow) is rewritten whole."""
  path = as_path(path, "output file")
  if is_local(path):
    with open(path, "a", encoding="utf-8") as f:
      f.write(text)
    return
  write_text_atomic(path, (path.read_text(encoding="utf-8") if path.exists() else "") + text)


def private_dir(name: str) -> pathlib.Path:
  """`<$XDG_RUNTIME_DIR or the temporary folder>/<name>-<uid>`: this user's own folder (mode 0700),
  created if missing. One that exists but is a link, another user's, or open to others is refused,
  since a process may execute what it finds there (configs are Python)."""
  base = pathlib.Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
  folder = base / f"{name}-{os.getuid()}"
  try:
    folder.mkdir(mode=0o700)
  except FileExistsError:
    pass
  st = os.lstat(folder)
  if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() \
      or st.st_mode & 0o077:
    raise ReportedError(
        f"{folder} is not this user's private folder (a link, another owner, or open to others: "
        f"mode {stat.S_IMODE(st.st_mode):o}); something else created it. Remove it, or set "
        "XDG_RUNTIME_DIR to a folder only you can write")
  return folder


def local_mirror(path: Any) -> pathlib.Path:
  """A local folder standing in for remote directory `path`, for files a process must read or
  write through local file APIs (a child's config file and log): the same folder every time,
  inside this user's `private_dir`."""
  key = hashlib.sha256(str(path).encode()).hexdigest()[:16]
  folder = private_dir("archscale-mirror") / f"{path.name}-{key}"
  folder.mkdir(exist_ok=True)
  return folder


def contained(base: Any, name: Any, what: str) -> Any:
  """`base / name` for a `name` read from a file someone else may have written (a dataset's shard
  index, an HF weight index). Refuses an empty or absolute name, `..`, and, for a local `base`,
  a path that resolves outside it (symlinks included); `what` names the file and field."""
  text = str(name)
  parts = pathlib.PurePosixPath(text.replace("\\", "/")).parts
  if not text.strip() or text.startswith(("/", "\\")) or ".." in parts or ":" in text.split("/")[0]:
    raise ValueError(f"{what} names {text!r}, which is not a file inside {base}: the file is "
                     "corrupt or crafted; do not use it (prepare or export it again)")
  path = base / text
  if is_local(base):
    root = pathlib.Path(base).resolve()
    if root not in pathlib.Path(path).resolve().parents:
      raise ValueError(f"{what} names {text!r}, which resolves outside {root} (a link?): the "
                       "file is corrupt or crafted; do not use it")
  return path


def append_jsonl(path: PathLike, row: dict[str, Any]) -> None:
  """Appends one row as a single write under an exclusive lock.

  Concurrent writers never interleave, and a crash can at worst leave a torn final line, which
  `read_jsonl` skips; rows already in the file are never touched.
  """
  path = local_only(path, "output file", "rows are appended under a lock")
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
  """Held by a trainer (or a sweep, on a run) for its whole life: `workdir/<name>`.

  A local directory gets an exclusive `flock`: the kernel drops it when its holder dies, so a
  killed trainer never blocks a rerun. Object stores (gs://) have no locks, so a remote directory
  gets a lease instead (`_Lease`). Either way the holder's pid, host and command are recorded,
  and a second holder stops at once naming the first.
  """

  NAME = ".lock"

  def __init__(self, workdir: Any, name: str = NAME):
    self.path = workdir / name
    self._fd: int | None = None
    self._lease = None if is_local(self.path) else _Lease(self.path)

  def acquire(self) -> None:
    """Takes the lock or raises WorkdirBusy naming its holder."""
    if self._lease is not None:
      return self._lease.acquire()
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirBusy(f"{self.path.parent} is in use by {self.holder()}; wait for it to "
                        "finish or stop it, or train in another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
    self._fd = fd

  def holder(self) -> str:
    """The recorded holder, as text."""
    return _describe_holder(_read_holder(self.path))

  def release(self) -> None:
    if self._lease is not None:
      self._lease.release()
    elif self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


class _Lease:
  """A lock on object storage: a record that its holder refreshes, and that expires.

  Acquiring reads the record. A holder that refreshed it within `LEASE_S` is live and wins, unless
  it is provably gone: a dead pid on this host, or an earlier incarnation of this SLURM job (a
  requeued job restarts only after its old processes ended). Otherwise the record is written
  with a fresh token and read back after `SETTLE_S`: of two trainers that started together, the
  one whose record was overwritten backs off. This excludes a second trainer started while one is
  running anywhere; it is not an atomic compare-and-swap, so two trainers started on different
  hosts within one request's latency of each other are not excluded. A holder that died on
  another host blocks its directory until its record is `LEASE_S` old.
  """

  LEASE_S = 300.0
  SETTLE_S = 2.0
  JOIN_S = 30.0  # release waits this long for a refresh in progress

  def __init__(self, path: Any):
    self.path = path
    self.record: dict[str, Any] | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def acquire(self) -> None:
    held = _read_holder(self.path)
    if held and not self._expired(held):
      raise WorkdirBusy(
          f"{self.path.parent} is in use by {_describe_holder(held)}, which refreshed its lease "
          f"{time.time() - held.get('heartbeat', 0):.0f}s ago; wait for it to finish or stop it "
          f"(a lease not refreshed for {self.LEASE_S:.0f}s is taken over), or train in another "
          "--workdir")
    self.record = dict(_holder_record(), token=uuid.uuid4().hex, heartbeat=time.time())
    self.path.write_text(json.dumps(self.record))
    time.sleep(self.SETTLE_S)
    now = _read_holder(self.path)
    if now.get("token") != self.record["token"]:
      self.record = None
      raise WorkdirBusy(f"{self.path.parent} was just taken by {_describe_holder(now)}; train "
                        "in another --workdir")
    self._thread = threading.Thread(target=self._refresh, daemon=True, name="lease")
    self._thread.start()

  def _expired(self, held: dict[str, Any]) -> bool:
    if time.time() - float(held.get("heartbeat", 0)) > self.LEASE_S:
      return True
    if held.get("host") == socket.gethostname() and not _alive(held.get("pid")):
      return True
    job = _slurm_incarnation()
    return bool(job and held.get("slurm_job") and held["slurm_job"][0] == job[0]
                and held["slurm_job"] != job)

  def _refresh(self) -> None:
    record = self.record
    while not self._stop.wait(self.LEASE_S / 5):
      try:
        if _read_holder(self.path).get("token") != record["token"]:
          logging.error("the lease on %s was taken over; stop this trainer", self.path.parent)
          return
        record["heartbeat"] = time.time()
        self.path.write_text(json.dumps(record))
      except Exception as e:  # noqa: BLE001 - storage errors of any client: the next refresh
        # tries again, and a lease that keeps failing expires by itself.
        logging.warning("could not refresh the lease on %s: %s", self.path.parent, e)

  def release(self) -> None:
    if self.record is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=self.JOIN_S)
      if self._thread.is_alive():  # Stuck in a storage call: leave it (a daemon) and move on.
        logging.error("the lease refresh on %s did not stop within %gs (its storage is not "
                      "answering); the lease expires by itself %.0fs after its last refresh",
                      self.path.parent, self.JOIN_S, self.LEASE_S)
        self.record = None
        return
    with contextlib.suppress(OSError):
      if _read_holder(self.path).get("token") == self.record["token"]:
        self.path.unlink()
    self.record = None


def _holder_record() -> dict[str, Any]:
  return {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv,
          "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "slurm_job": _slurm_incarnation()}


def _slurm_incarnation() -> list[str] | None:
  """[job id, restart count] of the SLURM job this process runs in, or None."""
  job = os.environ.get("SLURM_JOB_ID")
  return [job, os.environ.get("SLURM_RESTART_COUNT", "0")] if job else None


def _alive(pid: Any) -> bool:
  try:
    os.kill(int(pid), 0)
  except (ProcessLookupError, TypeError, ValueError):
    return False
  except PermissionError:  # Someone else's live process.
    return True
  return True


def _read_holder(path: Any) -> dict[str, Any]:
  try:
    record = json.loads(path.read_text() or "{}")
  except (OSError, json.JSONDecodeError):
    return {}
  return record if isinstance(record, dict) else {}


def _describe_holder(h: dict[str, Any]) -> str:
  return (f"pid {h.get('pid', '?')} on {h.get('host', '?')} (since {h.get('since', '?')}: "
          f"{' '.join(h.get('argv', [])) or '?'})")


def code_revision() -> str | None:
  """The git commit of the archscale checkout (with `+dirty` when modified), or None."""
  root = pathlib.Path(__file__).resolve().parents[2]
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
  if isinstance(obj, os.PathLike):
    return os.fspath(obj)
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
