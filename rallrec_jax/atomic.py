"""Atomic writes: readers see the old artifact or the new one, never half of one.

Artifacts get the modes an ordinary open() or mkdir() would give them under the umask, not the
private 0600 / 0700 of the temporary names they are written under.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def _umask():
  """The process umask, read from /proc where it can be, so other threads never see it changed."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  mask = os.umask(0)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def open_file(path, mode="wb"):
  """A file object on a temporary name beside `path`; renamed to `path` only on success."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
      yield f
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def write_text(path, text):
  """Write `text` to `path` through a temporary file in the same folder, then rename."""
  with open_file(path, "w") as f:
    f.write(text)


@contextlib.contextmanager
def directory(path):
  """Yield a temporary folder beside `path`; on success it replaces `path` whole.

  On any exception the temporary folder is removed and an existing `path` is left untouched.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
  try:
    tmp.chmod(0o777 & ~_umask())
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  old = None
  if path.exists():
    old = path.with_name(f".{path.name}.{os.getpid()}.old")
    os.replace(path, old)
  os.replace(tmp, path)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
