"""The errors lmlab reports to users as one line, without a traceback.

Anything raised as an ``LmlabError`` (or a subclass) is a problem with the user's input
(a file, a config, a checkpoint, a prompt); the CLI prints ``error: <message>`` and exits 1.
Any other exception is a bug in lmlab and keeps its traceback.
"""


class LmlabError(Exception):
    """A problem with the user's input that the CLI reports as one line."""


class ConfigError(LmlabError):
    """An unknown config key, a value of the wrong type, or an invalid combination."""


class DataError(LmlabError):
    """Input text or prepared data that is missing, empty, binary, not UTF-8, or too short."""


class CheckpointError(LmlabError):
    """A checkpoint that is missing, corrupt, or was not written by lmlab."""


class OutputError(LmlabError):
    """An output path that would overwrite an input or something lmlab did not write, or that cannot be written."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what a one-line
    error keeps of a library's message, which may go on with a C++ stack or a traceback."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
