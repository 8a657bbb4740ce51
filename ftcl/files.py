"""Files and folders that are never left half-written: every result, config, marker and checkpoint
ftcl writes goes through :func:`replacing`; generated data folders (composed scenes, a smoke run's
data) through :func:`folder_once`.

The data is written to a temporary file in the target's folder, flushed and fsync'ed, then renamed
over the target (``os.replace`` is atomic on POSIX), and the folder is fsync'ed so the rename itself
survives a crash: a reader sees the previous file or the new one, never a part. Temporary files are
named ``.<name>.<random>.tmp`` (:data:`TMP_GLOB` finds those a kill left behind).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def manifest_matches(folder: str | Path, manifest_name: str, manifest: Any) -> bool:
    """Whether ``folder/manifest_name`` holds ``manifest`` (as JSON)."""
    path = Path(folder) / manifest_name
    try:
        return path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(manifest))
    except ValueError:
        return False


def folder_once(folder: str | Path, manifest_name: str, manifest: Any, write: Callable[[Path], None],
                replace_other: bool = False) -> Path:
    """``folder`` as ``write(tmp)`` fills it, written once: when ``folder/manifest_name`` already holds
    ``manifest`` nothing is written. Otherwise ``write`` fills a temporary sibling, the manifest goes in
    last, and the sibling is renamed into place, so a concurrent writer or a kill never leaves a folder
    with a matching manifest half-written. A folder that exists without a matching manifest (another
    setting's, or an unfinished one) is replaced when ``replace_other``, else left alone with a
    ``FileExistsError``."""
    folder = Path(folder)
    if manifest_matches(folder, manifest_name, manifest):
        return folder
    if folder.exists() and not replace_other:
        raise FileExistsError(folder)
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        (tmp / manifest_name).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if manifest_matches(folder, manifest_name, manifest):  # another writer finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    try:
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not manifest_matches(folder, manifest_name, manifest):
            raise
    return folder
