"""The errors a user can fix, in one light module (importing it imports no torch).

The command line turns each into exit status 2 and a message that names the culprit.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file, key or value that cannot be used; the message says which and why."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupted or belongs to another architecture."""


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or used; the message names the URI."""


class CorruptImageError(OSError):
    """An image file that cannot be decoded; the message names it."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


USER_ERRORS = (ConfigError, CheckpointError, TrackingError, CorruptImageError, NonFiniteLossError,
               FileNotFoundError, PermissionError)
