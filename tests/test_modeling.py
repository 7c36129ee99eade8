import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, LlamaConfig, LlamaForCausalLM

from mmar import Image, Message, MMARConfig, MMARModel, MMARProcessor, build_model
from tests.conftest import TINY_BACKBONE, TINY_MODALITIES, make_tiny


def _batch(proc, rng):
    a = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    return proc([[Message("user", "draw the digit seven"), Message("assistant", [Image(a)])],
                 [Message("user", [Image(a), "which digit is this?"]), Message("assistant", "7")]])


def test_save_load_round_trip_is_identical(tiny, tiny_dir, rng):
    model, proc = tiny
    loaded = MMARModel.from_pretrained(tiny_dir).eval()
    assert isinstance(AutoModel.from_pretrained(tiny_dir), MMARModel)
    assert isinstance(AutoConfig.from_pretrained(tiny_dir), MMARConfig)
    assert sorted(p.name for p in tiny_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth")) == []
    assert (tiny_dir / "model.safetensors").exists()
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    proc2 = MMARProcessor.from_pretrained(tiny_dir)
    batch, batch2 = _batch(proc, rng), _batch(proc2, np.random.default_rng(0))
    torch.manual_seed(1)
    out = model(**batch)
    torch.manual_seed(1)
    out2 = loaded(**batch2)
    assert torch.equal(out.loss, out2.loss)
    with torch.no_grad():
        h = model(batch["input_ids"], batch["attention_mask"], values=batch["values"]).hidden_states
        h2 = loaded(batch2["input_ids"], batch2["attention_mask"], values=batch2["values"]).hidden_states
    assert torch.equal(h, h2)


def test_loss_parts_and_gradients(tiny, rng):
    model, proc = tiny
    model.zero_grad()
    out = model(**_batch(proc, rng))
    assert out.text_loss > 0 and out.modality_losses["image"] > 0
    assert torch.allclose(out.loss, out.text_loss + out.modality_losses["image"])
    out.loss.backward()
    for name in ("projections.image.0.weight", "heads.image.net.out.weight", "backbone.lm_head.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    model.zero_grad()


def test_text_loss_is_ce_over_text_targets_only(tiny, rng):
    model, proc = tiny
    b = _batch(proc, rng)
    with torch.no_grad():
        out = model(**b)
        h = model(b["input_ids"], b["attention_mask"], values=b["values"]).hidden_states
    logits, nxt = model.lm_head(h[:, :-1]), b["labels"][:, 1:]
    ph = proc.token_ids["image"]["token"]
    text = (nxt != -100) & (nxt != ph)
    assert 0 < int(text.sum()) < int((nxt != -100).sum())  # image targets are excluded
    expected = torch.nn.functional.cross_entropy(logits[text], nxt[text])
    assert torch.allclose(out.text_loss, expected, atol=1e-6)


def test_placeholder_count_mismatch_is_an_error(tiny, rng):
    model, proc = tiny
    b = _batch(proc, rng)
    with pytest.raises(ValueError, match="32 image placeholder tokens in input_ids but 16"):
        model(b["input_ids"], b["attention_mask"], values={"image": b["values"]["image"][:16]})
    bad = b["values"]["image"].clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        model(b["input_ids"], b["attention_mask"], values={"image": bad})


def test_backbone_from_a_local_pretrained_directory(tmp_path, tiny):
    _, proc = tiny
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    model = build_model(str(tmp_path / "llama"), proc.tokenizer, TINY_MODALITIES)
    original = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    assert model.get_input_embeddings().weight.shape[0] == len(proc.tokenizer)
    assert torch.equal(model.backbone.model.layers[0].mlp.up_proj.weight, original.model.layers[0].mlp.up_proj.weight)
    assert model.config.backbone_config.model_type == "llama"


def test_epsilon_prediction_and_unknown_head():
    model, proc = make_tiny(modalities={"image": {**TINY_MODALITIES["image"],
                                                  "head": {"prediction_type": "epsilon", "width": 16, "depth": 1}}})
    assert model.heads["image"].train_scheduler.config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="unknown head 'nope'"):
        make_tiny(modalities={"image": {**TINY_MODALITIES["image"], "head": {"name": "nope"}}})


def test_a_heads_own_init_survives_transformers_default_init(tmp_path):
    """A head that sets its own initialisation keeps it through MMARModel's construction (transformers'
    default init redraws every Linear afterwards) with no edit of modeling.py, and weights loaded from a
    checkpoint are left alone by it."""
    from mmar.heads import DiffusionHead, register_head

    @register_head("test-own-init")
    class OwnInitHead(DiffusionHead):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.scale = torch.nn.Linear(4, 4)
            self.init_own_weights()

        def init_own_weights(self):
            from transformers import initialization as hf_init

            hf_init.constant_(self.scale.weight, 0.5)
            hf_init.constant_(self.scale.bias, -1.0)

    modalities = {"image": {**TINY_MODALITIES["image"], "head": {**TINY_MODALITIES["image"]["head"],
                                                                   "name": "test-own-init"}}}
    model, proc = make_tiny(modalities=modalities)
    fresh = build_model(dict(TINY_BACKBONE), proc.tokenizer, modalities)
    head = fresh.heads["image"]
    assert torch.all(head.scale.weight == 0.5) and torch.all(head.scale.bias == -1.0)
    # the diffusion MLP's own zero init survives too (its output layer starts at zero)
    assert torch.count_nonzero(head.net.out.weight) == 0 and torch.count_nonzero(head.net.out.bias) == 0
    # loaded weights are kept: make_tiny drew the heads at random; a round trip keeps them
    with torch.no_grad():
        model.heads["image"].scale.weight.fill_(3.0)
    model.save_pretrained(tmp_path / "m")
    loaded = MMARModel.from_pretrained(tmp_path / "m")
    assert torch.all(loaded.heads["image"].scale.weight == 3.0)
    assert torch.equal(loaded.heads["image"].net.out.weight, model.heads["image"].net.out.weight)
    assert torch.count_nonzero(loaded.heads["image"].net.out.weight) > 0
