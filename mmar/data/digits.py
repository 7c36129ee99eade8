"""Real handwritten digits (scikit-learn's ``load_digits``) as interleaved chat samples.

Three kinds of sample, from a fixed train / held-out split of the 1,797 8x8 images:

* text-to-image: "draw the digit seven" -> image
* image-to-text: image + "which digit is this?" -> "7"
* interleaved: "a 3 and then a 4:" -> image, image

With ``sizes`` (``[height, width]`` pairs, e.g. :data:`MIXED_SIZES`) every image is padded with black
to one of them, centred, the size drawn per sample: a task of several image sizes and aspect
ratios whose content is still judged by the 8x8 classifier (:func:`crop_digit` takes it back out).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from ..types import Image, Message
from .task import TaskDataset

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
T2I_PROMPTS = ("draw the digit {w}", "draw a {d}", "write the number {w}", "a handwritten {d}",
               "show me a {w}", "the digit {d}, please")
I2T_PROMPTS = ("which digit is this?", "what number is written here?", "read this digit", "what is this digit?")
PAIR_PROMPTS = ("a {d1} and then a {d2}:", "draw {w1} then {w2}", "write {d1}, then {d2}")
MAX_VALUE = 16  # load_digits pixels are 0..16
DIGIT_SIZE = 8
MIXED_SIZES = ((8, 8), (8, 12), (12, 8))  # square, wide and tall (height x width), for dataset "digits-sizes"


def pad_digit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An 8x8 digit centred on a black ``size`` (height, width) canvas."""
    h, w = size
    if h < image.shape[0] or w < image.shape[1]:
        raise ValueError(f"cannot pad a {image.shape[0]}x{image.shape[1]} digit to {h}x{w}")
    out = np.zeros((h, w), dtype=image.dtype)
    top, left = (h - image.shape[0]) // 2, (w - image.shape[1]) // 2
    out[top: top + image.shape[0], left: left + image.shape[1]] = image
    return out


def crop_digit(image: np.ndarray) -> np.ndarray:
    """The centred 8x8 digit of a padded image ``[H, W]`` (the inverse of :func:`pad_digit`)."""
    h, w = image.shape
    top, left = (h - DIGIT_SIZE) // 2, (w - DIGIT_SIZE) // 2
    return image[top: top + DIGIT_SIZE, left: left + DIGIT_SIZE]


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 images ``[n, 8, 8]`` (0..255) and their labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.round(data.images * (255.0 / MAX_VALUE)).astype(np.uint8)
    return images, data.target.astype(np.int64)


def load_digit_split(split: str, held_out: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, stratified split: ``"train"`` or ``"test"`` (the held-out images)."""
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images, labels = digit_images()
    xtr, xte, ytr, yte = train_test_split(images, labels, test_size=held_out, random_state=seed, stratify=labels)
    return (xtr, ytr) if split == "train" else (xte, yte)


def t2i_prompt(d: int, i: int = 0) -> str:
    return T2I_PROMPTS[i % len(T2I_PROMPTS)].format(w=DIGIT_WORDS[d], d=d)


def i2t_prompt(i: int = 0) -> str:
    return I2T_PROMPTS[i % len(I2T_PROMPTS)]


def pair_prompt(d1: int, d2: int, i: int = 0) -> str:
    return PAIR_PROMPTS[i % len(PAIR_PROMPTS)].format(d1=d1, d2=d2, w1=DIGIT_WORDS[d1], w2=DIGIT_WORDS[d2])


def all_texts() -> list[str]:
    """Every string the digits task uses, for training its text tokenizer."""
    texts = [str(d) for d in range(10)] + [i2t_prompt(i) for i in range(len(I2T_PROMPTS))]
    texts += [t2i_prompt(d, i) for d in range(10) for i in range(len(T2I_PROMPTS))]
    texts += [pair_prompt(a, b, i) for a in range(10) for b in range(10) for i in range(len(PAIR_PROMPTS))]
    return texts


@dataclass
class DigitsDataset(TaskDataset):
    """Chat samples over one split: per image a text-to-image and an image-to-text sample,
    plus ``pairs_per_image * n`` interleaved two-image samples. Deterministic given ``seed``."""

    split: str = "train"
    seed: int = 0
    pairs_per_image: float = 0.5
    kinds: tuple[str, ...] = ("t2i", "i2t", "pair")
    shift_prob: float = 0.0
    """Probability that an image shown to the model (image-to-text) is shifted by one pixel;
    generation targets are never shifted. The draw is a function of (seed, epoch, index), so a resumed
    run sees the same shifts (set ``epoch`` at the start of each epoch)."""
    epoch: int = 0
    sizes: tuple = ()
    """``(height, width)`` sizes the images are padded to, one drawn per sample (empty: plain 8x8)."""

    def __post_init__(self):
        self.images, self.labels = load_digit_split(self.split)
        rng = random.Random(self.seed)
        n = len(self.labels)
        self.index: list[tuple] = []
        for i in range(n):
            if "t2i" in self.kinds:
                self.index.append(("t2i", i, rng.randrange(1000)))
            if "i2t" in self.kinds:
                self.index.append(("i2t", i, rng.randrange(1000)))
        if "pair" in self.kinds:
            for _ in range(int(self.pairs_per_image * n)):
                self.index.append(("pair", (rng.randrange(n), rng.randrange(n)), rng.randrange(1000)))

    def shifted(self, image: np.ndarray, idx: int) -> np.ndarray:
        rng = random.Random(f"mmar-shift-{self.seed}-{self.epoch}-{idx}")
        if self.shift_prob <= 0 or rng.random() >= self.shift_prob:
            return image
        dy, dx = rng.randint(-1, 1), rng.randint(-1, 1)
        out = np.zeros_like(image)
        h, w = image.shape
        out[max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = \
            image[max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
        return out

    texts = staticmethod(all_texts)

    @staticmethod
    def preview_prompts() -> list[str]:
        return [t2i_prompt(d) for d in range(10)]

    def sized(self, image: np.ndarray, v: int) -> np.ndarray:
        """``image`` padded to the sample's size (drawn from the sample's own number ``v``)."""
        return pad_digit(image, tuple(self.sizes[v % len(self.sizes)])) if self.sizes else image

    def __getitem__(self, idx: int) -> list[Message]:
        kind, i, v = self.index[idx]
        if kind == "t2i":
            return [Message("user", t2i_prompt(int(self.labels[i]), v)),
                    Message("assistant", [Image(self.sized(self.images[i], v // 7))])]
        if kind == "i2t":
            return [Message("user", [Image(self.sized(self.shifted(self.images[i], idx), v // 7)), i2t_prompt(v)]),
                    Message("assistant", str(int(self.labels[i])))]
        a, b = i
        return [Message("user", pair_prompt(int(self.labels[a]), int(self.labels[b]), v)),
                Message("assistant", [Image(self.sized(self.images[a], v // 7)),
                                      Image(self.sized(self.images[b], v // 11))])]
