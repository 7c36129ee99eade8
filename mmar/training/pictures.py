"""Pictures a person can look at: loss curves and sample grids."""

from __future__ import annotations

import json
import math
import os

import torch
from PIL import Image


def plot_loss_curve(log_path: str, out_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(log_path):
        return
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return
    keys = [k for k in rows[0] if k.endswith("loss")]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in keys:
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(out_path + ".tmp.png", out_path)


def image_grid(images: list[Image.Image], cols: int, scale: int = 1, pad: int = 2) -> Image.Image:
    """Tile images (upscaled ``scale`` times, nearest neighbour) into a grid; images of other sizes keep
    their own size, centred in a cell as large as the largest."""
    if not images:
        raise ValueError("no images to tile")
    w, h = max(im.size[0] for im in images) * scale, max(im.size[1] for im in images) * scale
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        iw, ih = im.size[0] * scale, im.size[1] * scale
        grid.paste(im.convert("RGB").resize((iw, ih), Image.NEAREST),
                   (pad + c * (w + pad) + (w - iw) // 2, pad + r * (h + pad) + (h - ih) // 2))
    return grid


@torch.no_grad()
def preview_grid(model, processor, prompts: list[str], path: str, seed: int = 0, guidance_scale: float = 3.0,
                 per_prompt: int = 8) -> None:
    from ..pipeline import MMARPipeline

    was_training = model.training
    pipe = MMARPipeline(model, processor)
    pipe.set_progress_bar_config(disable=True)
    batch = [p for p in prompts for _ in range(per_prompt)]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(batch))]
    out = pipe(batch, mode="image", guidance_scale=guidance_scale, generator=gens)
    images = [imgs[0] for imgs in out.images if imgs]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image_grid(images, cols=per_prompt, scale=4).save(path)
    model.train(was_training)
