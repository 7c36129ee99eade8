"""Training data: a registry of datasets and the collator (condition dropout + padding)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from ..sequence import MMARProcessor, as_messages

_DATASETS: dict[str, Callable] = {}


def register_dataset(name: str):
    def wrap(fn):
        _DATASETS[name] = fn
        return fn

    return wrap


@register_dataset("digits")
def _digits(split: str, seed: int = 0, pairs_per_image: float = 0.5, shift_prob: float = 0.0, **_) -> Dataset:
    from ..datasets.digits import DigitsDataset

    return DigitsDataset(split=split, seed=seed, pairs_per_image=pairs_per_image, shift_prob=shift_prob)


def build_dataset(name: str, split: str = "train", **kwargs) -> Dataset:
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; built in: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name](split, **kwargs)


def is_generation_sample(sample) -> bool:
    """True when the assistant produces an image / audio item (so the prompt is its condition)."""
    return any(m.role == "assistant" and any(not isinstance(s, str) and not hasattr(s, "text") for s in m.content)
               for m in as_messages(sample))


class Collator:
    """Encode samples with the processor; with probability ``cond_dropout_prob`` a generation
    sample loses its prompt text, so classifier-free guidance has an unconditional branch.
    The draws use torch's global RNG, which accelerate saves and restores with a checkpoint."""

    def __init__(self, processor: MMARProcessor, cond_dropout_prob: float = 0.0):
        self.processor, self.p = processor, cond_dropout_prob

    def __call__(self, samples: list) -> dict:
        enc = []
        for s in samples:
            drop = self.p > 0 and is_generation_sample(s) and float(torch.rand(())) < self.p
            enc.append(self.processor.encode(s, drop_prompt=drop))
        return self.processor.collate(enc, padding_side="right")
