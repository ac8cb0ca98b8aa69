"""Reading a GGUF file: its architecture from the header alone (milliseconds, before the ``gguf`` package
parses the whole file), the ``gguf`` reader opened with one clear error for a bad file, and its metadata
values, each checked to be of the type the converter needs (``get``).

A GGUF is untrusted input: every value read here is either what the caller asked for or an ActTailError.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

from .errors import ActTailError
from .files import open_regular, regular_file

GEMMA = ("gemma", "gemma2", "gemma3")  # llama.cpp's Gemma architectures (norms stored as 1 + weight)


def open_gguf(path: str | Path):
    """Open a GGUF file with the gguf package, turning a bad file into one clear error."""
    from gguf import GGUFReader

    path = Path(path)
    regular_file(path, "GGUF file")  # the reader would block on a FIFO
    try:
        return GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError for bad files
        raise ActTailError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})") from None


# GGUF metadata value types: fixed sizes in bytes (8 is a string, 9 an array).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: str | Path) -> str:
    """general.architecture of a GGUF file, read from its header alone: the metadata comes first and
    llama.cpp writes this key first, so a refusal costs milliseconds, not a parse of the whole file."""
    path = Path(path)
    with open_regular(path, "GGUF file") as f:
        try:
            if f.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            order = "<" if struct.unpack("<I", _read(f, 4))[0] < 0x10000 else ">"  # version: little-endian, or not
            _, n_kv = struct.unpack(order + "QQ", _read(f, 16))
            for _ in range(n_kv):
                key = _read_string(f, order)
                (kind,) = struct.unpack(order + "I", _read(f, 4))
                if key == "general.architecture" and kind == _GGUF_STRING:
                    return _read_string(f, order)
                _skip_value(f, order, kind)
        except (ValueError, struct.error, UnicodeDecodeError, OSError, OverflowError, RecursionError) as e:
            raise ActTailError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e)[:160]})") from None
    raise ActTailError(f"{path} is not a readable GGUF file (no general.architecture in its metadata)")


def _read(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("truncated header")
    return data


def _read_string(f, order: str) -> str:
    (n,) = struct.unpack(order + "Q", _read(f, 8))
    if n > 1 << 24:
        raise ValueError(f"implausible string length {n}")
    return _read(f, n).decode("utf-8")


def _skip_value(f, order: str, kind: int) -> None:
    if kind == _GGUF_STRING:
        (n,) = struct.unpack(order + "Q", _read(f, 8))
        f.seek(n, 1)
    elif kind == _GGUF_ARRAY:
        item, count = struct.unpack(order + "IQ", _read(f, 12))
        if item in _GGUF_SIZES:
            f.seek(_GGUF_SIZES[item] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, order, item)
    elif kind in _GGUF_SIZES:
        f.seek(_GGUF_SIZES[kind], 1)
    else:
        raise ValueError(f"unknown metadata value type {kind}")


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
