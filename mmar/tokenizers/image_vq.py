"""``image-vq``: discrete image tokens, the Chameleon / LlamaGen / Janus-style baseline.

Pixels are cut into patches exactly as ``image-patch`` does, and each patch
vector is replaced by the index of its nearest code in a codebook learnt with
vector-quantize-pytorch (k-means initialisation, EMA updates). Same token grid
as the continuous tokenizer, so the two can be compared one for one: the model
embeds codes with a codebook embedding and predicts them with a codebook head
(cross-entropy over codes).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .base import ModalityTokenizer, register_tokenizer
from .image_patch import ImagePatchTokenizer

WEIGHTS = "codebook.safetensors"


@register_tokenizer("image-vq")
class ImageVQTokenizer(ModalityTokenizer):
    modality = "image"
    kind = "discrete"

    def __init__(self, codebook_size: int = 256, image_size: int | list | None = None, patch_size: int = 2,
                 channels: int = 1, mean: float = 0.5, std: float = 0.5, resize: bool = False, decay: float = 0.8,
                 sizes: list | None = None):
        from vector_quantize_pytorch import VectorQuantize

        self.patches = ImagePatchTokenizer(image_size, patch_size, channels, mean, std, resize, sizes)
        self.size, self.sizes = self.patches.size, self.patches.sizes
        self.codebook_size, self.decay = codebook_size, decay
        self.vocab_size = codebook_size
        self.token_dim = None
        self.vq = VectorQuantize(dim=self.patches.token_dim, codebook_size=codebook_size, decay=decay,
                                 kmeans_init=True, threshold_ema_dead_code=2, commitment_weight=0.0)
        self.vq.eval()
        self.trained = False

    def config(self) -> dict[str, Any]:
        return {**self.patches.config(), "codebook_size": self.codebook_size, "decay": self.decay}

    def num_tokens(self, item: Any = None) -> int:
        return self.patches.num_tokens(item)

    def grid_of(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.patches.grid_of(size)

    def size_of(self, item: torch.Tensor) -> tuple[int, int]:
        return self.patches.size_of(item)

    def fit_to_size(self, img):
        return self.patches.fit_to_size(img)

    def preprocess(self, raw: Any) -> torch.Tensor:
        return self.patches.preprocess(raw)

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> code ids ``[B, num_tokens]``."""
        if not self.trained:
            raise ValueError("image-vq: the codebook is untrained; run `mmar train-tokenizer` or load a trained one")
        _, codes, _ = self.vq(self.patches.encode(batch))
        return codes.long()

    @torch.no_grad()
    def decode_pixels(self, codes: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        codes = codes.long().clamp(0, self.codebook_size - 1)
        return self.patches.decode_pixels(self.vq.get_codes_from_indices(codes), size)

    def decode(self, codes: torch.Tensor, size: tuple[int, int] | None = None) -> list:
        """Code ids ``[B, N]`` of images of ``size`` (height, width; default: the default size)."""
        return [self.patches.to_pil(x) for x in self.decode_pixels(codes, size)]

    def fit(self, pixels: torch.Tensor, steps: int = 200, batch_size: int = 256, seed: int = 0) -> list[float]:
        """Learn the codebook on ``pixels`` ``[n, C, H, W]`` (k-means init, then EMA); returns the
        reconstruction MSE (normalised units) every 10 steps."""
        g = torch.Generator().manual_seed(seed)
        vectors = self.patches.encode(pixels)
        self.vq.train()
        history = []
        with torch.no_grad():
            for step in range(steps):
                idx = torch.randint(0, vectors.shape[0], (batch_size,), generator=g)
                quantized, _, _ = self.vq(vectors[idx])
                if step % 10 == 0:
                    history.append(float((quantized - vectors[idx]).pow(2).mean()))
        self.vq.eval()
        self.trained = True
        return history

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        if not self.trained:
            raise ValueError("image-vq: refusing to save an untrained codebook")
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.vq.state_dict().items()}, os.path.join(directory, WEIGHTS))
        self.write_config(directory)

    @classmethod
    def from_config(cls, spec: dict[str, Any], directory: str | os.PathLike) -> ImageVQTokenizer:
        from safetensors.torch import load_file

        tok = cls(**spec)
        path = os.path.join(directory, WEIGHTS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: the image-vq codebook is missing")
        tok.vq.load_state_dict(load_file(path))
        tok.trained = True
        return tok
