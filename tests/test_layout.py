"""The einops layout helpers: exact round trips on square and non-square grids, and the same token
order as the hand-written reshape / permute they replaced (so saved models read their tokens alike)."""

import pytest
import torch

from mmar.tokenizers.layout import frames_to_tokens, patch_grid, patchify, tokens_to_frames, unpatchify


@pytest.mark.parametrize("height,width", [(8, 8), (8, 12), (12, 8), (16, 24), (4, 32)])
@pytest.mark.parametrize("patch", [1, 2, 4])
@pytest.mark.parametrize("channels", [1, 3])
def test_patchify_round_trip_is_exact(height, width, patch, channels):
    x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    tokens = patchify(x, patch)
    rows, cols = patch_grid(height, width, patch)
    assert tokens.shape == (2, rows * cols, patch * patch * channels)
    assert torch.equal(unpatchify(tokens, rows, cols, patch), x)


def test_patchify_matches_the_old_square_layout():
    b, c, p, g = 3, 3, 2, 4
    x = torch.randn(b, c, g * p, g * p, generator=torch.Generator().manual_seed(1))
    old = x.reshape(b, c, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(b, g * g, p * p * c)
    assert torch.equal(patchify(x, p), old)
    back = old.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)
    assert torch.equal(unpatchify(old, g, g, p), back)


def test_non_square_tokens_are_raster_order():
    # a 2x3 grid of 2x2 patches on a 4x6 image: token k covers row k // 3, column k % 3
    x = torch.arange(24, dtype=torch.float32).reshape(1, 1, 4, 6)
    tokens = patchify(x, 2)[0]
    assert tokens.shape == (6, 4)
    assert tokens[0].tolist() == [0, 1, 6, 7] and tokens[2].tolist() == [4, 5, 10, 11]
    assert tokens[3].tolist() == [12, 13, 18, 19]


def test_bad_grids_raise_clear_errors():
    with pytest.raises(ValueError, match="10x8 grid cannot be cut into 4x4"):
        patchify(torch.zeros(1, 1, 10, 8), 4)
    with pytest.raises(ValueError, match=r"tokens \[B, 6, dim\] for a 2x3 grid"):
        unpatchify(torch.zeros(1, 5, 4), 2, 3, 2)


@pytest.mark.parametrize("frames_per_token", [1, 2, 4])
def test_spectrogram_frames_round_trip(frames_per_token):
    spec = torch.randn(2, 5, 8 * frames_per_token, generator=torch.Generator().manual_seed(2))
    tokens = frames_to_tokens(spec, frames_per_token)
    assert tokens.shape == (2, 8, frames_per_token * 5)
    old = spec.transpose(1, 2).reshape(2, 8, frames_per_token * 5)  # frame-major, as before
    assert torch.equal(tokens, old)
    assert torch.equal(tokens_to_frames(tokens, frames_per_token), spec)
