"""``image-vae``: a diffusers ``AutoencoderKL`` turns images into continuous latents, grouped into tokens.

Either a local VAE directory (an SD-VAE or a MAR-style KL-16 folder, with its
scaling factor in its config) or a VAE built from a config dict (random init:
for tests, or to be trained by ``mmar train-tokenizer``). The latent grid
``[C, h, w]`` is cut into ``patch_size x patch_size`` patches in raster order:
``(h / p) * (w / p)`` tokens of ``p * p * C`` values (MAR's patchify).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .base import ModalityTokenizer, register_tokenizer
from .image_patch import ImagePatchTokenizer

VAE_DIR = "vae"


@register_tokenizer("image-vae")
class ImageVAETokenizer(ModalityTokenizer):
    modality = "image"
    kind = "continuous"

    def __init__(self, vae_path: str | None = None, vae_config: dict | None = None, image_size: int = 256,
                 patch_size: int = 1, sample_posterior: bool = False, scaling_factor: float | None = None):
        from diffusers import AutoencoderKL

        if (vae_path is None) == (vae_config is None):
            raise ValueError("image-vae needs exactly one of vae_path (a local AutoencoderKL directory) or vae_config")
        if vae_path is not None:
            if not os.path.isfile(os.path.join(vae_path, "config.json")):
                raise FileNotFoundError(f"{vae_path}: not an AutoencoderKL directory (no config.json)")
            self.vae = AutoencoderKL.from_pretrained(vae_path, use_safetensors=True)
        else:
            self.vae = AutoencoderKL(**vae_config)
        self.vae.eval().requires_grad_(False)
        self.vae_path, self.vae_config = vae_path, vae_config
        self.image_size, self.patch_size, self.sample_posterior = image_size, patch_size, sample_posterior
        cfg = self.vae.config
        self.scaling_factor = scaling_factor if scaling_factor is not None else cfg.scaling_factor
        self.shift_factor = getattr(cfg, "shift_factor", None) or 0.0
        self.down = 2 ** (len(cfg.block_out_channels) - 1)
        if image_size % (self.down * patch_size):
            raise ValueError(f"image_size {image_size} must be a multiple of {self.down * patch_size} "
                             f"(VAE downsampling {self.down} x patch_size {patch_size})")
        self.channels = cfg.latent_channels
        self.grid = image_size // self.down // patch_size
        self.token_dim = patch_size * patch_size * self.channels
        self._pixels = ImagePatchTokenizer(image_size=image_size, patch_size=1, channels=cfg.in_channels,
                                           resize=True)

    def config(self) -> dict[str, Any]:
        return dict(vae_path=self.vae_path, vae_config=self.vae_config, image_size=self.image_size,
                    patch_size=self.patch_size, sample_posterior=self.sample_posterior,
                    scaling_factor=self.scaling_factor)

    def num_tokens(self, item: Any = None) -> int:
        return self.grid * self.grid

    def preprocess(self, raw: Any) -> torch.Tensor:
        return self._pixels.preprocess(raw)  # [C, H, W] in [0, 1], resized to image_size

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(batch.to(self.vae.dtype) * 2 - 1).latent_dist
        z = dist.sample() if self.sample_posterior else dist.mode()
        z = (z - self.shift_factor) * self.scaling_factor
        b, c, p, g = z.shape[0], self.channels, self.patch_size, self.grid
        z = z.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
        return z.reshape(b, g * g, p * p * c).float()

    @torch.no_grad()
    def decode_pixels(self, tokens: torch.Tensor) -> torch.Tensor:
        b, c, p, g = tokens.shape[0], self.channels, self.patch_size, self.grid
        z = tokens.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)
        z = z / self.scaling_factor + self.shift_factor
        return (self.vae.decode(z.to(self.vae.dtype)).sample.float() + 1) / 2

    def decode(self, tokens: torch.Tensor) -> list:
        return [self._pixels.to_pil(x) for x in self.decode_pixels(tokens)]

    # -- persistence: the VAE weights travel with the model directory ------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        import json

        os.makedirs(directory, exist_ok=True)
        self.vae.save_pretrained(os.path.join(directory, VAE_DIR), safe_serialization=True)
        cfg = {**self.config(), "vae_path": VAE_DIR, "vae_config": None}
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"name": self.name, **cfg}, f, indent=2)

    @classmethod
    def from_config(cls, spec: dict[str, Any], directory: str | os.PathLike) -> ImageVAETokenizer:
        spec = dict(spec)
        if spec.get("vae_path") and not os.path.isabs(spec["vae_path"]):
            spec["vae_path"] = os.path.join(directory, spec["vae_path"])
        return cls(**spec)
