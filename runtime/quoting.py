"""Paths in log lines and one-line messages: a path is shown as is when it is printable, else quoted with its
control characters escaped, so a newline in a file name cannot start a forged line in a log or an error."""
from __future__ import annotations

from pathlib import Path


def shown(path: str | Path) -> str:
    text = str(path)
    return text if text.isprintable() else repr(text)
