"""The run directory: checked before any work, owned by one training at a time.

    with claim(run, resume=False, overwrite=False) as run:   # absolute path, locked
        ...train into it...

A run directory is locked by the process that trains into it: RUN/lock holds that
process's pid, host and start time, and an exclusive flock(2) on it, which the kernel drops
when the process ends however it ends (kill -9 included). A second process finds the flock
taken and fails at once, naming the holder; a lock file whose flock is free was left by a
process that died, and is taken over with a note. Under torchrun only rank 0 claims the
directory (the trainer shares the verdict with the other ranks).

A directory that holds files is refused unless the run is resumed (--resume RUN) or
--overwrite is given; --overwrite removes fastfilm's own files (OWN_FILES) and nothing else.

This module uses the standard library only, so that a process holding a lock for a test or
a script does not pay for torch's start-up.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from fastfilm.errors import UserError

T = TypeVar("T")

LOCK = "lock"
# What a training writes into its run directory (fastfilm.checkpoint and engine.trainer).
OWN_FILES = ("metrics.jsonl", "metrics.json", "last.pt", "best.safetensors", "best.json", "vocab.json")


def absolute(path: str | Path) -> Path:
    """`path` made absolute against the current directory, without resolving symlinks (the
    path the user typed stays recognisable in messages and in saved configs)."""
    return Path(os.path.abspath(os.path.expanduser(str(path))))


def _note(message: str) -> None:
    print(f"fastfilm: {message}", file=sys.stderr)


# ---------------------------------------------------------------- output paths


def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            return p
    return Path("/")


def _probe_writable(directory: Path, what: str) -> None:
    """Create and remove a file in `directory`: the only test that sees read-only mounts,
    ACLs and root alike (os.access answers for permission bits only)."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastfilm-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"{what}: cannot write in {directory} ({e.strerror or e})") from None


def check_output_file(path: str | Path, flag: str) -> Path:
    """An output file named by `flag` (e.g. '--predictions'), checked before any work: not a
    directory, its directory creatable and writable. Returns its absolute path."""
    path = absolute(path)
    what = f"{flag} {path}"
    if path.is_dir():
        raise UserError(f"{what}: is a directory; give a file name (e.g. {path / 'predictions.txt'})")
    existing = _nearest_existing(path.parent)
    if not existing.is_dir():
        raise UserError(f"{what}: {existing} is a file, not a directory")
    _probe_writable(existing, what)
    return path


def _make_dir(run: Path, flag: str) -> None:
    existing = _nearest_existing(run)
    if existing == run and not run.is_dir():
        raise UserError(f"{flag} {run}: is a file, not a directory; give a new directory for the run")
    if existing != run and not existing.is_dir():
        raise UserError(f"{flag} {run}: {existing} is a file, not a directory")
    try:
        run.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {run}: cannot create it ({e.strerror or e})") from None


# ---------------------------------------------------------------- the lock


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (still starting: its details are not written yet)"
    return (f"process {holder.get('pid', '?')} on {holder.get('host', '?')} "
            f"(started {holder.get('started', '?')}{', ' + holder['command'] if holder.get('command') else ''})")


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
        holder = json.loads(text) if text.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """An exclusive lock on RUN/lock, held until release() or the end of the process."""

    def __init__(self, run: Path, fd: int):
        self.path, self.fd = run / LOCK, fd

    @classmethod
    def acquire(cls, run: Path, flag: str = "--out") -> RunLock:
        path = run / LOCK
        for _ in range(10):  # retried only when the file was replaced between open and flock
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise UserError(f"{flag} {run}: cannot write there ({e.strerror or e})") from None
            try:
                locked = cls._flock(fd, path, run)
                # A file unlinked (released) or replaced by its holder since we opened it:
                # our flock is on a stale inode, try again.
                same = locked and os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino
            except BaseException:
                os.close(fd)
                raise
            if not locked:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(f"{run} is in use by {_describe(holder)}: one training per run directory. "
                                f"Wait for it to finish, or train into another --out")
            if same:
                break
            os.close(fd)
        else:
            raise RuntimeError(f"{path}: replaced 10 times while being locked")
        previous = _read_holder(fd)
        if previous:
            _note(f"{run}: taking over the lock left by {_describe(previous)}, which is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)
        return cls(run, fd)

    @staticmethod
    def _flock(fd: int, path: Path, run: Path) -> bool:
        """True when this process now holds the lock, False when another one does."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
        # A filesystem without flock: judge by the recorded pid, which works on one host.
        holder = _read_holder(fd)
        if not holder:
            return True
        if holder.get("host") != socket.gethostname():
            raise UserError(f"{run} may be in use by {_describe(holder)}, and this filesystem cannot lock files "
                            f"to tell; if that process has ended, delete {path}")
        return not _alive(int(holder.get("pid", -1)))

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                self.path.unlink()
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = -1


# ---------------------------------------------------------------- claiming a run


def _own(name: str) -> bool:
    """fastfilm's files, and the temp files of atomic writes to them (a kill mid-write leaves one)."""
    if name in OWN_FILES or name == LOCK:
        return True
    return any(name.startswith(f".{own}.") and name.endswith(".tmp") for own in OWN_FILES)


def _start_clean(run: Path, overwrite: bool) -> None:
    """Refuse a directory holding files unless `overwrite`; then remove fastfilm's own
    (the leftover temp files are gone already: _remove_leftovers)."""
    entries = sorted(p.name for p in run.iterdir() if p.name != LOCK)
    if not entries:
        return
    ours = [n for n in entries if _own(n)]
    if not overwrite:
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
        resume = (f"continue it with `--resume {run}`, or " if (run / "last.pt").exists()
                  else "it holds no last.pt to resume; ")
        raise UserError(f"--out {run} is not empty ({shown}): {resume}start again there with --overwrite "
                        f"(removes fastfilm's files: {', '.join(OWN_FILES)}), or give another --out")
    for name in ours:
        (run / name).unlink(missing_ok=True)
    kept = [n for n in entries if n not in ours]
    done = f"removed {', '.join(ours)} from {run}" if ours else f"{run} holds no fastfilm files"
    _note(f"--overwrite: {done}" + (f"; kept {', '.join(kept[:6])} (not fastfilm's)" if kept else ""))


def _remove_leftovers(run: Path) -> None:
    """Temp files of atomic writes that a killed training left behind (no one else writes
    here while we hold the lock)."""
    for p in run.iterdir():
        if p.name.startswith(".") and _own(p.name):
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def claim(run: str | Path, *, resume: bool, overwrite: bool) -> Iterator[Path]:
    """The run directory, absolute, created if new, locked for the duration, checked:
    resume: it must exist; otherwise it must be empty unless `overwrite` (then fastfilm's
    files are removed first). UserError naming the flag otherwise."""
    flag = "--resume" if resume else "--out"
    run = absolute(run)
    if resume and not run.is_dir():
        raise UserError(f"--resume {run}: no such run directory" if not run.exists()
                        else f"--resume {run}: is a file; give the run directory")
    _make_dir(run, flag)
    lock = RunLock.acquire(run, flag)
    try:
        _remove_leftovers(run)
        if not resume:
            _start_clean(run, overwrite)
        yield run
    finally:
        lock.release()


def check_new_run(run: str | Path, overwrite: bool) -> None:
    """What claim() would refuse for a new run, checked without taking the lock: for commands
    that train several runs (quickstart) and must refuse before their first."""
    run = absolute(run)
    existing = _nearest_existing(run)
    if not existing.is_dir():
        raise UserError(f"--out {run}: {existing} is a file, not a directory")
    if existing == run:
        entries = [p.name for p in run.iterdir() if p.name != LOCK]
        if entries and not overwrite:
            raise UserError(f"{run} holds a run already ({', '.join(sorted(entries)[:6])}): pass --overwrite to "
                            f"train it again, or give another --out")
    _probe_writable(existing, f"--out {run}")


def on_rank0(dctx, check: Callable[[], T]) -> T | None:
    """check() on rank 0 only (the process that writes the run's files), its verdict shared:
    a UserError there is raised on every rank, which would otherwise wait in their next
    collective until the timeout. dctx: an engine.distributed.Dist (is_main, broadcast_flag);
    in a single process this is just check()."""
    error, result = None, None
    if dctx.is_main:
        try:
            result = check()
        except UserError as e:
            error = e
    if dctx.broadcast_flag(error is not None):
        raise error or UserError("rank 0 refused the run's output paths (its message says why)")
    return result
