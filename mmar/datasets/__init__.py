"""Moved to :mod:`mmar.data` (built-in datasets live in ``mmar/data/``); the old names stay importable."""

from ..data.builtin import DIGIT_WORDS, DigitsDataset, digit_images, load_digit_split

__all__ = ["DIGIT_WORDS", "DigitsDataset", "digit_images", "load_digit_split"]
