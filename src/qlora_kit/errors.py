"""Errors every stage raises; the CLI turns them into one line and exit code 2."""
from __future__ import annotations


class DataError(ValueError):
    """Bad input data; the message names file, line and field."""


class MergeError(RuntimeError):
    """The base or the adapter cannot be merged as asked; the message says which file and tensor."""
