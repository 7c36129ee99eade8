"""image-clip: an open_clip vision tower as an understanding-only image tokenizer."""

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip", reason="open_clip is not installed (pip install -e '.[clip]')")

from mmar import Image, Message, MMARModel, MMARProcessor  # noqa: E402
from mmar.generation import generate  # noqa: E402
from mmar.tokenizers import ImageCLIPTokenizer, ModalityTokenizer  # noqa: E402
from tests.conftest import make_tiny  # noqa: E402

TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 4,
                                             "head_width": 16},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}
SPEC = {"name": "image-clip", "model_name": None, "model_config": TINY_CLIP}


def test_tokens_weights_and_errors(tmp_path):
    torch.manual_seed(0)
    tok = ImageCLIPTokenizer(model_name=None, model_config=TINY_CLIP)
    assert tok.num_tokens() == 16 and tok.token_dim == 32 and not tok.can_decode
    img = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)  # any size / mode is fitted
    tokens = tok.encode(tok.preprocess(img)[None])
    assert tokens.shape == (1, 16, 32) and torch.isfinite(tokens).all()
    tok.save_pretrained(tmp_path)
    again = ModalityTokenizer.from_pretrained(tmp_path)
    assert torch.equal(again.encode(again.preprocess(img)[None]), tokens)  # the same (random) tower travels
    with pytest.raises(ValueError, match="understanding-only"):
        tok.decode(tokens)
    with pytest.raises(FileNotFoundError, match="safetensors file only"):
        ImageCLIPTokenizer(model_name=None, model_config=TINY_CLIP, checkpoint=str(tmp_path / "clip.pt"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ImageCLIPTokenizer(model_name="no-such-model")


def test_model_understands_but_never_generates_clip_images(tmp_path):
    model, proc = make_tiny(modalities={"image": {"tokenizer": SPEC}})
    assert "image" not in model.heads and model.config.modalities["image"].can_generate is False
    img = np.random.default_rng(1).integers(0, 256, (16, 16), dtype=np.uint8)
    batch = proc([[Message("user", [Image(img), "which digit is this?"]), Message("assistant", "7")]])
    out = model(**batch)
    out.loss.backward()
    assert model.projections["image"][0].weight.grad.abs().sum() > 0  # the projector learns
    with pytest.raises(ValueError, match="understanding only"):
        model(**proc([[Message("user", "draw a 7"), Message("assistant", [Image(img)])]]))
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    model, proc = MMARModel.from_pretrained(tmp_path).eval(), MMARProcessor.from_pretrained(tmp_path)
    start = proc.token_ids["image"]["start"]
    with torch.no_grad():
        model.lm_head.weight[start] += 10.0  # the model would love to open an image...
    p = proc.collate([proc.encode([Message("user", [Image(img), "which digit is this?"])],
                                  add_generation_prompt=True)], padding_side="left")
    gen = generate(model, p["input_ids"], p["attention_mask"], p["values"], max_new_tokens=4, temperature=0.0)
    assert start not in gen.token_ids[0]  # ...but it cannot
    with pytest.raises(ValueError, match="understanding only"):
        generate(model, p["input_ids"], p["attention_mask"], p["values"], mode="image")
