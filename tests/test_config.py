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


# the diffusion head's defaults as config.py spelled them out before the head's signature became their one source
OLD_DEFAULT_HEAD = {"name": "diffusion", "width": 256, "depth": 3, "prediction_type": "v_prediction",
                    "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "diffusion_batch_mul": 4,
                    "scheduler": "DDIMScheduler", "num_inference_steps": 50}


def test_the_default_head_config_is_the_old_one_and_saved_configs_load_equal(tmp_path):
    from mmar.heads import head_defaults
    assert head_defaults("diffusion") == OLD_DEFAULT_HEAD
    assert list(head_defaults("diffusion")) == list(OLD_DEFAULT_HEAD)  # config.json's key order too
    cfg = MMARConfig(modalities={"image": {"tokenizer": {"name": "image-patch"}, "head": {"depth": 2}}})
    assert cfg.modalities["image"].head == {**OLD_DEFAULT_HEAD, "depth": 2}
    # a config.json written with the old defaults spelled out loads back to the same spec and file
    cfg.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    loaded = MMARConfig.from_pretrained(tmp_path)
    assert loaded.modalities == cfg.modalities
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "config.json").read_text() == text
    # other heads get no defaults filled in, as before
    flow = MMARConfig(modalities={"image": {"tokenizer": {"name": "image-patch"}, "head": {"name": "flow"}}})
    assert flow.modalities["image"].head == {"name": "flow"}


def test_config_and_arguments_read_the_head_defaults_off_the_registered_class(monkeypatch):
    """Change the registered diffusion head's signature and both follow: nothing else holds the defaults."""
    from mmar.heads import DiffusionHead, base
    from mmar.training.arguments import ModelArguments

    class Wider(DiffusionHead):
        def __init__(self, token_dim: int, cond_dim: int, width: int = 96, depth: int = 5, **options):
            super().__init__(token_dim, cond_dim, width=width, depth=depth, **options)

    Wider.name = "diffusion"
    monkeypatch.setitem(base._REGISTRY, "diffusion", Wider)
    cfg = MMARConfig(modalities={"image": {"tokenizer": {"name": "image-patch"}}})
    assert cfg.modalities["image"].head == {"name": "diffusion", "width": 96, "depth": 5}
    assert ModelArguments().modalities["image"]["head"] == {"name": "diffusion", "width": 96, "depth": 5}
