"""Writing a run's files: one run at a time per output directory (`RunLock`), whole
directories at once, so that an interrupted write leaves the previous complete directory (or
none), never half of one, with the permissions the process's umask gives every other file."""

import contextlib
import datetime
import errno
import fcntl
import glob
import json
import logging
import os
import shutil
import socket
import tempfile
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from finetune_module.errors import SettingsError, StorageError

# The files a run writes beside its model (or in its evaluation directory)
METRICS_FILE = "metrics.json"
HOLD_OUT_PREDICTIONS_FILE = "hold_out_predictions.csv"
VALIDATION_PREDICTIONS_FILE = "validation_predictions.csv"
BASE_MODEL_PREDICTIONS_FILE = "base_model_predictions.csv"
SETTINGS_FILE = "finetune_settings.json"  # length caps, generation settings, prompt template
REPORT_FILE = "report.html"
RUN_INFO_FILE = "run_info.json"  # what ran: model, data fingerprint, settings, versions, times

# A directory being replaced is first renamed to `<dir>.old`; a crash between the two renames
# leaves it there, and the next write (or a reader, see `existing_directory`) takes it back.
BEST_MODEL_DIR = "best_model"  # the run directory's folder of its best model
CHECKPOINTS_DIR = "checkpoints"  # the run directory's folder of the Trainer's checkpoints
BACKUP_SUFFIX = ".old"

LOCK_FILE = ".finetune.lock"  # in the output directory: who is writing to it

logger = logging.getLogger(__name__)


# what the machine answers when it will not store a file: the user must free or fix storage
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}
# the same, as libraries without an errno put it (torch.save: "file write failed")
_STORAGE_WORDS = {
    "No space left on device": errno.ENOSPC,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "Disk quota exceeded": errno.EDQUOT,
    "File too large": errno.EFBIG,
    "file write failed": None,
    "enforce fail at inline_container": None,  # torch.save's zip writer after a short write
}


def storage_error(error: BaseException, what: str, path: str) -> StorageError | None:
    """The one-line `StorageError` that `error`, raised while writing `what` at `path`,
    amounts to, or None when it is not the storage refusing a write."""
    code = error.errno if isinstance(error, OSError) else None
    if code not in _STORAGE_ERRNOS:
        text = str(error)
        found = [word for word in _STORAGE_WORDS if word in text]
        if not found:
            return None
        code = _STORAGE_WORDS[found[0]]
    if code is None or code == errno.ENOSPC:
        reason = _space_left(path)
    else:
        reason = os.strerror(code).lower()
    advice = {
        errno.EROFS: "write the run somewhere writable (output_dir)",
        errno.EACCES: "give this user write access, or choose another output_dir",
        errno.EPERM: "give this user write access, or choose another output_dir",
    }.get(code, "free some space, or choose another output_dir")
    return StorageError(
        code or errno.EIO, f"Cannot write {what} {path}: {reason}; {advice}. Nothing "
        "half-written was left there."
    )  # fmt: skip


def _space_left(path: str) -> str:
    """Why a write on `path`'s file system failed, as far as its free space tells."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        stats = os.statvfs(probe or "/")
    except OSError:
        return "the write failed"
    free = stats.f_bavail * stats.f_frsize
    if free > max(64 * 2**20, stats.f_blocks * stats.f_frsize // 100):  # not a full disk
        return f"the write failed ({free / 2**20:.1f} MB free there)"
    return f"no space left on device ({free / 2**20:.1f} MB free)"


class RunLockedError(SettingsError):
    """Another live run holds the output directory."""


def _holder_text(holder: dict[str, Any]) -> str:
    return (
        f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
        f"started {holder.get('started', '?')}"
    )


class _Hold:
    """This process's lock on one directory: the open lock file, how many `RunLock` objects
    share it, and whether taking it created the directory."""

    def __init__(self, lock_file: IO[str], created: bool) -> None:
        self.lock_file, self.created, self.uses = lock_file, created, 1

    def drop(self) -> None:
        """One use fewer; the last one unlocks (see `close`)."""
        self.uses -= 1
        if self.uses == 0:
            self.close()

    def close(self) -> None:
        """Unlocks, leaving an empty lock file (released cleanly); a directory the lock created
        and nothing else was written to is removed, so a run that wrote nothing leaves
        nothing."""
        if self.lock_file.closed:
            return
        directory = os.path.dirname(self.lock_file.name)
        if _HELD.get(directory) is self:
            del _HELD[directory]
        try:
            self.lock_file.seek(0)
            self.lock_file.truncate()
            if self.created and os.listdir(directory) == [LOCK_FILE]:
                os.unlink(self.lock_file.name)
                os.rmdir(directory)
        except OSError:
            pass
        self.lock_file.close()  # closing the file releases the lock


# directory -> this process's lock on it
_HELD: dict[str, _Hold] = {}


def release_directory(directory: str) -> None:
    """Ends this process's every hold on `directory` (its runs there are over, whether they
    succeeded or failed)."""
    hold = _HELD.get(os.path.abspath(directory))
    if hold is not None:
        hold.close()


class RunLock:
    """This process's hold on an output directory: no other run may write to it while any
    `RunLock` of it lives. The operating system's file lock (`flock` on `<dir>/.finetune.lock`)
    is released when the last `RunLock` of the directory is garbage-collected, or when the
    process dies, however it dies; the lock file names the holder (PID, host, start time).

    `release()` ends the hold at once (the run's last write is done: Hamilton keeps a run's
    results in reference cycles, which only the cyclic garbage collector frees). Apart from
    `directory`, what Hamilton's cache fingerprints, the object keeps only that; the open lock
    file is kept by the module, shared by every `RunLock` of the directory in this
    process (a second run in the same process may take it again). With `hold` False it holds
    nothing (for the processes of a multi-process run that do not write)."""

    def __init__(self, directory: str, *, hold: bool = True) -> None:
        self.directory = os.path.abspath(directory)
        if not hold:  # a process that does not write (not the main one of several)
            return
        hold = _HELD.get(self.directory)
        if hold is None:
            created = not os.path.isdir(self.directory)
            hold = _HELD[self.directory] = _Hold(_take(self.directory), created)
        else:
            hold.uses += 1
        _FINALIZERS[self] = weakref.finalize(self, hold.drop)

    def release(self) -> None:
        """Ends this hold now (the run has written its last file); later calls do nothing."""
        finalizer = _FINALIZERS.pop(self, None)
        if finalizer is not None:
            finalizer()

    @contextmanager
    def released_on_failure(self) -> Iterator[None]:
        """A block that writes into the directory: if it fails, the run is over, and the hold
        ends at once (a directory that only the lock created is removed with it)."""
        try:
            yield
        except BaseException:
            self.release()
            raise


# each RunLock's release, kept out of its attributes (which Hamilton's cache fingerprints)
_FINALIZERS: "weakref.WeakKeyDictionary[RunLock, weakref.finalize]" = weakref.WeakKeyDictionary()


def _take(directory: str) -> IO[str]:
    """Opens and locks `<directory>/.finetune.lock` (creating the directory), writing this
    process in it; a lock held by a live process is refused, naming it; one a dead process
    left is taken over with a warning."""
    path = os.path.join(directory, LOCK_FILE)
    try:
        os.makedirs(directory, exist_ok=True)
        lock_file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - kept open while held
    except OSError as e:
        raise storage_error(e, "the output directory", directory) or e from e
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = _read_holder(lock_file.read())
        lock_file.close()
        raise RunLockedError(
            f"Another run is writing to {directory} ({_holder_text(holder)}). Wait for it to "
            "end, or give this run another output_dir."
        ) from None
    lock_file.seek(0)
    previous = _read_holder(lock_file.read())
    if previous:  # a run that ended cleanly leaves the file empty: this one died holding it
        logger.warning(
            "Taking over %s from a run that ended without releasing it (%s).",
            directory,
            _holder_text(previous),
        )
    lock_file.seek(0)
    lock_file.truncate()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    json.dump(holder, lock_file)
    lock_file.flush()
    return lock_file


def _read_holder(text: str) -> dict[str, Any]:
    """The holder recorded in a lock file (empty when there is none or it is unreadable)."""
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def process_umask() -> int:
    """The process's file-creation mask (read without changing it, from /proc where it can)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def _staged_by_live_process(tag: str) -> bool:
    """Whether the staging directory tagged `<host>-<pid>-<random>` belongs to a process that
    still runs on this machine (or to another machine: left alone, it may be live there)."""
    parts = tag.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False  # an older run's staging directory: no owner recorded
    host, pid_text, _ = parts
    if host != socket.gethostname():
        return True
    pid = int(pid_text)
    if pid == os.getpid():
        return False  # this process's own leftovers (an earlier, failed write)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def take_umask(directory: str) -> None:
    """Gives `directory` and everything in it the permissions the process's umask gives a new
    file or directory: `mkdtemp` makes directories, and some writers (safetensors through a
    temporary file) files, that only their owner may read."""
    mask = process_umask()
    os.chmod(directory, 0o777 & ~mask)
    for root, directories, names in os.walk(directory):
        for name in directories:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in names:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextmanager
def atomic_directory(path: str) -> Iterator[str]:
    """Yields a fresh temporary directory that replaces `path` once the block succeeds, with
    the permissions of a directory made under the process's umask.

    The old directory is moved aside, the new one renamed in, and the old one deleted; a
    crash between the two renames leaves the old one as `<path>.old`, restored on the next write.
    Staging directories left by a killed run (`.<name>.tmp-<host>-<pid>-*`) are removed on the
    next write; those of a process that still runs are left alone.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise storage_error(e, "the directory", path) or e from e
    backup = path + BACKUP_SUFFIX
    if os.path.isdir(backup) and not os.path.exists(path):
        os.rename(backup, path)
    prefix = f".{name}.tmp-"
    for stale in glob.glob(os.path.join(glob.escape(parent), glob.escape(prefix) + "*")):
        if not _staged_by_live_process(stale[len(os.path.join(parent, prefix)) :]):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        staging = tempfile.mkdtemp(
            prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-", dir=parent
        )
    except OSError as e:
        raise storage_error(e, "the directory", path) or e from e
    try:
        yield staging
        take_umask(staging)
        if os.path.exists(path):
            shutil.rmtree(backup, ignore_errors=True)
            os.rename(path, backup)
        os.rename(staging, path)
        shutil.rmtree(backup, ignore_errors=True)
        logger.info("Wrote %s", path)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        refused = storage_error(e, "the directory", path)
        if refused is not None:
            raise refused from e
        raise


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON in `path`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, default=str)
        f.write("\n")


def existing_directory(path: str) -> str:
    """`path`, or its `<path>.old` backup when a replacement was killed between its two
    renames (the previous complete directory is there)."""
    backup = path + BACKUP_SUFFIX
    if not os.path.exists(path) and os.path.isdir(backup):
        return backup
    return path


def saved_settings(model_dir: str) -> dict[str, Any]:
    """The length caps, generation settings and prompt template saved with a model
    (`SETTINGS_FILE`: a best model, a checkpoint or an export has it); {} when it has none."""
    path = os.path.join(model_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextmanager
def waiting_lock(path: str) -> Iterator[None]:
    """A block that one process at a time runs (the others wait their turn): an exclusive
    `flock` on the file `path` (created with its directory), released when the block ends or
    the process dies. A sweep's workers promote their best model and write its report under
    one."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        lock_file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept open while held
    except OSError as e:
        raise storage_error(e, "the lock file", path) or e from e
    with lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def write_text_atomically(path: str, text: str) -> None:
    """`text` in the file `path`, written beside it and renamed into place: a reader sees the
    old file or the new one, never half of one."""
    directory, name = os.path.split(os.path.abspath(path))
    handle, staging = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(staging, 0o666 & ~process_umask())
        os.replace(staging, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        refused = storage_error(e, "the file", path)
        if refused is not None:
            raise refused from e
        raise
