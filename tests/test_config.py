"""The typed per-modality spec: saved as the same config.json keys, loaded back as a ModalitySpec."""

import json

import pytest

from mmar.config import MMARConfig, ModalitySpec
from tests.conftest import make_tiny


def test_spec_is_typed_and_saves_the_old_keys(tmp_path):
    model, _ = make_tiny()
    spec = model.config.modalities["image"]
    assert isinstance(spec, ModalitySpec) and spec.kind == "continuous" and spec.can_generate
    assert spec.token_dim == 4 and spec.num_tokens == 16 and set(spec.token_ids) == {"start", "end", "token"}
    model.config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["modalities"]["image"]
    assert set(saved) == {"tokenizer", "head", "token_ids", "num_tokens", "token_dim", "can_generate"}
    loaded = MMARConfig.from_pretrained(tmp_path)
    assert loaded.modalities == model.config.modalities
    assert spec["token_dim"] == 4 and spec.get("vocab_size") is None  # the old dict reads still work
    with pytest.raises(KeyError):
        spec["vocab_size"]


def test_a_hand_written_spec_needs_a_tokenizer_and_keeps_unknown_keys():
    cfg = MMARConfig(modalities={"image": {"tokenizer": {"name": "image-patch"}, "note": "kept"}})
    spec = cfg.modalities["image"]
    assert spec.head["name"] == "diffusion" and spec.token_ids == {} and spec.extra == {"note": "kept"}
    assert cfg.to_dict()["modalities"]["image"] == {"tokenizer": {"name": "image-patch"}, "head": spec.head,
                                                     "token_ids": {}, "note": "kept"}
    with pytest.raises(ValueError, match="needs a 'tokenizer'"):
        MMARConfig(modalities={"image": {"head": {}}})
