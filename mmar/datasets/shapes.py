"""Moved to :mod:`mmar.data.shapes`; the old name stays importable (the same module object)."""

import sys

from mmar.data import shapes as _moved

sys.modules[__name__] = _moved
