"""Diffusion-head sampling steps against quality: DDIM 10 / 25 / 50 / 100 steps (and DDPM 50) on the
trained digits model: text-to-image accuracy, Fréchet distance and generation time of 100 images.
The baseline is the default (DDIM 50).

    python benchmarks/sampling_steps.py [--model runs/bench-digits]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import machine, update_section  # noqa: E402


def run(pipe, clf, mlp, real_feats, scheduler: str, steps: int) -> dict:
    from mmar.datasets.digits import t2i_prompt
    from mmar.eval.digits import classify, features, frechet_distance

    head = pipe.model.heads["image"]
    head.scheduler_name = scheduler
    digits = [d for d in range(10) for _ in range(10)]
    gens = [torch.Generator().manual_seed(i) for i in range(len(digits))]
    start = time.perf_counter()
    out = pipe([t2i_prompt(d, i) for i, d in enumerate(digits)], mode="image", guidance_scale=3.0,
               num_inference_steps=steps, generator=gens, max_items=1)
    secs = time.perf_counter() - start
    images = [imgs[0] for imgs in out.images]
    return {"acc": float(np.mean(classify(clf, images) == np.array(digits))), "seconds": secs,
            "fd": frechet_distance(features(mlp, images), real_feats)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/bench-digits")
    args = ap.parse_args()
    from mmar.datasets.digits import load_digit_split
    from mmar.eval.digits import features, fit_classifier, fit_feature_extractor
    from mmar.pipeline import MMARPipeline

    pipe = MMARPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    clf, _ = fit_classifier()
    mlp = fit_feature_extractor()
    real = features(mlp, load_digit_split("test")[0])
    settings = [("DDIMScheduler", 10), ("DDIMScheduler", 25), ("DDIMScheduler", 50), ("DDIMScheduler", 100),
                ("DDPMScheduler", 50)]
    results = {s: run(pipe, clf, mlp, real, *s) for s in settings}
    base = results[("DDIMScheduler", 50)]
    lines = ["## Diffusion-head sampling steps against quality (digits)", "",
             f"`python benchmarks/sampling_steps.py --model {args.model}` on {machine()}. 100 images (10 per digit), "
             "CFG 3.0, batch 100; baseline: the default DDIM 50.", "",
             "| sampler | text-to-image acc. | FD | time for 100 images | time vs DDIM 50 |", "|---|---|---|---|---|"]
    for (name, steps), r in results.items():
        lines.append(f"| {name.replace('Scheduler', '')} {steps} | {r['acc']:.0%} | {r['fd']:.2f} | "
                     f"{r['seconds']:.1f} s | {r['seconds'] / base['seconds']:.2f}x |")
    update_section("sampling-steps", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
