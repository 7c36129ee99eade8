"""Held-out evaluation while training: eval loss rows, the best weights as the final model, early stopping."""

import json
import random
import shutil

import pytest
from safetensors.torch import load_file

from mmar.cli import main
from mmar.datasets import DigitsDataset
from mmar.training.evaluation import OVERFIT_RATIO, Subset, eval_shards, overfitting, split_held_out
from mmar.training.pictures import plot_loss_curve

def _rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def contradicting(tmp_path_factory):
    """Training records answer each question one way, the held-out records the other way: the better the
    model learns its training answers, the higher the held-out loss, so the eval loss must turn upwards."""
    root = tmp_path_factory.mktemp("colours")
    for name, answer in (("train", "red"), ("held_out", "blue")):
        with open(root / f"{name}.jsonl", "w") as f:
            for i in range(16):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"colour of square {i}?"},
                                                 {"role": "assistant", "content": answer}]}) + "\n")
    return root


def test_eval_rows_best_model_and_early_stopping(tmp_path, tiny_dir, contradicting, capsys):
    out = tmp_path / "run"
    args = ["train", "--init_from", str(tiny_dir), "--dataset", "jsonl",
            "--data_files", str(contradicting / "train.jsonl"),
            "--eval_data_files", str(contradicting / "held_out.jsonl"), "--eval_steps", "3", "--eval_batch_size", "5",
            "--load_best_model_at_end", "true", "--early_stopping_patience", "2", "--eval_generate", "4",
            "--max_steps", "60", "--batch_size", "8", "--learning_rate", "1e-2", "--warmup_steps", "0",
            "--logging_steps", "3", "--save_steps", "3", "--save_total_limit", "100", "--output_dir", str(out),
            "--progress", "false", "--cond_dropout_prob", "0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == list(range(3, 3 * len(evals) + 1, 3))  # at the eval steps
    assert all(r["eval_text_loss"] == pytest.approx(r["eval_loss"]) and "eval_image_loss" not in r for r in evals)
    assert all(0.0 <= r["eval_exact_match"] <= 1.0 and r["eval_answered"] == 4 for r in evals)
    assert f"mmar: step 3: eval loss {evals[0]['eval_loss']:.4f}" in printed
    assert f"exact match {evals[0]['eval_exact_match']:.1%}" in printed
    # the best step is the eval with the lowest loss; two evals without improvement stopped the run
    best = min(evals, key=lambda r: r["eval_loss"])
    assert all(r["best_step"] == min(evals[:i + 1], key=lambda r: r["eval_loss"])["step"]
               for i, r in enumerate(evals))
    last = max(r["step"] for r in rows)
    assert last < 60 and evals[-1]["step"] == last == best["step"] + 6 and "early_stopping" in evals[-1]
    assert "mmar: early stopping at step" in printed
    assert rows[-1] == {"step": last, "final_model_step": best["step"], "best_eval_loss": best["eval_loss"]}
    # the saved final model is the best step's weights (as its checkpoint holds them), not the last step's
    final = load_file(out / "model.safetensors")
    at_best = load_file(out / "checkpoints" / f"step_{best['step']}" / "model.safetensors")
    at_last = load_file(out / "checkpoints" / f"step_{last}" / "model.safetensors")
    shared = sorted(set(final) & set(at_best))
    assert len(shared) > 10 and all((final[k] == at_best[k]).all() for k in shared)
    assert any(not (final[k] == at_last[k]).all() for k in shared)
    assert not (out / "best").exists()
    state = json.loads((out / "checkpoints" / f"step_{last}" / "trainer_state.json").read_text())
    assert state["best_step"] == best["step"] and state["evals_without_improvement"] == 2
    assert (out / "loss_curve.png").stat().st_size > 1000


def test_a_resumed_run_keeps_the_best_record(tmp_path, tiny_dir, contradicting):
    def args(out, extra=()):
        return ["train", "--init_from", str(tiny_dir), "--dataset", "jsonl",
                "--data_files", str(contradicting / "train.jsonl"),
                "--eval_data_files", str(contradicting / "held_out.jsonl"), "--eval_steps", "2", "--max_steps", "8",
                "--batch_size", "8", "--learning_rate", "1e-2", "--warmup_steps", "0", "--logging_steps", "2",
                "--save_steps", "4", "--output_dir", str(out), "--progress", "false", *extra]

    assert main(args(tmp_path / "full")) == 0
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_4", tmp_path / "resumed" / "checkpoints" / "step_4")
    assert main(args(tmp_path / "resumed", ["--resume_from_checkpoint", "latest"])) == 0
    full = {r["step"]: r for r in _rows(tmp_path / "full") if "eval_loss" in r}
    resumed = {r["step"]: r for r in _rows(tmp_path / "resumed") if "eval_loss" in r}
    assert sorted(full) == [2, 4, 6, 8] and sorted(resumed) == [6, 8]
    for step, row in resumed.items():
        assert row["eval_loss"] == pytest.approx(full[step]["eval_loss"], rel=1e-4)
        assert row["best_step"] == full[step]["best_step"]
        assert row["best_eval_loss"] == pytest.approx(full[step]["best_eval_loss"], rel=1e-4)


def test_eval_split_holds_out_a_fixed_slice_not_trained_on():
    ds = DigitsDataset()
    train, held = split_held_out(ds, 0.1, seed=0)
    assert len(held) == round(0.1 * len(ds)) and len(train) + len(held) == len(ds)
    assert not set(train.indices) & set(held.indices)
    assert split_held_out(ds, 0.1, seed=0)[1].indices == held.indices != split_held_out(ds, 0.1, seed=1)[1].indices
    assert repr(train[5]) == repr(ds[train.indices[5]])
    assert train.preview_prompts() == ds.preview_prompts()  # the dataset's own extras pass through
    train.epoch = 3
    assert ds.epoch == 3
    with pytest.raises(ValueError, match="leaving none to train on"):
        split_held_out(Subset(ds, [0, 1]), 0.9, seed=0)


def test_eval_split_on_a_built_in_dataset_from_the_cli(tmp_path, capsys):
    from tests.test_training import _tiny_config

    cfg = _tiny_config(tmp_path, max_steps=4, logging_steps=2, save_steps=0, batch_size=8)
    assert main(["train", "--config", cfg, "--eval_split", "0.005", "--eval_steps", "2"]) == 0
    printed = capsys.readouterr().out
    n = len(DigitsDataset())
    assert f"{n - round(0.005 * n)} samples (+ {round(0.005 * n)} held out)" in printed
    evals = [r for r in _rows(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_text_loss"] > 0 and r["eval_image_loss"] > 0 for r in evals)


def test_eval_shards_deal_every_sample_once_in_equal_numbers_of_batches():
    for n, bs, world in ((0, 4, 2), (7, 4, 1), (42, 4, 2), (5, 2, 3), (9, 3, 3)):
        shards = [eval_shards(n, bs, world, r) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        seen = sorted(i for s in shards for b in s for i in b)
        assert seen == list(range(n)) and all(len(b) <= bs for s in shards for b in s)


def test_overfitting_rule():
    assert overfitting(0.4, 0.1) and overfitting(OVERFIT_RATIO * 0.1 + 1e-6, 0.1)
    assert not overfitting(0.25, 0.1)  # within 3x
    assert not overfitting(9.0, 2.0)  # the training loss is not small
    assert not overfitting(1.0, None)


def test_overfitting_warns_during_training(tmp_path, tiny_dir, contradicting):
    out = tmp_path / "run"
    args = ["train", "--init_from", str(tiny_dir), "--dataset", "jsonl",
            "--data_files", str(contradicting / "train.jsonl"),
            "--eval_data_files", str(contradicting / "held_out.jsonl"), "--eval_steps", "10",
            "--max_steps", "30", "--batch_size", "8", "--learning_rate", "2e-2", "--warmup_steps", "0",
            "--min_lr_ratio", "1", "--logging_steps", "10", "--save_steps", "0", "--output_dir", str(out), "--progress", "false"]
    with pytest.warns(UserWarning, match="far below the eval loss"):
        assert main(args) == 0
    assert _rows(out)[-1].get("overfitting") is True


def test_eval_argument_errors(tmp_path, chat_jsonl, capsys):
    base = ["train", "--dataset", "jsonl", "--data_files", str(chat_jsonl), "--output_dir", str(tmp_path / "x")]
    for extra, message in ((["--load_best_model_at_end", "true"], "load_best_model_at_end needs held-out data"),
                           (["--eval_split", "1.5"], "give a fraction in [0, 1)"),
                           (["--eval_split", "0.1", "--eval_data_files", str(chat_jsonl)], "not both"),
                           (["--eval_split", "0.1", "--streaming", "true"], "cannot be split")):
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_loss_curve_draws_train_and_eval(tmp_path):
    log = tmp_path / "log.jsonl"
    rng = random.Random(0)
    rows = [{"step": s, "loss": 2 / s + rng.random() * 0.01, "text_loss": 1 / s} for s in range(1, 21)]
    rows += [{"step": s, "eval_loss": 1 + s / 40, "eval_text_loss": 0.5, "best_step": 5} for s in (5, 10, 15, 20)]
    log.write_text("\n".join(map(json.dumps, rows)))
    plot_loss_curve(str(log), str(tmp_path / "curve.png"))
    assert (tmp_path / "curve.png").stat().st_size > 1000
