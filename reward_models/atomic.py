"""Atomic writes: a reader sees the old file or directory, or the new one, never half of one.

Everything is written under a temp name next to its destination (same filesystem), flushed
to disk (``fsync`` of each file and directory written, so that a power cut cannot leave a
renamed but empty file), and then moved into place with ``os.replace``, after which the parent
directory is fsynced too; on any error the temp copy is removed.

This is the one implementation for both packages: ``reward_models`` imports nothing from
``align``, so it lives here and ``align.atomic`` re-exports it.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

FSYNC_EACH_MAX = 256  # trees with more files and directories are flushed with one syncfs (Linux)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temp name next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temp directory next to ``path``; when the block ends without an error it
    replaces ``path`` (an existing directory there is removed first), otherwise it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        replace_directory(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replace_directory(tmp: str | Path, path: str | Path) -> Path:
    """Move the finished directory ``tmp`` (next to ``path``) to ``path``, removing an existing
    directory there first: the last step of :func:`atomic_directory`, for a temp directory that
    several processes fill (a training checkpoint) and that therefore has a name they agree on."""
    path = Path(path)
    fsync_tree(tmp)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def fsync_path(path: str | Path) -> None:
    """Flush a file's (or a directory's entries') data to disk. Directories that cannot be
    opened for it (some platforms and filesystems) are skipped: the rename is still atomic."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file and directory under ``root`` (symlinks not followed) to disk: one
    :func:`fsync_path` each for a small tree (a checkpoint), one ``syncfs`` of its filesystem
    for a large one (an imported dataset: thousands of fsyncs would cost seconds)."""
    paths = []
    for parent, _dirs, files in os.walk(root):
        paths += [os.path.join(parent, f) for f in files if not os.path.islink(os.path.join(parent, f))]
        paths.append(parent)
    if len(paths) > FSYNC_EACH_MAX and _syncfs(root):
        return
    for p in paths:
        fsync_path(p)


def _syncfs(path: str | Path) -> bool:
    """``syncfs(2)`` of the filesystem holding ``path`` (Linux); False where it is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return syncfs(fd) == 0
    finally:
        os.close(fd)
