"""Editing: dual classifier-free guidance (InstructPix2Pix / BAGEL) over three branches of one batch —
full (instruction + input image), items (input image only), none — through the sampler, the pipeline,
the CLI and the demo, on tiny untrained models."""

import json

import pytest
import torch
from PIL import Image as PILImage

from mmar import Image, Message, MMARProcessor, build_model, build_tokenizer
from mmar.datasets.digits import all_texts, load_digit_split
from mmar.generation import GenerationDefaults, Sampler, generate
from mmar.generation.branches import branch_masks, branch_names
from mmar.generation.tables import token_tables
from mmar.heads import DiffusionHead, FlowHead
from mmar.heads.codebook import CodebookHead
from mmar.heads.guidance import guide
from mmar.pipeline import MMARPipeline
from mmar.tokenizers import add_modality_tokens, train_bpe_tokenizer
from tests.conftest import TINY_BACKBONE, TINY_MODALITIES

EDIT = "make it a 3"


@pytest.fixture(scope="module")
def digits():
    x, _ = load_digit_split("test")
    return x


@pytest.fixture(scope="module")
def chatml():
    """A tiny model whose tokenizer has ChatML turn markers (role prefixes the items branch must hide)."""
    torch.manual_seed(0)
    tok = train_bpe_tokenizer(all_texts() + ["user", "assistant", EDIT], vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    add_modality_tokens(tok, TINY_MODALITIES)
    model = build_model(dict(TINY_BACKBONE), tok, TINY_MODALITIES).eval()
    for p in model.heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    proc = MMARProcessor(tok, {m: build_tokenizer(s["tokenizer"]) for m, s in TINY_MODALITIES.items()})
    assert proc.chat is not None
    return model, proc


def _batch(proc, prompts, start="image"):
    enc = [proc.encode(p, add_generation_prompt=True, start_modality=start) for p in prompts]
    return proc.collate(enc, padding_side="left")


def _run(model, proc, batch, seeds, **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return generate(model, batch["input_ids"], batch["attention_mask"], batch["values"], generator=gens,
                    decode_text=proc.decode_text, **kw)


def _latents(out):
    return [[s[1] for s in row if not isinstance(s, str)] for row in out.segments]


def _edit(img, text=EDIT):
    return [Message("user", [Image(img), text])]


# -- the combination ---------------------------------------------------------------------------
def test_guide_is_instructpix2pix_formula():
    torch.manual_seed(0)
    full, items, none = torch.randn(3, 5, 4).unbind(0)
    out = torch.cat([full, items, none])
    assert torch.allclose(guide(out, 3, 1.0, 1.0), full, atol=1e-6)  # both scales 1: no guidance
    want = none + 1.5 * (items - none) + 4.0 * (full - items)
    assert torch.allclose(guide(out, 3, 4.0, 1.5), want)
    # the items branch equal to none (a prompt without an input image): single guidance
    same = torch.cat([full, none, none])
    assert torch.allclose(guide(same, 3, 4.0, 1.5), guide(torch.cat([full, none]), 2, 4.0), atol=1e-6)


@pytest.mark.parametrize("head", [
    DiffusionHead(token_dim=4, cond_dim=8, width=16, depth=2, num_inference_steps=4),
    FlowHead(token_dim=4, cond_dim=8, width=16, depth=2, num_inference_steps=4),
    CodebookHead(cond_dim=8, vocab_size=11, width=16)])
def test_heads_take_three_branches(head):
    torch.manual_seed(1)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    cond, items, none = torch.randn(3, 6, 8).unbind(0)

    def draw(**kw):
        return head.sample(cond, generator=torch.Generator().manual_seed(2), temperature=1.0, **kw)

    plain = draw()
    ones = draw(uncond=(items, none), guidance_scale=1.0, image_guidance_scale=1.0)
    assert torch.allclose(ones.float(), plain.float(), atol=1e-5)
    # identical branches: whatever the scales, the output is the conditional one
    assert torch.allclose(draw(uncond=(cond, cond), guidance_scale=5.0, image_guidance_scale=3.0).float(),
                          plain.float(), atol=1e-4)
    if not isinstance(head, CodebookHead):  # codes can coincide; latents must move
        assert not torch.allclose(draw(uncond=(items, none), guidance_scale=3.0, image_guidance_scale=1.5),
                                  plain, atol=1e-3)


# -- what each branch sees ---------------------------------------------------------------------
def _visible(batch, masks, name, row=0):
    ids = batch["input_ids"][row]
    return ids[masks.of(name)[row].bool()].tolist()


@pytest.mark.parametrize("fixture", ["tiny", "chatml"])
def test_branch_masks_hide_what_they_must(request, fixture, digits):
    model, proc = request.getfixturevalue(fixture)
    batch = _batch(proc, [_edit(digits[0]), [Message("user", "draw a 7")]])
    t = token_tables(model, "image", None, None)
    names = branch_names(True, 1.5)
    assert names == ("full", "items", "none") and branch_names(True, None) == ("full", "none")
    opened = torch.ones(2, dtype=torch.bool)
    masks = branch_masks(batch["input_ids"], batch["attention_mask"], t, names, opened, ~opened)
    ids = proc.token_ids["image"]
    n = proc.modality_tokenizers["image"].num_tokens()
    input_image = [ids["start"]] + [ids["token"]] * n + [ids["end"]]
    bos = [proc.bos_id]
    real = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert _visible(batch, masks, "full") == real  # the whole prompt, instruction and chat markers included
    assert _visible(batch, masks, "items") == bos + input_image + [ids["start"]]
    assert _visible(batch, masks, "none") == bos + [ids["start"]]
    # the items branch is the layout condition dropout trains an edit sample on: the prompt's text (and
    # the chat markers) dropped, its items kept, then the answer's image
    sample = _edit(digits[0]) + [Message("assistant", [Image(digits[1])])]
    dropped = proc.encode(sample, drop_prompt=True).input_ids
    seen = _visible(batch, masks, "items")
    assert dropped[:len(seen)] == seen and dropped[len(seen):len(seen) + n] == [ids["token"]] * n
    # a prompt without items: the items branch sees what none sees
    assert _visible(batch, masks, "items", 1) == _visible(batch, masks, "none", 1) == bos + [ids["start"]]
    # what a guidance row is reset to when its row opens an item later: the same, without the start token
    B = 2
    assert batch["input_ids"][0][masks.reset[0].bool()].tolist() == bos + input_image
    assert batch["input_ids"][0][masks.reset[B].bool()].tolist() == bos


def test_sampler_rows_see_only_their_branch_while_drawing(chatml, digits, monkeypatch):
    """Auto mode: the row opens its item during generation; afterwards each branch's mask (read off the
    sampler) shows the full row everything, the items row BOS + input image + the drawn item's tokens,
    the none row BOS + the drawn item's tokens."""
    model, proc = chatml
    batch = _batch(proc, [_edit(digits[0])], start=None)
    ids = proc.token_ids["image"]
    original = model.lm_head.forward
    boost = torch.zeros(model.lm_head.out_features)
    boost[ids["start"]] = 50.0  # the untrained model opens an image at its first text step
    monkeypatch.setattr(model.lm_head, "forward", lambda h: original(h) + boost)
    received, decoder = [], model.decoder.forward  # what the backbone itself is given, call by call

    def recording(*args, **kw):
        received.append((kw["attention_mask"].clone(), kw["position_ids"].clone()))
        return decoder(*args, **kw)

    monkeypatch.setattr(model.decoder, "forward", recording)
    settings = GenerationDefaults(guidance_scale=2.0, image_guidance_scale=1.5, max_new_tokens=3, max_items=1)
    s = Sampler(model, batch["input_ids"], batch["attention_mask"], batch["values"], settings, mode="auto",
                decode_text=None, generator=[torch.Generator().manual_seed(0)], suppress_ids=None,
                eos_token_id=proc.stop_id, progress=False, callback=None)
    out = s.run()
    columns = batch["input_ids"][0].tolist() + out.token_ids[0]
    columns = torch.tensor(columns[:s.length])
    mask = s.mask[:, :s.length].bool()
    n = proc.modality_tokenizers["image"].num_tokens()
    drawn = [ids["start"]] + [ids["token"]] * n
    input_image = [ids["start"]] + [ids["token"]] * n + [ids["end"]]
    assert out.token_ids[0][:n + 2] == drawn + [ids["end"]]  # the item was drawn and closed
    assert columns[mask[0]].tolist() == columns.tolist()
    assert columns[mask[1]].tolist() == [proc.bos_id] + input_image + drawn
    assert columns[mask[2]].tolist() == [proc.bos_id] + drawn
    assert s.branches == ("full", "items", "none") and mask.shape[0] == 3
    # the backbone got these masks: from the first drawn latent on, each call's is a prefix of the final one
    # (the guidance rows reset once, when the row opened its item), and each guidance row's newest
    # position counts only the columns it sees
    for got, pos in received[2:]:
        width = got.shape[1]
        assert torch.equal(got.bool(), mask[:, :width])
        assert pos[:, -1].tolist() == [int(got[r].sum()) - 1 for r in range(3)]
    assert received[-1][0].shape[1] == s.length - 1  # the last step writes a column no call reads


# -- the sampler -------------------------------------------------------------------------------
def test_both_scales_one_equals_no_guidance(tiny, digits):
    model, proc = tiny
    b = _batch(proc, [_edit(digits[0])])
    kw = dict(mode="image", max_new_tokens=3, max_items=1)
    plain = _run(model, proc, b, [3], **kw)
    ones = _run(model, proc, b, [3], guidance_scale=1.0, image_guidance_scale=1.0, **kw)
    assert plain.token_ids == ones.token_ids
    assert torch.allclose(_latents(plain)[0][0], _latents(ones)[0][0], atol=1e-4)
    edited = _run(model, proc, b, [3], guidance_scale=3.0, image_guidance_scale=1.5, **kw)
    single = _run(model, proc, b, [3], guidance_scale=3.0, **kw)
    assert not torch.allclose(_latents(edited)[0][0], _latents(plain)[0][0], atol=1e-3)
    assert not torch.allclose(_latents(edited)[0][0], _latents(single)[0][0], atol=1e-3)  # the image counts


def test_unset_image_scale_is_single_guidance_and_no_image_makes_them_equal(tiny):
    """image_guidance_scale None: two branches, the output of single guidance. A prompt without an
    input image: the items branch sees what none sees, so dual guidance equals single guidance."""
    model, proc = tiny
    b = _batch(proc, [[Message("user", "draw the digit seven")]])
    kw = dict(mode="image", max_new_tokens=3, max_items=1, guidance_scale=3.0)
    single = _run(model, proc, b, [5], **kw)
    unset = _run(model, proc, b, [5], image_guidance_scale=None, **kw)
    dual = _run(model, proc, b, [5], image_guidance_scale=2.5, **kw)
    assert torch.equal(_latents(single)[0][0], _latents(unset)[0][0])
    assert single.token_ids == dual.token_ids
    assert torch.allclose(_latents(single)[0][0], _latents(dual)[0][0], atol=1e-4)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batch_of_edits_equals_each_alone(chatml, digits, use_cache):
    model, proc = chatml
    prompts = [_edit(digits[0]), _edit(digits[1], "turn this digit into a seven please"), _edit(digits[2], "a 1")]
    kw = dict(mode="image", max_new_tokens=3, max_items=1, guidance_scale=2.5, image_guidance_scale=1.5,
              use_cache=use_cache)
    batch = _run(model, proc, _batch(proc, prompts), [20, 21, 22], **kw)
    for i, p in enumerate(prompts):
        alone = _run(model, proc, _batch(proc, [p]), [20 + i], **kw)
        assert alone.token_ids[0] == batch.token_ids[i]
        assert torch.allclose(_latents(alone)[0][0], _latents(batch)[i][0], atol=1e-5)


def test_image_guidance_scale_is_validated(tiny):
    for bad in ("1.5", float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="image_guidance_scale"):
            GenerationDefaults(image_guidance_scale=bad)
    model, proc = tiny
    b = _batch(proc, [[Message("user", "draw")]])
    with pytest.raises(ValueError, match="image_guidance_scale"):
        _run(model, proc, b, [0], mode="image", image_guidance_scale=float("nan"))


def test_a_head_without_dual_guidance_is_a_clear_error(tiny, monkeypatch):
    model, proc = tiny
    head = model.heads["image"]
    monkeypatch.setattr(head, "sample", lambda cond, uncond=None, guidance_scale=1.0, **kw: cond[:, :4])
    b = _batch(proc, [[Message("user", "draw")]])
    with pytest.raises(ValueError, match="image_guidance_scale.*no dual guidance"):
        _run(model, proc, b, [0], mode="image", image_guidance_scale=1.5)


# -- the front doors ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_dir):
    p = MMARPipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    return p


def test_pipeline_edits_like_the_sampler(pipe, digits):
    model, proc = pipe.model, pipe.processor
    kw = dict(guidance_scale=2.0, image_guidance_scale=1.5, max_new_tokens=3, max_items=1)
    out = pipe([EDIT], images=[[digits[0]]], mode="image", generator=[torch.Generator().manual_seed(7)],
               output_type="latent", **kw)
    b = _batch(proc, [[Message("user", [Image(pipe.load_image(digits[0])), EDIT])]])
    ref = _run(model, proc, b, [7], mode="image", eos_token_id=proc.stop_id,
               suppress_ids=proc.tokenizer.all_special_ids, **kw)
    assert torch.allclose(out.latents[0][0][1], _latents(ref)[0][0], atol=1e-5)
    img = pipe(EDIT, images=[digits[0]], mode="image", generator=torch.Generator().manual_seed(7),
               **kw).images[0][0]
    assert isinstance(img, PILImage.Image) and img.size == (8, 8)


def test_cli_writes_the_edited_image(tiny_dir, digits, tmp_path, capsys):
    from mmar.cli import main

    src = tmp_path / "in.png"
    PILImage.fromarray(digits[0]).save(src)
    out = tmp_path / "out"
    argv = ["generate", "--model", str(tiny_dir), "--image", str(src), "--prompt", EDIT, "--mode", "image",
            "--guidance_scale", "2", "--image_guidance_scale", "1.5", "--max_new_tokens", "3", "--output", str(out)]
    assert main(argv) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["image_guidance_scale"] == 1.5 and record["guidance_scale"] == 2.0
    assert record["images"] == [str(src)] and record["outputs"][0]["files"] == [str(out / "sample0_0.png")]
    edited = PILImage.open(out / "sample0_0.png")
    assert edited.size == (8, 8)
    p = MMARPipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    want = p(EDIT, images=[str(src)], mode="image", generator=[torch.Generator().manual_seed(0)],
             guidance_scale=2.0, image_guidance_scale=1.5, max_new_tokens=3).images[0][0]
    assert list(edited.convert(want.mode).getdata()) == list(want.getdata())
    capsys.readouterr()
    assert main(argv[:-2] + ["--image_guidance_scale", "nan", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the weight-loading progress bar)
    assert err == "mmar generate: error: image_guidance_scale must be finite, got nan"


def test_demo_edit_handler(pipe, digits, tmp_path):
    gr = pytest.importorskip("gradio")
    from mmar.demo import _Handlers

    src = tmp_path / "in.png"
    PILImage.fromarray(digits[0]).resize((32, 32)).save(src)  # any size: fitted to the model's
    h = _Handlers(pipe, max_new_tokens=4, max_prompt_chars=40, max_images=2)
    path = h.edit(str(src), EDIT, 2.0, 1.5, 4, 9)
    shown = PILImage.open(path)
    want = pipe(EDIT, images=[pipe.load_image(str(src))], mode="image", max_items=1, guidance_scale=2.0,
                image_guidance_scale=1.5,
                num_inference_steps=4, generator=[torch.Generator().manual_seed(9)]).images[0][0]
    assert shown.size[0] >= 8 * 8 and shown.size[0] % want.size[0] == 0  # scaled up, pixel-exact
    assert list(shown.resize(want.size, PILImage.NEAREST).convert(want.mode).getdata()) == list(want.getdata())
    with pytest.raises(gr.Error, match="Upload an image"):
        h.edit(None, EDIT, 2.0, 1.5, 4, 0)
    with pytest.raises(gr.Error, match="instruction"):
        h.edit(str(src), "  ", 2.0, 1.5, 4, 0)
    with pytest.raises(gr.Error, match="at most 40"):
        h.edit(str(src), "x" * 41, 2.0, 1.5, 4, 0)


def test_demo_serves_the_edit_endpoint(pipe, digits, tmp_path, monkeypatch):
    """The Edit tab's /edit endpoint over gradio_client: an uploaded image in, the edited image out."""
    pytest.importorskip("gradio")
    gradio_client = pytest.importorskip("gradio_client")
    import socket

    from mmar.demo import build_demo, launch

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    src = tmp_path / "in.png"
    PILImage.fromarray(digits[0]).save(src)
    demo = build_demo(pipe, max_new_tokens=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path / "dl"))
        api = client.view_api(print_info=False, return_format="dict")["named_endpoints"]["/edit"]
        assert [p["parameter_name"] for p in api["parameters"]] == [
            "image", "instruction", "guidance_scale", "image_guidance_scale", "num_inference_steps", "seed"]
        path = client.predict(gradio_client.handle_file(str(src)), EDIT, 2.0, 1.5, 4, 3, api_name="/edit")
    finally:
        demo.close()
    want = pipe(EDIT, images=[str(src)], mode="image", max_items=1, guidance_scale=2.0, image_guidance_scale=1.5,
                num_inference_steps=4, generator=[torch.Generator().manual_seed(3)]).images[0][0]
    shown = PILImage.open(path)
    assert list(shown.resize(want.size, PILImage.NEAREST).convert(want.mode).getdata()) == list(want.getdata())
