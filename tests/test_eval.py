import json

from mmar.cli import main
from mmar.eval.digits import fit_classifier, parse_digit


def test_parse_digit():
    assert parse_digit("7") == 7 and parse_digit("it is seven") == 7 and parse_digit("no") is None
    assert parse_digit(" 3 and 4") == 3


def test_independent_classifier_is_accurate():
    _, acc = fit_classifier()
    assert acc > 0.97


def test_cli_eval_writes_metrics_and_grid(tiny_dir, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["eval", "--model", str(tiny_dir), "--task", "digits", "--output", str(out), "--per_digit", "2",
                 "--num_inference_steps", "3"]) == 0
    metrics = json.loads(out.read_text())
    for key in ("image_to_text_accuracy", "text_to_image_accuracy", "interleaved_accuracy",
                "classifier_heldout_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n_generated"] == 20 and metrics["n_heldout"] == 360
    assert (tmp_path / "metrics_grid.png").exists()
    assert "text_to_image_accuracy" in capsys.readouterr().out
    assert main(["eval", "--model", str(tmp_path / "nope")]) == 2
