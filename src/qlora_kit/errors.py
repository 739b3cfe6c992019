"""Errors every stage raises; the CLI turns them into one line and exit code 2."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""


class MergeError(RuntimeError):
    """The base or the adapter cannot be merged as asked; the message says which file and tensor."""


class OutputError(DataError):
    """An output cannot be written where it should go (a symlink, outside the checkout, disk full)."""


class IntegrityError(DataError):
    """A stage's input differs from what the stage that made it recorded; the message names the file."""
