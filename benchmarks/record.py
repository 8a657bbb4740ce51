"""Where a benchmark's figures go: ``benchmarks/results/<name>.md`` (what it printed) and ``<name>.json``
(its numbers), each with the date, the machine, the commit and the command that measured them, so the
docs show measured figures instead of copies of them. A new run of a section replaces its files; git
keeps the earlier ones."""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    """CPU model, cores, memory, OS, Python and torch (and the GPU, when one is visible)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f", {kib / 2**20:.0f} GiB"
    text = (f"{cpu}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")
    with contextlib.suppress(ImportError):
        import torch

        text += f", torch {torch.__version__}"
        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name()}"
    return text


def commit() -> str:
    """The checkout's commit, marked when the working tree differs from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:  # no git on this machine (e.g. a bare GPU node image)
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "ftcl", "benchmarks", "workflow", "config")
    return head + (" (with uncommitted changes)" if dirty else "")


def _here(path: str) -> str:
    """``path`` relative to the repository when it is inside it (``.venv/bin/python``)."""
    absolute = Path(os.path.abspath(path))
    return str(absolute.relative_to(REPO)) if absolute.is_relative_to(REPO) else path


class _Tee(io.TextIOBase):
    def __init__(self, *streams: Any):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def recorded(name: str, folder: Path = RESULTS) -> Iterator[dict]:
    """Print as usual inside the block, and write what was printed plus the dict the block fills to
    ``folder/<name>.md`` and ``.json`` when it ends without an error."""
    started = datetime.now(UTC)
    numbers: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, out)):
        yield numbers
    header = {"benchmark": name, "date": started.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
              "commit": commit(), "command": shlex.join([_here(sys.executable), *sys.argv]),
              "seconds": round((datetime.now(UTC) - started).total_seconds(), 1)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps({**header, "results": numbers}, indent=1, default=str) + "\n")
    lines = [f"# Benchmark `{name}`", ""] + [f"- {k}: {v}" for k, v in header.items() if k != "benchmark"]
    (folder / f"{name}.md").write_text("\n".join(lines) + "\n\n```text\n" + out.getvalue().strip() + "\n```\n")


def run_recorded(name: str, section: Callable[[], dict | None]) -> None:
    """``section()`` inside :func:`recorded`; the dict it returns becomes the JSON's results."""
    with recorded(name) as numbers:
        numbers.update(section() or {})
