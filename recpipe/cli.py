"""What every script shares at its edges: user errors become one clear line, not a traceback."""

import functools
import signal
import sys


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing input, unreadable source).

    The message names what was found, where, and how to fix it; scripts print it
    without a traceback and exit with status 2.
    """


def entrypoint(main):
    """Wrap a script's main(): SIGTERM unwinds like Ctrl-C, UserError exits 2 with its message.

    Turning SIGTERM into SystemExit matters: it runs the `finally` blocks that remove a
    stage's half-written staging folder, so a terminated run leaves the previous output.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: the previous output, if any, is left as it was", file=sys.stderr)
            sys.exit(130)

    return wrapper


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
