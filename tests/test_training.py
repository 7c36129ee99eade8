import json

import pytest
import torch

from mmar import MMARModel
from mmar.cli import main
from mmar.training.arguments import build_arguments
from mmar.training.data import Collator, build_dataset
from tests.conftest import TINY_BACKBONE, TINY_MODALITIES


def _tiny_config(tmp_path, **extra) -> str:
    import yaml

    cfg = {"output_dir": str(tmp_path / "run"), "backbone": TINY_BACKBONE, "modalities": TINY_MODALITIES,
           "text_vocab_size": 300, "max_steps": 30, "batch_size": 16, "learning_rate": 3e-3, "warmup_steps": 5,
           "logging_steps": 5, "save_steps": 10, "save_total_limit": 2, "sample_steps": 0, "progress": False,
           **extra}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _losses(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_cli_train_learns_and_saves_a_loadable_model(tmp_path):
    cfg = _tiny_config(tmp_path, generation={"guidance_scale": 2.0, "image_temperature": 0.7})
    assert main(["train", "--config", cfg, "--max_steps", "40"]) == 0
    run = tmp_path / "run"
    rows = _losses(run)
    assert rows[-1]["step"] == 40
    assert rows[-1]["text_loss"] < 0.5 * rows[0]["text_loss"]  # it learns
    assert rows[-1]["image_loss"] < rows[0]["image_loss"]
    model = MMARModel.from_pretrained(run)
    assert model.config.backbone_config.hidden_size == TINY_BACKBONE["hidden_size"]
    assert (run / "loss_curve.png").stat().st_size > 1000
    assert (run / "samples" / "final.png").exists()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_20", "step_30"]  # save_total_limit keeps the newest two
    saved = json.loads((run / "generation_config.json").read_text())  # the config's sampling defaults travel
    assert saved["guidance_scale"] == 2.0 and saved["image_temperature"] == 0.7


def test_a_typo_in_generation_defaults_fails_before_training(tmp_path, capsys):
    assert main(["train", "--config", _tiny_config(tmp_path, generation={"guidance": 2.0})]) == 2
    assert "unknown generation setting(s) ['guidance']" in capsys.readouterr().err
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_resume_continues_the_same_losses(tmp_path):
    """A run resumed from its step-10 checkpoint trains steps 11..20 (not from scratch) to the same loss."""
    cfg = _tiny_config(tmp_path, max_steps=20)
    assert main(["train", "--config", cfg]) == 0
    run = tmp_path / "run"
    full = {r["step"]: r["loss"] for r in _losses(run) if "loss" in r}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_10"]
    again = tmp_path / "again"
    assert main(["train", "--config", cfg, "--output_dir", str(again),
                 "--resume_from_checkpoint", str(run / "checkpoints" / "step_10")]) == 0
    rows = [r for r in _losses(again) if "loss" in r]
    assert [r["step"] for r in rows] == [15, 20]  # it went on after step 10
    assert rows[-1]["loss"] == pytest.approx(full[20], rel=1e-4)
    assert rows[0]["loss"] == pytest.approx(full[15], rel=1e-4)


def test_config_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown option\\(s\\) bogus"):
        build_arguments({"bogus": 1})
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rate: 1e-3\nbogus: 2\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "bad.yaml: unknown option(s) bogus" in capsys.readouterr().err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err


def test_flags_override_yaml(tmp_path):
    import argparse

    from mmar.training.arguments import add_arguments, parse_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    m, d, t = parse_arguments(p.parse_args(["--config", _tiny_config(tmp_path), "--learning_rate", "0.5",
                                            "--backbone", "{model_type: llama, hidden_size: 16}"]))
    assert t.learning_rate == 0.5 and t.max_steps == 30 and m.backbone["hidden_size"] == 16


def test_condition_dropout_empties_generation_prompts(tiny):
    """Exactly the samples whose (seed, epoch, index) draw is under the rate lose their prompt: the dropped
    rows are the expected ones (not merely about half), a lower rate drops a subset of them, another epoch
    or seed other rows."""
    import random

    _, proc = tiny
    ds = build_dataset("digits")
    t2i = [(i, ds[i]) for i in range(len(ds)) if ds.index[i][0] == "t2i"][:200]
    start = proc.token_ids["image"]["start"]

    def dropped(p, seed=0, epoch=0):
        collate = Collator(proc, cond_dropout_prob=p, seed=seed)
        collate.epoch = epoch
        return {i for (i, _), row in zip(t2i, collate(t2i)["input_ids"]) if row[1] == start}

    def expected(p, seed=0, epoch=0):
        return {i for i, _ in t2i if random.Random(f"mmar-dropout-{seed}-{epoch}-{i}").random() < p}

    half = dropped(0.5)
    assert half == expected(0.5) and 72 <= len(half) <= 128  # Binomial(200, 0.5): P(outside) < 1e-4
    assert dropped(0.1) == expected(0.1) and dropped(0.1) < half
    assert dropped(0.5, epoch=1) == expected(0.5, epoch=1) != half
    assert dropped(0.5, seed=1) == expected(0.5, seed=1) != half
    assert dropped(0.0) == set() and dropped(1.0) == {i for i, _ in t2i}
    # the rate itself, on a sample big enough for a narrow window: n = 4000 draws of one text-to-image sample
    # at p = 0.3 drop Binomial(4000, 0.3) rows, sd = sqrt(p (1 - p) / n) = 0.0072; 5 sd = +-0.036 around 0.3
    n, p = 4000, 0.3
    many = Collator(proc, cond_dropout_prob=p, seed=0)([(i, t2i[0][1]) for i in range(n)])["input_ids"]
    rate = (many[:, 1] == start).float().mean().item()
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5, rate
    i2t = [ds[i] for i in range(len(ds)) if ds.index[i][0] == "i2t"][:50]
    kept = Collator(proc, cond_dropout_prob=1.0)(i2t)  # understanding samples keep their question
    assert torch.equal(kept["input_ids"], proc(i2t)["input_ids"])


def test_item_dropout_trains_the_none_branch_of_editing(tiny):
    """Editing samples (input image + instruction -> image) lose their text with ``cond_dropout_prob`` (the
    ``items`` branch of dual guidance) and their whole prompt, image too, with ``item_dropout_prob`` (the
    ``none`` branch: BOS and the answer): exactly the indices the seeded draws pick, laid out as the
    processor's ``drop_items`` encoding; text-to-image samples drop as before whatever ``item_dropout_prob``."""
    import random

    import numpy as np

    from mmar.types import Image, Message

    _, proc = tiny
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(2)]
    edit = [Message("user", [Image(pics[0]), "make it brighter"]), Message("assistant", [Image(pics[1])])]
    samples = [(i, edit) for i in range(300)]
    p, q = 0.2, 0.3
    out = Collator(proc, cond_dropout_prob=p, item_dropout_prob=q, seed=3)(samples)["input_ids"]
    u = [random.Random(f"mmar-dropout-3-0-{i}").random() for i in range(300)]
    layouts = {k: torch.tensor(proc.encode(edit, **kw).input_ids) for k, kw in
               [("full", {}), ("items", {"drop_prompt": True}), ("none", {"drop_prompt": True, "drop_items": True})]}
    assert len(layouts["none"]) < len(layouts["items"]) < len(layouts["full"])
    for row, ui in zip(out, u):
        want = layouts["items" if ui < p else "none" if ui < p + q else "full"]
        assert torch.equal(row[:len(want)], want) and (len(want) == len(row) or row[len(want)] == proc.pad_id)
    none = layouts["none"].tolist()
    assert none[0] == proc.bos_id and none[1] == proc.token_ids["image"]["start"]  # BOS, then the answer
    assert 60 <= sum(p <= x < p + q for x in u) <= 120  # Binomial(300, 0.3), mean 90
    ds = build_dataset("digits")
    t2i = [(i, ds[i]) for i in range(len(ds)) if ds.index[i][0] == "t2i"][:100]
    base = Collator(proc, cond_dropout_prob=p, seed=3)(t2i)["input_ids"]
    assert torch.equal(Collator(proc, cond_dropout_prob=p, item_dropout_prob=q, seed=3)(t2i)["input_ids"], base)
    with pytest.raises(ValueError, match="sum <= 1"):
        Collator(proc, cond_dropout_prob=0.7, item_dropout_prob=0.4)
