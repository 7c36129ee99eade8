"""The procedural shapes dataset, its image analyser (GenEval-like) and evaluator."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch

from mmar.datasets.shapes import (COLOURS, IMAGE_SIZE, SHAPES, Scene, Shape, ShapesDataset, all_texts, caption,
                                  load_split, questions, t2i_prompt)
from mmar.eval.shapes import QUESTION_KINDS, analyser_accuracy, check, detect
from mmar.sequence import Image
from tests.conftest import make_tiny

SHAPES_MODALITIES = {"image": {"tokenizer": {"name": "image-patch", "image_size": 16, "patch_size": 4, "channels": 3},
                               "head": {"width": 32, "depth": 2, "num_inference_steps": 5}}}


def test_splits_are_fixed_and_disjoint():
    scenes, images = load_split("train")
    test_scenes, test_images = load_split("test")
    assert images.shape == (4000, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert len(test_scenes) == 400
    load_split.cache_clear()
    again_scenes, again_images = load_split("train")
    assert again_scenes == scenes and np.array_equal(again_images, images)  # rebuilt identically
    assert not {x.tobytes() for x in images} & {x.tobytes() for x in test_images}
    assert len({x.tobytes() for x in test_images}) == 400  # held-out images are all different
    for split, least in ((scenes, 400), (test_scenes, 40)):  # every kind of scene is well represented
        kinds = Counter("count" if s.is_count else "single" if len(s.shapes) == 1 else "pair" for s in split)
        assert set(kinds) == {"single", "pair", "count"} and min(kinds.values()) > least, kinds
    assert {caption(s) for s in test_scenes} <= {caption(s) for s in scenes}  # unseen images, known captions
    with pytest.raises(ValueError, match="split must be one of"):
        load_split("valid")


def test_dataset_samples_are_deterministic():
    a, b, c = ShapesDataset("train", seed=0), ShapesDataset("train", seed=0), ShapesDataset("train", seed=1)
    assert len(a) == 8000 and a.index == b.index and a.index != c.index
    texts = set(all_texts())
    for i in range(8):
        sample = a[i]
        user, answer = sample
        assert [m.role for m in sample] == ["user", "assistant"]
        if isinstance(answer.content[0], Image):
            assert user.content[0].text in texts
        else:
            assert isinstance(user.content[0], Image) and user.content[1].text in QUESTION_KINDS
            assert answer.content[0].text in texts or answer.content[0].text.startswith(("a ", "two "))


def test_captions_and_questions():
    red, blue = Shape("circle", "red", 0, 5, 6), Shape("square", "blue", 10, 5, 6)
    assert caption(Scene((red,), "left")) == "a red circle on the left"
    assert caption(Scene((red, blue), "horizontal")) == "a red circle on the left and a blue square on the right"
    assert caption(Scene((red, blue), "vertical")) == "a red circle above a blue square"
    assert caption(Scene((blue, blue), "vertical")) == "two blue squares"
    assert dict(questions(Scene((red, blue), "horizontal")))["what shape is on the right?"] == "square"
    assert dict(questions(Scene((red,), "top")))["where is the shape?"] == "top"
    assert t2i_prompt(Scene((red,), "left"), 0) == "draw a red circle on the left"


def test_analyser_is_exact_on_real_images():
    for split in ("train", "test"):
        scores = analyser_accuracy(split)
        assert all(scores[k] == 1.0 for k in ("count", "colour", "shape", "position", "overall")), scores


def test_analyser_rejects_wrong_images_and_tolerates_noise(rng):
    scenes, images = load_split("test")
    pair = next(i for i, s in enumerate(scenes) if len(s.shapes) == 2 and not s.is_count)
    scene = scenes[pair]
    a, b = scene.shapes
    swapped = check(Scene((b, a), scene.layout), images[pair])
    assert swapped["count"] and swapped["colour"] and swapped["shape"] and not swapped["position"]
    other = next(c for c in COLOURS if c not in (a.colour, b.colour))
    recoloured = check(Scene((dataclasses.replace(a, colour=other), b), scene.layout), images[pair])
    assert not recoloured["colour"] and not recoloured["overall"]
    single = next(i for i, s in enumerate(scenes) if len(s.shapes) == 1)
    one = scenes[single]
    moved = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[one.layout]
    assert check(Scene(one.shapes, moved), images[single]) == {
        "count": True, "colour": True, "shape": True, "position": False, "overall": False}
    reshaped = dataclasses.replace(one.shapes[0], kind=next(k for k in SHAPES if k != one.shapes[0].kind))
    assert not check(Scene((reshaped,), one.layout), images[single])["shape"]
    assert not check(scene, images[single])["count"]  # one object where two were asked for
    # noisy generations: jittered pixels and a stray speck are still read right
    for i in range(50):
        noisy = np.clip(images[i].astype(int) + rng.integers(-30, 31, images[i].shape), 0, 255).astype(np.uint8)
        noisy[0, 0] = noisy[0, 1] = (240, 220, 40)  # a two-pixel speck: below MIN_AREA
        assert check(scenes[i], noisy)["overall"], (caption(scenes[i]), detect(noisy))


def test_tiny_model_trains_on_shapes():
    model, proc = make_tiny(modalities=SHAPES_MODALITIES)
    data = ShapesDataset("train")
    batch = proc([data[i] for i in range(4)])
    assert batch["values"]["image"].shape == (4 * 16, 48)
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.modality_losses["image"] > 0 and out.text_loss > 0
    out.loss.backward()
    assert model.projections["image"][0].weight.grad.abs().sum() > 0


def test_evaluator_runs_on_a_tiny_model(tmp_path):
    import json

    from mmar.eval.shapes import evaluate_shapes
    from mmar.pipeline import MMARPipeline

    model, proc = make_tiny(modalities=SHAPES_MODALITIES)
    out = tmp_path / "metrics.json"
    m = evaluate_shapes("tiny", output=str(out), pipeline=MMARPipeline(model, proc), num_prompts=6,
                        num_qa_scenes=4, guidance_scale=1.0)
    assert json.loads(out.read_text())["n_generated"] == 6
    assert m["analyser_on_real_heldout"] == 1.0
    assert 0 <= m["text_to_image_overall"] <= 1 and 0 <= m["image_to_text_accuracy"] <= 1
    assert set(m["text_to_image"]) >= {"count", "colour", "shape", "position", "overall"}
    assert (tmp_path / "metrics_grid.png").is_file()
