"""Evaluate a model on the held-out scenes: GenEval-style text-to-image, visual QA, and instructed editing.

The analyser is classical image analysis, no learned model (:func:`read_objects`): pixels brighter than
the black background go to the nearest palette colour; each colour's connected components (scipy) are
objects; an object's size comes from its bounding box (5 or 7 pixels), its kind from its mask (fill
ratio of the box: 1.0 square, ~0.8 circle, ~0.5 diamond; a triangle is much wider at the bottom than at
the top), its cell from the centre of its box. :func:`analyser_accuracy` checks it on real held-out
scenes and edits (the exact scene graph read back).

* text-to-image: one prompt per held-out scene and GenEval category (:data:`CATEGORIES`), the same
  number per category; a generated image passes when it shows exactly what the prompt says (the
  objects' count, kinds, colours and, for position, the relation of their centres). ``overall`` is the
  mean of the six category scores (GenEval's overall); every figure also for the held-out-combination
  subset (scenes holding a colour and kind in a relation to another object that no training image has:
  there the position category is the composition test, its prompt naming the unseen combination);
  and again, reported apart, for the same scenes and categories in wordings no training sample uses
  (:data:`HELDOUT_T2I_PROMPTS`);
* image-to-text: greedy answers to every question of the first held-out scenes, exact match, per
  question type and overall (captions included) and on the held-out-combination subset;
* editing: the source image and the instruction -> the edited image, which passes when the analyser
  reads exactly the edited scene graph back: the edit was made AND every other object stayed as it was
  (both parts also reported apart), per edit type and overall;
* a Fréchet distance of the generated images to held-out ones of the same category mix, in the space of
  the principal components of training scenes' pixels, with its noise band: the distances of real
  training images (one of the same category per generated image, several draws) to the same held-out ones.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from ..data.scenes import (CATEGORIES, CELL, COLOURS, EDIT_TYPES, GRID, Edit, Obj, Scene, categories, draw,
                           load_edits, load_split, offset_relation, questions, relation, t2i_prompt, t2i_text)
from ..pipeline import MMARPipeline
from ..types import Image, Message
from .digits import FD_FEATURES, HELDOUT_SEED_OFFSET, frechet_distance
from .shapes import BATCH, _batches, _save, colour_regions, normalise

FOREGROUND = 100  # a pixel whose brightest channel exceeds this is not background
MIN_AREA = 6  # smaller components are specks (the smallest real object, a small diamond, covers 13 pixels)
LARGE_SIDE = 6  # a box side of at least this many pixels is a large object (5 small, 7 large)
TRIANGLE_ASYMMETRY = 0.35  # (bottom-third width - top-third width) / box width: 0 when symmetric, ~0.7 triangles
SQUARE_FILL = 0.92  # area / box area: 1.0 squares, <= 0.84 circles
DIAMOND_FILL = 0.65  # area / box area: ~0.52 diamonds, >= 0.75 circles
PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
COLOUR_NAMES = list(COLOURS)
MAX_ANSWER_TOKENS = 64
FD_TRAIN_IMAGES = 2000
FD_BAND_DRAWS = 5
FD_REF_PER_CATEGORY = 50
# text-to-image wordings that no training sample uses (mmar.data.scenes.T2I_TEMPLATES are the training ones)
HELDOUT_T2I_PROMPTS = ("please sketch {p}", "can you make a picture of {p}?", "I would like to see {p}",
                       "paint {p} for me", "a picture showing {p}")


@dataclass(frozen=True)
class Detection:
    """An object read off an image: its graph node and the centre of its box, in pixels."""

    obj: Obj
    cx: float
    cy: float


def shape_kind(mask: np.ndarray) -> str:
    """The kind of one object from its mask cropped to its bounding box."""
    h, w = mask.shape
    third = max(h // 3, 1)
    if (mask[-third:].sum(1).mean() - mask[:third].sum(1).mean()) / w > TRIANGLE_ASYMMETRY:
        return "triangle"
    fill = mask.sum() / (h * w)
    return "square" if fill > SQUARE_FILL else "diamond" if fill < DIAMOND_FILL else "circle"


def _as_array(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB") if isinstance(image, PILImage.Image) else image, dtype=np.float32)


def detect(image: Any) -> list[Detection]:
    """The objects in an RGB image (PIL or uint8 array) in reading order of their boxes' centres."""
    found = []
    for colour, box, mask in colour_regions(image, PALETTE, COLOUR_NAMES, FOREGROUND, MIN_AREA):
        h, w = mask.shape
        cx, cy = box[1].start + (w - 1) / 2, box[0].start + (h - 1) / 2
        # the cell whose centre is nearest (a real object's box centre sits half a pixel off its cell's)
        row, col = (int(np.clip((v + 0.5) // CELL, 0, GRID - 1)) for v in (cy, cx))
        size = "large" if max(h, w) >= LARGE_SIDE else "small"
        found.append(Detection(Obj(shape_kind(mask), colour, size, row, col), cx, cy))
    return sorted(found, key=lambda d: (d.obj.row, d.obj.col, d.obj.name))


def read_objects(image: Any) -> tuple[Obj, ...]:
    """The scene graph read off an image: its objects in reading order (compare with ``Scene.objects``)."""
    return tuple(d.obj for d in detect(image))


def _relation(a: Detection, b: Detection) -> str | None:
    """:func:`relation` on the pixel centres of two detections."""
    return offset_relation(a.cx - b.cx, a.cy - b.cy)


def check(category: str, scene: Scene, image: Any) -> bool:
    """Whether an image generated from ``scene``'s ``category`` prompt (:func:`t2i_prompt`, variant 0)
    shows exactly what the prompt says."""
    found, want = detect(image), scene.objects
    kinds, names = sorted(d.obj.kind for d in found), sorted(d.obj.name for d in found)
    if category in ("single_object", "counting", "two_object"):
        ok = kinds == sorted(o.kind for o in want)
        return ok if category != "counting" else ok and len(set(kinds)) == 1
    if category in ("colours", "colour_attribution"):
        return names == sorted(o.name for o in want)
    if category == "position":
        if names != sorted(o.name for o in want):
            return False
        a, b = want
        da, db = (next(d for d in found if d.obj.name == o.name) for o in (a, b))
        return _relation(da, db) == relation(a, b)
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def edit_verdict(edit: Edit, image: Any) -> dict[str, bool]:
    """``made``: every changed object is there as edited and no removed one is left; ``kept``: every
    untouched object is where it was; ``success``: exactly the edited scene graph (both, nothing else)."""
    read = read_objects(image)
    got, before, after = set(read), set(edit.source.objects), set(edit.target.objects)
    made = (after - before) <= got and not (before - after) & got
    kept = (before & after) <= got
    return {"made": made, "kept": kept, "success": read == edit.target.objects}


def _mean(values) -> float | None:
    values = list(values)
    return float(np.mean(values)) if values else None


def analyser_accuracy(split: str = "test", n: int | None = None) -> dict[str, float]:
    """The share of a split's first ``n`` real scenes (and of their edits' results) whose exact scene
    graph the analyser reads back, and the share of their GenEval prompts it passes."""
    scenes, images = load_split(split)
    scenes, images = scenes[:n], images[:n]
    edits = [e for e in load_edits(split)[: len(scenes)] if e is not None]
    return {"scenes": _mean(read_objects(im) == s.objects for s, im in zip(scenes, images)),
            "edits": _mean(edit_verdict(e, draw(e.target))["success"] for e in edits),
            "prompts": _mean(check(c, s, im) for s, im in zip(scenes, images) for c in categories(s)),
            "n_scenes": len(scenes), "n_edits": len(edits)}


def prompt_set(num_prompts: int) -> tuple[list[tuple[str, Scene]], list[tuple[str, Scene]]]:
    """(category, scene) pairs of held-out scenes: ``num_prompts`` of them, as many per category (rounded
    down), each category's scenes in split order; then as many again per category from the scenes holding
    a held-out combination that the first list left out (so that subset is not a handful)."""
    scenes = load_split("test")[0]
    per = num_prompts // len(CATEGORIES)
    main = [(c, s) for c in CATEGORIES for s in [s for s in scenes if c in categories(s)][:per]]
    extra = [(c, s) for c in CATEGORIES
             for s in [s for s in scenes if s.held_out and c in categories(s) and (c, s) not in main][:per]]
    return main, extra


def summarise_t2i(pairs: list[tuple[str, Scene]], passed: list[bool], n_main: int) -> dict[str, Any]:
    """Per-category scores and GenEval's overall (their mean) over the first ``n_main`` pairs, and both
    over every pair from a scene holding a held-out combination."""
    def block(chosen) -> dict[str, Any]:
        by = {c: _mean(ok for (cc, _), ok in chosen if cc == c) for c in CATEGORIES}
        scored = [v for v in by.values() if v is not None]
        return {"overall": float(np.mean(scored)) if scored else None, "by_category": by, "n": len(chosen)}

    both = list(zip(pairs, passed))
    out = block(both[:n_main])
    out["held_out_combinations"] = block([(p, ok) for p, ok in both if p[1].held_out])
    return out


def generate(pipe: MMARPipeline, prompts: list, seed: int, **gen_kw) -> list:
    """One image per prompt (text, or a list of messages), each from its own seeded generator."""
    out_images = []
    for k, chunk in enumerate(_batches(prompts)):
        gens = [torch.Generator().manual_seed(seed * 100_003 + k * BATCH + i) for i in range(len(chunk))]
        out = pipe(chunk, generator=gens, mode=Image.modality, max_items=1, **gen_kw)
        out_images += [imgs[0] for imgs in out.images]
    return out_images


def heldout_t2i_prompt(scene: Scene, category: str, i: int = 0) -> str:
    """``category``'s prompt for ``scene`` (as :func:`t2i_prompt` variant 0 names it) in a wording that no
    training sample uses (:data:`HELDOUT_T2I_PROMPTS`)."""
    return HELDOUT_T2I_PROMPTS[i % len(HELDOUT_T2I_PROMPTS)].format(p=t2i_text(scene, category))


def text_to_image(pipe: MMARPipeline, num_prompts: int, num_heldout_prompts: int | None, seed: int,
                  **settings) -> tuple[list[tuple[str, Scene]], list, dict[str, Any]]:
    """Images for :func:`prompt_set` (training wording, variant 0) and for its first ``num_heldout_prompts``
    main pairs (default: all) in held-out wordings, other seeds; each checked. Returns the main pairs, the
    training-wording images (main, then extra) and the metrics, the held-out wordings' apart."""
    main, extra = prompt_set(num_prompts)
    pairs, heldout = main + extra, main[:num_heldout_prompts]
    generated = generate(pipe, [t2i_prompt(s, c) for c, s in pairs], seed, **settings)
    t2i = summarise_t2i(pairs, [check(c, s, im) for (c, s), im in zip(pairs, generated)], len(main))
    held_images = generate(pipe, [heldout_t2i_prompt(s, c, i) for i, (c, s) in enumerate(heldout)],
                           seed + HELDOUT_SEED_OFFSET, **settings) if heldout else []
    held = summarise_t2i(heldout, [check(c, s, im) for (c, s), im in zip(heldout, held_images)], len(heldout))
    return main, generated, {
        "text_to_image_overall": t2i["overall"], "text_to_image": t2i,
        "text_to_image_overall_held_out_combinations": t2i["held_out_combinations"]["overall"],
        "text_to_image_overall_heldout_prompts": held["overall"], "text_to_image_heldout_prompts": held,
        "heldout_prompts": list(HELDOUT_T2I_PROMPTS), "n_generated": len(main),
        "n_generated_held_out_extra": len(extra), "n_generated_heldout_prompts": len(held_images)}


def edit_prompt(edit: Edit) -> list[Message]:
    """The editing request as a pipeline prompt: the source image and the instruction."""
    return [Message("user", [Image(draw(edit.source)), edit.instruction])]


def summarise_edits(edits: list[Edit], verdicts: list[dict[str, bool]]) -> dict[str, Any]:
    """Success (and its two parts) per edit type and over all edits; success on the held-out subset."""
    out: dict[str, Any] = {key: _mean(v[key] for v in verdicts) for key in ("success", "made", "kept")}
    out["by_type"] = {t: _mean(v["success"] for e, v in zip(edits, verdicts) if e.type == t) for t in EDIT_TYPES}
    out["n_by_type"] = {t: sum(e.type == t for e in edits) for t in EDIT_TYPES}
    held = [v["success"] for e, v in zip(edits, verdicts) if e.source.held_out or e.target.held_out]
    out["held_out_combinations"] = {"success": _mean(held), "n": len(held)}
    return out


def score_answers(asked: list[tuple[Scene, str, str, str]], answers: list[str]) -> dict[str, Any]:
    """Exact-match scores of ``answers`` to the ``(scene, type, question, answer)`` quadruples asked:
    overall (every question, captions included), without captions, per type, and the held-out subset."""
    right = [normalise(got) == normalise(a) for (_, _, _, a), got in zip(asked, answers, strict=True)]
    types = sorted({t for _, t, _, _ in asked})
    return {"overall": _mean(right), "without_captions": _mean(r for r, q in zip(right, asked) if q[1] != "caption"),
            "by_type": {t: _mean(r for r, q in zip(right, asked) if q[1] == t) for t in types},
            "n_by_type": {t: sum(q[1] == t for q in asked) for t in types},
            "held_out_combinations": _mean(r for r, q in zip(right, asked) if q[0].held_out), "n": len(right)}


def answer_questions(pipe: MMARPipeline, num_qa_scenes: int | None) -> tuple[list, list[str]]:
    """Every question of the first held-out scenes, greedy: the quadruples asked and the answers."""
    scenes, images = load_split("test")
    asked = [(s, t, q, a, i) for i, s in enumerate(scenes[:num_qa_scenes]) for t, q, a in questions(s)]
    answers = []
    for chunk in _batches(asked):
        prompts = [[Message("user", [Image(images[i]), q])] for _, _, q, _, i in chunk]
        answers += pipe(prompts, mode="text", temperature=0.0, max_new_tokens=MAX_ANSWER_TOKENS).text
    return [x[:4] for x in asked], answers


@lru_cache(maxsize=2)
def fit_feature_extractor(seed: int = 0):
    """The feature space of the Fréchet distance: the first ``FD_FEATURES`` principal components of
    ``FD_TRAIN_IMAGES`` training scenes' pixels (an offline stand-in for Inception features; a PCA fits
    in a second where the digits evaluator's MLP would take minutes on these 3,072 pixel values)."""
    from sklearn.decomposition import PCA

    x = load_split("train")[1][:FD_TRAIN_IMAGES].reshape(FD_TRAIN_IMAGES, -1) / 255.0
    return PCA(n_components=FD_FEATURES, random_state=seed).fit(x)


def features(pca, images) -> np.ndarray:
    """The FD features of RGB images (PIL or arrays): their pixels projected on the principal components."""
    return pca.transform(np.stack([_as_array(im).reshape(-1) for im in images]) / 255.0)


def fd_metrics(generated: list, prompted: list[str], seed: int) -> dict[str, Any]:
    """The Fréchet distance of ``generated`` (images for prompts of the categories ``prompted``) to real
    held-out images of the same category mix (``FD_REF_PER_CATEGORY`` scenes of each category), and its
    noise band: the distances of ``FD_BAND_DRAWS`` draws of real training images (beyond those the PCA
    saw), one of the same category per generated image, to the same held-out ones."""
    pca = fit_feature_extractor(seed)
    test_scenes, test_images = load_split("test")
    ref = [im for c in CATEGORIES for im in [im for s, im in zip(test_scenes, test_images)
                                             if c in categories(s)][:FD_REF_PER_CATEGORY]]
    real = features(pca, ref)
    train_scenes, train_images = load_split("train")
    pool = {c: [i for i in range(FD_TRAIN_IMAGES, len(train_scenes)) if c in categories(train_scenes[i])]
            for c in CATEGORIES}
    rng = random.Random(seed)
    band = [frechet_distance(features(pca, train_images[[rng.choice(pool[c]) for c in prompted]]), real)
            for _ in range(FD_BAND_DRAWS)]
    return {"frechet_distance": frechet_distance(features(pca, generated), real),
            "frechet_distance_real_train": float(np.mean(band)),
            "frechet_distance_noise_band": [float(min(band)), float(max(band))]}


def evaluate_scenes(model_dir: str, output: str | None = None, grid: str | None = None,
                    guidance_scale: float | None = None, image_guidance_scale: float | None = None,
                    num_inference_steps: int | None = None, seed: int = 0, image_temperature: float | None = None,
                    num_prompts: int = 120, num_qa_scenes: int | None = 100, num_edits: int = 60,
                    num_heldout_prompts: int | None = None, pipeline: MMARPipeline | None = None,
                    **_) -> dict[str, Any]:
    """Metrics as a dict (also written to ``output`` as JSON); ``grid`` gets the generated images
    (text-to-image, then edits). ``num_prompts``: text-to-image prompts, spread evenly over the six
    categories (and as many again from held-out-combination scenes, :func:`prompt_set`);
    ``num_heldout_prompts``: the first of those (default: all but the extra ones) again in wordings no
    training sample uses, reported apart (``text_to_image_overall_heldout_prompts``); ``num_qa_scenes``:
    held-out scenes whose questions are asked (None: all 500);
    ``num_edits``: the first held-out edits; ``image_guidance_scale`` goes to the pipeline for edits
    only when given (dual guidance)."""
    t0 = time.time()
    pipe = pipeline or MMARPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if guidance_scale is None:  # the model's own setting (generation_config.json)
        guidance_scale = pipe.generation_config.guidance_scale
    settings = {"guidance_scale": guidance_scale, "num_inference_steps": num_inference_steps,
                "image_temperature": image_temperature}
    asked, answers = answer_questions(pipe, num_qa_scenes)
    qa = score_answers(asked, answers)
    main, generated, t2i = text_to_image(pipe, num_prompts, num_heldout_prompts, seed, **settings)
    edits = [e for e in load_edits("test") if e is not None][:num_edits]
    edit_kw = {} if image_guidance_scale is None else {"image_guidance_scale": image_guidance_scale}
    edited = generate(pipe, [edit_prompt(e) for e in edits], seed + 1, **settings, **edit_kw) if edits else []
    ed = summarise_edits(edits, [edit_verdict(e, im) for e, im in zip(edits, edited)])
    head = pipe.model.config.modalities[Image.modality].head
    metrics = {
        "task": "scenes", "model": str(model_dir), **t2i,
        "image_to_text_accuracy": qa["overall"], "image_to_text_accuracy_without_captions": qa["without_captions"],
        "image_to_text_by_question": qa["by_type"], "n_questions_by_type": qa["n_by_type"],
        "image_to_text_accuracy_held_out_combinations": qa["held_out_combinations"],
        "editing_success": ed["success"], "editing": ed,
        "analyser_on_real_heldout": analyser_accuracy("test"),
        **(fd_metrics(generated[: len(main)], [c for c, _ in main], seed) if len(main) > 1 else {}),
        "n_questions": qa["n"], "n_edits": len(edits),
        "guidance_scale": guidance_scale, "image_guidance_scale": image_guidance_scale, "head": head["name"],
        "num_inference_steps": num_inference_steps or head.get("num_inference_steps"),
        "image_temperature": image_temperature or pipe.generation_config.image_temperature,
        "seed": seed, "eval_seconds": round(time.time() - t0, 1),
    }
    _save(metrics, output, grid, generated + edited)
    return metrics
