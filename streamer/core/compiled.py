"""Compiled per-reading loops (numba), for the per-sensor recurrences.

A sensor's statistics, seasonal profiles, AR model and experts' errors are sequential
recurrences: each reading updates its own sensor's state from the previous one. As numpy they
must loop in Python over *ranks* (the k-th reading of every sensor at once), which costs per
reading divided by the fleet size: a fleet of 11 sensors paid ~50x more per reading than one of
1,000. Compiled, one loop walks the readings in arrival order at a cost per reading that does
not depend on the fleet size, and needs no grouping by sensor.

Compiled code is cached on disk beside the source (or under ``NUMBA_CACHE_DIR``) so later
processes start without compiling; where no cache location is writable (a read-only image
without ``NUMBA_CACHE_DIR``) each process compiles once, on its first micro-batch.
"""

from __future__ import annotations

from collections.abc import Callable

import numba


def kernel(fn: Callable) -> Callable:
    """``fn`` compiled to machine code (nopython mode), cached where possible."""
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)
