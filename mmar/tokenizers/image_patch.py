"""``image-patch``: pixels cut into non-overlapping patches and back, exactly.

The simplest continuous image tokenizer (no learned weights): an image of
``image_size x image_size`` pixels with ``channels`` channels becomes
``(image_size / patch_size) ** 2`` tokens of ``patch_size**2 * channels``
values in raster order, normalised to roughly [-1, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ..io import load_image, pixel_limit  # the one image loader (limits, modes); old name importable here
from .base import ModalityTokenizer, register_tokenizer
from .layout import patchify, unpatchify

_MODES = {1: "L", 3: "RGB"}


@register_tokenizer("image-patch")
class ImagePatchTokenizer(ModalityTokenizer):
    modality = "image"
    kind = "continuous"

    def __init__(self, image_size: int = 8, patch_size: int = 2, channels: int = 1,
                 mean: float = 0.5, std: float = 0.5, resize: bool = False):
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if channels not in _MODES:
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.image_size, self.patch_size, self.channels = image_size, patch_size, channels
        self.mean, self.std, self.resize = mean, std, resize
        self.grid = image_size // patch_size
        self.token_dim = patch_size * patch_size * channels

    def config(self) -> dict[str, Any]:
        return dict(image_size=self.image_size, patch_size=self.patch_size, channels=self.channels,
                    mean=self.mean, std=self.std, resize=self.resize)

    def num_tokens(self, item: Any = None) -> int:
        return self.grid * self.grid

    # -- raw <-> pixels ------------------------------------------------------------------------
    def preprocess(self, raw: Any) -> torch.Tensor:
        """PIL image, path, uint8 array ``[H, W(, C)]`` or float tensor ``[C, H, W]`` in [0, 1] -> ``[C, H, W]``."""
        size, mode = self.image_size, _MODES[self.channels]
        # paths and PIL images: pixel limit, EXIF, 16-bit, transparency and mode, all in mmar.io
        raw = load_image(raw, mode=mode, max_pixels=pixel_limit(size))
        if isinstance(raw, Image.Image):
            if raw.size != (size, size):
                if not self.resize:
                    raise ValueError(f"image is {raw.size[0]}x{raw.size[1]}, this tokenizer takes {size}x{size} "
                                     "(set resize=True to resize)")
                raw = raw.resize((size, size), Image.BICUBIC)
            arr = np.asarray(raw, dtype=np.float32).reshape(size, size, self.channels) / 255.0
            pixels = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        elif isinstance(raw, np.ndarray) and raw.dtype == np.uint8:
            if raw.ndim == 2:
                raw = raw[..., None]
            return self.preprocess(Image.fromarray(raw.squeeze(-1) if raw.shape[-1] == 1 else raw))
        elif isinstance(raw, (torch.Tensor, np.ndarray)):
            pixels = torch.as_tensor(raw, dtype=torch.float32)
            if pixels.ndim == 2:
                pixels = pixels[None]
            if tuple(pixels.shape) != (self.channels, size, size):
                raise ValueError(f"image tensor has shape {tuple(pixels.shape)}, expected "
                                 f"{(self.channels, size, size)} with values in [0, 1]")
            if not torch.isfinite(pixels).all():
                raise ValueError("image tensor contains NaN or inf")
            if pixels.min() < 0 or pixels.max() > 1:
                raise ValueError(f"image tensor values must lie in [0, 1], got [{pixels.min():.3g}, {pixels.max():.3g}]")
        else:
            raise TypeError(f"cannot read an image from {type(raw).__name__}; give a PIL image, a path or an array")
        return pixels

    def to_pil(self, pixels: torch.Tensor) -> Image.Image:
        arr = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr[..., 0] if self.channels == 1 else arr, _MODES[self.channels])

    # -- pixels <-> tokens ---------------------------------------------------------------------
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> ``[B, grid*grid, p*p*C]`` normalised."""
        return patchify((batch - self.mean) / self.std, self.patch_size)

    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        return unpatchify(tokens, self.grid, self.grid, self.patch_size) * self.std + self.mean

    def decode(self, tokens: torch.Tensor) -> list[Image.Image]:
        return [self.to_pil(x) for x in self.decode_pixels(tokens.float())]
