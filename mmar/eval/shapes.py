"""Evaluate a model on the held-out shapes: a GenEval-like check of generated images, and visual QA.

Generated images are read by classical image analysis, no learned model: pixels brighter than the
background are assigned to the nearest palette colour, each colour's connected components (scipy)
are objects, an object's kind comes from its bounding box (fill ratio; a triangle is much wider at
the bottom than at the top), its place from the centre of its box. Each prompt is checked for count,
colours, shapes and positions; ``overall`` is the share of images that pass every check (GenEval's
rule). :func:`analyser_accuracy` validates the analyser on the real held-out images.

Held-out wordings: text-to-image again on the same scenes, each prompt phrased in a way no training
sample is (:data:`HELDOUT_T2I_PROMPTS`), scored the same way and reported apart.

Image-to-text: greedy answers to every question of every held-out scene, exact match; accuracy per
question type (captions included) and overall over every question asked (:func:`score_answers`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from ..datasets.shapes import COLOURS, QUESTIONS, Scene, caption, load_split, questions, t2i_prompt
from ..pipeline import MMARPipeline
from ..sequence import Image, Message
from .report import save_report
from .digits import FD_FEATURES, HELDOUT_SEED_OFFSET, frechet_distance

BATCH = 100
FOREGROUND = 100  # a pixel whose brightest channel exceeds this is not background (which is black)
MIN_AREA = 6  # smaller components are noise (the smallest real shape covers 21 pixels at 16x16)
TRIANGLE_ASYMMETRY = 0.35  # (bottom-third width - top-third width) / box width: 0 for circles, ~0.7 for triangles
SQUARE_FILL = 0.87  # area / box area: 1.0 for squares, <= 0.76 for circles
CATEGORIES = ("count", "colour", "shape", "position")
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
COLOUR_NAMES = list(COLOURS)
MAX_ANSWER_TOKENS = 24
GRID_COLS = 10
GRID_SCALE = 4
# text-to-image wordings that no training sample uses (mmar.data.shapes.T2I_PROMPTS are the training ones):
# the held-out-wording score shows whether the model follows the caption or the memorised sentence
HELDOUT_T2I_PROMPTS = ("please sketch {c}", "can you make a picture of {c}?", "I would like to see {c}",
                       "paint {c} for me", "a picture showing {c}")


@dataclass
class Detection:
    colour: str
    kind: str
    cx: float  # centre of the bounding box, in pixels
    cy: float
    area: int


def shape_kind(mask: np.ndarray) -> str:
    """The kind of one object from its mask cropped to its bounding box."""
    h, w = mask.shape
    third = max(h // 3, 1)
    asymmetry = (mask[-third:].sum(1).mean() - mask[:third].sum(1).mean()) / w
    if asymmetry > TRIANGLE_ASYMMETRY:
        return "triangle"
    return "square" if mask.sum() / (h * w) > SQUARE_FILL else "circle"


def colour_regions(image: Any, palette: np.ndarray, names: list[str], foreground: float = FOREGROUND,
                   min_area: int = MIN_AREA):
    """The objects of a picture of flat-coloured shapes on black (PIL or uint8 array): each connected region
    of pixels brighter than ``foreground`` whose nearest ``palette`` colour is the same, holes filled, specks
    under ``min_area`` pixels dropped. Yields ``(colour name, bounding-box slices, mask in the box)``; shared
    by the shapes and the scenes analysers."""
    from scipy import ndimage

    arr = np.asarray(image.convert("RGB") if isinstance(image, PILImage.Image) else image, dtype=np.float32)
    lit = arr.max(-1) > foreground
    nearest = ((arr[..., None, :] - palette) ** 2).sum(-1).argmin(-1)
    for c, name in enumerate(names):
        labels, _ = ndimage.label(lit & (nearest == c))
        for k, box in enumerate(ndimage.find_objects(labels), start=1):
            mask = ndimage.binary_fill_holes(labels[box] == k)
            if mask.sum() >= min_area:
                yield name, box, mask


def detect(image: Any) -> list[Detection]:
    """The objects in an RGB image (PIL or uint8 array), largest first."""
    found = []
    for name, box, mask in colour_regions(image, PALETTE, COLOUR_NAMES):
        h, w = mask.shape  # place by the box centre: a triangle's mass sits low in its box
        found.append(Detection(name, shape_kind(mask), box[1].start + (w - 1) / 2, box[0].start + (h - 1) / 2,
                               int(mask.sum())))
    return sorted(found, key=lambda d: -d.area)


def place_of(d: Detection, size: int) -> str:
    dx, dy = d.cx - (size - 1) / 2, d.cy - (size - 1) / 2
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def check(scene: Scene, image: Any) -> dict[str, bool | None]:
    """Per-category verdicts for an image generated from ``scene``'s caption (``None``: not applicable)."""
    found = detect(image)
    size = np.asarray(image).shape[0] if not isinstance(image, PILImage.Image) else image.size[1]
    want = scene.shapes
    result: dict[str, bool | None] = {
        "count": len(found) == len(want),
        "colour": Counter(d.colour for d in found) == Counter(s.colour for s in want),
        "shape": Counter(d.kind for d in found) == Counter(s.kind for s in want),
    }
    if len(want) == 1:
        result["position"] = len(found) == 1 and place_of(found[0], size) == scene.layout
    elif scene.is_count:
        result["position"] = None  # "two red circles" says nothing about where
    else:
        axis = "cx" if scene.layout == "horizontal" else "cy"
        order = sorted(found, key=lambda d: getattr(d, axis))
        result["position"] = len(found) == 2 and [(d.colour, d.kind) for d in order] == \
            [(s.colour, s.kind) for s in want]
    result["overall"] = all(v for v in result.values() if v is not None)
    return result


def summarise(scenes: list[Scene], verdicts: list[dict]) -> dict[str, Any]:
    """Mean of each category over the prompts it applies to, overall, and overall per kind of prompt."""
    out = {}
    for key in (*CATEGORIES, "overall"):
        vals = [v[key] for v in verdicts if v[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    kinds = ["count" if s.is_count else "single" if len(s.shapes) == 1 else "pair" for s in scenes]
    out["overall_by_prompt_kind"] = {k: float(np.mean([v["overall"] for v, kk in zip(verdicts, kinds) if kk == k]))
                                     for k in sorted(set(kinds))}
    return out


def analyser_accuracy(split: str = "test") -> dict[str, Any]:
    """The analyser's scores on the real images of a split (each checked against its own scene)."""
    scenes, images = load_split(split)
    return summarise(list(scenes), [check(s, im) for s, im in zip(scenes, images)])


QUESTION_KINDS = {q.format(a=a, b=b): kind.split("_")[0] for kind, q in QUESTIONS.items()
                  for a, b in (("left", "right"), ("top", "bottom"))}  # "what shape is on the right?" -> "shape"


def normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def _batches(items: list, size: int = BATCH):
    for i in range(0, len(items), size):
        yield items[i: i + size]


@lru_cache(maxsize=2)
def fit_feature_extractor(seed: int = 0):
    """A small MLP trained here to name the training scenes (their captions); its hidden layer is the
    feature space of the Fréchet distance, as for digits (an offline stand-in for Inception features)."""
    from sklearn.neural_network import MLPClassifier

    scenes, images = load_split("train")
    return MLPClassifier(hidden_layer_sizes=(FD_FEATURES,), max_iter=300, random_state=seed).fit(
        images.reshape(len(images), -1) / 255.0, [caption(s) for s in scenes])


def features(mlp, images: list | np.ndarray) -> np.ndarray:
    x = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im, dtype=np.float32).reshape(-1)
                  for im in images]) / 255.0
    return np.maximum(x @ mlp.coefs_[0] + mlp.intercepts_[0], 0.0)


def score_answers(asked: list[tuple[int, str, str]], answers: list[str]) -> dict[str, Any]:
    """Exact-match scores of ``answers`` to the ``(scene, question, answer)`` triples ``asked``: the accuracy
    per question type (captions included), the number of questions of each type, and ``overall``, the
    share right of every question asked (so it counts exactly the questions it reports)."""
    right: dict[str, list[bool]] = {}
    for (_, q, a), got in zip(asked, answers, strict=True):
        right.setdefault(QUESTION_KINDS[q], []).append(normalise(got) == normalise(a))
    every = [x for v in right.values() for x in v]
    without = [x for k, v in right.items() if k != "caption" for x in v]
    return {"overall": float(np.mean(every)) if every else None,
            "without_captions": float(np.mean(without)) if without else None,
            "by_type": {k: float(np.mean(v)) for k, v in sorted(right.items())},
            "n_by_type": {k: len(v) for k, v in sorted(right.items())}, "n": len(every)}


def answer_questions(pipe: MMARPipeline, scenes: list[Scene], images: np.ndarray,
                     num_qa_scenes: int | None = None) -> tuple[list[tuple[int, str, str]], list[str]]:
    """Every question of the first ``num_qa_scenes`` scenes (all by default) asked of ``pipe`` with the
    scene's image, greedy: the ``(scene, question, answer)`` triples and the model's answers."""
    asked = [(i, q, a) for i, s in enumerate(scenes[:num_qa_scenes]) for q, a in questions(s)]
    answers = []
    for chunk in _batches(asked):
        prompts = [[Message("user", [Image(images[i]), q])] for i, q, _ in chunk]
        answers += pipe(prompts, mode="text", temperature=0.0, max_new_tokens=MAX_ANSWER_TOKENS).text
    return asked, answers


def heldout_t2i_prompt(scene: Scene, i: int = 0) -> str:
    """A text-to-image prompt for ``scene`` in a wording that no training sample uses (:data:`HELDOUT_T2I_PROMPTS`)."""
    return HELDOUT_T2I_PROMPTS[i % len(HELDOUT_T2I_PROMPTS)].format(c=caption(scene))


def training_t2i_prompt(scene: Scene, i: int = 0) -> str:
    """The training wording the evaluator asks for every scene: ``t2i_prompt`` variant 0 ("draw ...")."""
    return t2i_prompt(scene)


def generate_images(pipe: MMARPipeline, prompts: list[Scene], seed: int, wording=training_t2i_prompt,
                    **gen_kw) -> list:
    """One image per scene, prompted with ``wording(scene, index)``, each from its own seeded generator."""
    generated = []
    for k, chunk in enumerate(_batches(prompts)):
        gens = [torch.Generator().manual_seed(seed * 100_003 + k * BATCH + i) for i in range(len(chunk))]
        texts = [wording(s, k * BATCH + i) for i, s in enumerate(chunk)]
        out = pipe(texts, generator=gens, mode="image", max_items=1, **gen_kw)
        generated += [imgs[0] for imgs in out.images]
    return generated


def _fd_metrics(generated: list, images: np.ndarray, seed: int) -> dict[str, float]:
    """Fréchet distance of the generated images to the held-out ones, and of as many training images."""
    mlp = fit_feature_extractor(seed)
    real = features(mlp, images)
    return {"frechet_distance": frechet_distance(features(mlp, generated), real),
            "frechet_distance_real_train": frechet_distance(
                features(mlp, load_split("train")[1][: len(generated)]), real)}


def _save(metrics: dict[str, Any], output: str | None, grid: str | None, generated: list) -> None:
    """``metrics`` as JSON to ``output``; the generated images as a grid (next to ``output`` by default)."""
    save_report(metrics, output, grid, generated, GRID_COLS, GRID_SCALE)


def text_to_image(pipe: MMARPipeline, scenes: tuple[Scene, ...], num_prompts: int, num_heldout_prompts: int,
                  seed: int, **gen_kw) -> tuple[list, dict[str, Any]]:
    """Images for the first ``num_prompts`` held-out captions in the training wording and for the first
    ``num_heldout_prompts`` in held-out wordings (other seeds), each read by the analyser: the images of the
    training wording, and the metrics of both, the held-out wordings' apart."""
    prompts, heldout = list(scenes[:num_prompts]), list(scenes[:num_heldout_prompts])
    generated = generate_images(pipe, prompts, seed, **gen_kw)
    heldout_images = generate_images(pipe, heldout, seed + HELDOUT_SEED_OFFSET, heldout_t2i_prompt, **gen_kw)
    t2i = summarise(prompts, [check(s, im) for s, im in zip(prompts, generated)])
    t2i_heldout = summarise(heldout, [check(s, im) for s, im in zip(heldout, heldout_images)])
    return generated, {"text_to_image_overall": t2i["overall"], "text_to_image": t2i,
                       "text_to_image_overall_heldout_prompts": t2i_heldout["overall"],
                       "text_to_image_heldout_prompts": t2i_heldout, "heldout_prompts": list(HELDOUT_T2I_PROMPTS),
                       "n_generated": len(generated), "n_generated_heldout_prompts": len(heldout_images)}


def evaluate_shapes(model_dir: str, output: str | None = None, grid: str | None = None,
                    guidance_scale: float | None = None, num_inference_steps: int | None = None, seed: int = 0,
                    image_temperature: float | None = None, num_prompts: int = 120, num_qa_scenes: int | None = None,
                    num_heldout_prompts: int | None = None, pipeline: MMARPipeline | None = None,
                    **_) -> dict[str, Any]:
    """Metrics as a dict (also written to ``output`` as JSON); ``grid`` gets the generated images.
    ``num_prompts``: generated images (one per held-out caption); ``num_heldout_prompts``: as many again
    (default ``num_prompts``) for the same captions in wordings no training sample uses, reported apart
    (``text_to_image_overall_heldout_prompts``); ``num_qa_scenes``: held-out scenes whose questions are
    asked (default: all); ``image_temperature``: the diffusion head's sampling temperature (default: the
    model's generation config)."""
    t0 = time.time()
    pipe = pipeline or MMARPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if guidance_scale is None:  # the model's own setting (generation_config.json)
        guidance_scale = pipe.generation_config.guidance_scale
    scenes, images = load_split("test")
    asked, answers = answer_questions(pipe, scenes, images, num_qa_scenes)  # image -> text (greedy)
    qa = score_answers(asked, answers)
    generated, t2i = text_to_image(  # text -> image: the first held-out captions (CFG), read by the analyser
        pipe, scenes, num_prompts, num_prompts if num_heldout_prompts is None else num_heldout_prompts, seed,
        guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, image_temperature=image_temperature)
    head = pipe.model.config.modalities["image"].head
    metrics = {
        "task": "shapes", "model": str(model_dir), **t2i,
        # every question asked, captions included; the caption-free figure is named as such
        "image_to_text_accuracy": qa["overall"], "image_to_text_accuracy_without_captions": qa["without_captions"],
        "caption_exact_match": qa["by_type"].get("caption"), "image_to_text_by_question": qa["by_type"],
        "n_questions_by_type": qa["n_by_type"],
        "analyser_on_real_heldout": analyser_accuracy("test")["overall"],
        **_fd_metrics(generated, images, seed),
        "n_questions": len(asked), "guidance_scale": guidance_scale,
        "head": head["name"], "num_inference_steps": num_inference_steps or head.get("num_inference_steps"),
        "image_temperature": image_temperature or pipe.generation_config.image_temperature,
        "seed": seed, "eval_seconds": round(time.time() - t0, 1),
    }
    _save(metrics, output, grid, generated)
    return metrics
