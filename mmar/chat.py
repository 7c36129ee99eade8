"""Moved to :mod:`mmar.app.chat`; the old name stays importable (the same module object)."""

import sys

from mmar.app import chat as _moved

sys.modules[__name__] = _moved
