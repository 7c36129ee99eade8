"""``image-clip``: an open_clip vision tower for understanding only (LLaVA-style image features).

The image becomes the tower's patch tokens (``grid x grid`` tokens of its transformer width); the model
projects them like any continuous token. There is no way back to pixels, so a model cannot be asked to
generate with it: ``decode`` and the sampler refuse with a clear error. The tower is an open_clip model
config (a name such as ``ViT-B-32``, or a dict for a custom size) with random weights or weights from
a local safetensors file; it is frozen and travels with the model directory.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .base import ModalityTokenizer, register_tokenizer, resolve_path
from .image_patch import ImagePatchTokenizer

WEIGHTS = "visual.safetensors"


@register_tokenizer("image-clip")
class ImageCLIPTokenizer(ModalityTokenizer):
    modality = "image"
    kind = "continuous"
    can_decode = False

    def __init__(self, model_name: str | None = "ViT-B-32", model_config: dict | None = None,
                 checkpoint: str | None = None):
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        cfg = model_config if model_config is not None else open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"image-clip: unknown open_clip model {model_name!r}")
        self.model_name, self.model_config, self.checkpoint = model_name, model_config, checkpoint
        self.visual = open_clip.model.CLIP(**cfg).visual.eval().requires_grad_(False)
        if checkpoint is not None:
            self.load_weights(checkpoint)
        self.visual.output_tokens = True
        size = self.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.grid = self.visual.grid_size[0]
        self.token_dim = self.visual.transformer.width
        self.mean = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)
        self._pixels = ImagePatchTokenizer(image_size=self.image_size, patch_size=1, channels=3, resize=True)
        self.size = self._pixels.size
        self.sizes = [self.size]

    def load_weights(self, path: str) -> None:
        from safetensors.torch import load_file

        if not os.path.isfile(path) or not path.endswith(".safetensors"):
            raise FileNotFoundError(f"{path}: image-clip loads vision weights from a local .safetensors file only")
        state = load_file(path)
        if any(k.startswith("visual.") for k in state):  # a whole CLIP checkpoint: keep the vision tower
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        missing, _ = self.visual.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{path}: not a vision tower for this config (missing {missing[:3]} ...)")

    def config(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "model_config": self.model_config, "checkpoint": self.checkpoint}

    def num_tokens(self, item: Any = None) -> int:
        return self.grid * self.grid

    def preprocess(self, raw: Any) -> torch.Tensor:
        return self._pixels.preprocess(raw)  # RGB [3, H, W] in [0, 1], resized to the tower's size

    def fit_to_size(self, img):
        return self._pixels.fit_to_size(img)

    @torch.no_grad()
    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        _, tokens = self.visual(((batch - self.mean) / self.std).to(next(self.visual.parameters()).dtype))
        return tokens.float()

    def decode(self, tokens: torch.Tensor):
        raise ValueError("image-clip is an understanding-only tokenizer: its features cannot be turned back into "
                         "images; generate with image-patch, image-vae or image-vq")

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.visual.state_dict().items()}, os.path.join(directory, WEIGHTS))
        self.write_config(directory, {**self.config(), "checkpoint": WEIGHTS})

    @classmethod
    def from_config(cls, spec: dict[str, Any], directory: str | os.PathLike) -> ImageCLIPTokenizer:
        return cls(**resolve_path(spec, "checkpoint", directory))
