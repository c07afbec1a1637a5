"""Where a run came from: the command line, package versions, device and git commit, for ``config.json``.

Usage::

    environment("cuda:0")   # {"command": "ssvt train-head --labels eps", "versions": {"ssvt": "0.1.0", ...}, ...}

Versions are read from the installed distributions' metadata (``importlib.metadata``), which imports
none of the packages, so recording them never loads transformers into stage two.
"""

from __future__ import annotations

import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

#: Distributions whose versions a run records (None when one is not installed).
RECORDED_PACKAGES = ("ssvt", "torch", "transformers", "zarr", "numpy")
#: Seconds each git call may take before the commit is recorded as unknown.
GIT_TIMEOUT = 2.0


def versions(packages: tuple[str, ...] = RECORDED_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution, None when it is not installed."""
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def command_line() -> str | None:
    """The command line of this process (``sys.argv``, shell-quoted): the ``ssvt ...`` command for a CLI
    run, the script or ``pytest ...`` when called from Python; None when there is none (embedded)."""
    return shlex.join(sys.argv) if sys.argv and any(sys.argv) else None


def git_state(package_dir: Path | None = None) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` when the package runs from its own git checkout, else Nones.

    A package installed into site-packages inside some other repository is not a checkout of ssvt: the
    repository's top level must be the folder that holds the package. Any failure (no git, a timeout,
    not a repository) gives None."""
    package_dir = package_dir or Path(__file__).resolve().parent
    unknown: dict[str, Any] = {"commit": None, "dirty": None}
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != package_dir.parent.resolve():
        return unknown
    commit = _git(package_dir, "rev-parse", "HEAD")
    if commit is None:
        return unknown
    status = _git(package_dir, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _git(cwd: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: str | None = None) -> dict[str, Any]:
    """Command line, package and Python versions, ``device`` (the one used) and git state, as JSON values."""
    return {
        "command": command_line(),
        "versions": {**versions(), "python": platform.python_version()},
        "device": device,
        "git": git_state(),
    }
