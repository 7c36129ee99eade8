"""Token layouts, written with ``einops`` so each reads as what it is.

Every tokenizer that cuts a grid into tokens goes through these helpers:
images (pixels or VAE latents) into raster-ordered patches, log-mel
spectrograms into frames. A layout is a pair of ``rearrange`` patterns that
are exact inverses, so ``unpatchify(patchify(x, p), h, w, p) == x`` bit for
bit (tested for square and non-square grids and several patch sizes).
"""

from __future__ import annotations

import torch
from einops import rearrange

# one token = one p x p patch, in raster order (row by row), values ordered (p1, p2, c) as in MAR
PATCHIFY = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"
UNPATCHIFY = "b (h w) (p1 p2 c) -> b c (h p1) (w p2)"
# one token = ``f`` consecutive spectrogram frames, values ordered (frame, mel)
FRAMES = "b m (n f) -> b n (f m)"
UNFRAMES = "b n (f m) -> b m (n f)"


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """The token grid ``(rows, cols)`` of a ``height x width`` map cut into ``patch_size`` patches."""
    if height % patch_size or width % patch_size or height <= 0 or width <= 0:
        raise ValueError(f"a {height}x{width} grid cannot be cut into {patch_size}x{patch_size} patches "
                         f"(height and width must be positive multiples of {patch_size})")
    return height // patch_size, width // patch_size


def patchify(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, (H/p)*(W/p), p*p*C]``, patches in raster order."""
    patch_grid(x.shape[-2], x.shape[-1], patch_size)  # clear error on a size that does not divide
    return rearrange(x, PATCHIFY, p1=patch_size, p2=patch_size)


def unpatchify(tokens: torch.Tensor, rows: int, cols: int, patch_size: int) -> torch.Tensor:
    """``[B, rows*cols, p*p*C]`` -> ``[B, C, rows*p, cols*p]``, the inverse of :func:`patchify`."""
    if tokens.ndim != 3 or tokens.shape[1] != rows * cols:
        raise ValueError(f"expected tokens [B, {rows * cols}, dim] for a {rows}x{cols} grid, "
                         f"got {tuple(tokens.shape)}")
    return rearrange(tokens, UNPATCHIFY, h=rows, w=cols, p1=patch_size, p2=patch_size)


def frames_to_tokens(spec: torch.Tensor, frames_per_token: int) -> torch.Tensor:
    """Spectrogram ``[B, n_mels, T]`` -> ``[B, T/f, f*n_mels]``: ``f`` consecutive frames per token."""
    return rearrange(spec, FRAMES, f=frames_per_token)


def tokens_to_frames(tokens: torch.Tensor, frames_per_token: int) -> torch.Tensor:
    """``[B, T/f, f*n_mels]`` -> ``[B, n_mels, T]``, the inverse of :func:`frames_to_tokens`."""
    return rearrange(tokens, UNFRAMES, f=frames_per_token)
