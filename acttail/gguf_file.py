"""Reading a GGUF file: its architecture from the header alone (milliseconds, before the ``gguf`` package
parses the whole file), the ``gguf`` reader opened with one clear error for a bad file, and its metadata
values, each checked to be of the type the converter needs (``get``).

A GGUF is untrusted input: every value read here is either what the caller asked for or an ActTailError.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path

from .errors import ActTailError
from .files import open_regular

GEMMA = ("gemma", "gemma2", "gemma3")  # llama.cpp's Gemma architectures (norms stored as 1 + weight)


def open_gguf(path: str | Path):
    """Open a GGUF file with the gguf package, turning a bad file into one clear error. Its layout is
    checked first (``check_layout``): the gguf reader loops and allocates per array item a file declares,
    whether or not the file holds them."""
    from gguf import GGUFReader

    path = Path(path)
    check_layout(path)
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError for bad files
        raise ActTailError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})") from None


# GGUF metadata value types: fixed sizes in bytes (8 is a string, 9 an array).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_MAX_NESTING = 4  # arrays of arrays of ...
_MAX_DIMS = 4  # GGML_MAX_DIMS


class _Cursor:
    """Reads a GGUF header from a buffer (the file, memory-mapped), refusing whatever runs past its end."""

    def __init__(self, buf):
        self.buf, self.pos = buf, 0
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic")
        self.order = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"  # the version's byte order
        self.pos = 4

    def left(self) -> int:
        return len(self.buf) - self.pos

    def unpack(self, fmt: str):
        size = struct.calcsize(self.order + fmt)
        if size > self.left():
            raise ValueError("the header runs past the end of the file")
        values = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += size
        return values

    def skip(self, n: int, what: str = "a value") -> None:
        if n > self.left():
            raise ValueError(f"{what} runs past the end of the file")
        self.pos += n

    def string(self) -> str:
        (n,) = self.unpack("Q")
        start = self.pos
        self.skip(n, "a string")
        return bytes(self.buf[start:self.pos]).decode("utf-8")

    def skip_value(self, kind: int, depth: int = 0) -> None:
        """Step over one metadata value of type ``kind``; every count must fit in the bytes left."""
        if kind in _GGUF_SIZES:
            self.skip(_GGUF_SIZES[kind])
        elif kind == _GGUF_STRING:
            self.skip(self.unpack("Q")[0], "a string")
        elif kind == _GGUF_ARRAY and depth < _MAX_NESTING:
            item, count = self.unpack("IQ")
            if item in _GGUF_SIZES:
                self.skip(_GGUF_SIZES[item] * count, "an array")
                return
            if count * 8 > self.left():  # each string or array item takes 8 bytes or more
                raise ValueError("an array runs past the end of the file")
            for _ in range(count):
                self.skip_value(item, depth + 1)
        else:
            raise ValueError(f"unknown metadata value type {kind}" if kind != _GGUF_ARRAY else
                             f"arrays nested over {_MAX_NESTING} deep")


def _header(path: Path, walk):
    """``walk(cursor)`` over the memory-mapped file's header, every malformation one clear error."""
    with open_regular(path, "GGUF file") as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ValueError(f"{size} bytes, shorter than a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                cur = _Cursor(buf)
                (version,) = cur.unpack("I")
                if version not in (2, 3):
                    raise ValueError(f"GGUF version {version} (2 and 3 are read)")
                return walk(cur)
        except (ValueError, struct.error, UnicodeDecodeError, OSError, OverflowError) as e:
            raise ActTailError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})") from None


def gguf_architecture(path: str | Path) -> str:
    """general.architecture of a GGUF file, read from its header alone: the metadata comes first and
    llama.cpp writes this key first, so a refusal costs milliseconds, not a parse of the whole file."""
    def walk(cur):
        _, n_kv = cur.unpack("QQ")
        for _ in range(n_kv):
            key = cur.string()
            (kind,) = cur.unpack("I")
            if key == "general.architecture" and kind == _GGUF_STRING:
                return cur.string()
            cur.skip_value(kind)
        return None

    path = Path(path)
    arch = _header(path, walk)
    if arch is None:
        raise ActTailError(f"{path} is not a readable GGUF file (no general.architecture in its metadata)")
    return arch


def check_layout(path: str | Path) -> None:
    """Refuse a GGUF whose header does not fit in the file: every metadata value, every tensor's name,
    dimensions (at most four), type (one the gguf package knows) and data must lie inside it."""
    from gguf import GGML_QUANT_SIZES

    def walk(cur):
        n_tensors, n_kv = cur.unpack("QQ")
        if n_kv * 12 > cur.left() or n_tensors * 24 > cur.left():
            raise ValueError(f"{n_kv} metadata values and {n_tensors} tensors cannot fit in the file")
        for _ in range(n_kv):
            cur.string()
            cur.skip_value(cur.unpack("I")[0])
        for _ in range(n_tensors):
            name = cur.string()
            (n_dims,) = cur.unpack("I")
            if n_dims > _MAX_DIMS:
                raise ValueError(f"tensor {name[:40]!r} has {n_dims} dimensions (at most {_MAX_DIMS})")
            dims = cur.unpack("Q" * n_dims)
            kind, offset = cur.unpack("IQ")
            if kind not in GGML_QUANT_SIZES:
                raise ValueError(f"tensor {name[:40]!r} has an unknown type {kind}")
            block, size = GGML_QUANT_SIZES[kind]
            count = math.prod(dims)
            if count % block or offset + count // block * size > cur.left():
                raise ValueError(f"tensor {name[:40]!r} ({list(dims)}) does not fit in the file")

    _header(Path(path), walk)


def field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # the gguf package: bad UTF-8, nested arrays
        raise ActTailError(f"GGUF metadata {key} is unreadable ({type(e).__name__})") from None


REQUIRED = object()
_TYPES = {  # what each kind of metadata value must be, and its name in an error
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "strs": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
}
_TYPES["ints"] = (lambda v: isinstance(v, list) and all(_TYPES["int"][0](x) for x in v), "a list of integers")
_TYPES["numbers"] = (lambda v: isinstance(v, list) and all(_TYPES["number"][0](x) for x in v), "a list of numbers")
_TYPES["pattern"] = (lambda v: (_TYPES["int"][0](v) and v >= 1) or (isinstance(v, list) and all(
    isinstance(x, int) for x in v)), "a layer count >= 1 or one flag per layer")  # Gemma's sliding layers


def get(reader, key: str, kind: str, default=REQUIRED, lo: float | None = None):
    """Metadata ``key`` of the GGUF, which must be of ``kind`` (``_TYPES``; a number also >= ``lo``, an
    integer also below 2**31); ``default`` when absent (required when none is given). One clear error
    otherwise."""
    value = field(reader, key)
    if value is None:
        if default is REQUIRED:
            raise ActTailError(f"the GGUF has no {key} (needed to convert it)")
        return default
    check, name = _TYPES[kind]
    if lo is not None and kind in ("int", "number"):
        name += f" >= {lo}" + (" and below 2**31" if kind == "int" else "")
        ok = check(value) and lo <= value and (kind != "int" or value < 2**31)
    else:
        ok = check(value)
    if not ok:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ActTailError(f"GGUF metadata {key} must be {name}, got {shown}")
    return value
