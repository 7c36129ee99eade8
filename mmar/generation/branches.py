"""The rows of classifier-free guidance: what each branch of a row may attend to.

With guidance the sampler runs every row once per branch, the branches stacked along the batch (rows
``j * B .. (j + 1) * B`` are branch ``j``) in the same backbone call and KV cache; only the attention
masks differ, and the heads combine the branches' outputs (:mod:`mmar.heads.guidance`):

- ``full``: the whole prompt (the row itself; text tokens are always drawn from it);
- ``items`` (dual guidance only, the "image only" branch of InstructPix2Pix): BOS and the prompt's
  items (an input image with its start, end and size-marker tokens), the instruction text and the chat
  markers hidden — the layout condition dropout trains on, which drops a prompt's text and keeps its
  items (:meth:`MMARProcessor.encode` with ``drop_prompt``);
- ``none``: BOS only (single guidance's unconditional branch).

A guidance branch sees an item the row is drawing (from its start token on) and nothing else of the
generation: when its row opens an item, the branch's mask is reset to what it saw of the prompt
(:attr:`BranchMasks.reset`), the start token then added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FULL, ITEMS, NONE = "full", "items", "none"


def branch_names(guided: bool, image_guidance_scale: float | None) -> tuple[str, ...]:
    """The branches of a call: ``full`` alone without guidance, ``full, none`` for single guidance,
    ``full, items, none`` when ``image_guidance_scale`` is set (dual guidance)."""
    if not guided:
        return (FULL,)
    return (FULL, NONE) if image_guidance_scale is None else (FULL, ITEMS, NONE)


@dataclass
class BranchMasks:
    """The prompt columns each branch's rows attend to, ``[n_branches * B, P]`` (branch-major)."""

    names: tuple[str, ...]
    prompt: torch.Tensor  # at the start of the call
    reset: torch.Tensor  # [(n_branches - 1) * B, P] a guidance row's prompt once its row opens an item

    def of(self, name: str) -> torch.Tensor:
        """The ``[B, P]`` prompt mask of branch ``name``."""
        B = self.prompt.shape[0] // len(self.names)
        i = self.names.index(name)
        return self.prompt[i * B:(i + 1) * B]


def branch_masks(input_ids: torch.Tensor, attention_mask: torch.Tensor, tables, names: tuple[str, ...],
                 opened: torch.Tensor, opened_sized: torch.Tensor) -> BranchMasks:
    """The masks of ``names``' branches for a left-padded prompt batch. ``tables``: the sampler's
    :class:`TokenTables` (``bos``, ``item_token``); ``opened``: ``[B]`` rows whose prompt ends by opening
    the item to draw (its start token last), ``opened_sized``: those whose start is followed by its size
    marker (the last two columns)."""
    mask = attention_mask.long()
    B, P = mask.shape
    rows = torch.arange(B, device=mask.device)
    first = mask.argmax(-1)  # left padding: each row's first real column
    bos_only = torch.zeros_like(mask)
    if tables.bos is not None:
        bos_only[rows, first] = (input_ids[rows, first] == tables.bos).long()
    # the open item (its start, and its size marker) is the one being drawn, not an input: not in the reset
    drawn = torch.zeros_like(mask, dtype=torch.bool)
    drawn[:, -1] = opened
    if P > 1:
        drawn[:, -2] = opened_sized
    items = (bos_only | (mask * tables.item_token[input_ids].long())) * ~drawn
    reset = [items if name == ITEMS else bos_only for name in names[1:]]
    prompt = [mask]
    for r in reset:  # at the start, a guidance row sees its reset mask and the open item
        prompt.append(torch.where(drawn, 1, r))
    return BranchMasks(names, torch.cat(prompt), torch.cat(reset) if reset else mask[:0])
