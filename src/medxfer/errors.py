"""The project's error base class: every error caused by the user's input derives from it.

The CLI prints a :class:`MedxferError` as one line (``medxfer VERB: error: ...``) and exits
with status 2; any other exception is a bug and keeps its traceback. Subclasses also derive
from the built-in type that describes them (``ValueError``, ``KeyError``, ``OSError``), so
callers catching those keep working.
"""
from __future__ import annotations


class MedxferError(Exception):
    """A problem with what the user asked for or gave us; the message names the file, row or key."""


class UsageError(MedxferError, ValueError):
    """An argument, option or value that cannot be used as given."""


class SpecError(UsageError):
    """A run spec (YAML, command line or Python) is invalid; the message says which field."""


class ParamError(UsageError):
    """A protocol parameter or dataset option that is unknown, misspelled or of the wrong type."""


class OutputError(MedxferError, OSError):
    """An output, work or cache folder that cannot be created or written."""


class DiskFullError(OutputError):
    """A write failed because the file system is full (or over quota); the message names the file."""


class UnknownNameError(MedxferError, KeyError):
    """A name that is not registered; the message suggests close matches."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0])
