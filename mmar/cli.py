"""Moved to :mod:`mmar.app.cli`; ``python -m mmar.cli`` and ``from mmar.cli import main`` still work."""

import sys

from mmar.app.cli import *  # noqa: F401,F403
from mmar.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
