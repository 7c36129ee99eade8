"""The sampler's output, assembled on the host from the ids each step produced.

The sampler hands every row's new token id (and, for item tokens, its latent) to a
:class:`RowOutput`, which groups them into segments — decoded text runs and ``(modality, tokens)``
items — and fires the streaming callback: ``callback(row, token_id)`` for a text token,
``callback(row, (modality, tokens))`` for a finished item, ``callback(row, None)`` at the row's end.
Items of a modality with several sizes are ``(modality, tokens, (height, width))``, the size read
from the marker after their start token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class GenerationOutput:
    """``segments[b]``: row ``b``'s output in order, ``str`` or ``(modality, tokens [N, token_dim])``
    (``(modality, tokens, (height, width))`` for items of a modality with several sizes)."""

    segments: list[list] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    stats: Any = None  # a speculative call's SpeculativeStats (mmar.generation.speculative)


class RowOutput:
    """One row's ids, text run, open item and finished segments."""

    def __init__(self, row: int, item: str | None, tables, decode, callback, size=None):
        self.row, self.item, self.decode, self.callback = row, item, decode, callback
        self.size = size  # (height, width) of the open item, from its marker
        self.eos, self.start_of, self.size_of = tables.eos, tables.start_of, tables.size_of
        self.end_of = {int(e): m for m, e in zip(tables.names, tables.end.tolist())}
        self.ids: list[int] = []
        self.text: list[int] = []
        self.latents: list[torch.Tensor] = []
        self.segments: list = []
        self.done = False

    def _emit(self, event) -> None:
        if self.callback is not None:
            self.callback(self.row, event)

    def _flush_text(self) -> None:
        if self.text:
            self.segments.append(self.decode(self.text))
            self.text = []

    def _close_item(self) -> None:
        tokens = torch.stack(self.latents)
        self.segments.append((self.item, tokens) if self.size is None else (self.item, tokens, self.size))
        self._emit(self.segments[-1])
        self.item, self.latents, self.size = None, [], None

    def add(self, token: int, latent: torch.Tensor | None = None) -> None:
        """The row's token of one step; ``latent`` when it is an item token."""
        self.ids.append(token)
        if latent is not None:
            self.latents.append(latent)
        elif self.item is not None and token in self.end_of:
            self._close_item()
        elif self.item is not None and token in self.size_of:
            self.size = self.size_of[token]
        elif token == self.eos:
            self._flush_text()
            self.done = True
            self._emit(None)
        elif token in self.start_of:
            self._flush_text()
            self.item = self.start_of[token]
        else:
            self.text.append(token)
            self._emit(token)

    def finish(self) -> None:
        """The limit was reached: keep the text and the complete tokens of an unfinished item."""
        self._flush_text()
        if self.item is not None and self.latents:
            self._close_item()
        if not self.done:
            self._emit(None)


def assemble(rows: list[RowOutput]) -> GenerationOutput:
    return GenerationOutput(segments=[r.segments for r in rows], token_ids=[r.ids for r in rows])
