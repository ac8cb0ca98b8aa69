"""Writing outputs: every file written in full under a temporary name and renamed into place, several as one
unit (all of them or none), folders swapped whole, each OSError one line; and the check, before any work,
that an output can be written and would replace none of the command's inputs."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import ActTailError


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


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order) atomically."""
    write_text(path, to_json(obj))


def to_json(obj) -> str:
    """``obj`` as indented JSON text; NaN and infinities are refused (JSON has no such numbers)."""
    try:
        return json.dumps(obj, indent=2, allow_nan=False) + "\n"
    except ValueError as e:
        raise ActTailError(f"cannot write a non-finite number as JSON ({e})") from None


def write_files(outputs: dict, check=None) -> None:
    """Write several files {path: text or bytes} as one unit: all of them, or none.

    Every file is written in full to a temporary name beside its target first (a full disk there leaves
    every target as it was); then they are renamed into place in the order given, each target that exists
    kept under a hard link until the last rename has succeeded, so a failed rename puts the earlier ones
    back. Put last the file that names the others (a plan after its tensors file): a crash between two
    renames then leaves at worst a new unnamed file beside a consistent old one. No temporary file stays
    behind; every OSError is one ActTailError ("cannot write PATH: No space left on device"). ``check()``
    runs while the output folders are locked, right before the renames: a refusal there (another plan's
    sidecar saved meanwhile) leaves every target as it was.
    """
    temps: dict[Path, Path] = {}
    try:
        for path, data in outputs.items():
            path = Path(path)
            temps[path] = _written_temp(path, data.encode("utf-8") if isinstance(data, str) else data)
        with _folders_locked({p.parent for p in temps}):
            if check is not None:
                check()
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


def check_new_folder(out_dir: str | os.PathLike, inputs) -> Path:
    """Before any work: ``out_dir`` can be made (new, or an empty folder, in a writable folder) and is none of
    ``inputs`` ((what, path) pairs)."""
    out_dir = Path(out_dir)
    check_output(out_dir, folder=True)
    check_outputs(inputs, [("output folder", out_dir)])
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ActTailError(f"output folder {out_dir} exists and is not empty")
    return out_dir


def write_model_folder(out_dir: Path, tensors: dict, files: dict[str, str | bytes]) -> Path:
    """A model folder at ``out_dir``: ``tensors`` as model.safetensors and ``files`` {name: content}. It appears
    complete or not at all: written into a temporary folder beside it, then renamed onto it (an empty folder
    there is replaced); if another run made it meanwhile, this one stops with a clear error and leaves nothing."""
    with writing(out_dir):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with writing(out_dir):
            try:
                save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            except SafetensorError as e:  # a full disk: "No space left on device (os error 28)"
                raise ActTailError(f"cannot write {out_dir}: {str(e).removeprefix('Error while serializing: ')}") \
                    from None
            for name, data in files.items():
                write_file(tmp / name, data)
            for f in tmp.iterdir():
                f.chmod(0o644)
            tmp.chmod(0o755)
            _rename_into(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _rename_into(tmp: Path, out_dir: Path) -> None:
    """Rename the finished folder onto ``out_dir`` (replacing an empty folder, as POSIX rename does)."""
    try:
        os.rename(tmp, out_dir)
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise ActTailError(f"{out_dir} appeared while it was written (another run?): left as it is") from None
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ActTailError(f"{out_dir} was filled while it was written (another run?): left as it is") from None
        raise


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
