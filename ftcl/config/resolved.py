"""Resolved run configs on disk: what a pipeline job (or anyone) reads without checking every rule again.

A config resolved at plan time (:func:`ftcl.config.resolve`) is written with a first line that names
the process count it was checked for and a digest of the text below it::

    # ftcl resolved run config: world 8, digest 3f2a9c0d4b1e7a65

:func:`read` recomputes the digest and refuses a file whose text changed after it was resolved (or
that never was), so a job checks only that it holds what planning checked. YAML readers ignore the
line: the file is also a plain config for ``ftcl pretrain --config``, which resolves it afresh.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from ftcl.config.types import RunConfig, from_dict, to_dict
from ftcl.errors import ConfigError
from ftcl.files import write_text

_HEADER = re.compile(r"^# ftcl resolved run config: world (\d+), digest ([0-9a-f]{16})$")


def digest(text: str) -> str:
    """A short content fingerprint of a config's text (sha256)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _fingerprint(world: int, body: str) -> str:
    return digest(f"world {world}\n{body}")


def text(cfg: RunConfig, world: int = 1) -> str:
    """The resolved file's content for ``cfg``, checked for ``world`` processes."""
    body = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return f"# ftcl resolved run config: world {world}, digest {_fingerprint(world, body)}\n{body}"


def write(cfg: RunConfig, path: str | Path, world: int = 1) -> Path:
    """Write ``cfg`` as a resolved file (atomically)."""
    return write_text(path, text(cfg, world))


def parse(content: str, source: str = "resolved config") -> tuple[RunConfig, int]:
    """``(config, world)`` of a resolved file's text; ``ConfigError`` unless its digest matches."""
    header, _, body = content.partition("\n")
    match = _HEADER.match(header)
    if match is None:
        raise ConfigError(f"{source} is not a resolved run config (its first line is not the '# ftcl resolved "
                          "run config' header); resolve it with ftcl.config.resolve, or pass it as --config")
    world = int(match.group(1))
    if _fingerprint(world, body) != match.group(2):
        raise ConfigError(f"{source} was changed after it was resolved (its digest does not match); plan again "
                          "(snakemake) or run the stage by hand with --config")
    return from_dict(RunConfig, yaml.safe_load(body)), world


def read(path: str | Path) -> tuple[RunConfig, int]:
    """:func:`parse` of the file at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"resolved config {path} does not exist")
    return parse(path.read_text(), str(path))
