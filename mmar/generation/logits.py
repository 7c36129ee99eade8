"""Logits processing of text tokens: small processor objects in a list, as transformers'
``LogitsProcessorList``.

Each processor maps ``(logits [n, vocab], rows)`` to new logits, where ``rows`` says, for the ``n``
rows being sampled, how many text tokens and items each has produced so far (tensors, so no
processor loops over rows in Python). Masks (banned tokens, item starts, the length limits) come
first, then the warpers (temperature, top-k, top-p) and ``choose`` draws the tokens: both from
:mod:`mmar.sampling`, which the codebook head uses too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sampling import LogitsProcessor, LogitsProcessorList, Temperature, TopK, TopP, draw, warpers

__all__ = ["BanTokens", "LimitItems", "LogitsProcessor", "LogitsProcessorList", "MaxNewTokens", "MinNewTokens",
           "Temperature", "TextRows", "TopK", "TopP", "build_processors", "choose"]

NEG_INF = float("-inf")


@dataclass
class TextRows:
    """The rows being sampled this step: their counters, each ``[n]`` on the logits' device."""

    n_text: torch.Tensor
    n_items: torch.Tensor


class BanTokens(LogitsProcessor):
    """Never sample ``mask``'s tokens (placeholders, item ends, special tokens)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask  # [vocab] bool

    def __call__(self, logits, rows):
        return logits.masked_fill_(self.mask, NEG_INF)


class LimitItems(LogitsProcessor):
    """No item starts in text mode, nor once a row has ``max_items`` items."""

    def __init__(self, start_ids: torch.Tensor, max_items: int, text_only: bool):
        self.start_ids, self.max_items, self.text_only = start_ids, max_items, text_only

    def __call__(self, logits, rows):
        if not len(self.start_ids):
            return logits
        full = torch.ones_like(rows.n_items, dtype=torch.bool) if self.text_only else rows.n_items >= self.max_items
        cols = logits[:, self.start_ids]
        logits[:, self.start_ids] = torch.where(full[:, None], NEG_INF, cols)
        return logits


class MinNewTokens(LogitsProcessor):
    """No EOS before ``min_new_tokens`` text tokens."""

    def __init__(self, min_new_tokens: int, eos: int):
        self.min_new_tokens, self.eos = min_new_tokens, eos

    def __call__(self, logits, rows):
        if self.min_new_tokens:
            logits[:, self.eos] = torch.where(rows.n_text < self.min_new_tokens, NEG_INF, logits[:, self.eos])
        return logits


class MaxNewTokens(LogitsProcessor):
    """Only EOS once a row has ``max_new_tokens`` text tokens."""

    def __init__(self, max_new_tokens: int, eos: int, vocab: int, device):
        self.max_new_tokens = max_new_tokens
        self.only_eos = torch.full((vocab,), NEG_INF, device=device)
        self.only_eos[eos] = 0.0

    def __call__(self, logits, rows):
        return torch.where((rows.n_text >= self.max_new_tokens)[:, None], self.only_eos, logits)


def build_processors(settings, *, ban_mask: torch.Tensor, start_ids: torch.Tensor, eos: int | None,
                     text_only: bool) -> LogitsProcessorList:
    """The processors for ``settings`` (a :class:`GenerationDefaults`): masks, then warpers unless greedy."""
    procs = LogitsProcessorList([BanTokens(ban_mask), LimitItems(start_ids, settings.max_items, text_only)])
    if eos is not None:
        procs += [MinNewTokens(settings.min_new_tokens, eos),
                  MaxNewTokens(settings.max_new_tokens, eos, ban_mask.shape[0], ban_mask.device)]
    procs += warpers(settings.temperature, settings.top_k, settings.top_p)  # shared with the codebook head
    return procs


def choose(logits: torch.Tensor, greedy: bool, generator, rows: list[int]) -> torch.Tensor:
    """One token per row of processed ``logits``: argmax when ``greedy``, else a draw from the softmax with
    the shared ``generator`` or, when it is a list, each row's own (``rows`` index it)."""
    return draw(logits, greedy, [generator[b] for b in rows] if isinstance(generator, list) else generator)
