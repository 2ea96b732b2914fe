"""Owner-only files and directories: the one place secrets and state touch the filesystem.

Every secret (a token, a signing key, a job's token file) and every state directory goes through
these helpers, so each gets the strongest treatment:

- a directory is created 0700, must be a real directory (not a link) owned by this user, and is
  tightened to 0700 if it exists with wider permissions;
- a file is created exclusively (``O_EXCL``: an existing file or a planted link is never reused or
  followed, ``O_NOFOLLOW``), with its mode from the first instant, close-on-exec, and flushed to
  disk before it is reported written;
- a file that must be replaced is written to a fresh private file beside it and renamed over it.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

from common.errors import DsnError

_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class PrivatePathError(DsnError):
    """A private directory or file that cannot be made, or that someone else could read or own."""


class PrivateFileExists(PrivatePathError):
    """A file that was to be created new is already there; it was left untouched."""


def private_dir(path: Path) -> Path:
    """``path`` (and missing parents) as a directory only this user can enter; returns ``path``."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise PrivatePathError(f"cannot create directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise PrivatePathError(f"{path} is not a directory (a link or a file is in its place)")
    if info.st_uid != os.geteuid():
        raise PrivatePathError(f"directory {path} belongs to another user (uid {info.st_uid})")
    if stat.S_IMODE(info.st_mode) & 0o077:
        path.chmod(0o700)  # an existing directory keeps its mode otherwise
    return path


def open_private_file(path: Path, *, mode: int = 0o600) -> int:
    """A new file at ``path`` with ``mode`` from the first instant, opened for writing; returns
    its descriptor (the caller closes it). Never overwrites, never follows a link."""
    try:
        fd = os.open(path, _CREATE, mode)
    except FileExistsError:
        raise PrivateFileExists(f"{path} exists; refusing to overwrite it") from None
    except OSError as exc:
        raise PrivatePathError(f"cannot create {path}: {exc.strerror}") from None
    os.fchmod(fd, mode)  # the umask may have cleared bits the caller needs (a script's x bit)
    return fd


def create_private_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create ``path`` holding ``data``, with ``mode`` from the first instant; never overwrite."""
    fd = open_private_file(path, mode=mode)
    try:
        with os.fdopen(fd, "wb", closefd=False) as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def replace_private_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to a new private file beside ``path`` and rename it over ``path``."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    create_private_file(temporary, data, mode=mode)
    try:
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise PrivatePathError(f"cannot replace {path}: {exc.strerror}") from None


def read_private_file(path: Path, *, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of ``path``, which must be a regular file (not a link), owned by this user, that
    no one else may read, of at most ``max_bytes``."""
    try:
        # O_NONBLOCK: a FIFO planted in the file's place must not hang the reader.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise PrivatePathError(f"{what} {path}: {reason}") from None
    try:
        _check_private(path, os.fstat(fd), max_bytes, what)
        return os.read(fd, max_bytes + 1)[:max_bytes]
    finally:
        os.close(fd)


def _check_private(path: Path, info: os.stat_result, max_bytes: int, what: str) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise PrivatePathError(f"{what} {path} is not a regular file")
    if info.st_uid != os.geteuid():
        raise PrivatePathError(f"{what} {path} belongs to another user (uid {info.st_uid})")
    if info.st_mode & 0o077:
        raise PrivatePathError(f"{what} {path} is readable by others (mode "
                               f"{stat.S_IMODE(info.st_mode):04o}); chmod 600 it")
    if info.st_size > max_bytes:
        raise PrivatePathError(f"{what} {path} is {info.st_size} bytes, more than the "
                               f"{max_bytes} it may hold")
