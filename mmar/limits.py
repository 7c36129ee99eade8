"""Input caps in tokens and positions: what a prompt (or a remembered chat history) may cost.

The backbone reads at most ``max_position_embeddings`` positions, and every front door (the pipeline,
so ``mmar generate``, ``mmar chat`` and the demo) checks a conversation against that here, in two
steps, so an over-long input fails fast with a clear ``ValueError`` instead of costing memory:

1. before anything is tokenized or decoded (:meth:`InputLimits.check_messages`): the number of
   messages, the number of items (each takes its tokens plus a start and an end marker), and the text
   length against a bound that no text under the limit can exceed (characters > longest vocabulary
   entry x positions);
2. after encoding (:meth:`InputLimits.check_length`): the exact token count, with room for the answer.

:meth:`InputLimits.count_tokens` gives the same count for a conversation without decoding its items
(the demo caps remembered histories with it, server-side).
"""

from __future__ import annotations

from typing import Any

from .types import Text, as_messages

ITEM_MARKERS = 2  # <|x_start|> and <|x_end|> around an item's tokens
TURN_MARKERS = 4  # a turn's role / end markers: a small overestimate for the chat layouts in use


def max_positions(config: Any) -> int | None:
    """The backbone's ``max_position_embeddings`` (None when the backbone does not say)."""
    value = getattr(getattr(config, "backbone_config", None), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _item_tokens(tok: Any) -> int:
    """Tokens of the tokenizer's largest item, its size marker included (tokenizers of several sizes)."""
    if not getattr(tok, "marks_size", False):
        return tok.num_tokens()
    return max(tok.num_tokens(size) for size in tok.sizes) + 1


class InputLimits:
    """The caps of one model: ``positions`` (the backbone's) and the positions each item takes."""

    def __init__(self, processor: Any, config: Any, positions: int | None = None):
        self.processor = processor
        self.positions = positions or max_positions(config)
        self.item_positions = {m: _item_tokens(tok) + ITEM_MARKERS for m, tok in processor.modality_tokenizers.items()}
        self._longest: int | None = None

    @property
    def longest_token(self) -> int:
        """Characters in the longest vocabulary entry: a text of n characters has >= n / this many tokens."""
        if self._longest is None:
            self._longest = max((len(t) for t in self.processor.tokenizer.get_vocab()), default=1) or 1
        return self._longest

    def _too_long(self, what: str, tokens: int | str, limit: int) -> ValueError:
        return ValueError(f"{what} is {tokens} tokens long; at most {limit} fit (the backbone's "
                          f"max_position_embeddings is {self.positions}, and the answer needs room too): shorten it")

    @staticmethod
    def parts(messages: Any) -> tuple[int, list[str], dict[str, int]]:
        """A conversation as what its cost depends on: (messages, texts, items per modality)."""
        messages = as_messages(messages)
        texts, items = [], {}
        for msg in messages:
            for seg in msg.content:
                if isinstance(seg, Text):
                    texts.append(seg.text)
                else:
                    modality = getattr(seg, "modality", None)
                    items[modality] = items.get(modality, 0) + 1
        return len(messages), texts, items

    def check_parts(self, messages: int, texts: list[str], items: dict[str, int], limit: int | None = None,
                    what: str = "the prompt") -> None:
        """Refuse what cannot fit in ``limit`` positions (default: the backbone's, less one for the answer),
        before any text is tokenized or any item decoded."""
        limit = limit or (self.positions - 1 if self.positions else None)
        if not limit:
            return
        if messages > limit:
            raise ValueError(f"{what} has {messages} messages; this model reads at most {limit} positions")
        needed = sum(n * self.item_positions.get(m, ITEM_MARKERS) for m, n in items.items())
        if needed > limit:
            counts = ", ".join(f"{n} {m} item{'s' * (n > 1)}" for m, n in items.items())
            raise ValueError(f"{what} holds {counts}, which take {needed} positions; this model reads at most "
                             f"{limit} (its backbone's max_position_embeddings is {self.positions}): send fewer")
        chars = sum(len(t) for t in texts)
        if chars > self.longest_token * (limit - needed):
            raise self._too_long(what, f"at least {chars // self.longest_token}", limit)

    def check_messages(self, messages: Any, limit: int | None = None, what: str = "the prompt") -> None:
        """:meth:`check_parts` of a conversation."""
        self.check_parts(*self.parts(messages), limit=limit, what=what)

    def count_parts(self, messages: int, texts: list[str], items: dict[str, int], limit: int | None = None) -> int:
        """Tokens of a conversation as encoded, items counted by their positions (not decoded); checks
        :meth:`check_parts` first, so the text tokenized is bounded."""
        self.check_parts(messages, texts, items, limit=limit)
        encode = self.processor.tokenizer.encode
        total = sum(len(encode(t, add_special_tokens=False)) for t in texts)
        total += sum(n * self.item_positions.get(m, ITEM_MARKERS) for m, n in items.items())
        return total + TURN_MARKERS * messages

    def count_tokens(self, messages: Any, limit: int | None = None) -> int:
        """:meth:`count_parts` of a conversation."""
        return self.count_parts(*self.parts(messages), limit=limit)

    def answer_positions(self, mode: str) -> int:
        """Positions the answer needs at least: one token, or one whole item when ``mode`` forces one (its
        start marker is already in the prompt)."""
        return self.item_positions[mode] - 1 if mode in self.item_positions else 1

    def check_length(self, num_tokens: int, mode: str = "auto", what: str = "the prompt") -> None:
        """Refuse an encoded prompt of ``num_tokens`` that leaves no room for the answer."""
        if not self.positions:
            return
        room = self.positions - self.answer_positions(mode)
        if num_tokens > room:
            raise self._too_long(what, num_tokens, room)
