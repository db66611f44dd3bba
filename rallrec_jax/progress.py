"""Progress bars that stay readable when stderr is a log file.

On a terminal a tqdm bar redraws itself in place with carriage returns; in a file those redraws
pile up into one enormous line. Off a terminal `bar` writes each refresh as its own line, and
refreshes seldom: a new postfix or description waits for the next timed refresh.
"""
import re
import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30
# tqdm's in-place redraw: carriage returns, newlines and cursor moves for nested bars.
_REDRAW = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\r\n]")


class _Lines:
  """A text stream wrapper that writes each of tqdm's redraws as one whole line."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text):
    for line in _REDRAW.split(text):
      line = line.rstrip()
      if line:
        self._stream.write(line + "\n")

  def flush(self):
    self._stream.flush()


class _LogBar(tqdm):
  """tqdm whose new postfix or description waits for the next timed refresh, not a line each."""

  def set_description(self, desc=None, refresh=False):
    super().set_description(desc, refresh)

  def set_description_str(self, desc=None, refresh=False):
    super().set_description_str(desc, refresh)

  def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
    super().set_postfix(ordered_dict, refresh, **kwargs)

  def set_postfix_str(self, s="", refresh=False):
    super().set_postfix_str(s, refresh)


def _isatty(stream):
  """Whether `stream` is a terminal; False for streams without isatty or closed ones."""
  isatty = getattr(stream, "isatty", None)
  try:
    return bool(isatty and isatty())
  except ValueError:  # a closed stream
    return False


def bar(iterable=None, **tqdm_kwargs):
  """A tqdm bar over `iterable`, taking tqdm's keyword arguments, that suits its stream.

  On a terminal (`file`, default sys.stderr) this is tqdm's own bar. Elsewhere each refresh is
  a plain line in ASCII, at most one per LOG_INTERVAL_S seconds unless `mininterval` says
  otherwise. `disable=True` prints nothing; `disable=None`, which in tqdm means off unless on a
  terminal, means on here, since the lines read well anywhere.
  """
  stream = tqdm_kwargs.pop("file", None)
  stream = sys.stderr if stream is None else stream
  if tqdm_kwargs.get("disable") is None:
    tqdm_kwargs["disable"] = False
  if _isatty(stream):
    return tqdm(iterable, file=stream, **tqdm_kwargs)
  tqdm_kwargs.setdefault("mininterval", LOG_INTERVAL_S)
  tqdm_kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, tqdm_kwargs["mininterval"]))
  tqdm_kwargs.setdefault("ascii", True)
  return _LogBar(iterable, file=_Lines(stream), **tqdm_kwargs)
