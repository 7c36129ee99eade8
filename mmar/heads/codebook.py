"""Codebook head: predicts discrete codes (VQ image tokens, codec audio tokens) with cross-entropy.

The baseline the diffusion head is compared against (LlamaGen / Janus style):
an MLP from the backbone state to logits over the codebook; sampling with
classifier-free guidance on the logits, then the text sampler's warpers (temperature, top-k, top-p from
:mod:`mmar.sampling`), so top-k and top-p mean the same for codes as for text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..sampling import draw, warpers
from .base import Head, register_head
from .guidance import guide


@register_head("codebook")
class CodebookHead(Head):
    def __init__(self, cond_dim: int, vocab_size: int, width: int = 256, top_k: int = 0, top_p: float = 1.0, **_):
        """``top_k`` (0: off) and ``top_p`` (1.0: off): the sampling defaults, overridden per call."""
        super().__init__()
        self.vocab_size, self.top_k, self.top_p = vocab_size, top_k, top_p
        self.net = nn.Sequential(nn.Linear(cond_dim, width), nn.GELU(), nn.Linear(width, vocab_size))

    def loss(self, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(cond).float(), target.long())

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
               temperature: float = 1.0, generator=None, top_k: int | None = None, top_p: float | None = None,
               image_guidance_scale: float | None = None, **_) -> torch.Tensor:
        """One code per row of ``cond``; guidance (single, or dual with ``uncond = (image_only, none)``)
        on the logits (:mod:`.guidance`)."""
        logits = self.net(cond).float()
        if isinstance(uncond, (tuple, list)):  # dual guidance: (image_only, none)
            logits = guide(torch.cat([logits, *(self.net(u).float() for u in uncond)]), 3, guidance_scale,
                           image_guidance_scale)
        elif uncond is not None:
            u = self.net(uncond).float()
            logits = u + guidance_scale * (logits - u)
        # the text sampler's warpers (none when greedy) and draw
        procs = warpers(temperature, self.top_k if top_k is None else top_k, self.top_p if top_p is None else top_p)
        return draw(procs(logits), greedy=temperature == 0, generator=generator)
