"""Files: atomic writes and content digests, one helper each, used everywhere in ``align``.

- :func:`atomic_write`, :func:`atomic_write_text`, :func:`atomic_directory` (and its last
  step, :func:`replace_directory`): a reader sees the old file or directory, or the new one,
  never half of one. They are implemented in
  :mod:`reward_models.atomic` (``reward_models`` imports nothing from ``align`` and saves its
  models atomically too) and re-exported here.
- :func:`file_sha256`: the SHA-256 of a file's bytes, read in chunks.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from reward_models.atomic import atomic_directory, atomic_write, atomic_write_text, replace_directory

__all__ = ["atomic_directory", "atomic_write", "atomic_write_text", "file_sha256", "replace_directory"]


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """The hex SHA-256 of the bytes of the file at ``path``, read ``chunk_bytes`` at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()
