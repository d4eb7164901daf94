"""One way to write a run's files: into a temporary file beside the target, flushed to disk, then renamed
over it in one step, so a reader never sees half of one and a write cut short leaves the old file whole."""

from __future__ import annotations

import os
import re
from typing import Callable

TEMPORARY = re.compile(r"\.tmp\.\d+$")  # <name>.tmp.<pid>: what write_atomic leaves when it is killed


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """`write(temporary)` writes the new content to the path it is given, which then replaces `path`.
    A write that fails leaves no temporary file; one killed outright leaves it to remove_orphans."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    write_atomic(path, write)


def remove_orphans(directory: str) -> list[str]:
    """Remove the temporary files of writes cut short (a SIGKILL during a save); returns their names."""
    orphans = [f for f in os.listdir(directory) if TEMPORARY.search(f)]
    for name in orphans:
        os.remove(os.path.join(directory, name))
    return orphans
