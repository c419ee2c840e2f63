"""User-facing errors: the CLI prints these as one line and exits with code 2, no traceback."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad config value, unknown name, missing data path)."""

    exit_code = 2


class ConfigError(UserError):
    """A config key, type or value that is not allowed."""


class UnknownNameError(UserError):
    """A name (method, model, dataset, backend, track) that no registered plugin provides."""


class DataError(UserError):
    """A data path that is missing or unreadable."""


class AccumulatorOverflowError(UserError):
    """An integer GEMM whose accumulator bound exceeds the allowed width under the 'error' policy."""
