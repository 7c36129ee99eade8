"""Pictures a person can look at: loss curves and sample grids."""

from __future__ import annotations

import json
import math
import os

import torch
from PIL import Image


def plot_loss_curve(log_path: str, out_path: str) -> None:
    """The losses of ``log.jsonl`` against the step: training rows as solid lines, held-out eval rows
    (``eval_*_loss``) dashed in the same colour, the best eval step as a dotted vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not os.path.isfile(log_path):
        return
    with open(log_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train and not evals:
        return
    names = [k for r in train for k in r] + [k[5:] for r in evals for k in r if k.startswith("eval_")]
    keys = list(dict.fromkeys(k for k in names if k.endswith("loss")))
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, k in enumerate(keys):
        color = f"C{i}"
        pts = [(r["step"], r[k]) for r in train if r.get(k) is not None]
        if pts:
            ax.plot(*zip(*pts), color=color, label=k)
        pts = [(r["step"], r["eval_" + k]) for r in evals if r.get("eval_" + k) is not None]
        if pts:
            ax.plot(*zip(*pts), color=color, linestyle="--", marker=".", label="eval_" + k)
    if evals and evals[-1].get("best_step") is not None:
        ax.axvline(evals[-1]["best_step"], color="grey", linestyle=":", label="best eval")
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
