"""One run at a time in a run folder: an exclusive lock held while a run writes there.

Why: two runs started on the same `run_dir` interleave their metrics and overwrite each other's
checkpoints, and neither notices. The lock is `flock` on `<run_dir>/.lock`: the kernel drops it when
its holder exits, however it exits (a run killed with SIGKILL never leaves a stale lock), and the
file names the holder (pid, host, start time) so the refusal says who holds it. A process may take
the lock on a folder it already holds (the CLI and the trainer both take it); only the main rank of
a multi-process run takes it, since all ranks of one run share the folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from safety_modules.fileio import describe_os_error

LOCK_NAME = ".lock"


class RunLockError(ValueError):
    """The run folder is held by another run, or cannot be a folder at all."""


# resolved run folder -> [file descriptor, holders in this process]
_HELD: dict[str, list[int]] = {}
_GUARD = threading.Lock()


class RunLock:
    """A held lock on a run folder; `release()` (or leaving the `with` block) gives it back."""

    def __init__(self, run_dir: Path, key: str, created: list[Path]) -> None:
        self.run_dir = run_dir
        self._key = key
        self._created = created          # folders this lock made, deepest first
        self._released = False

    def release(self) -> None:
        """Give the lock back; the last holder in this process removes the lock file (and the folder,
        when this lock created it and the run left nothing in it)."""
        if self._released:
            return
        self._released = True
        with _GUARD:
            entry = _HELD.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[self._key]
            try:
                os.unlink(self.run_dir / LOCK_NAME)   # while still held: no other run can hold this inode
            except OSError:
                pass
            os.close(entry[0])
        for folder in self._created:
            try:
                folder.rmdir()                        # only when empty: a failed start leaves no folder
            except OSError:
                break

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(path: Path) -> str:
    """'pid N on HOST since TIME' from a lock file, or a plain phrase when it cannot be read."""
    try:
        info = json.loads(path.read_text())
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its name"


def _take(path: Path, run_dir: Path) -> int:
    """An open descriptor of `path` holding an exclusive flock on the file now at `path`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLockError(f"run_dir {run_dir}: in use by another run ({_holder(path)}); wait for it to "
                               "finish or choose another run_dir") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)      # the holder removed the file as we opened it: lock the new one


def acquire(run_dir: str | Path) -> RunLock:
    """Take the run folder's lock (creating the folder), or raise RunLockError naming the holder."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunLockError(f"run_dir {run_dir}: a file is in the way (expected a folder)")
    created = []
    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            break
        created.append(folder)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunLockError(f"run_dir {run_dir}: cannot create the folder ({describe_os_error(exc)})") from None
    key = str(run_dir.resolve())
    with _GUARD:
        if key in _HELD:
            _HELD[key][1] += 1
            return RunLock(run_dir, key, created=[])
        path = run_dir / LOCK_NAME
        try:
            fd = _take(path, run_dir)
        except OSError as exc:
            raise RunLockError(f"run_dir {run_dir}: cannot take the run lock {path} ({describe_os_error(exc)})") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:300]}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode("utf-8"))
        except OSError:
            pass          # the lock holds without its label (e.g. a full disk); refusals say less
        _HELD[key] = [fd, 1]
    return RunLock(run_dir, key, created)


def is_main_process() -> bool:
    """Rank 0 of a launcher's processes (or a lone process): the one that takes the lock."""
    return int(os.environ.get("RANK", "0")) == 0
