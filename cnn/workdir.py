"""The workdir's files: their names, writing them safely, reading them back, and the lock of the run using them.

Every file cnn writes goes through this module. `write_atomic` puts the
content in a temporary file beside the target and renames it over it, so a
crash, a kill or a full disk leaves either the old file or the new one,
never half of one; and a write that fails (a full disk, a lost mount) ends
the run with one line naming the file (`WriteFailed`). `hold` keeps a second
run out of a workdir in use. `fault` is the one hook tests use to make a
write fail or the process die at a chosen point.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

from cnn.errors import ConfigError, WriteFailed

CONFIG = "config.json"
SUMMARY = "summary.txt"
METRICS = "metrics.jsonl"
STEPS = "steps.jsonl"
RESULTS = "results.json"
CHECKPOINTS = "checkpoints"
BEST = "best_checkpoint"  # the best epoch's state, by train.monitor (train.keep_best)
CV_RESULTS = "cv_results.json"  # the summary of a cross-validation's folds (cnn/train/folds.py)
PLOTS = "plots"
SKIPPED = "skipped_files.txt"  # files the data source could not read: path, a tab, the reason
LOCK = ".lock"  # held (flock) by the run using the workdir; records its PID and host
# The descriptor of a workdir lock the parent process took for this one (a sweep's worker for its trial).
LOCK_FD = "CNN_WORKDIR_LOCK_FD"
# Test hook: ACTION:NAME:N[,...] makes the Nth write of the workdir entry NAME in this process fail as a full
# disk would (ACTION enospc) or kills the process there with SIGKILL (kill). NAME is a file such as
# metrics.jsonl or results.json, or 'checkpoints' (after a checkpoint's files are written, before its rename).
FAULT = "CNN_FAULT"
_passes: dict[str, int] = {}


def fault(name: str) -> None:
    """One write of the workdir entry `name`: does what $CNN_FAULT asks for at this one (nothing when unset)."""
    spec = os.environ.get(FAULT)
    if not spec:
        return
    _passes[name] = _passes.get(name, 0) + 1
    for entry in spec.split(","):
        parts = entry.strip().split(":")
        if len(parts) != 3 or parts[0] not in ("enospc", "kill") or not parts[2].isdigit():
            raise ConfigError(f"{FAULT}={spec!r}: expected ACTION:NAME:N entries, ACTION enospc or kill, "
                              "e.g. enospc:checkpoints:3")
        action, where, count = parts
        if where == name and int(count) == _passes[name]:
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)


def faults_at(name: str) -> bool:
    """Whether $CNN_FAULT names `name` (the checkpoint saver then installs its hook)."""
    return any(entry.split(":")[1:2] == [name] for entry in os.environ.get(FAULT, "").split(","))


def write_failed(path: str, error: BaseException) -> WriteFailed:
    """The one line a failed write ends the run with: the file, the cause, and that a rerun resumes."""
    if isinstance(error, OSError) and error.strerror:
        cause = f"{error.strerror} [errno {error.errno}]"
    else:
        cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    return WriteFailed(f"could not write {path}: {cause}; what was saved before it is intact: make room (or fix "
                       "the folder) and run the same command to resume")


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turns an OSError while writing `path` into `write_failed`'s one line."""
    try:
        yield
    except OSError as e:
        raise write_failed(path, e) from None


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside `path` (same extension) to write; renames it onto `path` if all went well."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.{os.getpid()}.tmp{ext}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path: str, content: str | bytes) -> None:
    """Writes `content` to `path` through a temporary file and a rename; a failure is `WriteFailed`."""
    with writing(path), atomic_path(path) as tmp, open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        fault(os.path.basename(path))
        f.write(content)


def write_json(path: str, content: Any) -> None:
    write_atomic(path, json.dumps(content, indent=2) + "\n")


def read_json(path: str) -> Any:
    """The file's JSON content, or None if it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def check_writable(workdir: str, field: str = "workdir") -> None:
    """Fails before any work if `workdir` cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{field}={workdir!r} is not writable ({e.strerror}); choose a folder you can write to") \
            from None


@dataclasses.dataclass
class Lock:
    """A workdir's lock, held: an flock on WORKDIR/.lock, which the kernel releases when the holder dies."""

    fd: int
    left: dict | None  # the record of a holder that died holding it (a killed run), if one did


def try_lock(workdir: str) -> Lock | None:
    """Takes WORKDIR/.lock (creating the folder) and records this process in it; None while another holds it.

    The holder removes the file when it lets go (`hold`), so a lock taken on
    a file that is no longer WORKDIR/.lock is let go and taken again on the
    new one: two runs never hold different files of one workdir.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _same_file(fd, path):
            break
        os.close(fd)  # its holder removed it after we opened it
    left = _read_record(fd)
    _record(fd)
    return Lock(fd, left)


def _same_file(fd: int, path: str) -> bool:
    try:
        mine, theirs = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)


def holder(workdir: str) -> dict | None:
    """The record (pid, host, since) of the process holding the workdir's lock, as it wrote it."""
    try:
        fd = os.open(os.path.join(workdir, LOCK), os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read_record(fd)
    finally:
        os.close(fd)


def describe_holder(record: dict | None) -> str:
    if not record:
        return "another process (its PID is not recorded yet)"
    return f"PID {record.get('pid')} on {record.get('host')} (since {record.get('since')})"


def _record(fd: int) -> None:
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
    os.ftruncate(fd, 0)
    os.pwrite(fd, (text + "\n").encode(), 0)


def _read_record(fd: int) -> dict | None:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _inherited(workdir: str) -> int | None:
    """The lock the parent took for this process ($CNN_WORKDIR_LOCK_FD), if it is this workdir's."""
    value = os.environ.pop(LOCK_FD, "")  # not for this process's own children
    if not value.isdigit():
        return None
    try:
        if not _same_file(int(value), os.path.join(workdir, LOCK)):
            return None
        fcntl.flock(int(value), fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by our open file already: succeeds
    except OSError:
        return None
    _record(int(value))
    return int(value)


def refuse_if_in_use(workdir: str) -> None:
    """Refuses at once, before a run loads any data, a workdir whose lock another run holds; creates nothing.
    (`hold` takes the lock later, after the set-up that can be refused without touching the workdir.)"""
    inherited = os.environ.get(LOCK_FD, "")
    if inherited.isdigit() and _same_file(int(inherited), os.path.join(workdir, LOCK)):
        return  # held for this process by its parent (a sweep worker), which `hold` takes over
    try:
        fd = os.open(os.path.join(workdir, LOCK), os.O_RDONLY)
    except OSError:
        return  # no lock file: no run holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released at close: only a look
    except BlockingIOError:
        raise in_use(workdir) from None
    finally:
        os.close(fd)


def in_use(workdir: str) -> ConfigError:
    return ConfigError(f"workdir={workdir!r} is in use by another run: {describe_holder(holder(workdir))}; "
                       "let it finish (or stop it), or pass another --workdir")


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock while the block runs: one run per workdir, on this machine or another.

    A second run is refused at once, naming the first's PID and host. A lock
    whose holder was killed is free (the kernel dropped it) and is taken
    over, with a note. A sweep's trial process uses the lock its worker took.
    """
    fd = inherited = _inherited(workdir)
    if fd is None:
        lock = try_lock(workdir)
        if lock is None:
            raise in_use(workdir)
        fd = lock.fd
        if lock.left and lock.left.get("pid") != os.getpid():
            print(f"note: taking over {os.path.join(workdir, LOCK)} from {describe_holder(lock.left)}, which "
                  "stopped without releasing it (killed or crashed)", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if inherited is None:  # a clean end leaves no file; one found later with a record: a killed run
                os.remove(os.path.join(workdir, LOCK))
            else:  # the sweep worker that took it removes it
                os.ftruncate(fd, 0)
        os.close(fd)


@contextlib.contextmanager
def removed_if_refused(workdir: str) -> Iterator[None]:
    """For a run's set-up: if the block fails and `workdir` did not exist before it, the folder goes again, so
    a refused start leaves nothing behind. (Never around training: a run's files are kept however it ends.)"""
    created = not os.path.exists(workdir)
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(workdir, ignore_errors=True)
        raise


def has_checkpoints(workdir: str, folder: str = CHECKPOINTS) -> bool:
    """Whether WORKDIR/checkpoints (or `folder`) holds a saved step (a folder named by its step number)."""
    try:
        return any(name.isdigit() for name in os.listdir(os.path.join(workdir, folder)))
    except OSError:
        return False
