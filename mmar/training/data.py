"""Moved to :mod:`mmar.data.registry`; the old name stays importable (the same module object)."""

import sys

from mmar.data import registry as _moved

sys.modules[__name__] = _moved
