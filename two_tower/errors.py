"""The one base class of errors a user can fix.

Entry points print a `UserError` as a single line (`error: ...`, exit code 2) and let every other
exception through with its traceback: a bug must never be mistaken for bad input. Each message
names the problem and the fix. Subclasses stay `ValueError`s, so library callers can catch them the
ordinary way.
"""


class UserError(ValueError):
  """Bad input, config or state of a work directory, with a message that says how to fix it."""


class ConfigError(UserError):
  """A config value that is unknown, out of range or inconsistent with another."""


class MissingArtifactError(UserError, FileNotFoundError):
  """A file or directory a job needs (a checkpoint, an index, a config) does not exist yet."""
