"""Adding a modality = a segment class + a tokenizer, both defined in this file alone: a 1-D signal is
trained on from JSONL records, saved, loaded and generated (and read in a prompt), with no package file
edited. If this test needs a change in mmar/ to pass, some module still spells out the modality list."""

import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import yaml

from mmar.cli import main
from mmar.pipeline import MMARPipeline
from mmar.tokenizers import ModalityTokenizer, register_tokenizer
from mmar.types import Item, register_segment
from tests.conftest import TINY_BACKBONE

LENGTH, PER_TOKEN = 16, 4  # a signal of 16 values is 4 tokens of 4 values


@register_segment
@dataclass
class Signal(Item):
    values: Any  # a 1-D array, or the path of a .npy file

    modality: ClassVar[str] = "signal"
    noun: ClassVar[str] = "a signal"


@register_tokenizer("toy-signal")
class SignalTokenizer(ModalityTokenizer):
    modality = "signal"
    kind = "continuous"

    def __init__(self, length: int = LENGTH, per_token: int = PER_TOKEN):
        self.length, self.per_token, self.token_dim = length, per_token, per_token

    def config(self) -> dict:
        return {"length": self.length, "per_token": self.per_token}

    def num_tokens(self, item: Any = None) -> int:
        return self.length // self.per_token

    def preprocess(self, raw: Any) -> torch.Tensor:
        if isinstance(raw, (str, os.PathLike)):
            raw = np.load(raw, allow_pickle=False)
        x = torch.as_tensor(np.asarray(raw, dtype=np.float32)).reshape(-1)
        if x.numel() != self.length:
            raise ValueError(f"a signal has {self.length} values, got {x.numel()}")
        return x

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.reshape(batch.shape[0], self.num_tokens(), self.per_token)

    def decode(self, tokens: torch.Tensor) -> list[Signal]:
        return [Signal(t.reshape(-1).float().numpy()) for t in tokens]


def _wave(k: int) -> np.ndarray:
    return np.sin(np.arange(LENGTH) * (k + 1) / 4.0).astype(np.float32)


@pytest.fixture(scope="module")
def signal_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("signal")
    with open(root / "data.jsonl", "w") as f:
        for k in range(3):
            np.save(root / f"w{k}.npy", _wave(k))
            part = {"type": "signal", "path": f"w{k}.npy"}
            f.write(json.dumps({"messages": [{"role": "user", "content": f"wave {k}"},
                                             {"role": "assistant", "content": [part]}]}) + "\n")
            f.write(json.dumps({"messages": [{"role": "user", "content": [part, {"type": "text", "text": "which?"}]},
                                             {"role": "assistant", "content": f"{k}"}]}) + "\n")
    cfg = {"output_dir": str(root / "run"), "backbone": TINY_BACKBONE, "dataset": "jsonl",
           "data_files": str(root / "data.jsonl"), "text_vocab_size": 280, "max_steps": 6, "batch_size": 6,
           "learning_rate": 3e-3, "warmup_steps": 1, "logging_steps": 3, "save_steps": 0, "sample_steps": 0,
           "progress": False,
           "modalities": {"signal": {"tokenizer": {"name": "toy-signal"},
                                     "head": {"width": 32, "depth": 2, "num_inference_steps": 2}}}}
    (root / "signal.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(root / "signal.yaml")]) == 0
    return root / "run"


def test_a_toy_modality_trains_saves_loads_and_generates(signal_run):
    rows = [json.loads(line) for line in (signal_run / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 6 and all(np.isfinite(r["loss"]) for r in rows)
    saved = json.loads((signal_run / "config.json").read_text())["modalities"]["signal"]
    assert saved["token_dim"] == PER_TOKEN and saved["num_tokens"] == LENGTH // PER_TOKEN

    pipe = MMARPipeline.from_pretrained(signal_run)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.modalities == ["signal"] and pipe.model.config.modalities["signal"].kind == "continuous"
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(["wave 0", "wave 2"], mode="signal", max_items=1, max_new_tokens=2, generator=gens)
    for row in out.items("signal"):
        assert len(row) == 1 and isinstance(row[0], Signal) and row[0].values.shape == (LENGTH,)
        assert np.isfinite(row[0].values).all()
    assert out.images == [[], []]  # a signal is not an image

    # read in a prompt: media= with the modality's name, a content part of its type, and a segment
    kw = dict(mode="text", temperature=0.0, max_new_tokens=2)
    by_media = pipe("which?", media={"signal": [_wave(1)]}, **kw).text
    by_part = pipe.chat([{"role": "user", "content": [{"type": "signal", "signal": _wave(1)}, "which?"]}], **kw)
    by_segment = pipe.chat([{"role": "user", "content": [Signal(_wave(1)), "which?"]}], **kw)
    assert by_media == ["".join(by_part)] == ["".join(by_segment)]
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        pipe("x", media={"smell": [1]})
