"""SIGTERM and SIGINT: the first asks for a clean stop, the next one exits at once.

Light on purpose (no torch): ``streamer run`` installs it before its seconds-long start-up.
Exiting at once is as safe as a SIGKILL, which the worker is built to survive: whatever was
not checkpointed yet is read again and replayed by the next owner of its partitions."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("streamer.worker")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(stopping: threading.Event) -> None:
    """Make SIGTERM and SIGINT set ``stopping``; one arriving while it is set already (a
    second Ctrl-C, an impatient ``kill``) ends the process at once with 128 + its number."""

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("%s again: exiting at once (anything not checkpointed is replayed on "
                        "the next start)", name)
            os._exit(128 + signum)
        log.info("%s: stopping cleanly (flush, checkpoint, leave the group); %s again "
                    "exits at once", name, name)
        stopping.set()

    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
