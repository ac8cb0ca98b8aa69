"""Reading files: regular files only, each kind bounded in size before it is read, JSON strictly (no NaN, no
integers outside 64 bits, bounded nesting); the cache folder and the remembered sha256 of weight files."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import re
import stat
import time
import zlib
from pathlib import Path

from .errors import ActTailError
from .outputs import write_json


def cache_dir() -> Path:
    """Where fetched models, texts and cached results live: $ACTTAIL_CACHE, or ~/.cache/acttail when it is
    unset or empty (as XDG reads an empty variable). A cache path that is, or lies under, something other
    than a folder is refused in one line."""
    env = os.environ.get("ACTTAIL_CACHE")
    path = Path(env).absolute() if env else Path.home() / ".cache" / "acttail"
    where = f"ACTTAIL_CACHE={env}" if env else f"the cache folder {path}"
    for probe in (path, *path.parents):  # the nearest part that exists must be a folder
        try:
            mode = os.stat(probe).st_mode
        except (FileNotFoundError, NotADirectoryError):  # not there (or under a file): try the folder above
            continue
        except OSError as e:
            raise ActTailError(f"{where}: cannot use {probe}: {e.strerror}") from None
        if not stat.S_ISDIR(mode):
            raise ActTailError(f"{where} is not a folder ({probe} is {_kind(mode)})")
        break
    return path


def cache_folder(*parts: str) -> Path:
    """The folder ``cache_dir()/parts...``, created if missing (one clear error if it cannot be)."""
    folder = cache_dir().joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ActTailError(f"cannot create cache folder {folder}: {e.strerror}") from None
    return folder


# The most bytes read from each kind of file: a larger one is refused before it is read.
MAX_CONFIG = 16 << 20  # config.json, tokenizer_config.json
MAX_TOKENIZER = 256 << 20  # tokenizer.json (Gemma 3's is 33 MB)
MAX_JSON = 256 << 20  # plans, analyses, indexes, measured files (a plan of 10^5 projections is ~40 MB)
MAX_TEXT = 1 << 30  # a text file to tokenize

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file(path: str | os.PathLike, what: str = "file") -> os.stat_result:
    """The status of ``path`` (symlinks followed) if it is a regular file; else one clear error, before
    anything opens it: a FIFO or a device would block a read (or never end), a folder is no file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ActTailError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ActTailError(f"cannot read {what} {path}: {e.strerror}") from None
    except ValueError:  # a NUL character in the name
        raise ActTailError(f"cannot read {what} {str(path)!r}: a NUL character in its name") from None
    if not stat.S_ISREG(st.st_mode):
        raise ActTailError(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: str | os.PathLike, what: str = "file"):
    """``path`` opened for binary reading if it is a regular file (``regular_file``); opened without
    blocking and checked again once open, so a file swapped for a FIFO in between is refused too."""
    st = regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ActTailError(f"cannot read {what} {path}: {e.strerror}") from None
    now = os.fstat(fd)
    if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        raise ActTailError(f"{what} {path} changed while it was opened (now {_kind(now.st_mode)})")
    return os.fdopen(fd, "rb")  # left non-blocking: no effect on a regular file; a /proc file would block fails


def read_bytes(path: str | os.PathLike, what: str = "file", limit: int | None = MAX_JSON) -> bytes:
    """Every byte of a regular file of at most ``limit`` bytes (None: any size); a larger file is refused
    from its size, before it is read, and at most ``limit + 1`` bytes are ever read (it may grow)."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if limit is not None and size > limit:
            raise ActTailError(f"{what} {path} is {size:,} bytes, over the {limit:,} acttail reads for it")
        try:
            data = f.read() if limit is None else f.read(limit + 1)
        except OSError as e:
            raise ActTailError(f"cannot read {what} {path}: {e.strerror}") from None
        if data is None:  # a special file that is "regular" (in /proc) and has nothing to read now
            raise ActTailError(f"cannot read {what} {path}: it would block")
    if limit is not None and len(data) > limit:
        raise ActTailError(f"{what} {path} grew over the {limit:,} bytes acttail reads for it")
    return data


SETTLED_NS = 2 * 10**9  # a file unchanged this long (ns) has its hash remembered


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 (hex) of every byte of a file, remembered in the cache folder against the file's identity.

    A file is hashed again when its resolved path, size, inode, modification or status-change time
    differ from when it was hashed (any write changes the status-change time, which no tool can set
    back), so a cached hash never stands for other bytes. A file changed in the last few seconds is not
    remembered: the file system's clock is coarse, and a write in the same tick would keep its times.
    Hashing runs at about 0.5-1 GB/s.
    """
    path = Path(path).resolve()
    st = path.stat()
    ident = [str(path), st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]
    memo = cache_dir() / "sha256" / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError, ActTailError):
        if os.path.lexists(memo):
            known = json.loads(read_bytes(memo, "hash memo", 1 << 16))
            if known["file"] == ident:
                return known["sha256"]
    settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > SETTLED_NS
    h = hashlib.sha256()
    with open_regular(path, "weights file") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    if settled:
        with contextlib.suppress(OSError, ActTailError):  # the memo is an optimisation: never fail for it
            memo.parent.mkdir(parents=True, exist_ok=True)
            write_json(memo, {"file": ident, "sha256": h.hexdigest()})
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str = "JSON file", limit: int = MAX_JSON):
    """Read a JSON file (gzip-compressed if its name ends in .gz) of at most ``limit`` bytes (decompressed
    too), turning a missing, non-regular, oversized, unreadable or malformed file into one clear error.

    NaN and Infinity (which Python's json accepts) are refused, and so are integers outside 64 bits (no
    field of ours is one; Python would carry them into arithmetic that overflows) and nesting deeper than
    ``MAX_DEPTH`` (the readers, deepcopy and schema checks recurse), and strings that are no text (a ``\\uD800``
    to ``\\uDFFF`` escape without its pair: no tokenizer or file system takes such a string)."""
    path = Path(path)
    data = read_bytes(path, what, limit)
    try:
        if path.suffix == ".gz":
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as z:
                data = z.read(limit + 1)
            if len(data) > limit:
                raise ActTailError(f"{what} {path} decompresses to over the {limit:,} bytes acttail reads for it")
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant, parse_float=_finite, parse_int=_int64)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        raise ActTailError(f"{what} {path} is not gzip-compressed (or is cut short)") from None
    except OSError as e:
        raise ActTailError(f"cannot read {what} {path}: {e.strerror}") from None
    except RecursionError:
        raise ActTailError(f"{what} {path} is nested too deeply to read") from None
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ActTailError(f"{what} {path} is not valid JSON ({_short(str(e))})") from None
    if _depth(doc) > MAX_DEPTH:
        raise ActTailError(f"{what} {path} is nested too deeply to read (over {MAX_DEPTH} levels)")
    if _SURROGATE_ESCAPE.search(data) and not _all_text(doc):
        raise ActTailError(f"{what} {path} holds a string that is no text (an unpaired \\uD800-\\uDFFF escape)")
    return doc


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # only such an escape can put a lone surrogate in a string


def _all_text(doc) -> bool:
    """Every key and string value of ``doc`` encodes as UTF-8 (none holds an unpaired surrogate)."""
    todo = [doc]
    while todo:
        node = todo.pop()
        if isinstance(node, dict):
            todo.extend(node)
            todo.extend(node.values())
        elif isinstance(node, list):
            todo.extend(node)
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return False
    return True


MAX_DEPTH = 64  # levels of nesting in a JSON file we read (our formats use fewer than 8; readers recurse)


def _depth(doc) -> int:
    """How deeply ``doc`` nests lists and objects (a scalar: 0), without recursion."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        node, level = todo.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                todo.extend((c, level + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def _short(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n - 3] + "..."


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _int64(text: str) -> int:
    if len(text.lstrip("-")) > 19 or not -2**63 <= (x := int(text)) < 2**63:
        raise ValueError(f"integer {_short(text, 30)} is outside 64 bits")
    return x


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text} is too large for a float")
    return x
