"""Atomic file replacement: a file is the old one or the new one, never half of either.

Every file this project writes (catalog outputs, augmented images, checkpoints, the
model) goes through :func:`replaced_atomically`: the content is written to a hidden
temporary name in the target's folder and renamed over the target (``os.replace`` is
atomic on one file system). A run killed, or a disk that fills up, while writing
leaves the previous file whole and at most a hidden temporary file, which no loader
reads and the next successful write of the same target deletes.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replaced_atomically(target: Path, *, bulk: bool = False) -> Iterator[Path]:
    """Yields a temporary path to write; on success it replaces ``target``.

    Args:
        target: The file to write. Its folder is created if missing.
        bulk: One of many files written into a folder whose owner writes an index
            last and prunes what the index does not list: no flush to disk per
            file and no search for stale temporaries. Otherwise the file is
            flushed before the rename, so a power cut cannot leave an empty file
            under the target's name, and temporaries of dead processes are removed.

    Yields:
        A hidden path next to ``target``, named after it and this process's id.

    Raises:
        Whatever the write raised (``OSError`` for a full disk): the temporary file
        is removed and ``target`` is untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp{target.suffix}")
    try:
        yield temporary
        if not bulk:
            with open(temporary, "rb") as written:
                os.fsync(written.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    if not bulk:
        _remove_stale_temporaries(target)


def _remove_stale_temporaries(target: Path) -> None:
    """Deletes temporaries of ``target`` left by processes that no longer run."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.tmp")
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp*"):
        match = pattern.match(leftover.name)
        if match and not _is_running(int(match.group(1))):
            leftover.unlink(missing_ok=True)


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def replaced_folder(target: Path) -> Iterator[Path]:
    """Yields a temporary folder to fill; on success it takes the place of ``target``.

    A folder cannot be renamed over a non-empty one, so the old folder is first
    renamed aside, the new one renamed into place, and the old one deleted: at every
    moment ``target`` is the whole old folder, the whole new one, or (between the two
    renames) absent, never half written.

    Args:
        target: The folder to write. Its parent is created if missing.

    Yields:
        A hidden, not yet existing path next to ``target``, named after it and this
        process's id.

    Raises:
        Whatever the write raised: the temporary folder is removed and ``target`` is
        untouched.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    retired = target.with_name(f".{target.name}.{os.getpid()}.old")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        yield temporary
        if target.exists():
            os.replace(target, retired)
        os.replace(temporary, target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.(tmp|old)$")
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*"):
        match = pattern.match(leftover.name)
        if match and not _is_running(int(match.group(1))):
            shutil.rmtree(leftover, ignore_errors=True)
