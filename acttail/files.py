"""Small file helpers: atomic writes (never a half-written output) and the cache folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ActTailError


def cache_dir() -> Path:
    """Where fetched models and texts live: $ACTTAIL_CACHE or ~/.cache/acttail."""
    return Path(os.environ.get("ACTTAIL_CACHE", Path.home() / ".cache" / "acttail"))


def check_output(path: str | os.PathLike) -> Path:
    """Fail early, before long work, if ``path`` cannot be written; returns its folder."""
    parent = Path(path).parent
    if not parent.is_dir():
        raise ActTailError(f"output folder does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise ActTailError(f"output folder is not writable: {parent}")
    return parent


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary file path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The block may replace the temporary file by a folder (for outputs that are folders).
    """
    path = Path(path)
    parent = check_output(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order) atomically."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict:
    """Read a JSON file, turning a missing or malformed file into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise ActTailError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ActTailError(f"{what} {path} is not valid JSON ({e})") from None
