"""SIGTERM and SIGINT: the first asks for a clean stop, the next one exits at once.

Light on purpose (no torch): ``streamer run`` installs it before its seconds-long start-up.
Exiting at once is as safe as a SIGKILL, which the worker is built to survive: whatever was
not checkpointed yet is read again and replayed by the next owner of its partitions."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A second signal this soon after the first is the same request delivered twice (a terminal's
# Ctrl-C reaches a wrapper that forwards it as well as its child): not "now".
SAME_REQUEST_S = 0.5


@dataclass(frozen=True)
class CleanStop:
    """What a process's clean stop does and what exiting at once leaves, for the lines that
    say so, and the logger they are logged to."""

    logger: str
    doing: str
    left: str


WORKER_STOP = CleanStop("streamer.worker", "flush, checkpoint, leave the group",
                        "anything not checkpointed is replayed on the next start")
PRODUCE_STOP = CleanStop("streamer.produce", "the readings sent are flushed",
                         "readings not acknowledged yet may not have been sent")


def _set_soon(event: threading.Event) -> None:
    """Set ``event`` from a thread of its own: a handler runs on the main thread between two
    of its bytecodes, which may be inside that event's own (not reentrant) lock, in its
    ``wait`` or ``set`` (a second signal right behind the first, as ``timeout`` sends, ran the
    handler inside the first one's ``set``); set there, it would wait for itself for ever:
    the demo hung so."""
    threading.Thread(target=event.set, name="stop-request", daemon=True).start()


def set_on_signals(event: threading.Event) -> None:
    """Make SIGTERM and SIGINT set ``event`` (every time: nothing exits at once)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda _signum, _frame: _set_soon(event))


def stop_on_signals(stopping: threading.Event, stop: CleanStop = WORKER_STOP) -> None:
    """Make SIGTERM and SIGINT set ``stopping``; one arriving while it is set already (a
    second Ctrl-C, an impatient ``kill``), more than SAME_REQUEST_S after the signal that set
    it, ends the process at once with 128 + its number. ``stop``: what the lines that say so
    say, and their logger."""

    first_at: float | None = None  # monotonic time of the stop request by signal, if any
    log = logging.getLogger(stop.logger)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal first_at
        name, now = signal.Signals(signum).name, time.monotonic()
        if stopping.is_set() or first_at is not None:
            if first_at is not None and now - first_at < SAME_REQUEST_S:
                return
            log.warning("%s again: exiting at once (%s)", name, stop.left)
            os._exit(128 + signum)
        first_at = now
        log.info("%s: stopping cleanly (%s); %s again exits at once", name, stop.doing, name)
        _set_soon(stopping)

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)


@contextmanager
def stop_requests(exit_on_second: bool = True,
                  stop: CleanStop = WORKER_STOP,
                  ) -> Iterator[threading.Event]:
    """Inside: an event that SIGTERM and SIGINT set (``stop_on_signals``, or with
    ``exit_on_second`` off ``set_on_signals``: a process that must clean up, as the local
    broker's, never exits at once; whoever installs handlers inside may take them over); after:
    the handlers from before, whatever happened (a caller running ``streamer run`` in process
    keeps its Ctrl-C)."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    requested = threading.Event()
    if exit_on_second:
        stop_on_signals(requested, stop)
    else:
        set_on_signals(requested)
    try:
        yield requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
