"""Typed errors. Each also inherits the builtin it refines, so callers can catch either.

Messages say what was expected, what was found and what to do; the CLI prints them as one line.
"""


class SsvtError(Exception):
    """Base class of every error ssvt raises on purpose."""


class ConfigError(SsvtError, ValueError):
    """A setting is invalid (bad value, missing workspace entry, unknown name)."""


class DataError(SsvtError, ValueError):
    """A dataset, image or split file cannot be read as expected."""


class WeightsNotFoundError(SsvtError, FileNotFoundError):
    """No local weights for a backbone and no way to download them."""


class WeightsError(SsvtError, ValueError):
    """Weights exist but do not fit the backbone (wrong keys or shapes)."""


class StoreError(SsvtError, RuntimeError):
    """A feature or label store is missing, incomplete, corrupt or cannot be written."""


class StoreMismatchError(SsvtError, ValueError):
    """An existing store (or run) was made with other settings than the ones asked for."""


class LabelError(SsvtError, ValueError):
    """A label source holds values, ids or shapes that do not fit the store."""
