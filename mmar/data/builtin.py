"""Built-in datasets that need no download."""

from .digits import DIGIT_WORDS, DigitsDataset, digit_images, load_digit_split

__all__ = ["DIGIT_WORDS", "DigitsDataset", "digit_images", "load_digit_split"]
