"""Standard output whose reader may leave early (`streamer replay ... | head`): the commands
stop printing quietly instead of ending in a BrokenPipeError traceback."""

from __future__ import annotations

import os
import select
import sys
from collections.abc import Callable

# What a shell reports for a program that a closed pipe stopped (128 + SIGPIPE), as `yes | head`.
EXIT_READER_GONE = 141


def reader_gone(exc: BaseException) -> bool:
    """Whether ``exc`` is a write to stdout whose reader has left, not some other broken pipe
    (a socket's): the pipe's write end then polls as an error."""
    if not isinstance(exc, BrokenPipeError):
        return False
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no stdout, or not a file
        return False


def silence() -> None:
    """Send the rest of stdout to /dev/null, so that later prints and the flush at exit do not
    fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def shown(write: Callable[[], object]) -> bool:
    """Run ``write`` (printing to stdout); False, stdout silenced, when its reader has left."""
    try:
        write()
    except BrokenPipeError as exc:
        if not reader_gone(exc):
            raise
        silence()
        return False
    return True
