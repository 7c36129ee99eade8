import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from mmar.tokenizers import (ImagePatchTokenizer, ModalityTokenizer, add_modality_tokens, available_tokenizers,
                             build_tokenizer, modality_token_ids, train_bpe_tokenizer)


def test_registry_builds_by_name():
    assert "image-patch" in available_tokenizers()
    tok = build_tokenizer({"name": "image-patch", "image_size": 8, "patch_size": 2})
    assert isinstance(tok, ImagePatchTokenizer) and tok.token_dim == 4 and tok.num_tokens() == 16
    with pytest.raises(ValueError, match="unknown tokenizer 'nope'"):
        build_tokenizer({"name": "nope"})


@pytest.mark.parametrize("channels,patch", [(1, 2), (1, 1), (3, 4), (1, 8)])
def test_image_patch_round_trip_is_exact(channels, patch, rng):
    tok = ImagePatchTokenizer(image_size=8, patch_size=patch, channels=channels)
    shape = (8, 8) if channels == 1 else (8, 8, 3)
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels = tok.preprocess(arr)
    tokens = tok.encode(pixels[None])
    assert tokens.shape == (1, (8 // patch) ** 2, patch * patch * channels)
    assert np.array_equal(np.asarray(tok.decode(tokens)[0]), arr)


def test_patches_are_raster_order_and_normalised():
    tok = ImagePatchTokenizer(image_size=4, patch_size=2, channels=1)
    pixels = torch.arange(16, dtype=torch.float32).reshape(1, 4, 4) / 15
    tokens = tok.encode(pixels[None])[0]
    # first token = top-left 2x2 patch; second = top-right
    assert torch.allclose(tokens[0], (torch.tensor([0, 1, 4, 5]) / 15 - 0.5) / 0.5)
    assert torch.allclose(tokens[1], (torch.tensor([2, 3, 6, 7]) / 15 - 0.5) / 0.5)


def test_save_and_load(tmp_path):
    tok = ImagePatchTokenizer(image_size=16, patch_size=4, channels=3, resize=True)
    tok.save_pretrained(tmp_path)
    again = ModalityTokenizer.from_pretrained(tmp_path)
    assert again.config() == tok.config()


def test_bad_images_raise_clear_errors(tmp_path):
    tok = ImagePatchTokenizer(image_size=8, patch_size=2, channels=1)
    with pytest.raises(ValueError, match="16x16.*takes 8x8"):
        tok.preprocess(PILImage.new("L", (16, 16)))
    with pytest.raises(ValueError, match="NaN"):
        tok.preprocess(torch.full((1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tok.preprocess(torch.full((1, 8, 8), 3.0))
    with pytest.raises(ValueError, match="shape"):
        tok.preprocess(torch.zeros(3, 8, 8))
    with pytest.raises(TypeError, match="cannot read an image from dict"):
        tok.preprocess({"a": 1})
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tok.preprocess(str(missing))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="corrupt.png: not a readable image"):
        tok.preprocess(str(corrupt))
    with pytest.raises(ValueError, match="not a multiple"):
        ImagePatchTokenizer(image_size=8, patch_size=3)


def test_rgb_and_files_are_converted(tmp_path):
    tok = ImagePatchTokenizer(image_size=8, patch_size=2, channels=1)
    path = tmp_path / "digit.png"
    PILImage.new("RGB", (8, 8), (255, 255, 255)).save(path)
    assert torch.allclose(tok.preprocess(str(path)), torch.ones(1, 8, 8))
    big = ImagePatchTokenizer(image_size=8, patch_size=2, channels=1, resize=True)
    assert big.preprocess(PILImage.new("L", (32, 32), 255)).shape == (1, 8, 8)


def test_text_tokenizer_special_ids_are_derived():
    tok = train_bpe_tokenizer(["draw the digit seven", "which digit is this?"], vocab_size=280)
    ids = add_modality_tokens(tok, ["image"])
    assert ids == modality_token_ids(tok, ["image"])
    assert tok.convert_ids_to_tokens(ids["image"]["start"]) == "<|image_start|>"
    assert len(set(ids["image"].values())) == 3
    # a special token is one id, never split
    assert tok.encode("<|image|>", add_special_tokens=False) == [ids["image"]["token"]]
    with pytest.raises(ValueError, match="no '<\\|audio_start\\|>' token"):
        modality_token_ids(tok, ["audio"])
