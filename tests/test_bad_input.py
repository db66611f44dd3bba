"""Bad input stops the run with an error naming the file and line, and loses nothing written."""
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from rallrec_jax import data
from rallrec_jax.data import schema
from tests.conftest import REPO
from tests.test_movielens import data_config, random_ratings, write_ml1m


def _replace_line(path, lineno, text):
  lines = path.read_bytes().split(b"\n")
  lines[lineno - 1] = text
  path.write_bytes(b"\n".join(lines))


CASES = {
    "wrong delimiter": (lambda f: (f / "ratings.dat").write_bytes(
        (f / "ratings.dat").read_bytes().replace(b"::", b"\t")),
                        r"ratings.dat:1: expected 4 fields .* separated by '::', found 1"),
    "wrong column count": (lambda f: _replace_line(f / "ratings.dat", 5, b"1::2::3"),
                           r"ratings.dat:5: expected 4 fields"),
    "non-numeric rating": (lambda f: _replace_line(f / "ratings.dat", 4, b"1::2::four::978300000"),
                           r"ratings.dat:4: rating is not an integer: 'four'"),
    "non-numeric timestamp": (lambda f: _replace_line(f / "ratings.dat", 6, b"1::2::4::yesterday"),
                              r"ratings.dat:6: timestamp is not an integer"),
    "fractional id": (lambda f: _replace_line(f / "ratings.dat", 3, b"1.5::2::4::978300000"),
                      r"ratings.dat:3: user is not an integer"),
    "unknown item": (lambda f: _replace_line(f / "ratings.dat", 2, b"1::77::4::978300000"),
                     r"ratings.dat:2: rating names unknown item 77"),
    "unknown user": (lambda f: _replace_line(f / "ratings.dat", 9, b"42::1::4::978300000"),
                     r"ratings.dat:9: rating names unknown user 42"),
    "empty ratings": (lambda f: (f / "ratings.dat").write_bytes(b""),
                      r"ratings.dat: file is empty"),
    "empty movies": (lambda f: (f / "movies.dat").write_bytes(b"\n"), r"movies.dat: file is empty"),
    "missing file": (lambda f: (f / "users.dat").unlink(), r"users.dat: missing file 'users.dat'"),
    "non-ascii byte in ratings": (lambda f: _replace_line(f / "ratings.dat", 7, b"1::2::\xe9::97830"),
                                  r"ratings.dat:7: rating is not an integer"),
    "movies field count": (lambda f: _replace_line(f / "movies.dat", 2, b"2::Heat (1995)"),
                           r"movies.dat:2: expected 3 fields separated by '::', found 2"),
    "duplicate movie": (lambda f: _replace_line(f / "movies.dat", 3, b"1::Again (1999)::Drama"),
                        r"movies.dat:3: id 1 appears twice"),
    "bad age code": (lambda f: _replace_line(f / "users.dat", 1, b"1::F::7::10::48067"),
                     r"users.dat:1: age code 7"),
}


@pytest.fixture
def ml1m_folder(tmp_path):
  return write_ml1m(tmp_path / "ml-1m", random_ratings())


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_ml1m_files_name_file_and_line(ml1m_folder, case):
  mutate, message = CASES[case]
  mutate(ml1m_folder)
  with pytest.raises(data.DataError, match=message):
    data.prepare(data_config("ml1m", ml1m_folder))


def test_undecodable_bytes_name_the_line(ml1m_folder):
  _replace_line(ml1m_folder / "movies.dat", 3, b"3::Caf\xe9 (1994)::Drama")
  assert data.prepare(data_config("ml1m", ml1m_folder)).items[2]["title"] == "Café (1994)"
  # Line 2 holds the first non-UTF-8 byte: the latin-1 "é" of "Misérables".
  with pytest.raises(data.DataError, match=r"movies.dat:2: byte b'\\xe9' is not valid utf-8"):
    data.prepare(data_config("ml1m", ml1m_folder, encoding="utf-8"))


def test_missing_folder_and_truncated_zip(tmp_path, ml1m_folder):
  with pytest.raises(data.DataError, match="nowhere: no such file or folder"):
    data.prepare(data_config("ml1m", tmp_path / "nowhere"))
  archive = tmp_path / "ml-1m.zip"
  with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as z:
    for name in ("ratings.dat", "movies.dat", "users.dat"):
      z.write(ml1m_folder / name, f"ml-1m/{name}")
  archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
  with pytest.raises(data.DataError, match="ml-1m.zip: not a readable zip archive.*truncated"):
    data.prepare(data_config("ml1m", archive))


def test_ml100k_format_errors(tmp_path, ml100k_path):
  folder = tmp_path / "ml-100k"
  folder.mkdir()
  for name in ("u.data", "u.item", "u.user"):
    (folder / name).write_bytes((ml100k_path / name).read_bytes())
  _replace_line(folder / "u.item", 10, b"10|Richard III (1995)|22-Jan-1996")
  with pytest.raises(data.DataError, match=r"u.item:10: expected 24 fields separated by '\|'"):
    data.prepare(data_config("ml100k", folder))
  (folder / "u.item").write_bytes((ml100k_path / "u.item").read_bytes())
  _replace_line(folder / "u.data", 100, b"196 242 3 881250949")
  with pytest.raises(data.DataError, match=r"u.data:100: expected 4 fields"):
    data.prepare(data_config("ml100k", folder))


def _tree(path):
  return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
          if p.is_file()}


def _run_cli(config, workdir, *extra):
  return subprocess.run([sys.executable, "-m", "rallrec_jax.main", "--config", config,
                         "--workdir", str(workdir), "--stages", "prepare", *extra], cwd=REPO, capture_output=True,
                        text=True, timeout=120)


def test_failed_prepare_keeps_the_earlier_dataset(tmp_path, ml1m_folder):
  workdir = tmp_path / "w"
  ok = _run_cli(f"configs/ml1m.py:path={ml1m_folder}", workdir)
  assert ok.returncode == 0, ok.stderr
  before = _tree(workdir)
  _replace_line(ml1m_folder / "ratings.dat", 4, b"1::2::four::978300000")
  bad = _run_cli(f"configs/ml1m.py:path={ml1m_folder}", workdir)
  assert bad.returncode == 2
  assert "ratings.dat:4: rating is not an integer" in bad.stderr
  assert "Traceback" not in bad.stderr
  after = _tree(workdir)
  assert {k: v for k, v in after.items() if k != "config.json"} == {
      k: v for k, v in before.items() if k != "config.json"}
  assert sorted(os.listdir(workdir)) == ["config.json", "data", "manifests"]


def test_crash_while_writing_leaves_no_partial_dataset(tmp_path, ml1m_folder, monkeypatch):
  cfg = data_config("ml1m", ml1m_folder)
  workdir = tmp_path / "w"
  data.save(data.prepare(cfg), workdir / "data")
  before = _tree(workdir)
  calls = []

  def failing_savez(path, **arrays):
    calls.append(path)
    if len(calls) == 3:
      raise OSError("disk full")
    np.savez(path, **arrays)

  monkeypatch.setattr(schema.np, "savez", failing_savez)
  with pytest.raises(OSError, match="disk full"):
    data.save(data.prepare(cfg), workdir / "data")
  assert len(calls) == 3 and _tree(workdir) == before and os.listdir(workdir) == ["data"]


def test_missing_raw_file_or_config_is_one_line_and_writes_nothing(tmp_path, ml1m_folder):
  workdir = tmp_path / "w"
  ok = _run_cli(f"configs/ml1m.py:path={ml1m_folder}", workdir)
  assert ok.returncode == 0, ok.stderr
  before = _tree(workdir)
  (ml1m_folder / "movies.dat").rename(tmp_path / "movies.dat")
  bad = _run_cli(f"configs/ml1m.py:path={ml1m_folder}", workdir)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith(
      f"error: {ml1m_folder / 'movies.dat'}: missing file 'movies.dat'")
  nothing = _run_cli("configs/nosuch.py", workdir)
  assert nothing.returncode == 2 and "Traceback" not in nothing.stderr
  assert "no such config file 'configs/nosuch.py'" in nothing.stderr
  assert _tree(workdir) == before  # config.json included
  fresh = _run_cli(f"configs/ml1m.py:path={ml1m_folder}", tmp_path / "fresh")
  assert fresh.returncode == 2 and not (tmp_path / "fresh").exists()
