"""What the command line imports: torch only where a learner runs."""

from __future__ import annotations

import subprocess
import sys


def test_help_config_and_the_producer_never_import_torch() -> None:
    # Importing torch takes seconds: `streamer --help`, a config error or `streamer produce`
    # must not wait for it.
    code = ("import sys, streamer.tools.cli, streamer.tools.produce, streamer.config; "
            "streamer.config.load_settings({}).kafka.connection(); "
            "from streamer.core import Batch, LearnerConfig; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_learner_is_still_importable_from_the_core_package() -> None:
    from streamer.core import Learner
    from streamer.core.learner import Learner as Direct

    assert Learner is Direct
