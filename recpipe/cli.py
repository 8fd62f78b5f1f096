"""What every script shares at its edges: user errors, full disks, dead workers and signals
become one clear line on stderr, not a traceback.

Exit statuses:

    2    a user mistake (UserError): a bad flag, a missing input, an unreadable source
    74   the output could not be written (OutputError): the disk is full (ENOSPC, EDQUOT,
         EFBIG) or the folder is read-only / not permitted (EROFS, EACCES, EPERM);
         sysexits.h's EX_IOERR. Needs a person: free space, or another --data.
    75   the cluster failed under the stage (ClusterError): Dask workers died while running
         a task (KilledWorker), or the connection to the scheduler was lost; sysexits.h's
         EX_TEMPFAIL. Running again may succeed once the cause (often memory) is dealt with.
    130  interrupted (Ctrl-C); 143 terminated (SIGTERM)

In every case a stage publishes nothing: its staging folder is removed and the previous
output is left as it was (recpipe/stage.py).
"""

import errno
import functools
import os
import re
import signal
import sys
from pathlib import Path

EXIT_USER_ERROR = 2
EXIT_CANNOT_WRITE = 74
EXIT_CLUSTER_FAILED = 75

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def flag(name):
    """The command-line flag of a parameter or option name: max_history -> --max-history."""
    return "--" + name.replace("_", "-")


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing input, unreadable source).

    The message names what was found, where, and how to fix it; scripts print it
    without a traceback and exit with status 2.
    """


class OutputError(Exception):
    """The output could not be written: disk full or a read-only folder. Exit status 74."""


class ClusterError(Exception):
    """The Dask cluster failed under the stage: workers died, the scheduler was lost. Exit status 75."""


def entrypoint(main):
    """Wrap a script's main(): SIGTERM unwinds like Ctrl-C; UserError, OutputError, ClusterError
    and an OSError of a full disk or a read-only folder exit with their status and one line.

    Turning SIGTERM into SystemExit matters: it runs the `finally` blocks that remove a
    stage's half-written staging folder, so a terminated run leaves the previous output.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted: the previous output, if any, is left as it was", file=sys.stderr)
            sys.exit(130)
        except Exception as error:
            failed = failure(error)
            if failed is None:
                raise
            status, message = failed
            print_error(message)
            sys.exit(status)

    return wrapper


def failure(error):
    """(exit status, message) for an error a script stops on with one line; None for a bug, which
    keeps its traceback."""
    for kind, status in ((UserError, EXIT_USER_ERROR), (OutputError, EXIT_CANNOT_WRITE),
                         (ClusterError, EXIT_CLUSTER_FAILED)):
        if isinstance(error, kind):
            return status, str(error)
    from recpipe import storage  # here: storage imports this module
    if (cause := storage.store_error(error)) is not None:  # object storage: credentials, endpoint, bucket
        failed = storage.failure(cause)  # a refused write is an output that cannot be written
        return (EXIT_CANNOT_WRITE if isinstance(failed, OutputError) else EXIT_USER_ERROR), str(failed)
    # Outside a stage's cluster block (cluster.connect explains failures inside it, naming
    # --data): e.g. preprocess.py replacing preprocessors/ after publishing.
    message = output_failure(error)
    if message is None:
        return None
    return EXIT_CANNOT_WRITE, f"{message}; the script stopped there"


def print_error(message):
    """`error: <message>` on stderr, on one line whatever the message holds: libraries' texts (a corrupt
    Parquet file's, a worker's) can run over several."""
    print("error: " + re.sub(r"\s*\n\s*", " ", str(message).strip()), file=sys.stderr, flush=True)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def output_failure(error, folder=None, flag="--data"):
    """One line saying what could not be written, where, and the fix; None unless `error` (or an
    exception it was raised from) is an OSError of a full disk or of a read-only / not permitted folder.

    PyArrow (26) raises OSError with the errno set but no filename ("[Errno 28] Error writing
    bytes to file. Detail: [errno 28] No space left on device"; "Failed to open local file
    '/x'. Detail: [errno 30] Read-only file system"), and Dask re-raises a worker's OSError
    in the client with its errno; the errno is also read from the text, for errors that
    carry only text. `folder` is where the stage writes (its --data), named in the fix.
    """
    found = write_errno(error)
    if found is None:
        return None
    cause, code = found
    path = _failing_path(cause)
    reason = os.strerror(code).lower()
    folder = Path(folder).resolve() if folder is not None else None
    inside = folder is not None and (path is None or _is_inside(path, folder))
    where = path or (f"{folder}/" if folder else "the output")
    if code in (errno.ENOSPC, errno.EDQUOT):
        fix = (f"free space on the disk that holds {folder}/ or point {flag} at one with room" if inside
               else f"free space on the disk that holds {where}")
        message = f"{reason} while writing {where}: {fix}"
    elif code == errno.EFBIG:
        fix = (f"point {flag} at a file system without that file size limit" if inside
               else "write it to a file system without that file size limit")
        message = f"file too large for its file system (or `ulimit -f`) while writing {where}: {fix}"
    else:
        fix = (f"make {folder}/ writable or point {flag} at a folder that is" if inside
               else "make it writable (and readable) for the user running the script and its Dask workers")
        message = f"{reason}: cannot write {where}: {fix}"
    if folder is not None:
        message += f"; nothing was published, the previous output in {folder}/ was left as it was"
    return message


def write_errno(error):
    """(the exception, its errno) for the first disk-full / not-writable error in `error`'s chain."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) or type(error).__module__.startswith("pyarrow"):
            if isinstance(error, OSError) and error.errno in DISK_FULL + NOT_WRITABLE:
                return error, error.errno
            text = str(error)
            for match in re.finditer(r"\[errno (\d+)\]", text, re.IGNORECASE):
                if int(match.group(1)) in DISK_FULL + NOT_WRITABLE:
                    return error, int(match.group(1))
            for code in DISK_FULL + NOT_WRITABLE:
                if os.strerror(code).lower() in text.lower():
                    return error, code
        error = error.__cause__ or error.__context__
    return None


def _failing_path(error):
    """The path an OSError names: its filename, a shutil.Error's destination, or a quoted absolute path in its text."""
    if isinstance(error, OSError) and error.filename:
        return str(error.filename)
    if isinstance(error, OSError) and error.args and isinstance(error.args[0], list):  # shutil.Error
        for entry in error.args[0]:
            if isinstance(entry, tuple) and len(entry) == 3:
                return str(entry[1])
    match = re.search(r"'(/[^']+)'", str(error))
    return match.group(1) if match else None


def _is_inside(path, folder):
    try:
        Path(path).resolve().relative_to(folder)
        return True
    except ValueError:
        return False
