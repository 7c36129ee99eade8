"""``image-vae``: a diffusers ``AutoencoderKL`` turns images into continuous latents, grouped into tokens.

Either a local VAE directory (an SD-VAE or a MAR-style KL-16 folder, with its
scaling factor in its config) or a VAE built from a config dict (random init:
for tests, or to be trained by ``mmar train-tokenizer``, see :meth:`ImageVAETokenizer.fit`).
The latent grid ``[C, h, w]`` is cut into ``patch_size x patch_size`` patches in raster order:
``(h / p) * (w / p)`` tokens of ``p * p * C`` values (MAR's patchify).

Training (:meth:`~ImageVAETokenizer.fit`) follows the KL autoencoder recipe of latent diffusion without
its perceptual and adversarial terms: an L1 (or MSE) reconstruction loss on a latent drawn from the
posterior plus a small KL weight, AdamW with a cosine schedule. Afterwards the latent scaling factor
is set from the data as Stable Diffusion's was, ``1 / std`` of the training latents, so the
diffusion head sees latents of unit scale; it is saved in the tokenizer config and the VAE's own
``config.json``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .base import register_tokenizer, resolve_path
from .image_patch import GridImageTokenizer, ImagePatchTokenizer, as_size, default_and_sizes, size_text
from .layout import patch_grid, patchify, unpatchify

VAE_DIR = "vae"
LOSSES = ("l1", "mse")
LOG_EVERY = 10  # fit() returns the mean loss of each window of this many steps
SCALE_BATCH = 256  # images per batch when measuring the latents' std


def complete_vae_config(vae_config: dict) -> dict:
    """Fill the block types from ``block_out_channels`` (one plain encoder / decoder block per level), so
    a small VAE's config only names its widths, channels and sizes."""
    cfg = dict(vae_config)
    levels = len(cfg.get("block_out_channels", (64,)))
    cfg.setdefault("down_block_types", ["DownEncoderBlock2D"] * levels)
    cfg.setdefault("up_block_types", ["UpDecoderBlock2D"] * levels)
    return cfg


@register_tokenizer("image-vae")
class ImageVAETokenizer(GridImageTokenizer):

    def __init__(self, vae_path: str | None = None, vae_config: dict | None = None,
                 image_size: int | list | None = None, patch_size: int = 1, sample_posterior: bool = False,
                 scaling_factor: float | None = None, trained: bool | None = None, sizes: list | None = None):
        from diffusers import AutoencoderKL

        if (vae_path is None) == (vae_config is None):
            raise ValueError("image-vae needs exactly one of vae_path (a local AutoencoderKL directory) or vae_config")
        if vae_path is not None:
            if not os.path.isfile(os.path.join(vae_path, "config.json")):
                raise FileNotFoundError(f"{vae_path}: not an AutoencoderKL directory (no config.json)")
            self.vae = AutoencoderKL.from_pretrained(vae_path, use_safetensors=True)
        else:
            if not isinstance(vae_config, dict):
                raise TypeError(f"image-vae: vae_config must be a dict of AutoencoderKL options, "
                                f"got {type(vae_config).__name__}")
            vae_config = complete_vae_config(vae_config)
            try:
                self.vae = AutoencoderKL(**vae_config)
            except (TypeError, ValueError) as e:
                raise ValueError(f"image-vae: bad vae_config {vae_config}: {e}") from e
        self.vae.eval().requires_grad_(False)
        self.vae_path, self.vae_config = vae_path, vae_config
        # a VAE read from a directory counts as trained; one built from a config only after fit()
        self.trained = bool(vae_path is not None if trained is None else trained)
        self.patch_size, self.sample_posterior = patch_size, sample_posterior
        cfg = self.vae.config
        self.scaling_factor = scaling_factor if scaling_factor is not None else cfg.scaling_factor
        self.shift_factor = getattr(cfg, "shift_factor", None) or 0.0
        self.down = 2 ** (len(cfg.block_out_channels) - 1)
        self.size, self.sizes = default_and_sizes(image_size if image_size is not None or sizes else 256, sizes)
        step = self.down * patch_size
        for s in self.sizes:
            if s[0] % step or s[1] % step:
                raise ValueError(f"image size {size_text(s)} must be a multiple of {step} "
                                 f"(VAE downsampling {self.down} x patch_size {patch_size})")
        self.image_size = self.size[0] if self.size[0] == self.size[1] else list(self.size)
        self.channels = cfg.latent_channels
        self.grid = self.grid_of(self.size)  # (rows, cols) of the default size
        self.token_dim = patch_size * patch_size * self.channels
        self._pixels = ImagePatchTokenizer(image_size=self.image_size, patch_size=1, channels=cfg.in_channels,
                                           resize=True, sizes=[list(s) for s in self.sizes])

    def config(self) -> dict[str, Any]:
        return self.with_sizes(dict(vae_path=self.vae_path, vae_config=self.vae_config, image_size=self.image_size,
                                    patch_size=self.patch_size, sample_posterior=self.sample_posterior,
                                    scaling_factor=self.scaling_factor, trained=self.trained))

    def grid_of(self, size: tuple[int, int]) -> tuple[int, int]:
        """Token grid ``(rows, cols)`` of an image of ``size`` (height, width) in pixels."""
        return patch_grid(size[0], size[1], self.down * self.patch_size)

    def preprocess(self, raw: Any) -> torch.Tensor:
        return self._pixels.preprocess(raw)  # [C, H, W] in [0, 1], fitted to a trained size

    def fit_to_size(self, img):
        return self._pixels.fit_to_size(img)

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(batch.to(self.vae.dtype) * 2 - 1).latent_dist
        z = dist.sample() if self.sample_posterior else dist.mode()
        z = (z - self.shift_factor) * self.scaling_factor
        return patchify(z, self.patch_size).float()

    @torch.no_grad()
    def decode_pixels(self, tokens: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        rows, cols = self.grid_of(as_size(size) if size is not None else self.size)
        z = unpatchify(tokens, rows, cols, self.patch_size) / self.scaling_factor + self.shift_factor
        return (self.vae.decode(z.to(self.vae.dtype)).sample.float() + 1) / 2

    def decode(self, tokens: torch.Tensor, size: tuple[int, int] | None = None) -> list:
        """Tokens of images of ``size`` (height, width in pixels; default: the default size)."""
        return [self._pixels.to_pil(x) for x in self.decode_pixels(tokens, size)]

    # -- training ------------------------------------------------------------------------------
    def _check_pixels(self, pixels: torch.Tensor) -> None:
        c, (h, w) = self.vae.config.in_channels, self.size
        if (not isinstance(pixels, torch.Tensor) or pixels.ndim != 4 or pixels.shape[1] != c
                or self.size_of(pixels) not in self.sizes):
            shape = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            raise ValueError(f"image-vae: fit takes preprocessed pixels [n, {c}, {h}, {w}] in [0, 1] (or another "
                             f"of its sizes), got {shape}")
        if pixels.shape[0] == 0:
            raise ValueError("image-vae: fit got no images")
        if not torch.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ValueError("image-vae: fit takes pixels in [0, 1] (finite); preprocess the images first")

    def fit(self, pixels: torch.Tensor, steps: int = 1000, batch_size: int = 64, seed: int = 0,
            learning_rate: float = 1e-3, weight_decay: float = 0.0, kl_weight: float = 1e-3, loss: str = "l1",
            warmup_steps: int = 50, max_grad_norm: float = 1.0, progress: bool = True) -> list[float]:
        """Train the VAE on preprocessed ``pixels`` ``[n, C, H, W]`` in [0, 1].

        Loss per step: ``loss`` (``"l1"`` or ``"mse"``, per pixel, in the VAE's [-1, 1] range) between a
        batch and its reconstruction from a posterior sample, plus ``kl_weight`` times the KL divergence
        to N(0, I) per latent value. AdamW, linear warm-up then cosine decay, gradient clipping. Then
        sets ``scaling_factor`` to 1 / std of the training latents and marks the tokenizer trained.
        Returns the mean training loss of every ``LOG_EVERY`` steps."""
        from diffusers.optimization import get_cosine_schedule_with_warmup
        from tqdm.auto import tqdm

        self._check_pixels(pixels)
        if loss not in LOSSES:
            raise ValueError(f"image-vae: loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"image-vae: steps and batch_size must be positive, got {steps} and {batch_size}")
        if kl_weight < 0 or learning_rate <= 0:
            raise ValueError(f"image-vae: need kl_weight >= 0 and learning_rate > 0, got {kl_weight}, {learning_rate}")
        g = torch.Generator().manual_seed(seed)
        vae, data = self.vae, pixels.float() * 2 - 1
        vae.train().requires_grad_(True)
        opt = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=weight_decay)
        schedule = get_cosine_schedule_with_warmup(opt, min(warmup_steps, steps // 10), steps)
        history, window = [], []
        bar = tqdm(range(steps), desc="image-vae fit", disable=not progress)
        try:
            for step in bar:
                x = data[torch.randint(0, len(data), (batch_size,), generator=g)].to(vae.dtype)
                posterior = vae.encode(x).latent_dist
                z = posterior.sample(generator=g)
                error = vae.decode(z).sample - x
                rec = error.abs().mean() if loss == "l1" else error.pow(2).mean()
                kl = posterior.kl().mean() / z[0].numel()
                total = rec + kl_weight * kl
                opt.zero_grad(set_to_none=True)
                total.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), max_grad_norm)
                opt.step()
                schedule.step()
                window.append(total.item())
                if len(window) == LOG_EVERY or step == steps - 1:
                    history.append(sum(window) / len(window))
                    window = []
                    bar.set_postfix(loss=f"{history[-1]:.4f}", rec=f"{rec.item():.4f}", kl=f"{kl.item():.3f}")
        finally:
            vae.eval().requires_grad_(False)
        self.set_scaling_factor(pixels)
        self.trained = True
        return history

    @torch.no_grad()
    def set_scaling_factor(self, pixels: torch.Tensor) -> float:
        """Set the latent scaling factor to 1 / std of the latents of ``pixels`` (as encoded: the posterior
        mode, or a sample with ``sample_posterior``), as Stable Diffusion did; also written into the VAE's
        config. Returns it."""
        self._check_pixels(pixels)
        latents = []
        for i in range(0, len(pixels), SCALE_BATCH):
            dist = self.vae.encode(pixels[i:i + SCALE_BATCH].to(self.vae.dtype) * 2 - 1).latent_dist
            latents.append((dist.sample() if self.sample_posterior else dist.mode()).float() - self.shift_factor)
        std = float(torch.cat(latents).std())
        if not std > 0 or not torch.isfinite(torch.tensor(std)):
            raise ValueError(f"image-vae: the latents' std is {std}; cannot set a scaling factor")
        self.scaling_factor = 1.0 / std
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        return self.scaling_factor

    def reconstruct(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode then decode, pixels ``[B, C, H, W]`` in [0, 1] -> the same, clamped to [0, 1]."""
        return self.decode_pixels(self.encode(pixels)).clamp(0, 1)

    # -- persistence: the VAE weights travel with the model directory ------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        # the folder is a plain diffusers AutoencoderKL (config.json with the scaling factor, safetensors)
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.vae.save_pretrained(os.path.join(directory, VAE_DIR), safe_serialization=True)
        cfg = {**self.config(), "vae_path": VAE_DIR, "vae_config": None}
        self.write_config(directory, cfg)

    @classmethod
    def from_config(cls, spec: dict[str, Any], directory: str | os.PathLike) -> ImageVAETokenizer:
        return cls(**resolve_path(spec, "vae_path", directory))
