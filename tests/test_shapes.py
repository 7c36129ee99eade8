"""The procedural shapes dataset, its image analyser (GenEval-like) and evaluator."""

import dataclasses
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from mmar.datasets.shapes import (COLOURS, IMAGE_SIZE, SHAPES, T2I_PROMPTS, Scene, Shape, ShapesDataset, all_texts,
                                  caption, load_split, questions, t2i_prompt)
from mmar.eval.shapes import (HELDOUT_T2I_PROMPTS, QUESTION_KINDS, analyser_accuracy, check, detect, heldout_t2i_prompt,
                              score_answers)
from mmar.sequence import Image
from tests.conftest import assert_learns, make_tiny, modality_losses

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


def _every_caption_scene() -> list[Scene]:
    """A scene for every caption the task has (every layout, colours and kinds; positions do not matter)."""
    shapes = [Shape(k, c, 0, 0, 0) for c in COLOURS for k in SHAPES]
    return [Scene((a,), p) for a in shapes for p in ("left", "right", "top", "bottom")] + [
        Scene((a, b), lay) for a in shapes for b in shapes for lay in ("horizontal", "vertical")]


def _training_texts() -> set[str]:
    """Every text of every training sample the dataset generates (prompts, questions and answers), for
    a few seeds (the seed picks the wordings), and every string of the tokenizer's text list."""
    texts = set(all_texts())
    for seed in range(3):
        data = ShapesDataset("train", seed=seed)
        texts |= {part.text for i in range(len(data)) for msg in data[i] for part in msg.content
                  if not isinstance(part, Image)}
    return texts


def test_heldout_wordings_are_never_trained_on():
    """No held-out wording is a training template, no held-out prompt of any caption is a text of any
    training sample, and every held-out prompt still holds its caption (so the analyser's check applies)."""
    assert not set(HELDOUT_T2I_PROMPTS) & set(T2I_PROMPTS) and len(set(HELDOUT_T2I_PROMPTS)) == 5
    trained = _training_texts()
    assert {t2i_prompt(s, i) for s in load_split("train")[0][:50] for i in range(4)} <= trained  # it sees them
    for scene in _every_caption_scene():
        for i in range(len(HELDOUT_T2I_PROMPTS)):
            p = heldout_t2i_prompt(scene, i)
            assert p not in trained and caption(scene) in p, p
    assert heldout_t2i_prompt(Scene((Shape("circle", "red", 0, 0, 0),), "left"), 1) == \
        "can you make a picture of a red circle on the left?"


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


def test_tiny_model_trains_on_shapes(monkeypatch):
    model, proc = make_tiny(modalities=SHAPES_MODALITIES)
    data = ShapesDataset("train")
    batch = proc([data[i] for i in range(4)])
    assert batch["values"]["image"].shape == (4 * 16, 48)
    model.train()
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.modality_losses["image"] > 0 and out.text_loss > 0
    out.loss.backward()
    assert model.projections["image"][0].weight.grad.abs().sum() > 0
    # it learns: 100 AdamW steps on these 4 samples. Losses read with the same noise and timesteps (seed 123)
    # before and after; a fresh backbone's text loss is ln(vocabulary) (near-uniform logits), the image
    # loss ends below that of a head whose output is zero. Measured (make_tiny seeds 0-2): text 5.71-5.73
    # -> 0.06-0.07, image 7.6-8.9 -> 0.61-0.63 against 0.955 for the zero output.
    text0, _ = modality_losses(model, batch, "image")
    assert abs(text0 - np.log(model.lm_head.out_features)) < 0.2, text0
    # with the condition zeroed the same head does far worse (measured, seeds 0-2: 1.21-1.43 against 0.61-0.63)
    assert_learns(model, batch, "image", monkeypatch, zero_ratio=0.85)


class _ScriptedPipe:
    """A tiny real pipeline whose answers are scripted: text questions are answered from the held-out
    scenes (right, or a wrong answer for the question types in ``wrong``), and image prompts get the
    real held-out image of their scene (an oracle generator); prompts in a held-out wording get it too
    when ``heldout_wordings`` is true, else a blank image (an oracle of the training wordings only)."""

    def __init__(self, pipe, wrong: tuple[str, ...] = (), heldout_wordings: bool = True):
        from mmar.datasets.shapes import questions

        self.pipe, self.wrong, self.heldout_wordings = pipe, wrong, heldout_wordings
        scenes, images = load_split("test")
        self.answers = {(im.tobytes(), q): a for s, im in zip(scenes, images) for q, a in questions(s)}
        self.drawn: dict[str, list] = {}
        self.heldout: dict[str, list] = {}
        for j, (s, im) in enumerate(zip(scenes, images)):
            self.drawn.setdefault(t2i_prompt(s), []).append(PILImage.fromarray(im))  # as a pipeline returns
            self.heldout.setdefault(heldout_t2i_prompt(s, j), []).append(PILImage.fromarray(im))
        self.calls, self.image_prompts = Counter(), []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, mode, **_):
        from types import SimpleNamespace

        self.calls[mode] += len(prompts)
        if mode == "text":
            out = []
            for (msg,) in prompts:
                image, question = msg.content[0].image, msg.content[1].text
                right = self.answers[(np.asarray(image).tobytes(), question)]
                out.append("wrong" if QUESTION_KINDS[question] in self.wrong else right)
            return SimpleNamespace(text=out)
        assert mode == "image"
        self.image_prompts += prompts
        return SimpleNamespace(images=[[self._draw(p)] for p in prompts])

    def _draw(self, prompt: str):
        if prompt in self.drawn:
            return self.drawn[prompt].pop(0)
        image = self.heldout[prompt].pop(0)  # a KeyError: a prompt in neither wording
        return image if self.heldout_wordings else PILImage.new("RGB", image.size)


def test_score_answers_counts_every_question_it_reports():
    scenes, _ = load_split("test")
    asked = [(i, q, a) for i, s in enumerate(scenes[:20]) for q, a in questions(s)]
    right = score_answers(asked, [a.upper() + "." for _, _, a in asked])  # case and full stop are forgiven
    assert right["overall"] == 1.0 and right["without_captions"] == 1.0 and right["n"] == len(asked)
    assert set(right["by_type"]) == {"caption", "count", "colour", "shape", "place"}
    assert sum(right["n_by_type"].values()) == len(asked) and right["n_by_type"]["caption"] == 20
    # captions wrong: the overall drops by exactly their share, the caption-free figure does not move
    wrong = score_answers(asked, ["nonsense" if QUESTION_KINDS[q] == "caption" else a for _, q, a in asked])
    assert wrong["by_type"]["caption"] == 0.0 and wrong["without_captions"] == 1.0
    assert wrong["overall"] == pytest.approx(1 - 20 / len(asked))
    constant = score_answers(asked, ["red"] * len(asked))  # one colour of five named every time
    assert constant["by_type"]["caption"] == constant["by_type"]["shape"] == 0.0
    assert constant["by_type"]["colour"] == pytest.approx(
        np.mean([a == "red" for _, q, a in asked if QUESTION_KINDS[q] == "colour"]))
    with pytest.raises(ValueError):
        score_answers(asked, [])  # a missing answer is an error, not a shorter mean


@pytest.fixture(scope="module")
def tiny_shapes_pipe():
    from mmar.pipeline import MMARPipeline

    model, proc = make_tiny(modalities=SHAPES_MODALITIES)
    return MMARPipeline(model, proc)


def test_evaluator_scores_an_oracle_perfectly_and_counts_wrong_captions(tmp_path, tiny_shapes_pipe):
    import json

    from mmar.eval.shapes import evaluate_shapes

    out = tmp_path / "metrics.json"
    oracle = _ScriptedPipe(tiny_shapes_pipe)
    m = evaluate_shapes("tiny", output=str(out), pipeline=oracle, num_prompts=6, num_qa_scenes=4, guidance_scale=1.0)
    saved = json.loads(out.read_text())
    assert saved["n_generated"] == saved["n_generated_heldout_prompts"] == 6
    assert oracle.calls == {"text": saved["n_questions"], "image": 6 + 6}
    assert m["analyser_on_real_heldout"] == 1.0 and m["text_to_image_overall"] == 1.0
    assert saved["text_to_image_overall_heldout_prompts"] == 1.0
    assert saved["heldout_prompts"] == list(HELDOUT_T2I_PROMPTS)
    assert all(m["text_to_image"][k] == 1.0 for k in ("count", "colour", "shape", "overall"))
    assert m["image_to_text_accuracy"] == 1.0 and m["caption_exact_match"] == 1.0
    assert sum(m["n_questions_by_type"].values()) == m["n_questions"] and m["n_questions_by_type"]["caption"] == 4
    assert (tmp_path / "metrics_grid.png").is_file()
    bad = evaluate_shapes("tiny", pipeline=_ScriptedPipe(tiny_shapes_pipe, wrong=("caption",)), num_prompts=2,
                          num_qa_scenes=4, guidance_scale=1.0)
    assert bad["caption_exact_match"] == 0.0 and bad["image_to_text_accuracy_without_captions"] == 1.0
    assert bad["image_to_text_accuracy"] == pytest.approx(1 - 4 / bad["n_questions"])


def test_evaluator_reports_heldout_wordings_apart(tiny_shapes_pipe):
    """An oracle of the training wordings only: 1.0 on them, 0.0 on the held-out wordings, which were
    asked for exactly the first held-out scenes, one prompt each."""
    from mmar.eval.shapes import evaluate_shapes

    trained_only = _ScriptedPipe(tiny_shapes_pipe, heldout_wordings=False)
    m = evaluate_shapes("tiny", pipeline=trained_only, num_prompts=8, num_heldout_prompts=5, num_qa_scenes=1,
                        guidance_scale=1.0)
    assert m["n_generated"] == 8 and m["n_generated_heldout_prompts"] == 5
    assert m["text_to_image_overall"] == 1.0 and m["text_to_image"]["count"] == 1.0
    assert m["text_to_image_overall_heldout_prompts"] == 0.0 and m["text_to_image_heldout_prompts"]["count"] == 0.0
    scenes = load_split("test")[0]
    asked = [p for p in trained_only.image_prompts if p not in {t2i_prompt(s) for s in scenes}]
    assert asked == [heldout_t2i_prompt(s, j) for j, s in enumerate(scenes[:5])]
    assert {p.replace(caption(s), "{c}") for p, s in zip(asked, scenes)} == set(HELDOUT_T2I_PROMPTS)  # each once
    none = evaluate_shapes("tiny", pipeline=_ScriptedPipe(tiny_shapes_pipe), num_prompts=2, num_heldout_prompts=0,
                           num_qa_scenes=1, guidance_scale=1.0)
    assert none["n_generated_heldout_prompts"] == 0 and none["text_to_image_overall_heldout_prompts"] is None


def test_evaluator_runs_on_a_tiny_model(tmp_path, tiny_shapes_pipe):
    from mmar.eval.shapes import evaluate_shapes

    m = evaluate_shapes("tiny", pipeline=tiny_shapes_pipe, num_prompts=2, num_qa_scenes=2, guidance_scale=1.0)
    assert m["n_generated"] == m["n_generated_heldout_prompts"] == 2
    assert m["n_questions"] == sum(len(questions(s)) for s in load_split("test")[0][:2])
    assert set(m["text_to_image_heldout_prompts"]) >= {"count", "colour", "shape", "position", "overall"}
    assert set(m["text_to_image"]) >= {"count", "colour", "shape", "position", "overall"}
    assert set(m["image_to_text_by_question"]) <= set(m["n_questions_by_type"])
