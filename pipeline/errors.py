"""Typed errors. Each also inherits the builtin it refines, so callers can catch either.

Messages say what was expected, what was found and what to do; the CLI prints them as one line.
``with store_io("writing shard 3 of x.zarr"): ...`` turns file-system errors into a StoreError.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager


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
    """A feature store or label set is missing, incomplete, corrupt or cannot be written."""


class StoreMismatchError(SsvtError, ValueError):
    """An existing store (or run) was made with other settings than the ones asked for."""


class LabelError(SsvtError, ValueError):
    """A label source holds values, ids or shapes that do not fit the store."""


class RankFailed(SsvtError, RuntimeError):
    """Another rank of the process group failed a step this rank waited on (``Ranks.check``)."""


_SPACE, _PERMISSION = "free space or choose --out elsewhere", "fix the permissions or choose --out elsewhere"
_OS_ERRORS = {
    errno.ENOSPC: ("disk full", _SPACE),
    errno.EDQUOT: ("disk quota exceeded", _SPACE),
    errno.EACCES: ("permission denied", _PERMISSION),
    errno.EPERM: ("permission denied", _PERMISSION),
    errno.EROFS: ("read-only file system", "choose --out elsewhere"),
    errno.ENOTDIR: ("a file is in the way of a folder", "choose another --out"),
    errno.EEXIST: ("a file is in the way of a folder", "choose another --out"),
}


@contextmanager
def store_io(action: str) -> Iterator[None]:
    """Turn an OSError from the file system into a StoreError that says what to do."""
    try:
        yield
    except StoreError:
        raise
    except OSError as e:
        what, todo = _OS_ERRORS.get(e.errno or 0, ("error", "check the path and the disk"))
        raise StoreError(f"{what} while {action}: {todo} ({e})") from e
