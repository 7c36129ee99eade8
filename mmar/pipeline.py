"""MMARPipeline: load a model directory and generate interleaved text / images (diffusers-style)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from .generation import generate
from .modeling import MMARModel
from .sequence import Image, Message, MMARProcessor, as_messages


@dataclass
class MMARPipelineOutput:
    """One entry per prompt: its segments in order (``str`` / PIL image), and views by kind."""

    segments: list[list[Any]] = field(default_factory=list)
    latents: list[list[tuple[str, torch.Tensor]]] = field(default_factory=list)

    @property
    def text(self) -> list[str]:
        return ["".join(s for s in row if isinstance(s, str)) for row in self.segments]

    @property
    def images(self) -> list[list[Any]]:
        return [[s for s in row if not isinstance(s, str)] for row in self.segments]


class MMARPipeline:
    def __init__(self, model: MMARModel, processor: MMARProcessor):
        self.model, self.processor = model.eval(), processor
        self.progress = True

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> MMARPipeline:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no such model directory")
        model = MMARModel.from_pretrained(directory, dtype=dtype).to(device)
        return cls(model, MMARProcessor.from_pretrained(directory))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)

    def set_progress_bar_config(self, disable: bool = False) -> None:
        self.progress = not disable

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prompt(self, prompt: Any, images: list | None) -> list[Message]:
        if isinstance(prompt, str):
            if not prompt.strip() and not images:
                raise ValueError("empty prompt: give some text or an image")
            content = [Image(im) for im in images or []] + ([prompt] if prompt.strip() else [])
            return [Message("user", content)]
        return as_messages(prompt)

    @torch.no_grad()
    def __call__(self, prompt: Any, images: list | None = None, *, mode: str = "auto",
                 max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 guidance_scale: float = 1.0, image_temperature: float = 1.0,
                 num_inference_steps: int | None = None, generator=None, max_items: int = 4,
                 output_type: str = "pil") -> MMARPipelineOutput:
        """``prompt``: a string, a list of messages, or a list of those (a batch). ``images``: images that
        go before the text of a string prompt (one list per prompt in a batch)."""
        batch = isinstance(prompt, list) and prompt and not isinstance(prompt[0], (Message, dict))
        prompts = prompt if batch else [prompt]
        image_lists = images if batch else [images]
        if image_lists is None:
            image_lists = [None] * len(prompts)
        if len(image_lists) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(image_lists)} image lists")
        start = mode if mode in self.processor.modality_tokenizers else None
        enc = [self.processor.encode(self._prompt(p, im), add_generation_prompt=True, start_modality=start)
               for p, im in zip(prompts, image_lists)]
        b = self.processor.collate(enc, padding_side="left")
        dev = self.device
        values = {m: v.to(dev) for m, v in b["values"].items()}
        tok = self.processor.tokenizer
        out = generate(self.model, b["input_ids"].to(dev), b["attention_mask"].to(dev), values,
                       decode_text=self.processor.decode_text, mode=mode, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, guidance_scale=guidance_scale,
                       image_temperature=image_temperature, num_inference_steps=num_inference_steps,
                       generator=generator, max_items=max_items, suppress_ids=tok.all_special_ids,
                       progress=self.progress)
        segments = []
        for row in out.segments:
            segs = []
            for s in row:
                if isinstance(s, str):
                    segs.append(s)
                elif output_type == "latent":
                    segs.append(s)
                else:
                    segs.append(self.processor.decode_item(*s))
            segments.append(segs)
        latents = [[s for s in row if not isinstance(s, str)] for row in out.segments]
        return MMARPipelineOutput(segments=segments, latents=latents)
