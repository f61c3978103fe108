"""Exceptions that separate the user's mistakes from ours.

Anything derived from :class:`UserError` is something the person running
uqsynth can fix (a path, a key, a value, a plugin name). The command line
prints it as a single ``error: ...`` line and exits with status 2; any other
exception is a bug and exits with status 1 (with a traceback under ``--debug``).
"""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if empty), for one-line error messages."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class UserError(Exception):
    """A problem in the user's input; the message is shown as one line."""


class ConfigError(UserError):
    """A configuration file or override is missing, malformed or invalid."""


class PluginError(UserError):
    """A plugin is unknown, broken, duplicated or registered something unusable."""


class DataError(UserError):
    """Input images are unreadable, inconsistent or unusable."""


class TrainingDiverged(ConfigError):
    """Training produced a NaN or infinite loss or weight: the optimisation settings must change.

    A configuration error because the remedy is in the configuration (a
    lower ``train.lr``, fp32 instead of fp16), not in the data.
    """


class OutputError(UserError):
    """An output file cannot be written: the disk is full, the folder is read-only, ..."""


class StageNotImplemented(Exception):
    """A pipeline stage this version of uqsynth does not have yet (exit status 3)."""
