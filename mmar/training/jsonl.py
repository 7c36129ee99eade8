"""Moved to :mod:`mmar.data.jsonl`; the old name stays importable (the same module object)."""

import sys

from mmar.data import jsonl as _moved

sys.modules[__name__] = _moved
