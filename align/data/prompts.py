"""Prompt files: one prompt per line. Every command and objective that takes a prompts file
(online RWR, GRPO, and the CLI's ``--prompts-file``) reads it with :func:`read_prompts`."""

from __future__ import annotations

from pathlib import Path


def read_prompts(path: str | Path) -> list[str]:
    """Prompts of a file, one per line, stripped; a missing file or an empty line is an error
    naming the file (and the line). A trailing newline at the end of the file is allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path}: no such file")
    lines = path.read_text().rstrip("\n").split("\n")
    bad = [i + 1 for i, ln in enumerate(lines) if not ln.strip()]
    if bad:
        raise ValueError(f"prompts file {path}: line {bad[0]} is empty")
    return [ln.strip() for ln in lines]
