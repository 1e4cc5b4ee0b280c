"""Write a directory so that it appears complete or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_directory(directory: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``directory``; on success it replaces ``directory`` with one
    rename, on any error it is removed and ``directory`` is left as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        yield staging
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_target(target: Path, overwrite: bool, flag: str) -> None:
    """Refuse a ``target`` that is a file, or a non-empty directory unless ``overwrite`` (``flag`` names the
    command-line option that allows it)."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty (pass {flag} to replace it)")


def paths_overlap(a: Path, b: Path) -> bool:
    """True when one directory is, or lies inside, the other."""
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)
