"""Mixed precision: the launcher's setting is honoured (``ACCELERATE_MIXED_PRECISION``, what ``accelerate
launch --mixed_precision bf16`` and the presets' ``mixed_precision: bf16`` set), an explicit flag wins, the
precision really used is saved, and bf16 training on CPU learns."""

import json
import math

import pytest
import torch

from mmar.cli import main
from mmar.training.arguments import build_arguments
from mmar.training.trainer import setup
from tests.test_training import _losses, _tiny_config


def _linear_dtype_in_training(tmp_path, monkeypatch, env, **flags):
    """Set up a run (no training) and return (the precision it reports, the one it saved, the dtype a
    backbone linear layer computes in during a training forward)."""
    import yaml

    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    values = yaml.safe_load(open(_tiny_config(tmp_path, **flags)))
    margs, dargs, targs = build_arguments(values)
    run = setup(margs, dargs, targs)
    seen = []
    layer = run.acc.unwrap_model(run.model).backbone.model.layers[0].self_attn.q_proj
    hook = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    batch = next(iter(run.loader))
    batch.pop("sample_index", None)
    batch.pop("seq_lens", None)
    run.model.train()
    run.model(**batch).loss.backward()
    hook.remove()
    saved = json.loads((tmp_path / "run" / "training_args.json").read_text())
    return run.acc.mixed_precision, saved["mixed_precision"], seen[0]


@pytest.mark.parametrize("env, flag, expected", [
    (None, None, "no"),  # nothing asked: fp32
    ("bf16", None, "bf16"),  # accelerate launch --mixed_precision bf16, no flag: the launcher's
    ("bf16", "no", "no"),  # an explicit flag wins over the launcher
    (None, "bf16", "bf16"),
])
def test_the_launchers_precision_is_honoured_and_a_flag_wins(tmp_path, monkeypatch, env, flag, expected):
    flags = {} if flag is None else {"mixed_precision": flag}
    used, saved, dtype = _linear_dtype_in_training(tmp_path, monkeypatch, env, **flags)
    assert used == saved == expected
    build_arguments(json.loads((tmp_path / "run" / "training_args.json").read_text()))  # a valid config again
    assert dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)  # applied, not only reported


def test_bf16_training_on_cpu_learns(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = _tiny_config(tmp_path, max_steps=30, logging_steps=1, save_steps=0)
    assert main(["train", "--config", cfg, "--mixed_precision", "bf16"]) == 0
    assert "mixed precision bf16 (from --mixed_precision) on cpu" in capsys.readouterr().out
    rows = _losses(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 31))
    for key in ("loss", "text_loss"):
        first, last = [r[key] for r in rows[:10]], [r[key] for r in rows[-10:]]
        assert all(math.isfinite(v) for v in first + last)
        assert sum(last) / 10 < 0.7 * sum(first) / 10, (key, first, last)
    assert json.loads((tmp_path / "run" / "training_args.json").read_text())["mixed_precision"] == "bf16"


def test_a_precision_that_cannot_run_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    cfg = _tiny_config(tmp_path)
    assert main(["train", "--config", cfg, "--mixed_precision", "bf17"]) == 2
    assert "mixed_precision: 'bf17' is not one of no, bf16, fp16, fp8" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", "--config", cfg, "--mixed_precision", "fp16"]) == 2
        assert "mixed_precision fp16 needs a GPU" in capsys.readouterr().err
