"""Training under hostile checkpoints, bad data and bad disks (issue 10: items 1, 3, 4, 5, 8, 11 and the
training "also" items). Each test fails on the code before the fix."""

import os
import pickle
import warnings

import pytest
import torch

from mmar import MMARModel
from mmar.training import DataArguments, ModelArguments, TrainingArguments, train
from mmar.training.checkpoints import checkpoint_dirs, resolve_checkpoint
from .faults import losses
from tests.conftest import TINY_BACKBONE, TINY_MODALITIES

PLANTED = ["custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "custom_checkpoint_2.pkl", "optimizer.bin",
           "scheduler.bin", "sampler.bin", "random_states_0.pkl", "scaler.pt", "pytorch_model.bin", "model.bin",
           "dl_state_dict.bin"]


class Payload:
    """Unpickling this creates ``marker``: proof that a file from the checkpoint was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(folder, marker) -> None:
    """Every pickle name accelerate or torch might load, each a payload."""
    for name in PLANTED:
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"state": Payload(str(marker))}, f)


def _args(out, steps, **train_kw):
    return (ModelArguments(backbone=dict(TINY_BACKBONE), modalities=TINY_MODALITIES, text_vocab_size=300),
            DataArguments(),
            TrainingArguments(output_dir=str(out), max_steps=steps, batch_size=8, warmup_steps=1, logging_steps=1,
                              save_total_limit=3, progress=False, **{"ema_decay": 0.9, "save_steps": 3, **train_kw}))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    train(*_args(out, 6))
    return out


def interrupt_at(monkeypatch, step: int) -> None:
    """Stop training (as Ctrl-C would) once ``step`` is logged."""
    from mmar.training import trainer

    original = trainer.log_step

    def log_step(run, *a, **kw):
        original(run, *a, **kw)
        if run.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "log_step", log_step)


def _final_weights(out):
    return MMARModel.from_pretrained(out).state_dict()


def test_resume_never_unpickles_a_planted_payload(tmp_path, monkeypatch, uninterrupted):
    """Item 1: scheduler, EMA, optimizer and RNG state come back from safetensors + JSON; a checkpoint full of
    pickles whose unpickling runs code is resumed from without running it, to the same losses and EMA."""
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    interrupt_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        train(*_args(out, 6))
    monkeypatch.undo()
    (ckpt,) = checkpoint_dirs(str(out))
    pickled = [n for n in os.listdir(ckpt) if n.endswith((".pkl", ".bin", ".pt"))]
    plant(ckpt, marker)
    train(*_args(out, 6, resume_from_checkpoint="latest"))
    assert not marker.exists(), "a file of the checkpoint was unpickled"
    assert pickled == []  # and nothing pickled is written
    full, resumed = losses(str(uninterrupted)), losses(str(out))
    assert sorted(resumed) == list(range(1, 7))
    for step in range(4, 7):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5), step
    a, b = _final_weights(uninterrupted), _final_weights(out)  # the EMA (the saved final model) resumed too
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_an_old_pickled_checkpoint_is_refused_not_loaded(tmp_path):
    """A checkpoint in accelerate's pickled format: `latest` passes over it, a path to it is a clear error."""
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    old = out / "checkpoints" / "step_4"
    old.mkdir(parents=True)
    plant(old, marker)
    (old / "model.safetensors").write_bytes(b"")
    (old / "trainer_state.json").write_text('{"step": 4}')
    with pytest.warns(UserWarning, match="step_4: incomplete, passed over"):
        assert resolve_checkpoint(str(out), "latest") is None
    with pytest.raises(FileNotFoundError, match="not a complete mmar checkpoint"):
        resolve_checkpoint(str(old), str(old))
    assert not marker.exists()


# -- bad data: nothing usable, too little, nothing at all, too long (items 3, 4 and "also") ---------------
def _jsonl(path, records) -> str:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


BAD = {"messages": [{"role": "user", "content": [{"type": "image", "path": "gone.png"}]},
                    {"role": "assistant", "content": "1"}]}


def _cli(tiny_dir, data, out, *extra):
    from mmar.cli import main

    return main(["train", "--init_from", str(tiny_dir), "--dataset", "jsonl", "--data_files", data, "--output_dir",
                 str(out), "--max_steps", "3", "--batch_size", "4", "--logging_steps", "1", "--save_steps", "0",
                 "--progress", "false", *extra])


def _errors(capsys) -> list[str]:
    """The CLI's error lines (progress bars of loading weights aside)."""
    return [line for line in capsys.readouterr().err.splitlines() if "error" in line]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("streaming", ["false", "true"])
def test_only_bad_records_stop_with_a_clear_error(tmp_path, tiny_dir, capsys, streaming):
    """Item 3: before, the step never advanced and the epoch loop ran forever (streamed data too)."""
    data = _jsonl(tmp_path / "bad.jsonl", [BAD] * 12)
    assert _cli(tiny_dir, data, tmp_path / "run", "--streaming", streaming) == 2
    err = _errors(capsys)
    assert len(err) == 1 and "bad.jsonl: not one usable batch in epoch 0: 3 batch(es) of 4 read" in err[0], err
    assert "12 bad record(s) skipped" in err[0] and "gone.png" in err[0], err


@pytest.mark.parametrize("records, message", [
    (0, "empty.jsonl: no records (an empty file?)"),
    (3, "empty.jsonl: 3 record(s) make 0 full batch(es) of 4 a process"),
])
def test_too_few_records_are_a_clear_error(tmp_path, tiny_dir, capsys, records, message):
    """Item 4: an empty file (torch: num_samples=0) and fewer records than a batch (ZeroDivisionError)."""
    data = _jsonl(tmp_path / "empty.jsonl", [_chat("draw a 3", "3")] * records)
    assert _cli(tiny_dir, data, tmp_path / "run") == 2
    err = _errors(capsys)
    assert len(err) == 1 and message in err[0], err


def test_records_past_max_length_or_the_positions_are_dropped_and_counted(tmp_path, tiny_dir, capsys):
    """Without packing, a record longer than max_length (here the default 256, past the tiny backbone's 128
    positions) was trained on, past the positions; it is dropped and counted."""
    long = "seven " * 200
    data = _jsonl(tmp_path / "mixed.jsonl", [_chat("draw a 3", "3"), _chat(long, "7")] * 6)
    assert _cli(tiny_dir, data, tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "past the backbone's 128 positions" in out
    assert "sample longer than max_length=128" in out and "skipped" in out


def test_collator_drops_samples_past_max_length(tiny):
    from mmar.training.data import Collator

    _, proc = tiny
    n = len(proc.encode(_messages("draw a 3")))
    collator = Collator(proc, max_length=n)
    batch = collator([_messages("draw a 3"), _messages("seven " * 30)])
    assert batch["input_ids"].shape[0] == 1 and collator.skipped == 1
    assert f"longer than max_length={n}" in collator.reasons[0]


def _messages(text):
    from mmar import Message

    return [Message("user", text), Message("assistant", "3")]


# -- NaN / inf gradients, max_grad_norm 0 (item 5 and "also") ----------------------------------------------
def test_max_grad_norm_zero_trains_and_logs_the_norm(tmp_path):
    import json

    out = tmp_path / "run"
    train(*_args(out, 3, max_grad_norm=0.0, save_steps=0, ema_decay=0.0))
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["grad_norm"] is not None and r["grad_norm"] == r["grad_norm"] > 0 for r in rows), rows


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_nan_gradients_with_a_finite_loss_are_skipped(tmp_path, monkeypatch, max_grad_norm):
    import json

    from accelerate import Accelerator

    original, calls = Accelerator.backward, {"n": 0}

    def backward(self, loss, **kw):
        original(self, loss, **kw)
        calls["n"] += 1
        if calls["n"] in (2, 3):  # the loss is finite, one gradient is not
            param = next(p for p in self._models[0].parameters() if p.grad is not None)
            param.grad.view(-1)[0] = float("inf") if calls["n"] == 2 else float("nan")

    monkeypatch.setattr(Accelerator, "backward", backward)
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(*_args(out, 5, max_grad_norm=max_grad_norm, save_steps=0, ema_decay=0.0))
    skipped = [str(w.message) for w in caught if "skipping this batch" in str(w.message)]
    assert len(skipped) == 2 and "gradient norm is inf" in skipped[0] and "gradient norm is nan" in skipped[1]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["skipped_steps"] == 2
    model = MMARModel.from_pretrained(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- checkpoints: `latest` complete, output_dir not mixed, full disk, final model atomic (items 8, 11) ---------
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts") / "run"
    train(*_args(out, 5, save_steps=2, ema_decay=0.0))
    assert [os.path.basename(c) for c in checkpoint_dirs(str(out))] == ["step_2", "step_4"]
    return out


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage", ["truncate", "state"])
def test_latest_passes_over_an_incomplete_newest_checkpoint(tmp_path, two_checkpoints, damage):
    out = _copy(two_checkpoints, tmp_path / "run")
    newest = out / "checkpoints" / "step_4"
    if damage == "truncate":
        blob = newest / "model.safetensors"
        blob.write_bytes(blob.read_bytes()[:1000])
    else:
        (newest / "trainer_state.json").write_text('{"step": 4, "fil')
    with pytest.warns(UserWarning, match="step_4: incomplete, passed over"):
        assert resolve_checkpoint(str(out), "latest") == str(out / "checkpoints" / "step_2")
    with pytest.warns(UserWarning, match="step_4: incomplete"):
        train(*_args(out, 5, save_steps=2, ema_decay=0.0, resume_from_checkpoint="latest"))
    assert sorted(losses(str(out))) == [1, 2, 3, 4, 5]


def test_a_fresh_run_does_not_mix_into_another_runs_checkpoints(tmp_path, two_checkpoints):
    out = _copy(two_checkpoints, tmp_path / "run")
    with pytest.raises(ValueError, match="holds another run's checkpoints \\(step_2, step_4\\).*--overwrite_output_dir"):
        train(*_args(out, 3, save_steps=2, ema_decay=0.0))
    assert len(checkpoint_dirs(str(out))) == 2
    train(*_args(out, 3, save_steps=2, ema_decay=0.0, overwrite_output_dir=True))
    assert [os.path.basename(c) for c in checkpoint_dirs(str(out))] == ["step_2"]  # the old ones are gone


def test_a_full_disk_during_a_checkpoint_is_one_clear_error(tmp_path, tiny_dir, chat_jsonl, monkeypatch, capsys):
    """Item 11: the partial directory is removed, earlier checkpoints stay complete, the message is one line."""
    import errno

    from mmar.training import safe_state
    from mmar.training.checkpoints import incomplete_reason

    original = safe_state.save_file

    def save_file(tensors, path, *a, **kw):
        if ".tmp_step_4" in path and "optimizer" in path:  # the disk fills up halfway through step 4's
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, path, *a, **kw)

    monkeypatch.setattr(safe_state, "save_file", save_file)
    out = tmp_path / "run"
    assert _cli(tiny_dir, str(chat_jsonl), out, "--max_steps", "6", "--save_steps", "2") == 2
    err = _errors(capsys)
    assert len(err) == 1 and "could not write the checkpoint of step 4 (no space left on the device)" in err[0], err
    assert not (out / "checkpoints" / ".tmp_step_4").exists()
    assert [os.path.basename(c) for c in checkpoint_dirs(str(out))] == ["step_2"]
    assert incomplete_reason(str(out / "checkpoints" / "step_2")) is None


def test_the_final_model_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from mmar.sequence import MMARProcessor

    def fail(self, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MMARProcessor, "save_pretrained", fail)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="No space left"):
        train(*_args(out, 2, save_steps=0, ema_decay=0.0))
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
