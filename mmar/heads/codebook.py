"""Codebook head: predicts discrete codes (VQ image tokens, codec audio tokens) with cross-entropy.

The baseline the diffusion head is compared against (LlamaGen / Janus style):
an MLP from the backbone state to logits over the codebook; sampling with
temperature, top-k and classifier-free guidance on the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Head, register_head
from .guidance import guide


@register_head("codebook")
class CodebookHead(Head):
    def __init__(self, cond_dim: int, vocab_size: int, width: int = 256, top_k: int = 0, **_):
        super().__init__()
        self.vocab_size, self.top_k = vocab_size, top_k
        self.net = nn.Sequential(nn.Linear(cond_dim, width), nn.GELU(), nn.Linear(width, vocab_size))

    def loss(self, cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(cond).float(), target.long())

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, uncond: torch.Tensor | None = None, guidance_scale: float = 1.0,
               temperature: float = 1.0, generator=None, top_k: int | None = None,
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
        if temperature == 0:
            return logits.argmax(-1)
        logits = logits / temperature
        k = self.top_k if top_k is None else top_k
        if k:
            kth = logits.topk(k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if isinstance(generator, (list, tuple)):
            return torch.cat([torch.multinomial(p[None], 1, generator=g)[0] for p, g in zip(probs, generator)])
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
