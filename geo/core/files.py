"""Reading files a user (or an attacker) points geo at: regular files only, a size cap before reading, names
that survive any bytes.

Why: a manifest row, a query argument or a bundle's file list can name anything the file system holds. A
symlink to ``/dev/zero`` read whole exhausted memory in seconds, a FIFO blocked a build forever, a 3 GB
non-image used 4 GB of RAM, and one file name that is not UTF-8 aborted a whole build naming no file. Every
reader of outside input opens through here: the file is checked on its open descriptor (no race between
check and read), special files are refused without blocking (``O_NONBLOCK``), and reads stop at the cap.
"""
from __future__ import annotations

import os
import re
import stat

# Larger than any real photo (a 100-megapixel 16-bit TIFF is ~600 MB) and than any manifest geo reads;
# GEO_MAX_FILE_BYTES moves it.
DEFAULT_MAX_BYTES = 1 << 30
# For tables read in pieces (embeddings, predictions, bundle files): their size is no danger, their kind is.
NO_CAP = 1 << 62
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class FileRefused(OSError):
    """A path that is not a readable regular file within the cap; ``reason`` is short and human."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = printable(os.fspath(path)), reason
        super().__init__(f"{self.path}: {reason}")


def max_bytes() -> int:
    """The size cap: ``GEO_MAX_FILE_BYTES`` when set (bytes), else :data:`DEFAULT_MAX_BYTES`."""
    raw = os.environ.get("GEO_MAX_FILE_BYTES")
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"GEO_MAX_FILE_BYTES={raw!r} is not a whole number of bytes") from None
    if value < 1:
        raise ValueError(f"GEO_MAX_FILE_BYTES={raw!r} must be at least 1")
    return value


def _check(path: str | os.PathLike, st: os.stat_result, cap: int) -> int:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
        raise FileRefused(path, f"{kind}, not a regular file")
    if st.st_size > cap:
        raise FileRefused(path, f"{st.st_size:,} bytes, over the {cap:,}-byte limit (GEO_MAX_FILE_BYTES)")
    return st.st_size


def _why(path: str | os.PathLike, e: OSError) -> FileRefused:
    reason = {FileNotFoundError: "file not found", PermissionError: "permission denied",
              IsADirectoryError: "a directory, not a regular file"}.get(type(e), f"cannot open ({e.strerror or e})")
    return FileRefused(path, reason)


def regular_size(path: str | os.PathLike, cap: int | None = None) -> int:
    """The size of a regular file within the cap, or :class:`FileRefused`; for files a library then opens by
    name (Parquet, CSV, FAISS). The check follows symlinks, as the library's open will."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _why(path, e) from None
    return _check(path, st, max_bytes() if cap is None else cap)


def read_capped(path: str | os.PathLike, cap: int | None = None) -> bytes:
    """The whole content of a regular file within the cap, or :class:`FileRefused`. The checks run on the
    open descriptor, and the read stops one byte past the cap (a file that grows meanwhile is refused too)."""
    cap = max_bytes() if cap is None else cap
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _why(path, e) from None
    try:
        size = _check(path, os.fstat(fd), cap)
        with os.fdopen(fd, "rb", closefd=False) as f:
            # one byte past the size fstat gave shows a file that grew; asking for the cap itself made Python
            # allocate a buffer of the cap (1 GiB) for every photo: 80 us a read instead of 20
            data = f.read(size + 1)
            if len(data) > size:  # grew meanwhile (or a /proc file, whose size says 0): read on to the cap
                data += f.read(cap + 1 - len(data))
    except OSError as e:
        raise e if isinstance(e, FileRefused) else FileRefused(path, f"cannot read ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if len(data) > cap:
        raise FileRefused(path, f"grew past the {cap:,}-byte limit while being read")
    return data


def printable(name: str | os.PathLike) -> str:
    """A file name as text that any terminal, JSON or Parquet file takes: names that are not valid UTF-8
    (Python keeps their bytes as lone surrogates) show those bytes as ``\\xNN`` escapes."""
    s = os.fspath(name)
    if isinstance(s, bytes):
        return s.decode("utf-8", "backslashreplace")
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return os.fsencode(s).decode("utf-8", "backslashreplace")


def one_line(name: str | os.PathLike) -> str:
    """:func:`printable`, with control characters (newline, NUL, escape, ...) and line separators shown as
    ``\\xNN``/``\\uNNNN`` escapes: for lines meant for people, where an id holding a newline would otherwise
    print a forged line of output (or a terminal escape sequence)."""
    return "".join(c if c.isprintable() or c == " " else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
                   for c in printable(name))


_ESCAPE = re.compile(rb"\\x([0-9a-f]{2})")


def on_disk(name: str | os.PathLike) -> str:
    """The path to open for a name :func:`printable` produced: the name itself when it exists, else its
    ``\\xNN`` escapes turned back into the bytes the file system holds (so a photo whose name is not UTF-8
    is listed, stored and reported as text, and still opened)."""
    s = os.fspath(name)
    if isinstance(s, bytes) or "\\x" not in s or os.path.lexists(s):
        return s
    raw = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), s.encode("utf-8", "surrogateescape"))
    candidate = os.fsdecode(raw)
    return candidate if os.path.lexists(candidate) else s


PARQUET_BUFFER = 1 << 20  # bytes a Parquet column is read ahead by, page by page


def streamed_parquet(path: str | os.PathLike):
    """A ``pyarrow.parquet.ParquetFile`` that reads its pages through a 1 MiB buffer, without pre-buffering.

    Why: pyarrow's default reads the whole column chunk of a row group before the first batch comes. A
    147K x 1280 embedding file written as one row group (what pandas and most writers make) is then 0.75 GB
    held by Arrow's pool while a build reads 50K rows of it: measured 1.81 GB peak against 1.07 GB streamed,
    the same batches.
    """
    import pyarrow.parquet as pq  # not at import: a cold ``geo query`` reads no Parquet

    return pq.ParquetFile(path, buffer_size=PARQUET_BUFFER, pre_buffer=False)
