"""``mmar train-tokenizer``: learn a tokenizer's weights (the ``image-vq`` codebook) on a built-in dataset,
save it where a model config can point (``tokenizer: {path: DIR}``), and report its reconstruction error."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from ..tokenizers import build_tokenizer

DEFAULTS = {"output_dir": "runs/tokenizer", "dataset": "digits", "steps": 300, "batch_size": 512, "seed": 0}


def dataset_pixels(name: str, split: str, tok) -> torch.Tensor:
    if name == "digits":
        from ..datasets.digits import load_digit_split

        images, _ = load_digit_split(split)
    else:
        raise ValueError(f"train-tokenizer: no image set for dataset {name!r} (built in: digits)")
    return torch.stack([tok.preprocess(np.asarray(im)) for im in images])


def reconstruction(tok, pixels: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        recon = tok.decode_pixels(tok.encode(pixels)).clamp(0, 1)
    mse = float((recon - pixels).pow(2).mean())
    return {"mse": mse, "psnr_db": float(10 * np.log10(1.0 / max(mse, 1e-12)))}


def train_tokenizer(config: dict) -> dict:
    cfg = {**DEFAULTS, **config}
    unknown = set(cfg) - set(DEFAULTS) - {"tokenizer"}
    if unknown:
        raise ValueError(f"train-tokenizer: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: tokenizer, {', '.join(DEFAULTS)}")
    if "tokenizer" not in cfg:
        raise ValueError("train-tokenizer: the config needs a 'tokenizer' spec, e.g. {name: image-vq}")
    torch.manual_seed(cfg["seed"])
    tok = build_tokenizer(cfg["tokenizer"])
    if not hasattr(tok, "fit"):
        raise ValueError(f"tokenizer {tok.name!r} has nothing to train")
    start = time.time()
    train = dataset_pixels(cfg["dataset"], "train", tok)
    history = tok.fit(train, steps=cfg["steps"], batch_size=cfg["batch_size"], seed=cfg["seed"])
    tok.save_pretrained(cfg["output_dir"])
    report = {"tokenizer": tok.name, "train": reconstruction(tok, train),
              "heldout": reconstruction(tok, dataset_pixels(cfg["dataset"], "test", tok)),
              "fit_mse_history": history, "seconds": round(time.time() - start, 1)}
    with open(os.path.join(cfg["output_dir"], "reconstruction.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report
