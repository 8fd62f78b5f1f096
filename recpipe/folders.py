"""The folders this project replaces or deletes: proof that it wrote them, staging, locks.

The project deletes or replaces only what it can prove it wrote. A folder may always be
made when it is missing or empty; otherwise the caller gives the proof (`why_not_ours`):

- a stage folder (`data/merged/`, ...): its `_stage.json` names the stage and the folder holds
  nothing but the files that manifest lists (recpipe.stage.not_a_stage_folder);
- a preprocessors folder: encoders.json, scaler.json, fit.json and nothing else
  (recpipe.preprocess.not_a_preprocessors_folder);
- generate_data.py's raw folder: its `_generated.json` lists every file it wrote
  (recpipe.synthetic.not_a_generated_folder);
- a staging or retired folder: the marker `.recpipe-staging` written into it when this
  project made it, naming the host and process that made it, and when that process started
  (so that another process given the same pid later is not taken for it).

Anything else is refused with a UserError naming what was found, and left untouched;
a symbolic link is never replaced (the folder it points to is not ours to move).

Who uses a folder: a command that reads a stage folder holds a shared lock on
`.<name>.lock` beside it, one that replaces or deletes it the exclusive lock. They are
flock(2) locks: the kernel drops them when their process ends, SIGKILL included, so a
killed run never leaves a folder locked. The last holder removes the lock file; one a
killed command left is free to take (an flock on it is nobody's), and `leftovers` lists it
for `clean leftovers` to remove. A command that cannot take its lock stops at
once, naming the processes that hold it (from /proc/locks). On a read-only file system
readers take no lock: nothing can replace what they read there; on one without flock
(some network mounts) nobody does, and train.py's loader still notices a swapped folder.

Object storage (a URL) has neither folders to rename nor locks. A stage there writes each run
into a version folder of its own inside the stage folder (`merged/v20261201T081500123456-host-1234/`),
marked like a staging folder, and recpipe.stage commits it by writing the manifest that names it;
`version_leftovers` finds the versions no manifest names.
"""

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from recpipe import storage
from recpipe.cli import NOT_WRITABLE, OutputError, UserError

MARKER = ".recpipe-staging"

# A version folder of a stage on object storage: when, where and by which process it was written.
VERSION = re.compile(r"^v\d{8}T\d{12}-[^/]+-\d+$")


# --- proof of ownership -----------------------------------------------------------------------------

def refuse_unless_ours(folder, why_not_ours, action, fix):
    """Stop with a UserError unless `folder` is missing, empty, or proven ours by `why_not_ours(folder)`
    (None when it is ours, else what was found). `action` ("replace", "delete") and `fix` go into the message."""
    folder = storage.path(folder)
    if folder.is_symlink():
        raise UserError(f"refusing to {action} {folder}: it is a symbolic link (to {os.readlink(folder)}), "
                        f"and this project replaces only folders it made; {fix}")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"refusing to {action} {folder}: it is a file, not a folder; {fix}")
    if not any(folder.iterdir()):
        return
    problem = why_not_ours(folder)
    if problem:
        raise UserError(f"refusing to {action} {folder}/: {problem}, so this project cannot tell that it wrote "
                        f"it; {fix}")


def unexpected_entries(folder, expected):
    """The entries of `folder` (relative paths, files and folders, all depths) that are not in
    `expected` (relative paths of files) nor folders above them; symbolic links and special files
    count as unexpected whatever their name."""
    folder = storage.path(folder)
    parents = {str(parent) for name in expected for parent in Path(name).parents if str(parent) != "."}
    found = []
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            found.append(name)
        elif (path.is_file() and name not in expected) or (path.is_dir() and name not in parents):
            if not any(name.startswith(other + "/") for other in found):
                found.append(name)
    return found


def listing(names, limit=3):
    """'a, b, c and 4 more': a list short enough for a one-line message."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- staging and atomic replacement -----------------------------------------------------------------

def make_staging(target):
    """A new, empty staging folder beside `target`, marked as this process's: `.<name>.staging-<host>-<pid>`."""
    if storage.is_url(target):
        return make_version(target)
    target = Path(target)
    staging = target.with_name(f".{target.name}.staging-{socket.gethostname()}-{os.getpid()}")
    if staging.exists() or staging.is_symlink():  # this pid's, from an earlier process that had it
        remove(staging)
    staging.mkdir()
    mark(staging)
    return staging


def make_version(target):
    """A new version folder inside a stage folder on object storage, under a name no earlier run used,
    marked as this process's (the marker is its first object)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    version = storage.path(target) / f"v{stamp}-{socket.gethostname()}-{os.getpid()}"
    mark(version)
    return version


def mark(folder):
    marker = {"made_by": "recpipe", "host": socket.gethostname(), "pid": os.getpid()}
    if (started := process_started(os.getpid())) is not None:
        marker["started"] = started
    (folder / MARKER).write_text(json.dumps(marker) + "\n")


def owner(folder):
    """(host, pid) of the process that made a staging or retired folder, from its marker; None when it
    has no readable marker, which means this project cannot prove it made it."""
    made_by = _marker(folder)
    return made_by and made_by[:2]


def _marker(folder):
    """(host, pid, when that process started or None) from a folder's marker; None without a readable one."""
    try:
        marker = json.loads((storage.path(folder) / MARKER).read_text())
        started = marker.get("started")
        return str(marker["host"]), int(marker["pid"]), started if isinstance(started, str) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remove(folder):
    """Delete a staging or retired folder, or refuse (UserError) when it has no marker of ours."""
    folder = storage.path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    if folder.is_symlink() or owner(folder) is None:
        raise UserError(f"{folder} is not a temporary folder of this project (it has no {MARKER} marker): "
                        "left untouched; move or delete it yourself")
    discard(folder)


def discard(staging):
    """Delete a staging (or retired) folder of ours, its marker last.

    Tasks of a stage that failed may still be writing into it (an external cluster's workers
    finish what they run): what they add after the sweep stays, under the marker, for
    `clean leftovers` or the stage's next run to remove.
    """
    if storage.is_url(staging):
        storage.remove_tree(staging, last=MARKER)
        return
    staging = Path(staging)
    for entry in sorted(staging.iterdir()) if staging.is_dir() else []:
        if entry.name != MARKER:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        if [entry.name for entry in staging.iterdir()] == [MARKER]:
            (staging / MARKER).unlink()
            staging.rmdir()


def replace(staging, target):
    """Put `staging` in place of `target` with two renames; the old folder is deleted last.

    The old target, proven ours by the caller, is marked before it is renamed aside, so
    that a kill between the renames leaves a retired folder `clean leftovers` may remove.
    Between the renames (microseconds) there is no target at all, which the stages'
    contract allows ("the previous output, or none"); there is never a partial one.
    """
    staging, target = Path(staging), Path(target)
    retired = target.with_name(f".{target.name}.retired-{socket.gethostname()}-{os.getpid()}")
    if target.exists():
        mark(target)
        os.rename(target, retired)
    os.rename(staging, target)
    (target / MARKER).unlink(missing_ok=True)
    _fsync_dir(target.parent)
    if retired.exists():
        remove(retired)


def make_parents(path):
    """Create the folders above `path`, but never a staging folder that is gone.

    A task that outlives its stage (the stage failed and removed its staging folder while
    an external worker still ran) must not make the folder again: it would be a folder
    without a marker, that nothing could then prove to be ours and remove.

    Object storage has no folders to make: a file's name holds them.
    """
    if storage.is_url(path):
        return
    parent = Path(path).parent
    above = [parent, *parent.parents]
    root = next((index for index, folder in enumerate(above) if is_temporary_name(folder.name)), None)
    if root is None:
        parent.mkdir(parents=True, exist_ok=True)
        return
    for folder in reversed(above[:root]):
        try:
            folder.mkdir(exist_ok=True)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "the stage's staging folder is gone (the stage stopped)",
                                    str(above[root])) from None


def is_temporary_name(name):
    return name.startswith(".") and (".staging-" in name or ".retired-" in name)


@dataclass
class Leftover:
    """A staging or retired folder beside a target (or a lock file no process holds): `abandoned` when
    its maker is gone (remove it), `note` says why it is kept otherwise; `what` names it in a report."""

    path: Path
    abandoned: bool
    note: str
    what: str = "temporary folder"


LOCK_FILE = "lock file"


def leftovers(parent, name):
    """The staging and retired folders of `name` under `parent`, each with whether it may be removed, and
    its lock file when no process holds it (a killed command's: free to take, but clutter)."""
    found = [_leftover(path) for path in sorted(Path(parent).glob(f".{name}.*-*"))
             if is_temporary_name(path.name) and path.name.startswith(f".{name}.")]
    lock = lock_path(Path(parent) / name)
    if _unheld_lock_file(lock):
        found.append(Leftover(lock, True, "a lock no process holds, left by a killed command: `python pipeline.py "
                                          "clean leftovers` (or the next command that locks it) removes it",
                              LOCK_FILE))
    return found


def version_leftovers(target, committed):
    """The version folders inside a stage folder on object storage but the `committed` one (the one its
    manifest names), each with whether it may be removed: what runs that did not commit left."""
    target = storage.path(target)
    if not target.is_dir():
        return []
    return [_leftover(path) for path in sorted(target.iterdir())
            if VERSION.match(path.name) and path.name != committed]


def _leftover(path):
    made_by = None if path.is_symlink() else _marker(path)
    if made_by is None:
        return Leftover(path, False, f"has no {MARKER} marker, so not made by this project: "
                                     "not touched; delete it yourself if it is yours to delete")
    if made_by[0] != socket.gethostname():
        return Leftover(path, False, f"made on host {made_by[0]}: a run there may be using it; not touched")
    if pid_alive(made_by[1], made_by[2]):
        return Leftover(path, False, f"a run in progress ({describe_process(made_by[1])}): not touched")
    return Leftover(path, True, "left by a killed run: `python pipeline.py clean leftovers` "
                                "(or the stage's next run) removes it")


def remove_abandoned(found):
    """Delete the leftovers among `found` whose maker is gone; return their paths.

    Marker last, and again a few times while something remains: a task of a stage that was
    stopped may still be finishing a file in it (a worker outlives its cluster's close by a
    moment), and the folder must not lose its proof before it is gone.

    On object storage a delete the store refuses raises storage.NotDeleted (discard); here a folder that
    is still there after the tries is not reported removed either: an OutputError names what stayed.
    """
    removed = []
    for leftover in found:
        if not leftover.abandoned:
            continue
        if leftover.what == LOCK_FILE:
            if _remove_unheld_lock_file(leftover.path):
                removed.append(leftover.path)
            continue
        for attempt in range(5):
            discard(leftover.path)
            if not leftover.path.exists():
                break
            time.sleep(0.2)
        else:
            raise _not_removed(leftover.path)
        removed.append(leftover.path)
    return removed


def _not_removed(folder):
    """The OutputError for a temporary folder that discard could not empty: what stayed, and why."""
    stayed = sorted(name for name in storage.files(folder) if storage.name(name) != MARKER)
    why = "files were still being written into it"  # by a late task (on object storage a refusal raised already)
    if stayed and not storage.is_url(folder) and not os.access((Path(folder) / stayed[0]).parent, os.W_OK | os.X_OK):
        why = "permission denied"
    return OutputError(f"could not delete {folder}/: {why} ({listing(stayed) or 'empty folders'} stayed, under its "
                       f"{MARKER} marker); delete it yourself, or fix what keeps it, then run this again")


def pid_alive(pid, started=None):
    """Whether a process runs with this pid on this host (this process counts as gone: whatever it
    left from an earlier life with the same pid is not in use). `started`: when the process meant
    started (process_started), if known: a process with that pid that started at another time is
    another one, which was given the pid after the one meant ended."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started is not None and (now := process_started(pid)) is not None and now != started:
        return False
    return True


def process_started(pid):
    """When a process started, exactly: '<boot id>:<clock ticks after boot>' from /proc; None where that
    cannot be read (no /proc, or no such process).

    Not psutil's create_time(): that adds the boot time, which the kernel derives from the wall clock,
    so it shifts when the clock is stepped, and a live run must never look like another process.
    """
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        # Field 22, counted after the command name, which is in parentheses and may hold spaces or ")".
        return f"{boot}:{int(status[status.rindex(')') + 2:].split()[19])}"
    except (OSError, ValueError, IndexError):
        return None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- who uses a folder ------------------------------------------------------------------------------

def lock_path(folder):
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.lock")


@contextlib.contextmanager
def reading(folder):
    """Hold `folder` for reading: no other command replaces or deletes it meanwhile (on a file system;
    object storage has no locks, see recpipe.stage)."""
    if storage.is_url(folder):
        yield
        return
    try:
        fd = _lock(folder, fcntl.LOCK_SH, "read")
    except OSError as error:
        if error.errno not in (*NOT_WRITABLE, errno.ENOENT):
            raise
        yield  # read-only media (or no folder to read): nothing can replace what is read there
        return
    try:
        yield
    finally:
        _unlock(folder, fd)


@contextlib.contextmanager
def claiming(folder, why_not_ours, action, fix):
    """Hold `folder` to replace or delete it: refused (UserError) unless it is missing, empty or proven
    ours (see refuse_unless_ours), or while another command reads or writes it.

    Ownership is checked before the lock file is made beside it (so a refused folder's
    surroundings are not touched either), and again under the lock. Object storage has no
    locks: there only ownership is checked.
    """
    refuse_unless_ours(folder, why_not_ours, action, fix)
    if storage.is_url(folder):
        yield
        return
    try:
        Path(folder).parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot make {folder}/: a file stands where a folder above it should be; {fix}") from None
    fd = _lock(folder, fcntl.LOCK_EX, action)
    try:
        refuse_unless_ours(folder, why_not_ours, action, fix)
        yield
    finally:
        _unlock(folder, fd)


def _lock(folder, kind, action):
    """An open descriptor of the folder's lock file, locked (`kind`); a UserError naming who holds it.

    The lock file is removed by the last holder (_unlock), so a lock is only ours once the
    file we locked is still the one at the path: else another process removed it meanwhile.
    """
    path = lock_path(folder)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
        except BlockingIOError:
            users = _users(fd)
            os.close(fd)
            raise UserError(f"cannot {action} {folder}/ now: {users}; wait until that finishes (or stop it), "
                            "then run this again") from None
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                os.close(fd)
                raise
            return fd  # a file system without flock (some network mounts): unlocked, as docs/operations.md says
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


def _unheld_lock_file(path):
    """Whether `path` is a lock file (a regular file, not a link) that no process holds, from /proc/locks:
    looking takes no lock, so it never gets in a command's way."""
    try:
        info = os.lstat(path)
        held = Path("/proc/locks").read_text()
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode):
        return False
    # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146376 0 EOF": device and inode are the sixth field.
    return not any(len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(info.st_ino)
                   for fields in map(str.split, held.splitlines()))


def _remove_unheld_lock_file(path):
    """Remove a lock file if no one holds it now, as _unlock does: under its lock, so that a command that
    opened it meanwhile sees it gone (_lock checks the inode) and makes a new one. Whether it was removed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False
        os.unlink(path)
        return True
    except OSError:  # BlockingIOError: a command took it meanwhile, and is its holder now
        return False
    finally:
        os.close(fd)


def _unlock(folder, fd):
    """Release a lock, removing the lock file when no one else holds it (no litter beside the folders)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # from shared: succeeds only when we are the last
        lock_path(folder).unlink()
    except OSError:  # BlockingIOError: others still hold it; or the lock file could not be removed
        pass
    finally:
        os.close(fd)


def _users(fd):
    """Who holds the lock on `fd`'s file, from /proc/locks: 'train.py (pid 1234) is reading it'."""
    inode = os.fstat(fd).st_ino
    readers, writers = [], []
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2146376 0 EOF"; waiters carry "->" and hold nothing
            fields = line.split()
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                (writers if fields[3] == "WRITE" else readers).append(describe_process(int(fields[4])))
    if writers:
        return f"{', '.join(dict.fromkeys(writers))} is replacing or deleting it"
    if readers:
        readers = list(dict.fromkeys(readers))
        return f"{', '.join(readers)} {'is' if len(readers) == 1 else 'are'} reading it"
    return "another process is using it"


def describe_process(pid):
    """'train.py (pid 1234)': the script a process runs, from /proc/<pid>/cmdline (no psutil: the
    training side runs where only PyTorch, PyArrow, pandas and NumPy are installed)."""
    try:
        arguments = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return f"process {pid}"
    script = next((Path(argument).name for argument in arguments[1:] if argument.endswith(".py")),
                  Path(arguments[0]).name if arguments and arguments[0] else "a process")
    return f"{script} (pid {pid})"
