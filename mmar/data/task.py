"""What the built-in tasks' datasets (digits, shapes, scenes, spoken digits) share.

Each lists its samples in ``self.index`` as ``(kind, item, variant)`` tuples, built once from a seeded
RNG (so a dataset is deterministic given its seed), checks the sample ``kinds`` it is asked for, and
gives ``texts()``: every string of the task, for training its text tokenizer.
"""

from __future__ import annotations

import random

from torch.utils.data import Dataset


class TaskDataset(Dataset):
    index: list[tuple]

    def __len__(self) -> int:
        return len(self.index)

    @staticmethod
    def check_kinds(kinds, known: tuple[str, ...]) -> None:
        """A ``ValueError`` for any of ``kinds`` not in ``known``."""
        unknown = set(kinds) - set(known)
        if unknown:
            names = ", ".join(repr(k) for k in known[:-1]) + f" and / or {known[-1]!r}"
            raise ValueError(f"unknown sample kinds {sorted(unknown)}; expected {names}")

    @staticmethod
    def seeded_index(n: int, kinds, seed: int) -> list[tuple]:
        """A sample of every kind for each of ``n`` items, each with a variant in 0..999 drawn with ``seed``."""
        rng = random.Random(seed)
        return [(kind, i, rng.randrange(1000)) for i in range(n) for kind in kinds]
