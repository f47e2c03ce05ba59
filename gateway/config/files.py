"""Reading config files safely: regular files only, bounded in size, stamped for the reloader.

A config path is usually trusted, but not every file it ends up naming is: an include may point
at ``/dev/zero`` or a FIFO (a read that never ends or never starts), or a file that grew to tens
of megabytes. Files are therefore opened without blocking and checked with ``fstat`` before a
byte is read, and read no further than the limit.

Each file read leaves a ``FileStamp``: what ``stat`` said about it and a digest of the bytes read.
The reloader polls the stat part, and reads a changed file until two readings a moment apart
agree, so a file caught in the middle of being written is never taken for the whole file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass

__all__ = [
    "MAX_FILE_BYTES",
    "MAX_TOTAL_BYTES",
    "FileStamp",
    "Identity",
    "identity_of",
    "read_config_file",
    "reread",
]

# The largest config measured in practice (1,000 routes and 10,000 keys) is under 3 MB; a file
# ten times the size of any real one is a mistake or an attack, and parsing 50 MB would hold the
# process for many seconds and hundreds of MB.
MAX_FILE_BYTES = 4 * 1024 * 1024
# The same bound for the main file and all its includes together.
MAX_TOTAL_BYTES = 16 * 1024 * 1024

Identity = tuple[int, int, int, int]  # device, inode, size, mtime in ns

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


@dataclass(frozen=True)
class FileStamp:
    """One file as it was read: ``identity`` and ``digest`` are None when it could not be."""

    file: str
    identity: Identity | None
    digest: bytes | None


def identity_of(result: os.stat_result) -> Identity:
    # The inode changes on an atomic rename and on a Kubernetes ConfigMap's symlink swap; size
    # and mtime on an in-place write.
    return (result.st_dev, result.st_ino, result.st_size, result.st_mtime_ns)


def read_config_file(file: str, limit: int = MAX_FILE_BYTES) -> tuple[bytes | str, FileStamp]:
    """The bytes of ``file`` (at most ``limit``), or why they cannot be read, and its stamp."""
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        return error.strerror or str(error), FileStamp(file, None, None)
    try:
        info = os.fstat(fd)
        identity = identity_of(info)
        for is_kind, kind in _KINDS:
            if is_kind(info.st_mode):
                return f"it is {kind}, not a regular file", FileStamp(file, identity, None)
        if info.st_size > limit:
            return _too_big(info.st_size, limit), FileStamp(file, identity, None)
        chunks = []
        size = 0
        while size <= limit:  # the file may have grown since fstat
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        data = b"".join(chunks)
    except OSError as error:
        return error.strerror or str(error), FileStamp(file, None, None)
    finally:
        os.close(fd)
    if len(data) > limit:
        return _too_big(len(data), limit), FileStamp(file, identity, None)
    return data, FileStamp(file, identity, hashlib.blake2b(data, digest_size=16).digest())


def reread(stamp: FileStamp) -> FileStamp:
    """``stamp``'s file read again, for comparison."""
    return read_config_file(stamp.file)[1]


def _too_big(size: int, limit: int) -> str:
    mib = limit / (1024 * 1024)
    return f"it is {size:,} bytes, over the limit of {limit:,} bytes ({mib:g} MiB)"
