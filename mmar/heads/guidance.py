"""Classifier-free guidance of a head's output, over the branches the sampler stacks along the rows.

Single guidance (one unconditional branch) mixes ``u + s * (c - u)``. Dual guidance (InstructPix2Pix,
Brooks et al. 2023, eq. 3; BAGEL's editing) has three branches: *full* (instruction and input image),
*image only* (the instruction hidden) and *none* (both hidden), and two scales::

    out = none + s_img * (image_only - none) + s_txt * (full - image_only)

The same formula serves noise / velocity predictions and logits; with both scales 1 it is ``full``.
Heads call :func:`guidance_rows` on their conditions and :func:`guide` on their network's output.
"""

from __future__ import annotations

import torch


def guidance_rows(cond: torch.Tensor, uncond) -> tuple[torch.Tensor, int]:
    """The conditions of every branch stacked along the rows, and the number of branches: ``cond`` alone
    (``uncond`` None), ``[cond; uncond]`` (single guidance) or, with ``uncond = (image_only, none)``,
    ``[cond; image_only; none]`` (dual guidance)."""
    if uncond is None:
        return cond, 1
    parts = [cond, *uncond] if isinstance(uncond, (tuple, list)) else [cond, uncond]
    if len(parts) not in (2, 3):
        raise ValueError(f"uncond must be a tensor or an (image_only, none) pair, got {len(parts) - 1} tensors")
    return torch.cat(parts), len(parts)


def guide(out: torch.Tensor, branches: int, guidance_scale: float,
          image_guidance_scale: float | None = None) -> torch.Tensor:
    """Combine ``out`` (``[branches * n, ...]``, in :func:`guidance_rows`' order) into ``[n, ...]``."""
    if branches == 1:
        return out
    if branches == 2:
        cond, uncond = out.chunk(2)
        return torch.lerp(uncond, cond, guidance_scale)  # u + s * (c - u)
    full, image_only, none = out.chunk(3)
    s_img = 1.0 if image_guidance_scale is None else image_guidance_scale
    return none + s_img * (image_only - none) + guidance_scale * (full - image_only)
