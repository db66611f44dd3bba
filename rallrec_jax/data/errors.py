"""The one error type for bad input data: it always names the file and, where known, the line."""


class DataError(Exception):
  """Bad or missing input data. `str()` reads `path:line: message`."""

  def __init__(self, path, message, line=None):
    self.path = str(path)
    self.line = line
    self.message = message
    where = self.path if line is None else f"{self.path}:{line}"
    super().__init__(f"{where}: {message}")
