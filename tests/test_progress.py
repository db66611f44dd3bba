"""progress.bar: tqdm on a terminal, whole plain lines in a log file."""
import io
import sys

from rallrec_jax import progress


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_bar_off_a_terminal_writes_whole_lines():
  log = io.StringIO()
  for _ in progress.bar(range(5), desc="items", file=log, mininterval=0):
    pass
  text = log.getvalue()
  assert "\r" not in text and "\x1b" not in text
  assert text.endswith("\n")
  lines = text.splitlines()
  assert lines and all(line.startswith("items:") for line in lines)
  assert "5/5" in lines[-1]


def test_bar_writes_to_redirected_stderr_and_updates_by_hand(monkeypatch):
  log = io.StringIO()
  monkeypatch.setattr(sys, "stderr", log)
  with progress.bar(total=3, unit="prompt") as bar:
    bar.update(3)
  assert "\r" not in log.getvalue()
  assert log.getvalue().splitlines()[-1].startswith("100%|##########| 3/3")


def test_disable_prints_nothing():
  log = io.StringIO()
  for _ in progress.bar(range(5), file=log, disable=True):
    pass
  assert log.getvalue() == ""


def test_disable_none_still_prints_lines_off_a_terminal():
  log = io.StringIO()
  for _ in progress.bar(range(2), file=log, disable=None):
    pass
  assert "2/2" in log.getvalue()


def test_bar_on_a_terminal_redraws_in_place():
  term = _Terminal()
  for _ in progress.bar(range(3), file=term, mininterval=0):
    pass
  assert "\r" in term.getvalue()


def test_postfix_off_a_terminal_waits_for_the_timed_refresh():
  log = io.StringIO()
  bar = progress.bar(total=50, file=log)
  for step in range(50):
    bar.update(1)
    bar.set_postfix(loss=f"{step:.4f}")
  bar.close()
  lines = log.getvalue().splitlines()
  assert len(lines) == 2
  assert "50/50" in lines[-1] and lines[-1].endswith("loss=49.0000]")
