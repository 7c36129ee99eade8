"""Moved to :mod:`mmar.data.spoken_digits`; the old name stays importable (the same module object)."""

import sys

from mmar.data import spoken_digits as _moved

sys.modules[__name__] = _moved
