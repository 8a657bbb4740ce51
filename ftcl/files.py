"""Files that are never left half-written: every result, config, marker and checkpoint ftcl writes
goes through :func:`replacing`.

The data is written to a temporary file in the target's folder, flushed and fsync'ed, then renamed
over the target (``os.replace`` is atomic on POSIX), and the folder is fsync'ed so the rename itself
survives a crash: a reader sees the previous file or the new one, never a part. Temporary files are
named ``.<name>.<random>.tmp`` (:data:`TMP_GLOB` finds those a kill left behind).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: what a killed write leaves in a folder (never a finished file)
TMP_GLOB = ".*.tmp"


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; when the block ends without an error it replaces
    ``path`` atomically (module docstring), else it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text(path: str | Path, text: str) -> Path:
    """``text`` to ``path``, atomically."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON to ``path``, atomically."""
    return write_text(path, json.dumps(data, indent=2))
