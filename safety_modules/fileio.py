"""Writing files whole or not at all, and reading JSON with errors that name the file.

Why one module: a run killed mid-write, or a disk that fills during a checkpoint, must never leave a
half-written marker, summary, adapter or checkpoint where a finished one is expected, and the user
must be told plainly what happened ("no space left on device"), not shown a serializer's internal
message (torch's zip writer reports a full disk as "unexpected pos"). Every writer of the framework
goes through `write_file` / `atomic_write`, so that guarantee is made in one place.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

Writer = Callable[[BinaryIO], None]


class FileWriteError(ValueError):
    """A file could not be written (full disk, no permission, a file where a folder should be)."""


class CorruptFileError(ValueError):
    """A file the framework wrote earlier cannot be read back (truncated, not JSON, wrong shape)."""


class _Sink(io.RawIOBase):
    """A binary file wrapper that remembers the OS error of a failed write.

    Why: serializers catch the OSError of a full disk and raise their own error without the errno;
    the remembered error lets `write_file` say what really went wrong.
    """

    def __init__(self, fh: BinaryIO) -> None:
        super().__init__()
        self.fh = fh
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        try:
            self.fh.flush()
        except OSError as exc:
            self.error = exc
            raise


def describe_os_error(exc: OSError) -> str:
    """A plain sentence for an OS error ("no space left on device", "permission denied", ...)."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return "a file is in the way where a folder is expected"
    return (exc.strerror or str(exc)).lower()


def write_file(path: str | Path, write: Writer, shown: str | Path | None = None) -> None:
    """Write `path` with `write(binary_file)`, flushed to disk; a failure raises FileWriteError
    naming `shown` (default: `path`).

    Not atomic by itself (see `atomic_write`); a failed write removes what it wrote.
    """
    path = Path(path)
    shown = path if shown is None else shown
    sink = None
    try:
        with open(path, "wb") as fh:
            sink = _Sink(fh)
            write(sink)  # type: ignore[arg-type]
            sink.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            path.unlink()
        cause = sink.error if sink is not None and sink.error is not None else exc
        if isinstance(cause, OSError):
            raise FileWriteError(f"{shown}: cannot write ({describe_os_error(cause)})") from None
        raise


def atomic_write(path: str | Path, write: Writer) -> Path:
    """Write `path` through a temporary file in the same folder, then rename it into place.

    A reader sees the old file or the new one, never a part; on failure the old file is untouched.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise FileWriteError(f"{path}: cannot write ({describe_os_error(exc)})") from None
    os.close(fd)
    try:
        write_file(tmp, write, shown=path)
        os.replace(tmp, path)
    except OSError as exc:
        raise FileWriteError(f"{path}: cannot write ({describe_os_error(exc)})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """`obj` as JSON (indented, trailing newline), written atomically."""
    dumps.setdefault("indent", 2)
    return write_text_atomic(path, json.dumps(obj, **dumps) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a JSON file, or raise CorruptFileError naming it (and FileNotFoundError when absent)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"{path}: {what} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise CorruptFileError(f"{path}: cannot read {what} ({describe_os_error(exc)})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        ends_early = exc.pos >= len(text.rstrip()) or exc.msg.startswith("Unterminated string")
        cut = ", it ends early: truncated?" if ends_early else ""
        raise CorruptFileError(f"{path}: {what} is not valid JSON ({exc.msg} at line {exc.lineno} column "
                               f"{exc.colno}{cut})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line of a JSON-lines file; a line that is not
    JSON is a CorruptFileError naming the file, the line and the column."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorruptFileError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
