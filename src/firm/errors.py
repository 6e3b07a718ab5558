"""The one base class of errors caused by the user's input.

The CLI prints a ``FirmError`` as one line and exits with code 2; anything else is a bug and
keeps its traceback. Every module's input error derives from it (and from the builtin it
used to be, so ``except ValueError`` callers keep working).
"""


class FirmError(Exception):
    """Bad input: a setting, a file, a model or a run directory FIRM cannot use. The message names it."""
