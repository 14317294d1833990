"""Crash points for durability tests: ``STREAMER_FAILPOINTS=name:n[,name:n]`` SIGKILLs the process
the n-th time it passes ``failpoint(name)``. Read from the environment at the first call, not at
import; unset (always, in production) a call costs one lookup.
"""

from __future__ import annotations

import os
import signal

_armed: dict[str, int] | None = None  # what is left of STREAMER_FAILPOINTS, once read


def _parse(spec: str) -> dict[str, int]:
    armed = {}
    for item in filter(None, spec.split(",")):
        name, _, count = item.partition(":")
        armed[name.strip()] = int(count or 1)
    return armed


def failpoint(name: str) -> None:
    """Die here, as a crash would, if this point is armed and its count is reached."""
    global _armed
    if _armed is None:
        _armed = _parse(os.environ.get("STREAMER_FAILPOINTS", ""))
    if name in _armed:
        _armed[name] -= 1
        if _armed[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
