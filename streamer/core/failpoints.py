"""Crash points for durability tests: ``STREAMER_FAILPOINTS=name:n[,name:n]`` SIGKILLs the process
the n-th time it passes ``failpoint(name)``. Unset (always, in production) it costs one lookup.
"""

from __future__ import annotations

import os
import signal

_ARMED: dict[str, int] = {}
for _item in filter(None, os.environ.get("STREAMER_FAILPOINTS", "").split(",")):
    _name, _, _count = _item.partition(":")
    _ARMED[_name.strip()] = int(_count or 1)


def failpoint(name: str) -> None:
    """Die here, as a crash would, if this point is armed and its count is reached."""
    if name in _ARMED:
        _ARMED[name] -= 1
        if _ARMED[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
