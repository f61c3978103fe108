"""``python -m uqsynth``: the same as the ``uqsynth`` command."""

import sys

from uqsynth.cli import main

sys.exit(main())
