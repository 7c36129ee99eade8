"""`mmar eval --task jsonl`: a user's held-out chat records scored by exact match / contains, loss, and FD."""

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from mmar.cli import main
from mmar.datasets.digits import i2t_prompt, load_digit_split, t2i_prompt
from mmar.eval.jsonl import evaluate_jsonl, image_scores, score_text


def _held_out(root, n_text=20, n_image=10):
    """Held-out digits as a user's JSONL: image -> digit questions and 'draw' requests with references."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    x, y = load_digit_split("test")
    with open(root / "held_out.jsonl", "w") as f:
        for i in range(n_text + n_image):
            PILImage.fromarray(x[i]).save(root / "imgs" / f"{i}.png")
            if i < n_text:
                msgs = [{"role": "user", "content": [{"type": "image", "path": f"imgs/{i}.png"},
                                                     {"type": "text", "text": i2t_prompt(i)}]},
                        {"role": "assistant", "content": str(y[i])}]
            else:
                msgs = [{"role": "user", "content": t2i_prompt(int(y[i]), i)},
                        {"role": "assistant", "content": [{"type": "image", "path": f"imgs/{i}.png"}]}]
            f.write(json.dumps({"messages": msgs}) + "\n")
        f.write("{broken\n")
    return root / "held_out.jsonl"


def test_text_scores_normalise_case_space_and_punctuation():
    assert score_text(" Seven. ", "seven") == (True, True)
    assert score_text("it is a seven", "seven") == (False, True)
    assert score_text("green", "yellow") == (False, False)


def test_frechet_distance_of_references_to_themselves_is_zero_and_grows_with_noise(rng):
    x, _ = load_digit_split("test")
    refs = [PILImage.fromarray(a) for a in x[:30]]
    same = image_scores(refs, refs)
    assert same["frechet_distance"] == pytest.approx(0.0, abs=1e-3) and same["image_mse"] == 0.0
    noise = [PILImage.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)) for _ in refs]
    other = [PILImage.fromarray(a) for a in x[30:60]]
    assert image_scores(noise, refs)["frechet_distance"] > image_scores(other, refs)["frechet_distance"]


def test_trained_model_on_held_out_records(trained_digits, tmp_path):
    data = _held_out(tmp_path)
    m = evaluate_jsonl(str(trained_digits), str(data), num_inference_steps=10)
    assert m["n_records"] == 30 and m["bad_records"] == 1 and m["n_text"] == 20 and m["n_images"] == 10
    assert m["exact_match"] >= 0.5 and m["contains"] >= m["exact_match"]  # the model reads digits
    assert np.isfinite(m["loss"]) and np.isfinite(m["text_loss"]) and np.isfinite(m["image_loss"])
    assert m["frechet_distance"] >= 0.0 and len(m["answers"]) == 20


def test_cli_eval_jsonl_writes_metrics_and_grid(tiny_dir, tmp_path, capsys):
    data = _held_out(tmp_path, n_text=4, n_image=3)
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(tiny_dir), "--task", "jsonl", "--data_files", str(data),
                 "--output", str(out), "--num_inference_steps", "2"]) == 0
    metrics = json.loads(out.read_text())
    for key in ("exact_match", "contains", "loss", "text_loss", "frechet_distance", "image_mse"):
        assert key in metrics
    assert 0.0 <= metrics["exact_match"] <= 1.0 and (tmp_path / "metrics_grid.png").exists()
    assert "exact_match" in capsys.readouterr().out
    assert main(["eval", "--model", str(tiny_dir), "--task", "jsonl"]) == 2  # no --data_files: a clear error
    assert "needs --data_files" in capsys.readouterr().err
