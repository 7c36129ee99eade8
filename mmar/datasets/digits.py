"""Moved to :mod:`mmar.data.digits`; the old name stays importable (the same module object)."""

import sys

from mmar.data import digits as _moved

sys.modules[__name__] = _moved
