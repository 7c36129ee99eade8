"""Images of several sizes: tokenizers take height x width, the sequence carries a size marker, the
model gives every token its (row, column) cell; square single-size models keep the old layout."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from mmar import Image, Message
from mmar.sequence import grid_positions
from mmar.tokenizers import (ImagePatchTokenizer, ImageVAETokenizer, ImageVQTokenizer, ModalityTokenizer,
                             add_modality_tokens, build_tokenizer, marked_sizes, size_token_ids, train_bpe_tokenizer)

from .conftest import make_tiny

SIZES = [[8, 12], [12, 8], [8, 8]]
MULTI = {"image": {"tokenizer": {"name": "image-patch", "sizes": SIZES, "patch_size": 2, "channels": 1},
                   "head": {"width": 32, "depth": 2, "num_inference_steps": 5}}}


@pytest.fixture(scope="module")
def multi():
    return make_tiny(modalities=MULTI)


@pytest.mark.parametrize("size", [(8, 12), (12, 8), (8, 8)])
def test_patch_tokenizer_round_trips_every_size(size, rng):
    tok = ImagePatchTokenizer(sizes=SIZES, patch_size=2)
    arr = rng.integers(0, 256, size, dtype=np.uint8)
    pixels = tok.preprocess(arr)
    assert pixels.shape == (1, *size) and tok.size_of(pixels) == size
    tokens = tok.encode(pixels[None])
    assert tokens.shape == (1, tok.num_tokens(size), 4) and tok.num_tokens(pixels) == size[0] * size[1] // 4
    assert np.array_equal(np.asarray(tok.decode(tokens, size=size)[0]), arr)


def test_default_size_and_config_round_trip(tmp_path):
    tok = ImagePatchTokenizer(sizes=SIZES, patch_size=4)
    assert tok.size == (8, 12) and tok.image_size == [8, 12] and tok.grid == (2, 3) and tok.marks_size
    tok.save_pretrained(tmp_path)
    again = ModalityTokenizer.from_pretrained(tmp_path)
    assert again.config() == tok.config() and again.sizes == [(8, 12), (12, 8), (8, 8)]
    square = ImagePatchTokenizer(image_size=8, patch_size=2)  # one size: no sizes key, as saved before
    assert "sizes" not in square.config() and not square.marks_size and not marked_sizes(square)
    with pytest.raises(ValueError, match="not among sizes"):
        ImagePatchTokenizer(image_size=16, sizes=SIZES)
    with pytest.raises(ValueError, match="not a multiple of patch_size 4"):
        ImagePatchTokenizer(sizes=[[8, 12], [8, 10]], patch_size=4)


def test_other_sizes_are_refused_or_padded_never_stretched():
    tok = ImagePatchTokenizer(sizes=[[8, 12], [12, 8]], patch_size=2)
    with pytest.raises(ValueError, match="takes 8x12 or 12x8"):
        tok.preprocess(PILImage.new("L", (10, 10)))
    fit = ImagePatchTokenizer(sizes=[[8, 12], [12, 8]], patch_size=2, resize=True)
    tall = PILImage.new("L", (10, 20), 255)  # width 10, height 20: nearest aspect is 12x8 (h x w)
    with pytest.warns(UserWarning, match="padded to 12x8"):
        pixels = fit.preprocess(tall)
    assert pixels.shape == (1, 12, 8)
    assert pixels[0, :, 0].max() == 0 and pixels[0, :, 2:6].min() == 1  # black bars left and right
    same_aspect = PILImage.new("L", (24, 16), 255)  # 16x24 -> 8x12: a plain resize, no padding
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fit.preprocess(same_aspect).shape == (1, 8, 12)


def test_vae_and_vq_tokenizers_take_sizes(rng):
    vae = ImageVAETokenizer(vae_config={"block_out_channels": [8, 8], "latent_channels": 2, "norm_num_groups": 4,
                                        "in_channels": 1, "out_channels": 1}, sizes=[[8, 16], [16, 8]], patch_size=2)
    assert vae.grid_of((8, 16)) == (2, 4) and vae.num_tokens((16, 8)) == 8
    x = torch.rand(1, 1, 16, 8)
    assert vae.decode_pixels(vae.encode(x), size=(16, 8)).shape == (1, 1, 16, 8)
    with pytest.raises(ValueError, match="multiple of 4"):
        ImageVAETokenizer(vae_config={"block_out_channels": [8, 8], "latent_channels": 2, "norm_num_groups": 4},
                          sizes=[[8, 8], [8, 6]], patch_size=2)
    vq = ImageVQTokenizer(codebook_size=8, sizes=[[4, 8], [8, 4]], patch_size=2)
    vq.fit(torch.rand(16, 1, 4, 8), steps=2, batch_size=16)
    codes = vq.encode(torch.rand(2, 1, 8, 4))
    assert codes.shape == (2, 8) and vq.decode(codes, size=(8, 4))[0].size == (4, 8)  # PIL: (width, height)
    assert vq.config()["sizes"] == [[4, 8], [8, 4]]


def test_size_markers_are_special_tokens_read_back():
    tok = train_bpe_tokenizer(["draw a digit"], vocab_size=280)
    add_modality_tokens(tok, MULTI)
    ids = size_token_ids(tok, "image", [(8, 12), (12, 8), (8, 8)])
    assert len(set(ids)) == 3 and tok.convert_ids_to_tokens(ids[0]) == "<|image_8x12|>"
    assert tok.encode("<|image_12x8|>", add_special_tokens=False) == [ids[1]]
    with pytest.raises(ValueError, match="no '<\\|image_16x16\\|>' size marker"):
        size_token_ids(tok, "image", [(16, 16)])


def test_sequence_carries_the_size_after_the_start_token(multi, rng):
    _, proc = multi
    tid = proc.token_ids["image"]
    img = rng.integers(0, 256, (12, 8), dtype=np.uint8)
    enc = proc.encode([Message("user", "draw a 3"), Message("assistant", [Image(img)])])
    start = enc.input_ids.index(tid["start"])
    marker = proc.size_ids["image"][(12, 8)]
    assert enc.input_ids[start + 1] == marker and enc.labels[start + 1] == marker  # the LM head learns it
    assert enc.input_ids[start + 2: start + 2 + 24] == [tid["token"]] * 24 and enc.input_ids[start + 26] == tid["end"]
    opened = proc.encode([Message("user", "draw a 3")], add_generation_prompt=True, start_modality="image",
                         start_size=(8, 12))
    assert opened.input_ids[-2:] == [tid["start"], proc.size_ids["image"][(8, 12)]]
    with pytest.raises(ValueError, match="16x16 given; this model's images are 8x12, 12x8, 8x8"):
        proc.encode([Message("user", "x")], add_generation_prompt=True, start_modality="image", start_size=(16, 16))
    with pytest.raises(ValueError, match="reserved token"):
        proc.encode_text("a <|image_8x12|> b")


def test_grid_positions_follow_each_items_marker():
    # ids: 1 = start, 2 = placeholder, 7 / 8 = markers of a 2x3 and a 3x2 grid, 0 = text; table width 3
    row = [0, 1, 7] + [2] * 6 + [0, 1, 8] + [2] * 6
    pos = grid_positions(torch.tensor([row, [0] * 9 + row[9:]]), 1, 2, [7, 8], [(2, 3), (3, 2)], width=3)
    first = [0, 1, 2, 3, 4, 5]  # 2x3: rows of three
    second = [0, 1, 3, 4, 6, 7]  # 3x2: rows of two in a table three wide
    assert pos.tolist() == first + second + second
    with pytest.raises(ValueError, match="without a size marker"):
        grid_positions(torch.tensor([[1, 2, 2]]), 1, 2, [7], [(1, 2)], width=2)


def test_model_of_several_sizes_trains_and_round_trips(multi, tmp_path, rng):
    from mmar import MMARModel, MMARProcessor

    model, proc = multi
    spec = model.config.modalities["image"]
    assert spec.grids == [[4, 6], [6, 4], [4, 4]] and spec.to_dict()["sizes"] == SIZES
    assert model.pos_embeds["image"].num_embeddings == 36
    samples = [[Message("user", "draw a 3"), Message("assistant", [Image(rng.integers(0, 256, s, dtype=np.uint8))])]
               for s in [(8, 12), (12, 8), (8, 8)]]
    batch = proc(samples)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # the cells differ between the sizes: the same token index sits in another row for 8x12 and 12x8
    index = model.item_positions("image", batch["input_ids"])
    assert index[:24].tolist() != index[24:48].tolist() and index.max() < 36
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    again, proc2 = MMARModel.from_pretrained(tmp_path).eval(), MMARProcessor.from_pretrained(tmp_path)
    assert proc2.size_ids == proc.size_ids
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "values")}
    with torch.no_grad():  # the diffusion loss draws noise; the hidden states are deterministic
        assert torch.allclose(again(**inputs).hidden_states, model(**inputs).hidden_states, atol=1e-6)


def test_square_models_keep_the_old_layout(tiny):
    model, proc = tiny
    spec = model.config.modalities["image"]
    assert not proc.size_ids and spec.grids is None and "grids" not in spec.to_dict()
    assert model.pos_embeds["image"].num_embeddings == 16 and build_tokenizer(
        model.config.modalities["image"]["tokenizer"]).config() == proc.modality_tokenizers["image"].config()


# -- sampling: per-row grids in one batch ------------------------------------------------------------------
def _sample(model, proc, prompts, seeds, start_sizes, sizes, **kw):
    from mmar.generation import generate

    enc = [proc.encode(p, add_generation_prompt=True, start_modality="image", start_size=s)
           for p, s in zip(prompts, start_sizes)]
    batch = proc.collate(enc, padding_side="left")
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return generate(model, batch["input_ids"], batch["attention_mask"], batch["values"], generator=gens,
                    decode_text=proc.decode_text, mode="image", sizes=sizes, **kw)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_batch_of_mixed_sizes_equals_each_row_alone(multi, guidance):
    model, proc = multi
    # row 0: the prompt carries the marker; row 1: the size is asked for; row 2: the model picks it
    prompts = [[Message("user", "draw the digit seven")], [Message("user", "a handwritten 3")],
               [Message("user", "draw a 5 for me please, a big one")]]
    start_sizes, sizes, seeds = [(8, 12), None, None], [None, {"image": (12, 8)}, None], [0, 1, 2]
    kw = dict(guidance_scale=guidance, max_new_tokens=4, max_items=1, temperature=1.0)
    batch = _sample(model, proc, prompts, seeds, start_sizes, sizes, **kw)
    for b in range(3):
        alone = _sample(model, proc, prompts[b:b + 1], seeds[b:b + 1], start_sizes[b:b + 1], sizes[b:b + 1], **kw)
        assert alone.token_ids[0] == batch.token_ids[b]
        (m, tokens, size), = [s for s in batch.segments[b] if not isinstance(s, str)]
        (m2, tokens2, size2), = [s for s in alone.segments[0] if not isinstance(s, str)]
        assert size == size2 and torch.allclose(tokens, tokens2, atol=1e-5)
        assert tokens.shape == (size[0] * size[1] // 4, 4)  # the number of tokens follows from the size
    assert [s for s in batch.segments[0] if not isinstance(s, str)][0][2] == (8, 12)
    assert [s for s in batch.segments[1] if not isinstance(s, str)][0][2] == (12, 8)
    marker_ids = set(proc.size_ids["image"].values())
    assert sum(t in marker_ids for t in batch.token_ids[2]) == 1  # the model chose one size itself


def test_pipeline_draws_the_size_asked_for(multi):
    from mmar.pipeline import MMARPipeline

    model, proc = multi
    pipe = MMARPipeline(model, proc)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.image_sizes() == [(8, 12), (12, 8), (8, 8)]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    out = pipe(["draw a 3", "draw a 4"], mode="image", height=12, width=8, generator=gens, max_items=1)
    assert [imgs[0].size for imgs in out.images] == [(8, 12), (8, 12)]  # PIL: (width, height)
    assert out.latents[0][0][2] == (12, 8)
    streamed = [x for x in pipe.stream("draw a 3", mode="image", height=8, width=12, max_items=1,
                                       generator=torch.Generator().manual_seed(0)) if not isinstance(x, str)]
    assert streamed[0].size == (12, 8)
    with pytest.raises(ValueError, match="height=16, width=16: this model draws images of 8x12, 12x8, 8x8"):
        pipe("draw a 3", mode="image", height=16, width=16)
    with pytest.raises(ValueError, match="give both height and width"):
        pipe("draw a 3", mode="image", height=8)
    assert pipe.image_size(height=12) == (12, 8)  # one trained size has this height


def test_understanding_inputs_of_another_size_are_fitted_with_a_note(multi):
    from mmar.pipeline import MMARPipeline

    pipe = MMARPipeline(*multi)
    with pytest.warns(UserWarning, match="padded to 8x12 .*trained on 8x12, 12x8, 8x8"):
        img = pipe.load_image(PILImage.new("L", (40, 20), 255))  # 20x40: wider than any trained size
    assert img.size == (12, 8)
    out = pipe([[Message("user", [Image(img), "which digit is this?"])]], mode="text", max_new_tokens=2,
               temperature=0.0)
    assert isinstance(out.text[0], str)


def test_cli_generate_takes_height_and_width(multi, tmp_path):
    import json

    from mmar.app.cli import main

    model, proc = multi
    model.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", "draw a 3", "--mode", "image",
                 "--height", "8", "--width", "12", "--output", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert (record["height"], record["width"]) == (8, 12)
    assert PILImage.open(record["outputs"][0]["files"][0]).size == (12, 8)


def test_demo_generate_tab_offers_the_trained_sizes(multi):
    gr = pytest.importorskip("gradio")
    from mmar.app.demo import _Handlers, build_demo
    from mmar.pipeline import MMARPipeline

    pipe = MMARPipeline(*multi)
    pipe.set_progress_bar_config(disable=True)
    demo = build_demo(pipe)
    sizes = [c for c in demo.blocks.values() if isinstance(c, gr.Dropdown) and c.elem_id == "gen-size"]
    assert len(sizes) == 1 and [v for v, _ in sizes[0].choices] == ["8x12", "12x8", "8x8"]
    handlers = _Handlers(pipe, 8, 100, 2)  # owns the folder of the shown images while it lives
    gallery = handlers.generate("draw a 3", 3.0, 2, 0, 1, "12x8")
    width, height = PILImage.open(gallery[0][0]).size  # scaled up for display, pixel-exact
    assert height * 8 == width * 12


def test_digits_of_several_sizes_dataset_and_evaluator(multi, tmp_path):
    from mmar.data.digits import MIXED_SIZES, crop_digit, pad_digit
    from mmar.data.registry import build_dataset
    from mmar.eval import evaluate
    from mmar.pipeline import MMARPipeline

    digit = np.arange(64, dtype=np.uint8).reshape(8, 8)
    padded = pad_digit(digit, (8, 12))
    assert padded.shape == (8, 12) and padded[:, :2].max() == 0 and np.array_equal(crop_digit(padded), digit)
    data = build_dataset("digits-sizes", "train", pairs_per_image=0.1)
    seen = {np.asarray(seg.image).shape for i in range(60) for m in data[i] for seg in m.content
            if isinstance(seg, Image)}
    assert seen == set(MIXED_SIZES)
    pipe = MMARPipeline(*multi)
    metrics = evaluate("digits-sizes", "tiny", pipeline=pipe, per_digit=1, num_heldout=4, num_inference_steps=2,
                       output=str(tmp_path / "m.json"))
    assert set(metrics["sizes"]) == {"8x12", "12x8", "8x8"}
    assert all(m["requested_size_rate"] == 1.0 and m["n_generated"] == 10 for m in metrics["sizes"].values())
    assert metrics["gap_to_square_points"] is not None and (tmp_path / "m_grid.png").exists()
