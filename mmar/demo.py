"""Moved to :mod:`mmar.app.demo`; the old name stays importable (the same module object)."""

import sys

from mmar.app import demo as _moved

sys.modules[__name__] = _moved
