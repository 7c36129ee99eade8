"""Drawing one token from logits, shared by the text sampler and the codebook head.

The warpers (temperature, top-k, top-p; the last two are transformers' ``TopKLogitsWarper`` /
``TopPLogitsWarper``) are small processor objects that a :class:`LogitsProcessorList` applies in order, as
in transformers; :func:`draw` takes the argmax or a seeded multinomial draw. The text sampler adds its
masks in front (:mod:`mmar.generation.logits`), the codebook head (:mod:`mmar.heads.codebook`) applies the
warpers to its guided logits, so top-k and top-p mean the same for text and for codes. A leaf module
(torch and transformers only), so heads and the sampler both import it without a cycle.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper


class LogitsProcessor:
    """Maps ``(logits [n, vocab], rows)`` to new logits. ``rows`` is what the caller's processors need (the
    text sampler's per-row counters; ``None`` for codes); the warpers here ignore it."""

    def __call__(self, logits: torch.Tensor, rows: Any = None) -> torch.Tensor:
        raise NotImplementedError


class LogitsProcessorList(list):
    """Applies its processors in order."""

    def __call__(self, logits: torch.Tensor, rows: Any = None) -> torch.Tensor:
        for processor in self:
            logits = processor(logits, rows)
        return logits


class Temperature(LogitsProcessor):
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, logits, rows=None):
        return logits / self.temperature


class TopK(LogitsProcessor):
    """Keep the ``top_k`` largest logits of each row (ties with the k-th kept), the rest to -inf."""

    def __init__(self, top_k: int):
        self.warper = TopKLogitsWarper(top_k)

    def __call__(self, logits, rows=None):
        return self.warper(None, logits)


class TopP(LogitsProcessor):
    """Nucleus sampling: keep the smallest set of tokens whose probabilities add up to ``top_p``."""

    def __init__(self, top_p: float):
        self.warper = TopPLogitsWarper(top_p)

    def __call__(self, logits, rows=None):
        return self.warper(None, logits)


def warpers(temperature: float, top_k: int = 0, top_p: float = 1.0) -> LogitsProcessorList:
    """Temperature, then top-k (``0``: off), then top-p (``1.0``: off); none at all when greedy
    (``temperature == 0``)."""
    procs = LogitsProcessorList()
    if temperature > 0:
        procs.append(Temperature(temperature))
        if top_k:
            procs.append(TopK(top_k))
        if top_p < 1.0:
            procs.append(TopP(top_p))
    return procs


def draw(logits: torch.Tensor, greedy: bool, generator=None) -> torch.Tensor:
    """One token per row of processed ``logits`` ``[n, vocab]``: the argmax when ``greedy``, else a draw
    from the softmax with ``generator``, or, when it is a list, each row with its own generator."""
    if greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
