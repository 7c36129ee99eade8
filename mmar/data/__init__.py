"""Data: one dataset / task registry (training, tokenizer training and eval read it), the JSONL and
streaming chat records, the collator, and the built-in datasets that need no download (digits, shapes,
scenes, spoken digits)."""

from .builtin import DIGIT_WORDS, DigitsDataset, digit_images, load_digit_split
from .registry import Collator, SafeDataset, build_dataset, register_dataset

__all__ = ["DIGIT_WORDS", "Collator", "DigitsDataset", "SafeDataset", "build_dataset", "digit_images",
           "load_digit_split", "register_dataset"]
