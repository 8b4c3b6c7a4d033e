"""What a path is before anything opens it: regular files only, never a FIFO, socket or device.

Opening a FIFO for reading blocks until someone writes to it, and reading a character device such
as ``/dev/zero`` never ends: one such entry in a class folder, or named as a model file, would hang
training, evaluation and every torchrun worker forever. Every reader of user files therefore asks
``special_kind`` first (a ``stat``, which never blocks) or opens through ``open_regular``, which
opens without blocking and checks the descriptor it got, so a file swapped in between is caught too.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from ..errors import NotRegularFile

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def kind_of_mode(mode: int) -> str | None:
    """``None`` for a regular file's ``st_mode``, else what the entry is, in words ("a FIFO (named pipe)")."""
    if stat.S_ISREG(mode):
        return None
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def special_kind(path: str | os.PathLike[str]) -> str | None:
    """What ``path`` is when it exists and is not a regular file (symbolic links followed); ``None``
    for a regular file or a path that cannot be looked at (the reader then says why)."""
    try:
        return kind_of_mode(os.stat(path).st_mode)
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return None


def not_regular(path: str | os.PathLike[str], what: str) -> NotRegularFile:
    """The error for ``path``, which is ``what`` (from ``special_kind``)."""
    return NotRegularFile(errno.EINVAL, f"{what}, not a regular file", str(path))


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` opened for reading bytes; raises ``NotRegularFile`` (an ``OSError``) without blocking
    when it is a FIFO, socket, device or folder."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        what = kind_of_mode(os.fstat(fd).st_mode)
        if what is not None:
            raise not_regular(path, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")
