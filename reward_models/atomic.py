"""Atomic writes: a reader sees the old file or directory, or the new one, never half of one.

Everything is written under a temp name next to its destination (same filesystem) and then
moved into place with ``os.replace``; on any error the temp copy is removed.

This is the one implementation for both packages: ``reward_models`` imports nothing from
``align``, so it lives here and ``align.atomic`` re-exports it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a fresh temp name next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
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
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path
