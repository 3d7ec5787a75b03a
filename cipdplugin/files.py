"""Reading a whole input file safely: only a regular file, and only up to a bound.

Every file the library and the command line read whole (the CIPD config
file, metadata files, ``--pins-json``) goes through ``read_regular_file``.
A FIFO would block the read until some other process writes and closes it,
and a device such as ``/dev/zero`` never ends: both are refused before any
read, as is a file larger than the caller's bound, so no input can hang the
caller or exhaust its memory.
"""

from __future__ import annotations

import os
import stat


class UnusableFile(ValueError):
    """The path names something that is not a regular file, or a file over the bound.

    The message says what was found (``is a FIFO, not a regular file``),
    without the path: the caller names the file in its own error.
    """


#: Read in pieces of this size, so that a file growing while it is read
#: cannot make one read allocate more than the bound.
_CHUNK = 1024 * 1024


def describe_size(size: int) -> str:
    """``size`` bytes for a message: ``1 MiB``, ``16 KiB`` or ``100 bytes``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


def file_kind(mode: int) -> str:
    """What a ``st_mode`` describes, with its article: ``a FIFO``, ``a directory``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "a special file")


def read_regular_file(path: str | os.PathLike[str], *, limit: int) -> bytes:
    """The whole content of the regular file at ``path``, at most ``limit`` bytes.

    Never blocks on a FIFO and never reads a device: the type is checked
    before the file is opened and again on the open descriptor (the path
    may be replaced in between). Does not block beyond the file system's
    own latency.

    Raises:
        OSError: the file cannot be opened or read (``FileNotFoundError``
            when it does not exist).
        UnusableFile: it is not a regular file, or it holds more than
            ``limit`` bytes.
    """
    info = os.stat(path)
    _check(info.st_mode, info.st_size, limit)
    # O_NONBLOCK: should the path have become a FIFO since the stat, the
    # open returns at once instead of waiting for a writer.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        _check(info.st_mode, info.st_size, limit)
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # it grew since the stat
                raise UnusableFile(f"is larger than {describe_size(limit)}")
    finally:
        os.close(fd)


def _check(mode: int, size: int, limit: int) -> None:
    if not stat.S_ISREG(mode):
        raise UnusableFile(f"is {file_kind(mode)}, not a regular file")
    if size > limit:
        raise UnusableFile(f"is larger than {describe_size(limit)} ({size} bytes)")
