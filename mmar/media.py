"""Moved to :mod:`mmar.io`; the old name stays importable (the same module object)."""

import sys

from mmar import io as _moved

sys.modules[__name__] = _moved
