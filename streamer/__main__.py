"""`python -m streamer` is the `streamer` command."""

import sys

from streamer.tools.cli import main

sys.exit(main())
