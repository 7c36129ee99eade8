import json
import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image as PILImage

from mmar.cli import main
from mmar.datasets.digits import DIGIT_WORDS, T2I_PROMPTS, all_texts, load_digit_split
from mmar.eval.digits import HELDOUT_T2I_PROMPTS, evaluate_digits, fit_classifier, heldout_t2i_prompt, parse_digit

_DIGIT = re.compile(r"\d|" + "|".join(DIGIT_WORDS))


def test_parse_digit():
    assert parse_digit("7") == 7 and parse_digit("it is seven") == 7 and parse_digit("no") is None
    assert parse_digit(" 3 and 4") == 3


def test_independent_classifier_is_accurate():
    """The judge reads the held-out digits (its reported accuracy is the real one, recomputed here) and,
    scored against shuffled labels, falls to chance (1 in 10): it reads the image, not the label order."""
    clf, acc = fit_classifier()
    assert acc > 0.97
    xte, yte = load_digit_split("test")
    read = clf.predict(xte.reshape(len(xte), -1) / 255.0)
    assert acc == pytest.approx(np.mean(read == yte))
    shuffled = [np.mean(read == np.random.default_rng(s).permutation(yte)) for s in range(5)]
    assert abs(np.mean(shuffled) - 0.1) < 0.03, shuffled  # 360 held-out digits, near-uniform over the 10
    assert np.mean(read == (yte + 1) % 10) < 0.03  # every label wrong: almost nothing matches


def test_heldout_wordings_are_never_trained_on():
    """No held-out wording is a training template, none of its prompts is a training string, and every
    prompt still names its digit (so the evaluator can score it)."""
    trained = set(all_texts())
    assert not set(HELDOUT_T2I_PROMPTS) & set(T2I_PROMPTS)
    for d in range(10):
        for i in range(len(HELDOUT_T2I_PROMPTS)):
            p = heldout_t2i_prompt(d, i)
            assert p not in trained and parse_digit(p) == d, p


class _ScriptedPipe:
    """A tiny real pipeline whose outputs are scripted: image questions are answered with the image's
    label (or label + 1 for the digits in ``wrong``), and image prompts get a training image of the prompted
    digit that the judge classifies right (or of digit + 1 for the digits in ``wrong``)."""

    def __init__(self, pipe, wrong=()):
        self.pipe, self.wrong = pipe, set(wrong)
        clf, _ = fit_classifier()
        xte, yte = load_digit_split("test")
        self.label = {x.tobytes(): int(y) for x, y in zip(xte, yte)}
        xtr, ytr = load_digit_split("train")
        read = clf.predict(xtr.reshape(len(xtr), -1) / 255.0)
        self.drawing = {d: PILImage.fromarray(xtr[np.flatnonzero((ytr == d) & (read == d))[0]]) for d in range(10)}
        self.calls, self.prompts = Counter(), []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def _draw(self, d):
        return self.drawing[(d + 1) % 10 if d in self.wrong else d]

    def __call__(self, prompts, mode, **_):
        self.calls[mode] += len(prompts)
        if mode == "text":
            labels = [self.label[np.asarray(msg.content[0].image).tobytes()] for (msg,) in prompts]
            return SimpleNamespace(text=[str((y + 1) % 10 if y in self.wrong else y) for y in labels])
        self.prompts += prompts
        wanted = [[int(m) if m.isdigit() else DIGIT_WORDS.index(m) for m in _DIGIT.findall(p)] for p in prompts]
        if mode == "auto":
            return SimpleNamespace(images=[[self.drawing[d] for d in (ds[:1] if self.wrong & set(ds) else ds)]
                                           for ds in wanted])
        return SimpleNamespace(images=[[self._draw(d) for d in ds] for ds in wanted])


@pytest.fixture(scope="module")
def tiny_pipe(tiny):
    from mmar.pipeline import MMARPipeline

    return MMARPipeline(*tiny)


def test_evaluator_scores_an_oracle_perfectly_and_a_wrong_digit_by_its_share(tiny_pipe, tmp_path):
    out = tmp_path / "metrics.json"
    oracle = _ScriptedPipe(tiny_pipe)
    m = evaluate_digits("tiny", output=str(out), pipeline=oracle, per_digit=2, heldout_per_digit=1, pairs=10)
    assert json.loads(out.read_text())["text_to_image_accuracy"] == m["text_to_image_accuracy"]
    assert oracle.calls == {"text": 360, "image": 20 + 10, "auto": 10}
    heldout = {heldout_t2i_prompt(d, i) for d in range(10) for i in range(len(HELDOUT_T2I_PROMPTS))}
    assert sum(p in heldout for p in oracle.prompts) == 10  # the held-out wordings really were asked
    for key in ("image_to_text_accuracy", "text_to_image_accuracy", "text_to_image_accuracy_heldout_prompts",
                "interleaved_accuracy", "interleaved_two_images_rate"):
        assert m[key] == 1.0, key
    assert m["n_generated"] == 20 and m["n_generated_heldout_prompts"] == 10 and m["n_heldout"] == 360
    assert m["frechet_distance"] > 0 and (tmp_path / "metrics_grid.png").exists()
    # digit 3 always wrong: every figure drops by exactly digit 3's share
    bad = evaluate_digits("tiny", pipeline=_ScriptedPipe(tiny_pipe, wrong=[3]), per_digit=2, pairs=10)
    _, yte = load_digit_split("test")
    assert bad["image_to_text_accuracy"] == pytest.approx(1 - np.mean(yte == 3))
    assert bad["text_to_image_accuracy"] == bad["text_to_image_accuracy_heldout_prompts"] == pytest.approx(0.9)
    assert bad["text_to_image_per_digit"]["3"] == 0.0 and bad["text_to_image_per_digit"]["4"] == 1.0
    rng = np.random.default_rng(0)  # the evaluator's pairs (seed 0)
    pairs = [tuple(int(x) for x in rng.integers(0, 10, 2)) for _ in range(10)]
    assert any(3 in p for p in pairs) and not all(3 in p for p in pairs)
    assert bad["interleaved_accuracy"] == bad["interleaved_two_images_rate"] == pytest.approx(
        np.mean([3 not in p for p in pairs]))


def test_cli_eval_writes_metrics_and_grid(tiny_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(tiny_dir), "--task", "digits", "--output", str(out), "--per_digit", "2",
                 "--num_inference_steps", "3"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["n_generated"] == 20 and metrics["n_heldout"] == 360 and metrics["n_generated_heldout_prompts"] == 20
    assert metrics["classifier_heldout_accuracy"] == fit_classifier()[1]
    assert (tmp_path / "metrics_grid.png").exists()
    assert "text_to_image_accuracy" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "nope")]) == 2
