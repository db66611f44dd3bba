"""atomic: artifacts get the modes the umask gives, not those of their temporary names."""
import os
import stat

import pytest

from rallrec_jax import atomic


@pytest.fixture
def umask():
  """os.umask, with the process's own umask put back after the test."""
  old = os.umask(0o022)
  yield os.umask
  os.umask(old)


def _mode(path):
  return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, file_mode, dir_mode",
                         [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)],
                         ids=["umask022", "umask077", "umask002"])
def test_modes_follow_the_umask(tmp_path, umask, mask, file_mode, dir_mode):
  umask(mask)
  atomic.write_text(tmp_path / "a.txt", "x")
  with atomic.open_file(tmp_path / "b.bin") as f:
    f.write(b"x")
  with atomic.directory(tmp_path / "d") as d:
    (d / "inner.txt").write_text("x")
  assert _mode(tmp_path / "a.txt") == file_mode
  assert _mode(tmp_path / "b.bin") == file_mode
  assert _mode(tmp_path / "d") == dir_mode
  assert (tmp_path / "d" / "inner.txt").read_text() == "x"


def test_umask_without_proc_falls_back_to_os_umask(umask, monkeypatch):
  def no_proc(*args, **kwargs):
    raise OSError("no /proc")

  umask(0o027)
  monkeypatch.setattr(atomic, "open", no_proc, raising=False)
  assert atomic._umask() == 0o027
  assert os.umask(0o027) == 0o027
