"""The procedural scenes dataset (scene graphs, captions, questions, edits), its analyser and evaluator."""

import random
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage

from mmar.data.scenes import (CATEGORIES, EDIT_TYPES, HELD_OUT_COMBINATIONS, IMAGE_SIZE, KINDS, Obj, ScenesDataset,
                              all_texts, caption, categories, draw, load_edits, load_split, make_edit, questions,
                              random_scene, relation, scene_of, shape_mask, split_of, t2i_prompt, t2i_text)
from mmar.eval.scenes import (HELDOUT_T2I_PROMPTS, analyser_accuracy, check, detect, edit_verdict, heldout_t2i_prompt,
                              read_objects)
from mmar.types import Image


def test_splits_are_fixed_disjoint_and_hold_out_combinations():
    scenes, images = load_split("train")
    test_scenes, test_images = load_split("test")
    assert images.shape == (6000, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8 and len(test_scenes) == 500
    load_split.cache_clear()
    again, again_images = load_split("train")
    assert again == scenes and np.array_equal(again_images, images)  # rebuilt identically
    assert not {x.tobytes() for x in images} & {x.tobytes() for x in test_images}
    assert len({x.tobytes() for x in test_images}) == 500
    seen = {(o.colour, o.kind, relation(o, p)) for s in scenes for o in s.objects for p in s.objects if p is not o}
    assert not seen & HELD_OUT_COMBINATIONS and not any(s.held_out for s in scenes)
    assert len(seen - {(c, k, None) for c, k, _ in seen}) == 6 * 4 * 4 - len(HELD_OUT_COMBINATIONS)  # all else
    trained = {t2i_prompt(s, "position", v) for s in scenes if "position" in categories(s) for v in range(4)}
    held_prompts = {t2i_prompt(s, "position", v) for s in test_scenes if s.held_out and "position" in categories(s)
                    for v in range(4)}
    assert len(held_prompts) > 30 and not held_prompts & trained  # the held-out position prompts are new
    held = [s for s in test_scenes if s.held_out]
    assert 60 < len(held) < 250  # a subset large enough to report apart
    for split in (scenes, test_scenes):  # every GenEval category and object count is represented
        cats = Counter(c for s in split for c in categories(s))
        assert set(cats) == set(CATEGORIES) and min(cats.values()) >= 0.05 * len(split)
        assert set(Counter(len(s.objects) for s in split)) == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="split must be one of"):
        load_split("valid")


def test_heldout_wordings_are_never_trained_on():
    """No held-out wording is a training template, and no held-out prompt, of any category of any scene of
    either split, is a text of a training sample: every prompt wording of every training scene and category
    (both orders), and every text of the samples ScenesDataset generates (two seeds)."""
    from mmar.data.scenes import T2I_TEMPLATES

    assert not set(HELDOUT_T2I_PROMPTS) & set(T2I_TEMPLATES) and len(set(HELDOUT_T2I_PROMPTS)) == 5
    scenes, test_scenes = load_split("train")[0], load_split("test")[0]
    trained = set(all_texts()) | {t.format(p=t2i_text(s, c, flip)) for s in scenes for c in categories(s)
                                  for flip in (False, True) for t in T2I_TEMPLATES}
    for seed in range(2):
        data = ScenesDataset("train", seed=seed, kinds=("t2i", "i2t"))
        trained |= {part.text for i in range(len(data)) for msg in data[i] for part in msg.content
                    if not isinstance(part, Image)}
    trained |= {e.instruction for e in load_edits("train") if e is not None}
    assert {t2i_prompt(s, c, v) for s in test_scenes[:100] for c in categories(s) for v in range(8)} & trained
    for s in scenes + test_scenes:
        for c in categories(s):
            for i in range(len(HELDOUT_T2I_PROMPTS)):
                p = heldout_t2i_prompt(s, c, i)
                assert p not in trained and t2i_text(s, c) in p, p


def test_scenes_have_no_overlap_and_unique_names():
    for s in load_split("test")[0]:
        assert 1 <= len(s.objects) <= 4
        assert len({(o.row, o.col) for o in s.objects}) == len(s.objects)
        assert len({o.name for o in s.objects}) == len(s.objects)
        assert list(s.objects) == sorted(s.objects, key=lambda o: (o.row, o.col))
    with pytest.raises(ValueError, match="one object per cell"):
        scene_of([Obj("circle", "red", "small", 0, 0), Obj("square", "blue", "small", 0, 0)])
    with pytest.raises(ValueError, match="one object per colour and kind"):
        scene_of([Obj("circle", "red", "small", 0, 0), Obj("circle", "red", "large", 1, 1)])
    masks = {(k, z): shape_mask(k, z) for k in KINDS for z in ("small", "large")}
    assert len({m.tobytes() for m in masks.values()}) == 8  # every kind and size is its own mask


def test_prompts_captions_and_questions():
    red, blue = Obj("circle", "red", "large", 1, 0), Obj("square", "blue", "small", 1, 3)
    pair = scene_of([blue, red])
    assert pair.objects == (red, blue) and relation(red, blue) == "left of" and relation(blue, red) == "right of"
    assert caption(pair) == "a large red circle at row 2 column 1 and a small blue square at row 2 column 4"
    assert categories(pair) == ["two_object", "position", "colour_attribution"]
    assert t2i_prompt(pair, "position") == "draw a red circle left of a blue square"
    assert t2i_prompt(pair, "position", 1) == "a blue square right of a red circle"
    assert t2i_prompt(pair, "colour_attribution", 2) == "an image of a red circle and a blue square"
    tris = scene_of([Obj("triangle", c, "large", 2, k) for k, c in enumerate(("green", "yellow", "cyan"))])
    assert categories(tris) == ["counting"] and t2i_prompt(tris, "counting") == "draw three triangles"
    assert categories(scene_of([red])) == ["single_object", "counting", "colours"]
    assert relation(Obj("circle", "red", "small", 0, 0), Obj("square", "red", "small", 1, 1)) is None  # diagonal
    qa = {q: (t, a) for t, q, a in questions(pair)}
    assert qa["how many objects are there?"] == ("count", "two")
    assert qa["how many red objects are there?"] == ("count_colour", "one")
    assert qa["how many green objects are there?"] == ("count_colour", "zero")
    assert qa["what colour is the square?"] == ("colour", "blue")
    assert qa["what shape is the red object?"] == ("shape", "circle")
    assert qa["what size is the blue square?"] == ("size", "small")
    assert qa["where is the red circle relative to the blue square?"] == ("position", "left of")
    assert qa["describe the image"] == ("caption", caption(pair))
    assert "what colour is the triangle?" not in {q for _, q, _ in questions(tris)}  # three triangles: ambiguous


def test_edits_change_what_they_say_and_nothing_else():
    rng = random.Random(0)
    scenes = load_split("train")[0][:300]
    for kind in EDIT_TYPES:
        made = [e for e in (make_edit(rng, s, kind) for s in scenes) if e is not None]
        assert len(made) > 100, kind
        for e in made:
            before, after = set(e.source.objects), set(e.target.objects)
            changed = {"recolour": (1, 1), "move": (1, 1), "resize": (1, 1), "add": (0, 1), "remove": (1, 0),
                       "swap": (2, 2)}[kind]
            assert (len(before - after), len(after - before)) == changed, (kind, e.instruction)
            gone, new = before - after, after - before
            if kind == "move":
                (a,), (b,) = gone, new
                assert abs(a.row - b.row) + abs(a.col - b.col) == 1 and (a.kind, a.colour, a.size) == (
                    b.kind, b.colour, b.size)
            if kind == "swap":
                assert {(o.row, o.col) for o in gone} == {(o.row, o.col) for o in new}
    edits = load_edits("test")
    assert len(edits) == 500 and sum(e is None for e in edits) == 0
    assert set(Counter(e.type for e in edits)) == set(EDIT_TYPES) and min(Counter(e.type for e in edits).values()) > 40
    assert all(split_of(e.target) == "train" for e in load_edits("train")[:500] if e is not None)


def test_editing_data_round_trips_its_scene_graph():
    """The edited scene graph re-rendered is the edited image the sample carries, and the analyser reads
    the edited graph back off it (and the source graph off the source)."""
    data = ScenesDataset("test", kinds=("edit",))
    assert len(data) == 500
    for idx in range(0, 500, 5):
        user, assistant = data[idx]
        (src, instruction), (edited,) = user.content, assistant.content
        e = data.edits[data.index[idx][1]]
        assert isinstance(src, Image) and isinstance(edited, Image) and instruction.text == e.instruction
        assert np.array_equal(edited.image, draw(e.target)) and np.array_equal(src.image, draw(e.source))
        assert read_objects(edited.image) == e.target.objects and read_objects(src.image) == e.source.objects
        assert edit_verdict(e, edited.image) == {"made": True, "kept": True, "success": True}
        assert edit_verdict(e, src.image)["success"] is False  # the unedited image fails


def test_dataset_samples_are_deterministic():
    a, b, c = ScenesDataset("train", seed=0), ScenesDataset("train", seed=0), ScenesDataset("train", seed=1)
    assert a.index == b.index and a.index != c.index
    kinds = Counter(k for k, _, _ in a.index)
    assert kinds["i2t"] == 6000 and kinds["edit"] > 5900 and 3500 < kinds["t2i"] < 6000
    words = {w for t in all_texts() for w in t.split()}  # the text tokenizer sees every word of the task
    for i in range(60):
        user, answer = a[i]
        kind, scene_index, v = a.index[i]
        scene = a.scenes[scene_index]
        texts = [seg.text for m in (user, answer) for seg in m.content if hasattr(seg, "text")]
        assert {w for t in texts for w in t.split()} <= words
        if kind == "t2i":
            assert isinstance(answer.content[0], Image) and user.content[0].text in {
                t2i_prompt(scene, c, k) for c in categories(scene) for k in range(8)}
        elif kind == "edit":
            assert isinstance(user.content[0], Image) and isinstance(answer.content[0], Image)
            assert user.content[1].text == a.edits[scene_index].instruction
        else:
            assert isinstance(user.content[0], Image) and (user.content[1].text, answer.content[0].text) in {
                (q, ans) for _, q, ans in questions(scene)}


def test_analyser_reads_the_exact_scene_graph_of_real_scenes():
    scores = analyser_accuracy("test")  # all 500 held-out scenes and their 500 edits
    assert scores["n_scenes"] == 500 and scores["n_edits"] == 500
    assert scores["scenes"] >= 0.99 and scores["edits"] >= 0.99 and scores["prompts"] >= 0.99, scores
    held = [(s, im) for s, im in zip(*load_split("test")) if s.held_out]
    assert np.mean([read_objects(im) == s.objects for s, im in held]) >= 0.99


def test_analyser_rejects_wrong_images_and_tolerates_noise():
    scenes, images = load_split("test")
    np_rng = np.random.default_rng(0)
    i = next(k for k, s in enumerate(scenes) if "position" in categories(s))
    a, b = scenes[i].objects
    assert check("position", scenes[i], images[i])
    swapped = scene_of([Obj(a.kind, a.colour, a.size, b.row, b.col), Obj(b.kind, b.colour, b.size, a.row, a.col)])
    assert not check("position", scenes[i], draw(swapped))  # the relation reversed
    assert check("colour_attribution", scenes[i], draw(swapped))  # but the objects are right
    j = next(k for k, s in enumerate(scenes) if len(s.objects) == 1)
    (o,) = scenes[j].objects
    other = next(k for k in KINDS if k != o.kind)
    assert not check("single_object", scenes[j], draw(scene_of([Obj(other, o.colour, o.size, o.row, o.col)])))
    assert not check("colours", scenes[j], images[i]) and not check("counting", scenes[i], images[j])
    for k in range(100):  # jittered pixels and a stray two-pixel speck are still read right
        noisy = np.clip(images[k].astype(int) + np_rng.integers(-30, 31, images[k].shape), 0, 255).astype(np.uint8)
        noisy[0, 0] = noisy[0, 1] = (240, 220, 40)
        assert read_objects(noisy) == scenes[k].objects, (caption(scenes[k]), detect(noisy))


def test_random_scenes_cover_every_layout():
    rng = random.Random(3)
    drawn = [random_scene(rng) for _ in range(400)]
    assert {len(s.objects) for s in drawn} == {1, 2, 3, 4}
    assert any(len({o.kind for o in s.objects}) == 1 and len(s.objects) > 1 for s in drawn)  # counting scenes


SCENES_MODALITIES = {"image": {"tokenizer": {"name": "image-patch", "image_size": 32, "patch_size": 4, "channels": 3},
                               "head": {"width": 32, "depth": 2, "num_inference_steps": 2}}}


class _ScriptedPipe:
    """A tiny real pipeline whose outputs are scripted from the held-out scene graphs: answers are right
    (or "wrong" for the question types in ``wrong_answers``), a text-to-image prompt gets the real image of
    its scene (the objects swapped for the categories in ``wrong_images``), an edit gets the real edited
    image (the unedited source for the edit types in ``wrong_edits``). A prompt in a held-out wording gets
    a real image of a scene its words describe when ``heldout_wordings`` is true, else a blank image."""

    def __init__(self, pipe, wrong_answers=(), wrong_images=(), wrong_edits=(), heldout_wordings=True):
        from mmar.eval.scenes import prompt_set

        self.pipe, self.calls, self.image_prompts = pipe, Counter(), []
        self.wrong_answers, self.wrong_edits, self.heldout_wordings = wrong_answers, wrong_edits, heldout_wordings
        self.heldout = {heldout_t2i_prompt(s, c, i): im for s, im in zip(*load_split("test")) for c in categories(s)
                        for i in range(len(HELDOUT_T2I_PROMPTS))}  # what it says fixes what the check asks for
        scenes, images = load_split("test")
        self.answers = {(im.tobytes(), q): (t, a) for s, im in zip(scenes, images) for t, q, a in questions(s)}
        self.drawn: dict[str, list] = {}
        for c, s in [p for ps in prompt_set(600) for p in ps]:
            shown = s
            if c in wrong_images:  # every object in the other's cell: relations reversed, nothing else changed
                a, b = s.objects
                shown = scene_of([Obj(a.kind, a.colour, a.size, b.row, b.col), Obj(b.kind, b.colour, b.size, a.row,
                                                                                    a.col)])
            self.drawn.setdefault(t2i_prompt(s, c), []).append(PILImage.fromarray(draw(shown)))
        self.edits = {(draw(e.source).tobytes(), e.instruction): e for e in load_edits("test")}

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompts, mode, **_):
        self.calls[mode] += len(prompts)
        if mode == "text":
            out = []
            for (msg,) in prompts:
                t, a = self.answers[(np.asarray(msg.content[0].image).tobytes(), msg.content[1].text)]
                out.append("wrong" if t in self.wrong_answers else a)
            return SimpleNamespace(text=out)
        images = []
        for p in prompts:
            if isinstance(p, str) and p in self.heldout:
                self.image_prompts.append(p)
                shown = self.heldout[p] if self.heldout_wordings else np.zeros_like(self.heldout[p])
                images.append([PILImage.fromarray(shown)])
                continue
            if isinstance(p, str):
                self.image_prompts.append(p)
                images.append([self.drawn[p].pop(0)])
                continue
            src, instruction = p[0].content
            e = self.edits[(np.asarray(src.image).tobytes(), instruction.text)]
            images.append([PILImage.fromarray(draw(e.source if e.type in self.wrong_edits else e.target))])
        return SimpleNamespace(images=images)


@pytest.fixture(scope="module")
def tiny_scenes_pipe():
    from mmar.pipeline import MMARPipeline
    from tests.conftest import make_tiny

    model, proc = make_tiny(modalities=SCENES_MODALITIES)
    return MMARPipeline(model, proc)


def test_evaluator_scores_an_oracle_perfectly(tmp_path, tiny_scenes_pipe):
    import json

    from mmar.eval.scenes import evaluate_scenes

    oracle = _ScriptedPipe(tiny_scenes_pipe)
    m = evaluate_scenes("tiny", output=str(tmp_path / "m.json"), pipeline=oracle, num_prompts=60, num_qa_scenes=10,
                        num_edits=30, guidance_scale=1.0)
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["n_generated"] == 60 and saved["n_edits"] == 30 and 0 < saved["n_generated_held_out_extra"] <= 60
    assert saved["n_generated_heldout_prompts"] == 60 and saved["heldout_prompts"] == list(HELDOUT_T2I_PROMPTS)
    assert oracle.calls == {"text": m["n_questions"], "image": 90 + 60 + saved["n_generated_held_out_extra"]}
    assert m["text_to_image_overall"] == 1.0 and set(m["text_to_image"]["by_category"].values()) == {1.0}
    assert saved["text_to_image_overall_heldout_prompts"] == 1.0
    held = m["text_to_image"]["held_out_combinations"]
    assert held["n"] > 20 and held["by_category"]["position"] == 1.0
    assert m["text_to_image_overall_held_out_combinations"] == 1.0
    assert m["image_to_text_accuracy"] == 1.0 and m["image_to_text_accuracy_held_out_combinations"] == 1.0
    assert set(m["image_to_text_by_question"]) == {"caption", "colour", "count", "count_colour", "position", "shape",
                                                    "size"}
    assert m["editing_success"] == 1.0 and set(m["editing"]["by_type"].values()) == {1.0}
    assert m["analyser_on_real_heldout"]["scenes"] >= 0.99
    lo, hi = m["frechet_distance_noise_band"]
    assert lo <= m["frechet_distance_real_train"] <= hi and m["frechet_distance"] >= 0
    assert (tmp_path / "m_grid.png").is_file()


def test_evaluator_scores_drop_by_the_share_a_wrong_pipeline_gets_wrong(tiny_scenes_pipe):
    from mmar.eval.scenes import evaluate_scenes

    bad = _ScriptedPipe(tiny_scenes_pipe, wrong_answers=("count",), wrong_images=("position",), wrong_edits=("move",))
    m = evaluate_scenes("tiny", pipeline=bad, num_prompts=60, num_qa_scenes=10, num_edits=30, guidance_scale=1.0)
    by = m["text_to_image"]["by_category"]
    assert by["position"] == 0.0 and all(v == 1.0 for c, v in by.items() if c != "position")
    assert m["text_to_image_overall"] == pytest.approx(5 / 6)  # the mean of the six categories
    held = m["text_to_image"]["held_out_combinations"]["by_category"]
    assert held["position"] == 0.0 and held["colour_attribution"] == 1.0
    n = m["n_questions_by_type"]
    assert m["image_to_text_by_question"]["count"] == 0.0 and n["count"] == 10
    assert m["image_to_text_accuracy"] == pytest.approx(1 - 10 / m["n_questions"])
    moves = m["editing"]["n_by_type"]["move"]
    assert moves > 0 and m["editing"]["by_type"]["move"] == 0.0
    assert m["editing_success"] == pytest.approx(1 - moves / 30) and m["editing"]["made"] == pytest.approx(1 - moves / 30)
    assert m["editing"]["kept"] == 1.0  # the unedited image keeps every other object


def test_evaluator_reports_heldout_wordings_apart(tiny_scenes_pipe):
    """An oracle of the training wordings only: 1.0 on them, 0.0 on the held-out wordings, asked for
    exactly the first main (category, scene) pairs in turn."""
    from mmar.eval.scenes import evaluate_scenes, prompt_set

    trained_only = _ScriptedPipe(tiny_scenes_pipe, heldout_wordings=False)
    m = evaluate_scenes("tiny", pipeline=trained_only, num_prompts=60, num_heldout_prompts=25, num_qa_scenes=1,
                        num_edits=0, guidance_scale=1.0)
    assert m["n_generated"] == 60 and m["n_generated_heldout_prompts"] == m["text_to_image_heldout_prompts"]["n"] == 25
    assert m["text_to_image_overall"] == 1.0 and m["text_to_image_overall_heldout_prompts"] == 0.0
    assert {c: v for c, v in m["text_to_image_heldout_prompts"]["by_category"].items() if v is not None} == {
        "single_object": 0.0, "two_object": 0.0, "counting": 0.0}  # the first 25 pairs: 10 per category
    main, _ = prompt_set(60)
    asked = [p for p in trained_only.image_prompts if p in trained_only.heldout]
    assert asked == [heldout_t2i_prompt(s, c, i) for i, (c, s) in enumerate(main[:25])]


def test_tiny_model_trains_on_scenes_through_the_cli_and_evaluates(tmp_path, monkeypatch):
    """A tiny backbone on the scenes data (64 image tokens of 48 values) for a few steps through
    `mmar train` (without the final preview grid, see :func:`_two_steps`), then `mmar eval --task scenes`
    on a few prompts, questions and edits."""
    import json

    import yaml

    from mmar.cli import main
    from mmar.config import MMARConfig
    from tests.conftest import TINY_BACKBONE

    run = tmp_path / "run"
    cfg = {"output_dir": str(run), "dataset": "scenes", "backbone": {**TINY_BACKBONE, "max_position_embeddings": 512},
           "modalities": SCENES_MODALITIES, "text_vocab_size": 400, "max_steps": 4, "batch_size": 4,
           "learning_rate": 3e-3, "warmup_steps": 1, "logging_steps": 1, "save_steps": 4, "sample_steps": 0,
           "progress": False}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(ScenesDataset, "preview_prompts", None)
    assert main(["train", "--config", str(tmp_path / "tiny.yaml")]) == 0
    spec = MMARConfig.from_pretrained(run).modalities["image"]
    assert spec.num_tokens == 64 and spec.token_dim == 48
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and all(np.isfinite(r["loss"]) for r in rows)
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(run), "--task", "scenes", "--num_prompts", "6", "--num_qa_scenes", "1",
                 "--num_edits", "2", "--output", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["task"] == "scenes" and m["n_generated"] == 6 and m["n_edits"] == 2
    assert m["n_generated_held_out_extra"] == 4  # one each of the four categories held-out scenes have
    assert m["n_generated_heldout_prompts"] == 6 and "text_to_image_overall_heldout_prompts" in m
    assert m["n_questions"] == len(questions(load_split("test")[0][0]))
    assert set(m["text_to_image"]["by_category"]) == set(CATEGORIES) and 0 <= m["text_to_image_overall"] <= 1
    assert set(m["editing"]["by_type"]) == set(EDIT_TYPES) and (tmp_path / "metrics_grid.png").is_file()


def _two_steps(config: dict, tmp_path, monkeypatch) -> "MMARConfig":  # noqa: F821
    """Train ``config`` for two steps of batch 4 through `mmar train`, without the final preview grid (32
    images of 64 tokens at 50 diffusion steps: minutes on a busy CPU; test_training covers the preview)."""
    import yaml

    from mmar.cli import main
    from mmar.config import MMARConfig

    monkeypatch.setattr(ScenesDataset, "preview_prompts", None)
    run = tmp_path / "run"
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "model.yaml"), "--max_steps", "2", "--batch_size", "4",
                 "--output_dir", str(run), "--save_steps", "2", "--progress", "false"]) == 0
    return MMARConfig.from_pretrained(run)


def test_recipe_loads_and_runs_two_steps(tmp_path, monkeypatch):
    import yaml

    config = _two_steps(yaml.safe_load(open("configs/scenes.yaml")), tmp_path, monkeypatch)
    spec = config.modalities["image"]
    assert spec.num_tokens == 64 and spec.token_dim == 48 and config.pos_embed


@pytest.mark.parametrize("tokenizer_config, model_config, token_dim", [
    ("configs/vae-scenes.yaml", "configs/scenes-vae.yaml", 16), ("configs/vq-scenes.yaml", "configs/scenes-vq.yaml", None)])
def test_tokenizer_recipes_train_and_load(tokenizer_config, model_config, token_dim, tmp_path, monkeypatch):
    """A tokenizer recipe (two steps, fitted and scored on the first 64 scenes of each split: the whole split
    through a VAE takes minutes on a busy CPU) and the model recipe pointed at the result (two model steps):
    64 latent tokens of 16 values per image (VAE), or 64 codes of 256 (VQ)."""
    import yaml

    from mmar.cli import main
    from mmar.training import tokenizer_trainer

    items = tokenizer_trainer.raw_items
    monkeypatch.setattr(tokenizer_trainer, "raw_items", lambda name, split: items(name, split)[:64])
    tok = yaml.safe_load(open(tokenizer_config))
    tok.update(steps=2, batch_size=8, output_dir=str(tmp_path / "tok"))
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(tok))
    assert main(["train-tokenizer", "--config", str(tmp_path / "tok.yaml")]) == 0
    cfg = yaml.safe_load(open(model_config))
    cfg["modalities"]["image"]["tokenizer"] = {"path": str(tmp_path / "tok")}
    spec = _two_steps(cfg, tmp_path, monkeypatch).modalities["image"]
    assert spec.num_tokens == 64
    assert spec.token_dim == token_dim if token_dim else spec.vocab_size == 256
