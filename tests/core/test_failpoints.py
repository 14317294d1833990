"""Failpoints are a test facility: armed from the environment when first used, not at import."""

from __future__ import annotations

import signal
import subprocess
import sys

SCRIPT = """
import os
from streamer.core.failpoints import failpoint
os.environ["STREAMER_FAILPOINTS"] = "crash:2"  # set after the import
failpoint("other")
failpoint("crash")
print("passed once", flush=True)
failpoint("crash")
print("never printed", flush=True)
"""


def test_a_failpoint_armed_after_import_kills_the_process_on_its_nth_pass():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert done.stdout == "passed once\n"
