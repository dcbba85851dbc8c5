"""File helpers shared by training, conversion and the device runtime (numpy-free, torch-free).

Every file fer-edge writes goes through ``write_atomic``: a temp file in the
same folder, then a rename, so a reader (or a device) never sees half a file,
and a failed write (full disk, read-only folder) leaves the old file intact.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from fer_edge import UserError


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def refuse_existing(path, force: bool, what: str = "--out") -> None:
    """The one "exists; pass --force" rule: nothing is overwritten unasked."""
    path = Path(path)
    if _exists(path, what) and not force:
        raise UserError(f"{path} exists; pass --force to overwrite it")


def shown(text) -> str:
    """Text (a file name, a message naming one) as it may be printed: every
    character that is not printable written as its escape (a newline as \\n,
    an ANSI escape as \\x1b), so one line stays one line and reads as it is."""
    text = str(text)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def refuse_special(path, what: str = "--out") -> None:
    """An output file's name must not be a device, pipe or socket, nor a link to
    one, even with --force: the rename that writes it would replace /dev/null or
    a link to stdout with a plain file.  (A link to a regular file is replaced
    by the output, its target untouched; a folder is refused by its own check.)"""
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):   # a dangling link: the rename replaces the link
                return
    except (FileNotFoundError, NotADirectoryError):   # nothing there (a file on the way is refused elsewhere)
        return
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} {str(path)[:200]}: {getattr(exc, 'strerror', None) or exc}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise UserError(f"{what} {path} is a device, pipe or socket (or a link to one), not a regular file: "
                        "give another name")


def _exists(path: Path, what: str = "--out") -> bool:
    """Path.exists, with a name the OS refuses (too long, a NUL byte) as one UserError line."""
    try:
        return path.exists()
    except (OSError, ValueError) as exc:
        raise UserError(f"{what} {str(path)[:200]}: {getattr(exc, 'strerror', None) or exc}") from None


def os_error_reason(exc: OSError) -> str:
    """Why an OS call failed, in words (ENOSPC, EROFS, EACCES, ...)."""
    return {errno.ENOSPC: "no space left on the device", errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.ENOTDIR: "a parent of it is a file, not a folder",
            errno.EISDIR: "it is a folder", errno.ENOENT: "no such file or folder"}.get(
                exc.errno, exc.strerror or str(exc))


def os_error_line(exc: OSError, path=None, action: str | None = "cannot write") -> str:
    """One line for an OS error on a path, without a traceback."""
    where = path if path is not None else (exc.filename or "a file")
    reason = os_error_reason(exc)
    return f"{action} {where}: {reason}" if action else f"{where}: {reason}"


def check_writable_parent(path, what: str = "--out") -> Path:
    """Refuse, before long work starts, an output whose folder cannot be made or written."""
    path = Path(path)
    _exists(path, what)
    parent = path.parent if str(path.parent) else Path(".")
    probe = parent
    while not _exists(probe, what):
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UserError(f"{what} {path}: {probe} is a file, not a folder")
    check_writable_folder(probe, what, path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder; give a file name")
    return path


def check_writable_folder(folder, what: str = "--out", path=None) -> None:
    """Refuse an existing folder that files cannot be created in: an empty hidden
    file is made and removed there, the only sure test (root passes os.access on
    read-only and kernel file systems alike).  ``path``: the output named in the message."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".fer-edge-probe-", dir=folder)
    except OSError as exc:
        raise UserError(f"{what} {path or folder}: cannot write into {folder} ({os_error_reason(exc)})") from None
    os.close(fd)
    os.unlink(tmp)


def write_atomic(path, write_fn, force: bool = False, mode: int | None = None) -> None:
    """Write through a temp file in the same folder, then rename: readers never
    see a half-written file and nothing is overwritten without ``force``.
    ``mode``: set before a byte is written (private keys); default: what a plain
    open() would give.  OS errors become one UserError line and leave nothing behind."""
    path = Path(path)
    refuse_special(path)
    refuse_existing(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(os_error_line(exc, path)) from None
    os.close(fd)
    try:
        if mode is not None:
            os.chmod(tmp, mode)
        write_fn(tmp)
        if mode is None:
            # mkstemp creates 0600; give the file the mode a plain open() would have.
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(os_error_line(exc, path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path, data: bytes, force: bool = False, mode: int | None = None) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), force=force, mode=mode)


def json_bytes(data) -> bytes:
    """JSON as fer-edge writes it: indented, UTF-8, newline at the end."""
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_json_atomic(path, data, force: bool = False) -> None:
    write_bytes_atomic(path, json_bytes(data), force=force)
