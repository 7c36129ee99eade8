"""``image-patch``: pixels cut into non-overlapping patches and back, exactly.

The simplest continuous image tokenizer (no learned weights): an image of
``height x width`` pixels with ``channels`` channels becomes
``(height / patch_size) * (width / patch_size)`` tokens of ``patch_size**2 * channels``
values in raster order (:mod:`mmar.tokenizers.layout`), normalised to roughly [-1, 1].

``image_size`` (an int for a square, or ``[height, width]``) is the default size; ``sizes`` lists every
``[height, width]`` the model is trained on (several sizes: the sequence carries a size marker, see
:mod:`mmar.sequence`). With ``resize=True`` an image of another size is fitted to the trained size
nearest in aspect ratio: resized when the aspect ratio is the same, else resized to fit and padded
with black, never stretched; a warning says what was done.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..io import load_image, pixel_limit  # the one image loader (limits, modes); old name importable here
from .base import ModalityTokenizer, register_tokenizer
from .layout import patch_grid, patchify, unpatchify

_MODES = {1: "L", 3: "RGB"}
DEFAULT_IMAGE_SIZE = 8


def as_size(size: Any) -> tuple[int, int]:
    """``8`` -> ``(8, 8)``; ``[8, 12]`` / ``(8, 12)`` -> ``(8, 12)`` as (height, width)."""
    if isinstance(size, bool) or not isinstance(size, (int, list, tuple)):
        raise ValueError(f"an image size is an int or [height, width], got {size!r}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw):
        raise ValueError(f"an image size is an int or [height, width] of positive ints, got {size!r}")
    return hw


def size_text(size: tuple[int, int]) -> str:
    """``(8, 12)`` -> ``"8x12"`` (height x width, as in the size markers)."""
    return f"{size[0]}x{size[1]}"


def default_and_sizes(image_size: Any, sizes: Any) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The default size and the list of sizes (default first) from a tokenizer's two options."""
    listed = [as_size(s) for s in sizes] if sizes else []
    if len(set(listed)) != len(listed):
        raise ValueError(f"sizes {sizes} lists a size twice")
    size = as_size(image_size) if image_size is not None else (listed[0] if listed else as_size(DEFAULT_IMAGE_SIZE))
    if listed and size not in listed:
        raise ValueError(f"image_size {size_text(size)} is not among sizes {[size_text(s) for s in listed]}")
    return size, [size] + [s for s in listed if s != size]


def nearest_size(sizes: list[tuple[int, int]], height: int, width: int) -> tuple[int, int]:
    """The size in ``sizes`` closest in aspect ratio to ``height x width`` (then in area)."""
    def distance(s):
        return abs(math.log((s[0] / s[1]) / (height / width))), abs(math.log(s[0] * s[1] / (height * width)))
    return min(sizes, key=distance)


def fit_image(img: Image.Image, size: tuple[int, int], fill: int | tuple = 0) -> tuple[Image.Image, str]:
    """Fit ``img`` into ``size`` (height, width) without distortion: a plain resize when the aspect
    ratios agree, else a resize that fits inside and black padding around it. Returns the image and
    a note saying what was done."""
    h, w = size
    ih, iw = img.height, img.width
    if ih * w == iw * h:
        note = f"image {size_text((ih, iw))} resized to {size_text(size)} (height x width)"
        return img.resize((w, h), Image.BOX if ih > h else Image.BICUBIC), note
    scale = min(h / ih, w / iw)
    nh, nw = max(1, round(ih * scale)), max(1, round(iw * scale))
    inner = img.resize((nw, nh), Image.BOX if scale < 1 else Image.BICUBIC)
    canvas = Image.new(img.mode, (w, h), fill)
    canvas.paste(inner, ((w - nw) // 2, (h - nh) // 2))
    note = (f"image {size_text((ih, iw))} resized to {size_text((nh, nw))} and padded to {size_text(size)} "
            "(height x width), the trained size nearest in aspect ratio")
    return canvas, note


class GridImageTokenizer(ModalityTokenizer):
    """What the image tokenizers that cut an image into a grid of tokens share (image-patch, image-vae):
    items of one or more ``(height, width)`` sizes (``self.size`` the default, ``self.sizes`` all), each a
    ``grid_of(size)`` of tokens; the sizes go into the config when there are several."""

    modality = "image"
    kind = "continuous"
    size: tuple[int, int]

    def grid_of(self, size: tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(rows, cols)`` of an image of ``size`` (height, width) in pixels."""
        raise NotImplementedError

    def size_of(self, item: torch.Tensor) -> tuple[int, int]:
        return int(item.shape[-2]), int(item.shape[-1])

    def num_tokens(self, item: Any = None) -> int:
        """Tokens of the default size, of a ``(height, width)`` size, or of a preprocessed item."""
        size = self.size if item is None else as_size(item) if isinstance(item, (int, list, tuple)) \
            else self.size_of(item)
        rows, cols = self.grid_of(size)
        return rows * cols

    def with_sizes(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """``cfg`` plus ``sizes`` when items of several sizes occur."""
        if self.marks_size:
            cfg["sizes"] = [list(s) for s in self.sizes]
        return cfg


@register_tokenizer("image-patch")
class ImagePatchTokenizer(GridImageTokenizer):

    def __init__(self, image_size: int | list | None = None, patch_size: int = 2, channels: int = 1,
                 mean: float = 0.5, std: float = 0.5, resize: bool = False, sizes: list | None = None):
        if channels not in _MODES:
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.size, self.sizes = default_and_sizes(image_size, sizes)
        for s in self.sizes:
            if s[0] % patch_size or s[1] % patch_size:
                raise ValueError(f"image size {size_text(s)} is not a multiple of patch_size {patch_size}")
        self.image_size = self.size[0] if self.size[0] == self.size[1] else list(self.size)
        self.patch_size, self.channels = patch_size, channels
        self.mean, self.std, self.resize = mean, std, resize
        self.grid = self.grid_of(self.size)  # (rows, cols) of the default size
        self.token_dim = patch_size * patch_size * channels

    def config(self) -> dict[str, Any]:
        return self.with_sizes(dict(image_size=self.image_size, patch_size=self.patch_size, channels=self.channels,
                                    mean=self.mean, std=self.std, resize=self.resize))

    # -- sizes ---------------------------------------------------------------------------------
    def grid_of(self, size: tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(rows, cols)`` of an image of ``size`` (height, width)."""
        return patch_grid(size[0], size[1], self.patch_size)

    def _sizes_text(self) -> str:
        return " or ".join(size_text(s) for s in self.sizes)

    # -- raw <-> pixels ------------------------------------------------------------------------
    def preprocess(self, raw: Any) -> torch.Tensor:
        """PIL image, path, uint8 array ``[H, W(, C)]`` or float tensor ``[C, H, W]`` in [0, 1] -> ``[C, H, W]``."""
        # paths and PIL images: pixel limit, EXIF, 16-bit, transparency and mode, all in mmar.io
        raw = load_image(raw, mode=_MODES[self.channels], max_pixels=pixel_limit(max(max(sz) for sz in self.sizes)))
        if isinstance(raw, Image.Image):
            return self._from_pil(raw)
        if isinstance(raw, np.ndarray) and raw.dtype == np.uint8:
            if raw.ndim == 2:
                raw = raw[..., None]
            return self.preprocess(Image.fromarray(raw.squeeze(-1) if raw.shape[-1] == 1 else raw))
        if isinstance(raw, (torch.Tensor, np.ndarray)):
            return self._from_tensor(raw)
        raise TypeError(f"cannot read an image from {type(raw).__name__}; give a PIL image, a path or an array")

    def fit_to_size(self, img: Image.Image) -> tuple[Image.Image, str | None]:
        """``img`` fitted to the trained size nearest in aspect ratio (see :func:`fit_image`) and a note
        saying what was done (``None`` when it already has a trained size)."""
        if (img.height, img.width) in self.sizes:
            return img, None
        return fit_image(img, nearest_size(self.sizes, img.height, img.width))

    def _from_pil(self, raw: Image.Image) -> torch.Tensor:
        if raw.mode != _MODES[self.channels]:  # mmar.io converted it already; a safeguard
            raw = raw.convert(_MODES[self.channels])
        if (raw.height, raw.width) not in self.sizes:
            if not self.resize:
                raise ValueError(f"image is {raw.size[0]}x{raw.size[1]} (width x height), this tokenizer takes "
                                 f"{self._sizes_text()} (height x width; set resize=True to fit it)")
            fitted, note = self.fit_to_size(raw)
            if "padded" in note:  # a plain resize is what resize=True asks for; padding deserves a word
                warnings.warn(note, stacklevel=3)
            raw = fitted
        arr = np.asarray(raw, dtype=np.float32).reshape(raw.height, raw.width, self.channels) / 255.0
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def _from_tensor(self, raw) -> torch.Tensor:
        pixels = torch.as_tensor(raw, dtype=torch.float32)
        if pixels.ndim == 2:
            pixels = pixels[None]
        if pixels.ndim != 3 or pixels.shape[0] != self.channels or self.size_of(pixels) not in self.sizes:
            raise ValueError(f"image tensor has shape {tuple(pixels.shape)}, expected [{self.channels}, height, "
                             f"width] with height x width {self._sizes_text()} and values in [0, 1]")
        if not torch.isfinite(pixels).all():
            raise ValueError("image tensor contains NaN or inf")
        if pixels.min() < 0 or pixels.max() > 1:
            raise ValueError(f"image tensor values must lie in [0, 1], got [{pixels.min():.3g}, {pixels.max():.3g}]")
        return pixels

    def to_pil(self, pixels: torch.Tensor) -> Image.Image:
        arr = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr[..., 0] if self.channels == 1 else arr, _MODES[self.channels])

    # -- pixels <-> tokens ---------------------------------------------------------------------
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` in [0, 1] -> ``[B, (H/p)*(W/p), p*p*C]`` normalised."""
        return patchify((batch - self.mean) / self.std, self.patch_size)

    def decode_pixels(self, tokens: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        rows, cols = self.grid_of(as_size(size) if size is not None else self.size)
        return unpatchify(tokens, rows, cols, self.patch_size) * self.std + self.mean

    def decode(self, tokens: torch.Tensor, size: tuple[int, int] | None = None) -> list[Image.Image]:
        """Tokens ``[B, N, p*p*C]`` of images of ``size`` (height, width; default: the default size)."""
        return [self.to_pil(x) for x in self.decode_pixels(tokens.float(), size)]
