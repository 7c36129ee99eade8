"""Interleaved samples -> model inputs.

A sample is a conversation: a list of :class:`Message` (role + segments), or a
plain list of segments (one assistant turn: everything is trained on). Each
image / audio segment becomes ``<|image_start|> <|image|>*N <|image_end|>``;
the placeholders are replaced by projected continuous tokens in the model.

Images of several sizes: when the image tokenizer has more than one size, a
size marker follows the start token, ``<|image_start|> <|image_8x12|>
<|image|>*N <|image_end|>`` with ``N = (8 / p) * (12 / p)`` (Emu3 and
Lumina-mGPT write the size there too). The marker is an ordinary special token
the LM head learns to predict, so a sampler reads (or forces) the size before
drawing the item's tokens, and :func:`grid_positions` gives every placeholder
its (row, column) cell from the marker before it. A tokenizer with one size
keeps the plain layout, so models saved before this read their sequences alike.

Labels follow one rule: ``labels[t]`` is the token the model must predict at
``t`` (``-100`` where nothing is trained). A placeholder id in ``labels``
marks a continuous token that the modality's head learns to produce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .tokenizers import (ModalityTokenizer, build_tokenizer, marked_sizes, modality_token_ids, modality_tokens,
                         size_token, size_token_ids)

from .types import IGNORE, ROLES, Audio, Image, Item, Message, Segment, Text, as_messages  # noqa: F401


def chat_markers(tokenizer) -> dict | None:
    """ChatML turn markers (Qwen, many instruct models) when the tokenizer has them; otherwise turns are
    laid out back to back and each answer ends with EOS (the built-in from-scratch models)."""
    vocab = tokenizer.get_vocab()
    if "<|im_start|>" not in vocab or "<|im_end|>" not in vocab:
        return None
    return {"start": vocab["<|im_start|>"], "end": vocab["<|im_end|>"],
            "newline": tokenizer.encode("\n", add_special_tokens=False)}


@dataclass
class Encoded:
    """One sample laid out as token ids, labels and per-modality continuous tokens."""

    input_ids: list[int]
    labels: list[int]
    values: dict[str, list[torch.Tensor]]

    def __len__(self) -> int:
        return len(self.input_ids)


class MMARProcessor:
    """Text tokenizer + modality tokenizers + the layout rules; builds batches for the model."""

    def __init__(self, tokenizer, modality_tokenizers: dict[str, ModalityTokenizer]):
        self.tokenizer = tokenizer
        self.modality_tokenizers = dict(modality_tokenizers)
        self.token_ids = modality_token_ids(tokenizer, self.modality_tokenizers)
        # size markers of tokenizers with several sizes: {modality: {(height, width): id}}
        self.size_ids = {m: dict(zip(marked_sizes(t), size_token_ids(tokenizer, m, marked_sizes(t))))
                         for m, t in self.modality_tokenizers.items() if marked_sizes(t)}
        self.reserved = {tok: m for m in self.modality_tokenizers for tok in modality_tokens(m).values()}
        self.reserved.update({size_token(m, s): m for m, ids in self.size_ids.items() for s in ids})
        self.reserved.update({t: "special" for t in tokenizer.all_special_tokens})
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.chat = chat_markers(tokenizer)
        # the token that ends an answer: ChatML's <|im_end|> when the tokenizer has it, else EOS
        self.stop_id = self.chat["end"] if self.chat else self.eos_id

    # -- segments -> ids -----------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("empty text segment: give some text, or leave the segment out")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (bytes decoded with surrogateescape): no tokenizer takes it
            raise ValueError(f"text is not valid Unicode: {e.reason} at position {e.start} "
                             f"({text[e.start:e.end]!r}); decode bytes as UTF-8 before passing them") from None
        for tok in self.reserved:
            if tok in text:
                raise ValueError(f"text {text[:40]!r} contains the reserved token {tok!r}; "
                                 "pass images / audio as Image / Audio segments instead")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_item(self, segment: Item) -> tuple[str, torch.Tensor]:
        """A segment -> its modality and tokens."""
        modality, tokens, _ = self.encode_item_sized(segment)
        return modality, tokens

    def item_ids(self, modality: str, num_tokens: int, size: tuple[int, int] | None = None) -> list[int]:
        """The ids of one item: start, the size marker (tokenizers with several sizes), placeholders, end."""
        tid = self.token_ids[modality]
        return [tid["start"]] + self.size_marker(modality, size) + [tid["token"]] * num_tokens + [tid["end"]]

    def size_marker(self, modality: str, size: tuple[int, int] | None) -> list[int]:
        """``[id]`` of the marker of ``size``, ``[]`` for a modality without markers."""
        if modality not in self.size_ids:
            return []
        if size is None or tuple(size) not in self.size_ids[modality]:
            known = ", ".join(f"{h}x{w}" for h, w in self.size_ids[modality])
            got = "no size" if size is None else f"{size[0]}x{size[1]}"
            raise ValueError(f"{modality}: {got} given; this model's {modality}s are {known} (height x width)")
        return [self.size_ids[modality][tuple(size)]]

    def encode_item_sized(self, segment: Item) -> tuple[str, torch.Tensor, tuple[int, int] | None]:
        """A segment -> its modality, tokens and size (``(height, width)`` for images, else ``None``)."""
        modality = segment.modality
        if modality not in self.modality_tokenizers:
            raise ValueError(f"this model has no {modality} tokenizer; it handles "
                             f"{', '.join(self.modality_tokenizers) or 'text only'}")
        tok = self.modality_tokenizers[modality]
        raw = segment.raw()
        try:
            item = tok.preprocess(raw)
        except (ValueError, TypeError, FileNotFoundError) as e:
            where = f"{os.fspath(raw)}: " if isinstance(raw, (str, os.PathLike)) and os.fspath(raw) not in str(e) else ""
            raise type(e)(f"{where}{modality} segment rejected: {e}") from e
        return modality, tok.encode(item[None])[0], tok.size_of(item)

    def encode(self, sample: Any, *, add_generation_prompt: bool = False, drop_prompt: bool = False,
               drop_items: bool = False, start_modality: str | None = None,
               start_size: tuple[int, int] | None = None) -> Encoded:
        """Lay out one sample. ``drop_prompt`` removes the non-assistant text (condition dropout: what the
        ``items`` branch of guidance sees); with ``drop_items`` too the non-assistant items go as well
        (BOS and the answer only: the ``none`` branch);
        ``add_generation_prompt`` leaves the sequence open for the model to answer, optionally
        already inside a ``start_modality`` item (forced text-to-image), of ``start_size`` (height,
        width) when given and the modality has several sizes (else the model picks the size)."""
        messages = as_messages(sample)
        ids: list[int] = [] if self.bos_id is None else [self.bos_id]
        labels: list[int] = [IGNORE] * len(ids)
        values: dict[str, list[torch.Tensor]] = {m: [] for m in self.modality_tokenizers}
        # with condition dropout only the answer's items remain, exactly what CFG's unconditional branch sees
        markers = self.chat is not None and not drop_prompt
        for msg in messages:
            train = msg.role == "assistant"
            if markers:
                ids += self.role_prefix(msg.role)
                labels += [IGNORE] * len(self.role_prefix(msg.role))
            for seg in msg.content:
                if drop_prompt and drop_items and not train:
                    continue
                if isinstance(seg, Text):
                    if drop_prompt and not train:
                        continue
                    new = self.encode_text(seg.text)
                    ids += new
                    labels += new if train else [IGNORE] * len(new)
                else:
                    modality, tokens, size = self.encode_item_sized(seg)
                    new = self.item_ids(modality, tokens.shape[0], size)
                    ids += new
                    labels += new if train else [IGNORE] * len(new)
                    values[modality].append(tokens)
            if markers:
                ids += [self.chat["end"]] + self.chat["newline"]
                labels += ([self.chat["end"]] if train else [IGNORE]) + [IGNORE] * len(self.chat["newline"])
            elif train and self.stop_id is not None:
                ids.append(self.stop_id)
                labels.append(self.stop_id)
        if add_generation_prompt and self.chat is not None:
            ids += self.role_prefix("assistant")
            labels += [IGNORE] * len(self.role_prefix("assistant"))
        if add_generation_prompt and start_modality is not None:
            if start_modality not in self.token_ids:
                raise ValueError(f"cannot start a {start_modality!r} item: this model has no such tokenizer")
            opened = [self.token_ids[start_modality]["start"]]
            if start_size is not None and start_modality in self.size_ids:
                opened += self.size_marker(start_modality, start_size)
            ids += opened
            labels += [IGNORE] * len(opened)
        if len(ids) == 0:
            raise ValueError("the sample is empty")
        return Encoded(ids, labels, values)

    def role_prefix(self, role: str) -> list[int]:
        """ChatML's ``<|im_start|>role\n``."""
        return [self.chat["start"]] + self.tokenizer.encode(f"{role}\n", add_special_tokens=False)

    # -- batches -------------------------------------------------------------------------------
    def collate(self, encoded: list[Encoded], padding_side: str = "right") -> dict[str, Any]:
        """Pad to the longest sample. Continuous tokens are concatenated in row-major order,
        the order in which their placeholders appear in ``input_ids``."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        longest = max(len(e) for e in encoded)
        input_ids = torch.full((len(encoded), longest), self.pad_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE)
        mask = torch.zeros_like(input_ids)
        for i, e in enumerate(encoded):
            sl = slice(longest - len(e), longest) if padding_side == "left" else slice(0, len(e))
            input_ids[i, sl] = torch.tensor(e.input_ids)
            labels[i, sl] = torch.tensor(e.labels)
            mask[i, sl] = 1
        values = {}
        for m, tok in self.modality_tokenizers.items():
            items = [v for e in encoded for v in e.values[m]]
            if items:
                values[m] = torch.cat(items)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
                "labels": labels, "values": values}

    def pack(self, encoded: list[Encoded], max_length: int) -> dict[str, Any]:
        """Pack samples into rows of ``max_length`` tokens (first-fit decreasing) instead of padding.

        Position ids restart at 0 for every sample and ``attention_mask`` is ``None``: the backbone
        then builds a block-diagonal causal mask from the position ids, so no sample sees another.
        ``seq_lens`` lists each row's sample lengths (padding fills the rest of the row) and
        ``sample_index`` which of ``encoded`` each sample is."""
        too_long = [len(e) for e in encoded if len(e) > max_length]
        if too_long:
            raise ValueError(f"{len(too_long)} sample(s) longer than max_length={max_length} "
                             f"(longest {max(too_long)} tokens)")
        rows: list[list[Encoded]] = []
        index: list[list[int]] = []
        free: list[int] = []
        for k in sorted(range(len(encoded)), key=lambda k: len(encoded[k]), reverse=True):
            e = encoded[k]
            i = next((i for i, f in enumerate(free) if f >= len(e)), None)
            if i is None:
                rows.append([])
                index.append([])
                free.append(max_length)
                i = len(rows) - 1
            rows[i].append(e)
            index[i].append(k)
            free[i] -= len(e)
        input_ids = torch.full((len(rows), max_length), self.pad_id, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE)
        position_ids = torch.zeros_like(input_ids)
        seq_lens: list[list[int]] = []
        for r, row in enumerate(rows):
            at, lens = 0, []
            for e in row:
                n = len(e)
                input_ids[r, at: at + n] = torch.tensor(e.input_ids)
                labels[r, at + 1: at + n] = torch.tensor(e.labels[1:])  # never predicted from the previous sample
                position_ids[r, at: at + n] = torch.arange(n)
                lens.append(n)
                at += n
            position_ids[r, at:] = torch.arange(max_length - at)
            seq_lens.append(lens)
        values = {}
        for m in self.modality_tokenizers:
            items = [v for row in rows for e in row for v in e.values[m]]
            if items:
                values[m] = torch.cat(items)
        return {"input_ids": input_ids, "attention_mask": None, "position_ids": position_ids,
                "labels": labels, "values": values, "seq_lens": seq_lens,
                "sample_index": index}

    def __call__(self, samples: list[Any], padding_side: str = "right", **kwargs) -> dict[str, Any]:
        return self.collate([self.encode(s, **kwargs) for s in samples], padding_side=padding_side)

    # -- outputs -------------------------------------------------------------------------------
    def decode_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_item(self, modality: str, tokens: torch.Tensor, size: tuple[int, int] | None = None):
        """One item's tokens -> the item; ``size`` (height, width) for tokenizers with several sizes."""
        tok = self.modality_tokenizers[modality]
        if size is None:
            return tok.decode(tokens[None])[0]
        return tok.decode(tokens[None], size=tuple(size))[0]

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.tokenizer.save_pretrained(directory)
        for m, tok in self.modality_tokenizers.items():
            tok.save_pretrained(os.path.join(directory, f"{m}_tokenizer"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, modality_specs: dict | None = None) -> MMARProcessor:
        from transformers import AutoTokenizer

        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no such model directory")
        tokenizer = AutoTokenizer.from_pretrained(directory)
        toks = {}
        for name in sorted(os.listdir(directory)):
            if name.endswith("_tokenizer") and os.path.isdir(os.path.join(directory, name)):
                toks[name[: -len("_tokenizer")]] = ModalityTokenizer.from_pretrained(os.path.join(directory, name))
        for m, spec in (modality_specs or {}).items():
            toks.setdefault(m, build_tokenizer(spec))
        return cls(tokenizer, toks)


def grid_positions(input_ids: torch.Tensor, start_id: int, placeholder_id: int, size_ids: list[int],
                   grids: list[tuple[int, int]], width: int) -> torch.Tensor:
    """The cell of every ``placeholder_id`` in ``input_ids`` ``[B, L]``, in row-major order: ``row * width +
    col``, where the item's grid (``grids[i]`` for marker ``size_ids[i]``) is read from the size marker
    after its start token and ``width`` is the widest grid's column count (the table's row length)."""
    ph = input_ids == placeholder_id
    count = ph.long().cumsum(-1)  # placeholders so far, this one included
    base = torch.where(input_ids == start_id, count, torch.zeros_like(count)).cummax(-1).values
    k = count - base - 1  # index within the item
    steps = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
    is_marker = torch.isin(input_ids, torch.tensor(size_ids, device=input_ids.device))
    last = torch.where(is_marker, steps, torch.full_like(steps, -1)).cummax(-1).values
    marker = input_ids.gather(-1, last.clamp(min=0))
    cols = torch.zeros_like(input_ids)
    for sid, (_, c) in zip(size_ids, grids):
        cols = torch.where(marker == sid, c, cols)
    if ((last < 0) & ph).any() or ((cols == 0) & ph).any():
        raise ValueError("image tokens without a size marker before them: this model's items of several "
                         "sizes are laid out as <|image_start|> <|image_HxW|> <|image|>... <|image_end|>")
    cols = cols.clamp(min=1)
    return ((k // cols) * width + k % cols)[ph]
