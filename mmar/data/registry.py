"""Training data: a registry of datasets and the collator (condition dropout + padding)."""

from __future__ import annotations

from collections.abc import Callable

import random

from torch.utils.data import Dataset

from ..sequence import MMARProcessor, as_messages
from .jsonl import BadSample

_DATASETS: dict[str, Callable] = {}


def register_dataset(name: str):
    def wrap(fn):
        _DATASETS[name] = fn
        return fn

    return wrap


@register_dataset("digits")
def _digits(split: str, seed: int = 0, pairs_per_image: float = 0.5, shift_prob: float = 0.0, **_) -> Dataset:
    from .digits import DigitsDataset

    return DigitsDataset(split=split, seed=seed, pairs_per_image=pairs_per_image, shift_prob=shift_prob)


@register_dataset("digits-sizes")
def _digits_sizes(split: str, seed: int = 0, pairs_per_image: float = 0.5, shift_prob: float = 0.0, **_) -> Dataset:
    """Digits padded to 8x8, 8x12 and 12x8 (height x width), one size per sample."""
    from .digits import MIXED_SIZES, DigitsDataset

    return DigitsDataset(split=split, seed=seed, pairs_per_image=pairs_per_image, shift_prob=shift_prob,
                         sizes=MIXED_SIZES)


@register_dataset("spoken-digits")
def _spoken_digits(split: str, seed: int = 0, cache_dir: str | None = None, **_) -> Dataset:
    from .spoken_digits import DEFAULT_CACHE, SpokenDigitsDataset

    return SpokenDigitsDataset(split=split, seed=seed, cache_dir=cache_dir or DEFAULT_CACHE)


@register_dataset("shapes")
def _shapes(split: str, seed: int = 0, **_) -> Dataset:
    from .shapes import ShapesDataset

    return ShapesDataset(split=split, seed=seed)


@register_dataset("scenes")
def _scenes(split: str, seed: int = 0, **_) -> Dataset:
    """32x32 scenes of one to four objects: GenEval-style text-to-image, visual QA and editing samples."""
    from .scenes import ScenesDataset

    return ScenesDataset(split=split, seed=seed)


@register_dataset("jsonl")
def _jsonl(split: str, data_files: str | list[str] | None = None, streaming: bool = False, seed: int = 0,
           shuffle_buffer: int = 1000, **_) -> Dataset:
    from .jsonl import ChatDataset, StreamingChatDataset

    if not data_files:
        raise ValueError("dataset 'jsonl' needs data_files: a .jsonl / .json / .parquet path")
    if streaming:
        return StreamingChatDataset(data_files, split=split, seed=seed, shuffle_buffer=shuffle_buffer)
    return ChatDataset(data_files, split=split)


def build_dataset(name: str, split: str = "train", **kwargs) -> Dataset:
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; built in: {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name](split, **kwargs)


def _has_item(sample, in_answer: bool) -> bool:
    """True when an assistant turn (``in_answer``) or another turn holds an item (not text)."""
    return any((m.role == "assistant") == in_answer and any(not isinstance(s, str) and not hasattr(s, "text")
                                                           for s in m.content) for m in as_messages(sample))


def is_generation_sample(sample) -> bool:
    """True when the assistant produces an image / audio item (so the prompt is its condition)."""
    return _has_item(sample, in_answer=True)


def has_prompt_items(sample) -> bool:
    """True when a non-assistant turn holds an item (an editing sample's input image)."""
    return _has_item(sample, in_answer=False)


class SafeDataset(Dataset):
    """Wraps a dataset: items come as ``(index, sample)``, and a bad record becomes a :class:`BadSample`
    instead of an exception."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int):
        try:
            return idx, self.dataset[idx]
        except (ValueError, TypeError, KeyError, OSError) as e:
            return idx, BadSample(str(e))


class Collator:
    """Encode samples with the processor; with probability ``cond_dropout_prob`` a generation
    sample loses its prompt text, so classifier-free guidance has an unconditional branch. A generation
    sample whose prompt holds items (editing: an input image and an instruction) loses its whole prompt,
    items too, with probability ``item_dropout_prob`` (InstructPix2Pix's "both dropped"), so that the
    ``none`` branch of dual guidance is trained on such data; the two draws share one number, so the
    shares are exact and ``item_dropout_prob`` 0 changes nothing else.
    Each draw is a function of (seed, epoch, sample index) when items come as ``(index, sample)`` (see
    :class:`SafeDataset`), never of a global RNG: data loaders prepare batches ahead, so a global draw
    would be taken before a checkpoint for a batch trained after it, and a resumed run would differ.

    Bad samples (unreadable records, rejected images, reserved tokens in text) are skipped and
    counted in ``skipped``, with the first reasons in ``reasons``; so are samples longer than
    ``max_length`` tokens (0: no limit) or, when packing, than ``pack_length``. With ``pack_length`` samples
    are packed into rows of that many tokens (:meth:`MMARProcessor.pack`) instead of padded."""

    def __init__(self, processor: MMARProcessor, cond_dropout_prob: float = 0.0, pack_length: int = 0,
                 seed: int = 0, max_length: int = 0, item_dropout_prob: float = 0.0):
        if not (0 <= cond_dropout_prob and 0 <= item_dropout_prob and cond_dropout_prob + item_dropout_prob <= 1):
            raise ValueError(f"need cond_dropout_prob, item_dropout_prob >= 0 with a sum <= 1, got "
                             f"{cond_dropout_prob} and {item_dropout_prob}")
        self.processor, self.p, self.pack_length = processor, cond_dropout_prob, pack_length
        self.p_items = item_dropout_prob
        self.max_length = max_length
        self.seed, self.epoch, self._calls = seed, 0, 0
        self.skipped, self.reasons = 0, []

    def _draw(self, index: int | None) -> float:
        if index is None:  # plain samples: a stream of its own, still independent of the global RNG
            self._calls += 1
            index = -self._calls
        return random.Random(f"mmar-dropout-{self.seed}-{self.epoch}-{index}").random()

    def _dropout(self, sample, index: int | None) -> tuple[bool, bool]:
        """(drop the prompt's text, drop its items too) for one sample: one draw ``u``; the text goes when
        ``u < p``, everything when ``p <= u < p + p_items`` and the prompt holds items."""
        if not (self.p > 0 or self.p_items > 0) or not is_generation_sample(sample):
            return False, False
        u = self._draw(index)
        if u < self.p:
            return True, False
        if self.p_items > 0 and u < self.p + self.p_items and has_prompt_items(sample):
            return True, True
        return False, False

    def __call__(self, samples: list) -> dict | None:
        enc = []
        for item in samples:
            index, s = item if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], int) else (None, item)
            try:
                if isinstance(s, BadSample):
                    raise ValueError(s)
                drop, items = self._dropout(s, index)
                enc.append(self.processor.encode(s, drop_prompt=drop, drop_items=items))
            except (ValueError, TypeError, OSError) as e:
                self.skipped += 1
                if len(self.reasons) < 3:
                    self.reasons.append(str(e))
        limit = self.pack_length or self.max_length
        if limit:
            for e in enc:
                if len(e) > limit:
                    self.skipped += 1
                    if len(self.reasons) < 3:
                        self.reasons.append(f"sample longer than max_length={limit} ({len(e)} tokens)")
            enc = [e for e in enc if len(e) <= limit]
        if not enc:
            return None
        if self.pack_length:
            return self.processor.pack(enc, self.pack_length)
        return self.processor.collate(enc, padding_side="right")
