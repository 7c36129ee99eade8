"""Where an evaluator's results go: the metrics JSON and a grid of what it generated."""

from __future__ import annotations

import json
import os
from typing import Any

from ..training.pictures import image_grid


def save_report(metrics: dict[str, Any], output: str | None, grid: str | None, images: list, cols: int,
                scale: int = 4) -> None:
    """``metrics`` as JSON to ``output``; ``images`` as a grid of ``cols`` columns at ``grid`` (next to
    ``output`` by default), whose path is then added to ``metrics``."""
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(metrics, f, indent=2)
    grid = grid or (os.path.splitext(output)[0] + "_grid.png" if output else None)
    if grid:
        image_grid(images, cols=cols, scale=scale).save(grid)
        metrics["grid"] = grid
