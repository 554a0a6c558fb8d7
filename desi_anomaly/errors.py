"""Errors that name the file or partition and what is wrong with it."""

from __future__ import annotations

from pathlib import Path


class DesiAnomalyError(Exception):
    """Base class of every error this package raises on purpose."""


class PartitionKeyError(DesiAnomalyError, ValueError):
    """A partition key that does not match ``{survey}-{program}-{healpix}``."""


class DesiFormatError(DesiAnomalyError):
    """A DESI file that cannot be used: names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
