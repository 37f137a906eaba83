"""Errors a user can cause, each with a message that says what to do.

Every exception raised for bad input is a :class:`GeoprobeError` subclass; the command-line
application prints its message and exits non-zero without a traceback.
"""
from __future__ import annotations


class GeoprobeError(Exception):
    """Base class for every error caused by user input or environment."""

    exit_code = 2


class ModelNotFoundError(GeoprobeError):
    """The model spec names no local file or folder and the hub cannot provide it."""


class ModelLoadError(GeoprobeError):
    """A model file exists but cannot be read (corrupt, truncated, unsupported)."""


class UnsafeModelError(GeoprobeError):
    """Loading would execute untrusted code (pickle weights, remote code) and was not allowed."""


class MissingDependencyError(GeoprobeError):
    """An optional package is needed; the message names the install command."""


class CorpusError(GeoprobeError):
    """The corpus is empty, binary, or lacks the requested field."""


class InputDataError(GeoprobeError, ValueError):
    """Points or counts handed to a probe are unusable (NaN/inf, too few, all identical).

    Also a :class:`ValueError`, as scikit-learn and scikit-dimension raise for bad input, so code
    written against their estimators (``except ValueError``) catches it."""


class ProfileError(GeoprobeError):
    """A profile JSON is malformed or from an incompatible schema version."""


class OutputError(GeoprobeError, OSError):
    """An output path cannot be written: the disk is full or read-only, permission is denied, a folder
    stands where a file should be written, or a file where a folder is needed. The message names the
    path and what to do.

    Also an :class:`OSError`, so code written against plain file writes (``except OSError``) catches it."""


class PlanError(GeoprobeError):
    """An adapter plan cannot be met (budget too small, layers missing)."""


class AdapterError(GeoprobeError):
    """An adapter folder or configuration does not fit the model it is used with."""


class DataFormatError(GeoprobeError):
    """A training or evaluation data file lacks the expected fields."""


class ComparisonError(GeoprobeError):
    """A comparison cannot run as asked: an unknown method, no seeds, a parameter budget that cannot be
    matched, or an output folder that holds a comparison with other settings."""


class DeviceError(GeoprobeError):
    """The device cannot do what was asked: no such device (a name this machine does not know), a dtype
    it cannot compute in, more processes or devices than this machine has, or a way of spreading work
    over processes that does not apply."""


class MemoryBudgetError(DeviceError):
    """A memory budget (``--max-gpu-memory``, ``--max-memory``) or the free memory cannot hold the run
    asked for; the message gives the numbers."""


class StreamingError(ModelLoadError):
    """Layer-by-layer streaming was asked of a checkpoint it does not cover (an architecture outside
    the covered ones, GGUF or pickle weights)."""
