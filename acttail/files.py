"""Small file helpers: bounded reads of regular files only, atomic writes (never a half-written output) and the
cache folder."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import os
import shutil
import stat
import tempfile
import time
import zlib
from functools import lru_cache
from pathlib import Path

import jsonschema
import referencing

from .errors import ActTailError


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


def check_output(path: str | os.PathLike, folder: bool | None = False, parents: bool = False) -> Path:
    """Fail early, before long work, if ``path`` cannot be written; returns the folder it goes in.

    Writing is tried for real (a file is created and removed in the folder): permission bits say
    nothing for root, nor for /proc. A file output must not be an existing folder, a folder output
    (``folder=True``) not an existing file; ``folder=None`` takes either. With ``parents``, missing
    folders above ``path`` will be created: the nearest existing one is tried.
    """
    path = Path(path)
    if folder is False and path.is_dir():
        raise ActTailError(f"output {path} is a folder; give a file name")
    if folder is True and path.exists() and not path.is_dir():
        raise ActTailError(f"output {path} exists and is not a folder")
    parent = path.parent
    while parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ActTailError(f"cannot create output{' folder' if folder else ''} {path}: {parent} is not a folder")
    if not parent.is_dir():
        raise ActTailError(f"output folder does not exist: {parent}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".acttail-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ActTailError(f"cannot write in output folder {parent}: {e.strerror}") from None
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise ActTailError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    try:
        yield Path(tmp)
        try:
            if os.path.isfile(tmp):
                os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except OSError as e:
            raise ActTailError(f"cannot write {path}: {e.strerror}") from None
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        elif os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    write_files({path: text})


def write_files(outputs: dict) -> None:
    """Write several files {path: text or bytes} as one unit: all of them, or none.

    Every file is written in full to a temporary name beside its target first (a full disk there leaves
    every target as it was); then they are renamed into place in the order given, each target that exists
    kept under a hard link until the last rename has succeeded, so a failed rename puts the earlier ones
    back. Put last the file that names the others (a plan after its tensors file): a crash between two
    renames then leaves at worst a new unnamed file beside a consistent old one. No temporary file stays
    behind; every OSError is one ActTailError ("cannot write PATH: No space left on device").
    """
    temps: dict[Path, Path] = {}
    try:
        for path, data in outputs.items():
            path = Path(path)
            temps[path] = _written_temp(path, data.encode("utf-8") if isinstance(data, str) else data)
        with _folders_locked({p.parent for p in temps}):
            _rename_all(temps)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _written_temp(path: Path, data: bytes) -> Path:
    """A temporary file beside ``path`` holding ``data`` (on the disk), with the permissions a new file gets."""
    parent = check_output(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        raise ActTailError(f"cannot write {path}: {_reason(e)}") from None
    try:
        _write_fd(fd, data)
        os.chmod(tmp, 0o666 & ~_umask())
    except OSError as e:
        os.unlink(tmp)
        raise ActTailError(f"cannot write {path}: {_reason(e)}") from None
    return Path(tmp)


def write_file(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a new file inside a folder being built under a temporary name (renamed into place whole by
    ``replace_folder``), as ``write_files`` writes; an OSError is the caller's to name (``writing``)."""
    _write_fd(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666),
              data.encode("utf-8") if isinstance(data, str) else data)


def _write_fd(fd: int, data: bytes) -> None:
    """Write every byte to the open file ``fd`` and flush it to the disk (a full disk or quota shows here,
    not after a rename), then close it. Every write of an output goes through here."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_all(temps: dict[Path, Path]) -> None:
    """Rename each temporary file onto its target, in order; if one fails (or Ctrl-C comes between two),
    put the earlier targets back (from hard links kept to them) before raising."""
    targets = list(temps)
    kept = {}  # target -> link to its old file (none for the last: nothing is renamed after it)
    done = []
    try:
        for path in targets[:-1]:
            if os.path.lexists(path):
                kept[path] = _keep(path)
        try:
            for path in targets:
                os.replace(temps[path], path)
                done.append(path)
        except BaseException as e:
            undone = _put_back(done, kept)
            if isinstance(e, OSError):
                raise ActTailError(f"cannot write {path}: {_reason(e)}" + undone) from None
            raise
    finally:
        for link in kept.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)


@contextlib.contextmanager
def _folders_locked(folders):
    """Hold an exclusive flock on each folder while its renames run, so that two processes saving the same
    plan at once cannot interleave them into one's plan beside the other's sidecar (best effort: a file
    system without flock on folders goes unlocked)."""
    import fcntl

    with contextlib.ExitStack() as stack:
        for folder in sorted({os.path.realpath(f) for f in folders}):  # one order: no deadlock between two
            with contextlib.suppress(OSError):
                fd = os.open(folder, os.O_RDONLY)
                stack.callback(os.close, fd)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield


def _keep(path: Path) -> Path:
    """A second name for the file at ``path`` (a hard link; a copy where the file system has none)."""
    for _ in range(100):
        link = path.parent / f".{path.name}.{os.urandom(4).hex()}.old"
        try:
            os.link(path, link)
            return link
        except FileExistsError:
            continue
        except OSError:
            break
    try:
        return _written_temp(path, Path(path).read_bytes())
    except OSError as e:
        raise ActTailError(f"cannot write {path}: cannot keep its old version ({_reason(e)})") from None


def _put_back(done: list[Path], kept: dict[Path, Path]) -> str:
    """Restore the targets already replaced (their old files, or none); '' or what could not be restored."""
    lost = []
    for path in reversed(done):
        try:
            if path in kept:
                os.replace(kept[path], path)
            else:
                os.unlink(path)
        except OSError:
            lost.append(str(path))
    return f" (and could not put back the old {', '.join(lost)})" if lost else ""


def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


@contextlib.contextmanager
def writing(what: str | os.PathLike):
    """Turn an OSError raised while writing ``what`` (a full disk, a quota, an I/O error) into one
    ActTailError: "cannot write WHAT: No space left on device"."""
    try:
        yield
    except OSError as e:
        raise ActTailError(f"cannot write {what}: {_reason(e)}") from None


def replace_folder(new: Path, dest: Path) -> None:
    """Put the finished folder ``new`` at ``dest`` by renames only (``dest`` is never half-written)."""
    with folder_replaced(new, dest):
        pass


@contextlib.contextmanager
def folder_replaced(new: Path, dest: Path):
    """Put the finished folder ``new`` at ``dest`` by renames only, the old ``dest`` moved aside; if the
    block then fails (the file that goes with the folder cannot be written), the old folder is put back.
    The old folder is deleted once the block has succeeded."""
    new, dest = Path(new), Path(dest)
    aside = None
    with writing(dest):
        if os.path.lexists(dest):
            aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            try:
                os.replace(dest, aside / dest.name)
            except OSError:
                os.rmdir(aside)
                raise
        try:
            os.replace(new, dest)
        except OSError:
            _put_folder_back(aside, dest, replaced=False)
            raise
    try:
        yield
    except BaseException:
        with writing(dest):
            _put_folder_back(aside, dest, replaced=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _put_folder_back(aside: Path | None, dest: Path, replaced: bool) -> None:
    """Undo ``folder_replaced``: the new folder at ``dest`` removed (when ``replaced``), the old one back."""
    if replaced:
        shutil.rmtree(dest, ignore_errors=True)
    if aside is not None:
        os.replace(aside / dest.name, dest)  # should this fail, the old folder stays in ``aside``
        os.rmdir(aside)


write_texts = write_files  # several text files {path: text}, all or none


# ---- outputs never replace inputs ---------------------------------------------------------------------


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same real path (symlinks resolved), or the same (device, inode)
    (hard links, and names that differ only in case on a file system that ignores it)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_outputs(inputs, outputs) -> None:
    """Refuse, before any work, an output that would replace an input: one that is an input file (see
    ``same_file``) or a folder holding one (a folder output replaces what is in it), and two outputs that
    are one file. ``inputs`` and ``outputs`` are (what, path) pairs; paths None are skipped."""
    outputs = [(what, Path(p)) for what, p in outputs if p is not None]
    inputs = [(what, Path(p)) for what, p in inputs if p is not None and os.path.isfile(p)]
    for i, (what, out) in enumerate(outputs):
        real = Path(os.path.realpath(out))
        for what_in, path in inputs:
            if same_file(out, path):
                raise ActTailError(f"{what} {out} would overwrite {what_in} {path}, an input: choose another "
                                   "output path")
            if Path(os.path.realpath(path)).is_relative_to(real):
                raise ActTailError(f"{what} {out} holds {what_in} {path}, an input, and would replace it: choose "
                                   "another output path")
        for other_what, other in outputs[:i]:
            if same_file(out, other):
                raise ActTailError(f"{other_what} {other} and {what} {out} are the same file")


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order) atomically."""
    write_text(path, to_json(obj))


def to_json(obj) -> str:
    """``obj`` as indented JSON text; NaN and infinities are refused (JSON has no such numbers)."""
    try:
        return json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise ActTailError(f"cannot write a non-finite number as JSON ({e})") from None


def read_json(path: str | os.PathLike, what: str = "JSON file", limit: int = MAX_JSON):
    """Read a JSON file (gzip-compressed if its name ends in .gz) of at most ``limit`` bytes (decompressed
    too), turning a missing, non-regular, oversized, unreadable or malformed file into one clear error.

    NaN and Infinity (which Python's json accepts) are refused, and so are integers outside 64 bits (no
    field of ours is one; Python would carry them into arithmetic that overflows) and nesting deeper than
    ``MAX_DEPTH`` (the readers, deepcopy and schema checks recurse)."""
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
    return doc


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


# JSON Schema's "integer" admits 30.0; our readers index and count with these, so only true integers pass.
_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=(
    jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, x: isinstance(x, int) and not isinstance(x, bool))))


def check_model(found, fingerprint: str, where: str, refusal: str = "was made for another checkpoint", *,
                against: str = "this model", advice: str = "") -> None:
    """Refuse a document (plan, analysis, eval result, measurement) made for other weights: its fingerprint
    ``found`` must be ``fingerprint``, that of the weights it is used with (``against``: this model, the
    analysis). One line: "{where} {refusal} (fingerprint {found}, {against} has {fingerprint}){advice}"."""
    if found != fingerprint:
        raise ActTailError(f"{where} {refusal} (fingerprint {found}, {against} has {fingerprint}){advice}")


SCHEMAS = Path(__file__).parent / "schemas"


@lru_cache(maxsize=None)
def schema(name: str) -> dict:
    """The JSON Schema of a file format, shipped in the package as ``schemas/<name>.schema.json``."""
    return json.loads((SCHEMAS / f"{name}.schema.json").read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def _registry() -> referencing.Registry:
    """Every shipped schema under its $id, so one format can embed another (the analysis' greedy section)."""
    docs = [schema(p.name.removesuffix(".schema.json")) for p in sorted(SCHEMAS.glob("*.schema.json"))]
    return referencing.Registry().with_resources((d["$id"], referencing.Resource.from_contents(d)) for d in docs)


def check_schema(doc, name: str, where: str) -> None:
    """One ActTailError naming the first field of ``doc`` that breaks schema ``name`` or is NaN/infinite."""
    bad = nonfinite_path(doc)
    if bad is not None:
        raise ActTailError(f"{where}: field {bad}: not a finite number (NaN or infinite)")
    error = jsonschema.exceptions.best_match(_Validator(schema(name), registry=_registry()).iter_errors(doc))
    if error is not None:
        message = error.message if len(error.message) < 160 else error.message[:157] + "..."
        raise ActTailError(f"{where}: field {error.json_path}: {message}")


def nonfinite_path(doc, path: str = "$") -> str | None:
    """The JSON path of the first NaN or infinite number in ``doc`` (JSON Schema's "number" admits them)."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return path
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        found = nonfinite_path(v, f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}")
        if found is not None:
            return found
    return None


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
