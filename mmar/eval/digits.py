"""Evaluate a model on the held-out digits.

* image-to-text: accuracy of the answer to "which digit is this?" on every held-out image;
* text-to-image: ``per_digit`` images per digit, generated with CFG; accuracy = the share that an
  independent classifier (an RBF SVC fitted on the training split) assigns to the prompted digit;
* interleaved: "a 3 and then a 4:" -> both generated images must be classified right, in order;
* Fréchet distance between the generated images and the held-out ones, in the hidden layer of a small
  MLP trained on the training split (and, for scale, the same distance for as many real training images).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

import numpy as np
import torch

from ..datasets.digits import DIGIT_WORDS, i2t_prompt, load_digit_split, pair_prompt, t2i_prompt
from ..pipeline import MMARPipeline
from ..sequence import Image, Message
from ..training.pictures import image_grid

BATCH = 100
FD_FEATURES = 32
_WORDS = {w: i for i, w in enumerate(DIGIT_WORDS)}


def fit_classifier(seed: int = 0):
    """An RBF SVC on the training split's pixels (0..1); returns it and its held-out accuracy."""
    from sklearn.svm import SVC

    xtr, ytr = load_digit_split("train")
    xte, yte = load_digit_split("test")
    clf = SVC(C=10.0, gamma="scale", random_state=seed).fit(xtr.reshape(len(xtr), -1) / 255.0, ytr)
    return clf, float((clf.predict(xte.reshape(len(xte), -1) / 255.0) == yte).mean())


def fit_feature_extractor(seed: int = 0):
    """A small MLP trained here on the training split; its hidden layer is the feature space of the
    Fréchet distance (an offline stand-in for Inception features)."""
    from sklearn.neural_network import MLPClassifier

    xtr, ytr = load_digit_split("train")
    return MLPClassifier(hidden_layer_sizes=(FD_FEATURES,), max_iter=600, random_state=seed).fit(
        xtr.reshape(len(xtr), -1) / 255.0, ytr)


def features(mlp, images: list | np.ndarray) -> np.ndarray:
    x = (np.stack([np.asarray(im.convert("L"), dtype=np.float32).reshape(-1) for im in images]) if isinstance(
        images, list) else images.reshape(len(images), -1).astype(np.float32)) / 255.0
    return np.maximum(x @ mlp.coefs_[0] + mlp.intercepts_[0], 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    eps = 1e-6 * np.eye(a.shape[1])  # dead ReLU units have zero variance
    cov_a, cov_b = np.cov(a, rowvar=False) + eps, np.cov(b, rowvar=False) + eps
    covmean = linalg.sqrtm(cov_a @ cov_b)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean.real))


def classify(clf, images: list) -> np.ndarray:
    x = np.stack([np.asarray(im.convert("L"), dtype=np.float32).reshape(-1) / 255.0 for im in images])
    return clf.predict(x)


def parse_digit(text: str) -> int | None:
    """The first digit (numeral or word) in ``text``."""
    m = re.search(r"\d|" + "|".join(DIGIT_WORDS), text.lower())
    if m is None:
        return None
    return int(m.group()) if m.group().isdigit() else _WORDS[m.group()]


def _batches(items: list, size: int = BATCH):
    for i in range(0, len(items), size):
        yield items[i: i + size]


def evaluate_digits(model_dir: str, output: str | None = None, grid: str | None = None,
                    guidance_scale: float | None = None, num_inference_steps: int | None = None, seed: int = 0,
                    image_temperature: float | None = None, per_digit: int = 10, pairs: int = 50,
                    pipeline: MMARPipeline | None = None, **_) -> dict[str, Any]:
    """Metrics as a dict (also written to ``output`` as JSON). ``guidance_scale`` / ``image_temperature``
    default to the model's generation config."""
    t0 = time.time()
    pipe = pipeline or MMARPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if guidance_scale is None:  # the model's own setting (generation_config.json)
        guidance_scale = pipe.generation_config.guidance_scale
    clf, clf_acc = fit_classifier(seed)
    xte, yte = load_digit_split("test")
    rng = np.random.default_rng(seed)

    # image -> text (greedy)
    answers = []
    for chunk in _batches(list(range(len(yte)))):
        prompts = [[Message("user", [Image(xte[i]), i2t_prompt(i)])] for i in chunk]
        answers += pipe(prompts, mode="text", temperature=0.0, max_new_tokens=4).text
    i2t = float(np.mean([parse_digit(a) == y for a, y in zip(answers, yte)]))

    # text -> image (CFG)
    digits = [d for d in range(10) for _ in range(per_digit)]
    images = []
    gen_kw = dict(mode="image", guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, max_items=1,
                  image_temperature=image_temperature)
    for k, chunk in enumerate(_batches(digits)):
        gens = [torch.Generator().manual_seed(seed * 100_003 + k * BATCH + i) for i in range(len(chunk))]
        out = pipe([t2i_prompt(d, i) for i, d in enumerate(chunk)], generator=gens, **gen_kw)
        images += [imgs[0] for imgs in out.images]
    pred = classify(clf, images)
    t2i = float(np.mean(pred == np.array(digits)))
    mlp = fit_feature_extractor(seed)
    fd = frechet_distance(features(mlp, images), features(mlp, xte))
    fd_real = frechet_distance(features(mlp, load_digit_split("train")[0][: len(images)]), features(mlp, xte))
    per_digit_acc = {str(d): float(np.mean(pred[np.array(digits) == d] == d)) for d in range(10)}

    # interleaved: two images in one answer
    pair_digits = [tuple(int(x) for x in rng.integers(0, 10, 2)) for _ in range(pairs)]
    ok, complete = [], 0
    for k, chunk in enumerate(_batches(pair_digits)):
        gens = [torch.Generator().manual_seed(seed * 7919 + k * BATCH + i) for i in range(len(chunk))]
        out = pipe([pair_prompt(a, b, i) for i, (a, b) in enumerate(chunk)], generator=gens, mode="auto",
                   guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, max_items=2,
                   image_temperature=image_temperature,
                   max_new_tokens=4)
        for (a, b), imgs in zip(chunk, out.images):
            complete += len(imgs) == 2
            ok.append(len(imgs) == 2 and list(classify(clf, imgs)) == [a, b])
    metrics = {
        "task": "digits", "model": str(model_dir),
        "image_to_text_accuracy": i2t, "text_to_image_accuracy": t2i,
        "interleaved_accuracy": float(np.mean(ok)), "interleaved_two_images_rate": complete / max(len(pair_digits), 1),
        "text_to_image_per_digit": per_digit_acc, "classifier_heldout_accuracy": clf_acc,
        "frechet_distance": fd, "frechet_distance_real_train": fd_real,
        "n_heldout": int(len(yte)), "n_generated": len(images), "guidance_scale": guidance_scale,
        "head": pipe.model.config.modalities["image"].head["name"],
        "num_inference_steps": num_inference_steps or pipe.model.config.modalities["image"].head.get("num_inference_steps"),
        "image_temperature": image_temperature or pipe.generation_config.image_temperature,
        "seed": seed, "eval_seconds": round(time.time() - t0, 1),
    }
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(metrics, f, indent=2)
    grid = grid or (os.path.splitext(output)[0] + "_grid.png" if output else None)
    if grid:
        image_grid(images, cols=per_digit, scale=4).save(grid)
        metrics["grid"] = grid
    return metrics
