"""Evaluate a model on the held-out digits.

* image-to-text: accuracy of the answer to "which digit is this?" on every held-out image;
* text-to-image: ``per_digit`` images per digit, generated with CFG; accuracy = the share that an
  independent classifier (an RBF SVC fitted on the training split) assigns to the prompted digit;
* interleaved: "a 3 and then a 4:" -> both generated images must be classified right, in order;
* held-out wordings: text-to-image again with prompts phrased in ways no training sample is
  (:data:`HELDOUT_T2I_PROMPTS`), reported apart;
* Fréchet distance between the generated images and the held-out ones, in the hidden layer of a small
  MLP trained on the training split (and, for scale, the same distance for as many real training images).
"""

from __future__ import annotations

import re
import time
from typing import Any

import numpy as np
import torch

from ..datasets.digits import DIGIT_WORDS, i2t_prompt, load_digit_split, pair_prompt, t2i_prompt
from ..pipeline import MMARPipeline
from ..sequence import Image, Message
from .report import save_report

BATCH = 100
FD_FEATURES = 32
_WORDS = {w: i for i, w in enumerate(DIGIT_WORDS)}
# text-to-image wordings that no training sample uses (mmar.data.digits.T2I_PROMPTS are the training ones):
# the held-out-prompt accuracy shows whether the model follows the digit or the memorised sentence
HELDOUT_T2I_PROMPTS = ("please sketch {w}", "can you make a picture of the number {d}?", "I would like to see a {w}",
                       "render the numeral {d}", "paint digit {w} for me")
HELDOUT_SEED_OFFSET = 500_009  # the held-out-wording images draw other noise than the training-wording ones


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


def answer_images(pipe: MMARPipeline, images: np.ndarray) -> list[str]:
    """The greedy answer to an image-to-text prompt ("which digit is this?") for each image."""
    answers = []
    for chunk in _batches(list(range(len(images)))):
        prompts = [[Message("user", [Image(images[i]), i2t_prompt(i)])] for i in chunk]
        answers += pipe(prompts, mode="text", temperature=0.0, max_new_tokens=4).text
    return answers


def heldout_t2i_prompt(d: int, i: int = 0) -> str:
    """A text-to-image prompt in a wording that no training sample uses (:data:`HELDOUT_T2I_PROMPTS`)."""
    return HELDOUT_T2I_PROMPTS[i % len(HELDOUT_T2I_PROMPTS)].format(w=DIGIT_WORDS[d], d=d)


def generate_digits(pipe: MMARPipeline, digits: list[int], seed: int, prompt=t2i_prompt, **gen_kw) -> list:
    """One image per digit from ``prompt(digit, i)``, each from its own seeded generator."""
    images = []
    for k, chunk in enumerate(_batches(digits)):
        gens = [torch.Generator().manual_seed(seed * 100_003 + k * BATCH + i) for i in range(len(chunk))]
        out = pipe([prompt(d, i) for i, d in enumerate(chunk)], generator=gens, mode="image", max_items=1, **gen_kw)
        images += [imgs[0] for imgs in out.images]
    return images


def generate_pairs(pipe: MMARPipeline, clf, pair_digits: list[tuple[int, int]], seed: int,
                   **gen_kw) -> tuple[list[bool], int]:
    """Interleaved answers to "a 3 and then a 4:": per pair whether both images came out and were read
    right, in order; and how many answers held two images."""
    ok, complete = [], 0
    for k, chunk in enumerate(_batches(pair_digits)):
        gens = [torch.Generator().manual_seed(seed * 7919 + k * BATCH + i) for i in range(len(chunk))]
        out = pipe([pair_prompt(a, b, i) for i, (a, b) in enumerate(chunk)], generator=gens, mode="auto",
                   max_items=2, max_new_tokens=4, **gen_kw)
        for (a, b), imgs in zip(chunk, out.images):
            complete += len(imgs) == 2
            ok.append(len(imgs) == 2 and list(classify(clf, imgs)) == [a, b])
    return ok, complete


def _t2i_metrics(clf, images: list, digits: list[int], heldout_images: list, heldout_digits: list[int],
                 xte: np.ndarray, seed: int) -> dict[str, Any]:
    """Text-to-image accuracy (overall, per digit, on held-out wordings) and the Fréchet distances."""
    pred, target = classify(clf, images), np.array(digits)
    mlp = fit_feature_extractor(seed)
    fd_real = frechet_distance(features(mlp, load_digit_split("train")[0][: len(images)]), features(mlp, xte))
    heldout = classify(clf, heldout_images) == np.array(heldout_digits) if heldout_images else np.array([])
    return {"text_to_image_accuracy": float(np.mean(pred == target)),
            "text_to_image_accuracy_heldout_prompts": float(np.mean(heldout)) if len(heldout) else None,
            "text_to_image_per_digit": {str(d): float(np.mean(pred[target == d] == d)) for d in range(10)},
            "frechet_distance": frechet_distance(features(mlp, images), features(mlp, xte)),
            "frechet_distance_real_train": fd_real, "n_generated": len(images),
            "n_generated_heldout_prompts": len(heldout_images)}


def _save(metrics: dict[str, Any], output: str | None, grid: str | None, images: list, cols: int) -> None:
    """``metrics`` as JSON to ``output``; the generated images as a grid (next to ``output`` by default)."""
    save_report(metrics, output, grid, images, cols)


def evaluate_digits(model_dir: str, output: str | None = None, grid: str | None = None,
                    guidance_scale: float | None = None, num_inference_steps: int | None = None, seed: int = 0,
                    image_temperature: float | None = None, per_digit: int = 10, pairs: int = 50,
                    heldout_per_digit: int | None = None, pipeline: MMARPipeline | None = None,
                    **_) -> dict[str, Any]:
    """Metrics as a dict (also written to ``output`` as JSON). ``guidance_scale`` / ``image_temperature``
    default to the model's generation config. Text-to-image runs on the training wordings and, reported
    apart (``text_to_image_accuracy_heldout_prompts``), on ``heldout_per_digit`` (default ``per_digit``)
    prompts per digit in wordings no training sample uses."""
    t0 = time.time()
    pipe = pipeline or MMARPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if guidance_scale is None:  # the model's own setting (generation_config.json)
        guidance_scale = pipe.generation_config.guidance_scale
    clf, clf_acc = fit_classifier(seed)
    xte, yte = load_digit_split("test")
    rng = np.random.default_rng(seed)
    answers = answer_images(pipe, xte)  # image -> text (greedy)
    gen_kw = dict(guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                  image_temperature=image_temperature)
    digits = [d for d in range(10) for _ in range(per_digit)]  # text -> image (CFG)
    images = generate_digits(pipe, digits, seed, **gen_kw)
    n_heldout = per_digit if heldout_per_digit is None else heldout_per_digit
    heldout_digits = [d for d in range(10) for _ in range(n_heldout)]
    heldout_images = generate_digits(pipe, heldout_digits, seed + HELDOUT_SEED_OFFSET, heldout_t2i_prompt, **gen_kw)
    pair_digits = [tuple(int(x) for x in rng.integers(0, 10, 2)) for _ in range(pairs)]
    ok, complete = generate_pairs(pipe, clf, pair_digits, seed, **gen_kw)  # interleaved: two images in one answer
    metrics = {
        "task": "digits", "model": str(model_dir),
        "image_to_text_accuracy": float(np.mean([parse_digit(a) == y for a, y in zip(answers, yte)])),
        **_t2i_metrics(clf, images, digits, heldout_images, heldout_digits, xte, seed),
        "interleaved_accuracy": float(np.mean(ok)), "interleaved_two_images_rate": complete / max(len(pair_digits), 1),
        "classifier_heldout_accuracy": clf_acc, "heldout_prompts": list(HELDOUT_T2I_PROMPTS),
        "n_heldout": int(len(yte)), "guidance_scale": guidance_scale,
        "head": pipe.model.config.modalities["image"].head["name"],
        "num_inference_steps": num_inference_steps or pipe.model.config.modalities["image"].head.get("num_inference_steps"),
        "image_temperature": image_temperature or pipe.generation_config.image_temperature,
        "seed": seed, "eval_seconds": round(time.time() - t0, 1),
    }
    _save(metrics, output, grid, images, per_digit)
    return metrics
