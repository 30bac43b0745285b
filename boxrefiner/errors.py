"""The two kinds of failure a command reports without a traceback.

`UserError`: something the user can fix (a config key, a data file, a checkpoint, a device) — one
line on stderr, exit code 2. Each layer raises its own subclass (`ConfigError`, `DataError`, ...),
so callers can tell them apart while the command line handles them all alike.
`TrainingError`: a run that cannot go on (e.g. the loss stays non-finite) — one line, exit code 1.
"""

from __future__ import annotations


class UserError(ValueError):
    """A user error; its message is one line meant for the terminal."""


class ConfigError(UserError):
    """A wrong config key, type or value (from the file, the command line or an argument such as the
    device); its message names the key."""


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays non-finite); one-line message."""
