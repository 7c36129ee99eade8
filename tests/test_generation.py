import numpy as np
import pytest
import torch

from mmar import Image, Message
from mmar.generation import generate
from mmar.pipeline import MMARPipeline


def _prompts(proc, prompts, start=None):
    enc = [proc.encode(p, add_generation_prompt=True, start_modality=start) for p in prompts]
    return proc.collate(enc, padding_side="left")


def _run(model, proc, batch, seeds, **kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return generate(model, batch["input_ids"], batch["attention_mask"], batch["values"], generator=gens,
                    decode_text=proc.decode_text, **kw)


def _same(a, b, atol=1e-5):
    assert a.token_ids == b.token_ids
    assert len(a.segments) == len(b.segments)
    for ra, rb in zip(a.segments, b.segments):
        assert len(ra) == len(rb)
        for sa, sb in zip(ra, rb):
            if isinstance(sa, str):
                assert sa == sb
            else:
                assert sa[0] == sb[0] and torch.allclose(sa[1], sb[1], atol=atol)


T2I = [[Message("user", "draw the digit seven")], [Message("user", "a 3 and then a 4:")]]


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_equals_uncached(tiny, guidance):
    model, proc = tiny
    b = _prompts(proc, T2I, start="image")
    kw = dict(mode="image", guidance_scale=guidance, max_new_tokens=6, max_items=2)
    cached = _run(model, proc, b, [0, 1], use_cache=True, **kw)
    uncached = _run(model, proc, b, [0, 1], use_cache=False, **kw)
    _same(cached, uncached)
    n = proc.modality_tokenizers["image"].num_tokens()
    for row in cached.segments:
        items = [s for s in row if not isinstance(s, str)]
        assert items and all(s[1].shape == (n, 4) for s in items)


def test_cached_equals_uncached_for_text(tiny, digit_image):
    model, proc = tiny
    img, _ = digit_image
    b = _prompts(proc, [[Message("user", [Image(img), "which digit is this?"])], [Message("user", "draw a 3")]])
    kw = dict(mode="text", max_new_tokens=8, temperature=1.0)
    _same(_run(model, proc, b, [0, 1], use_cache=True, **kw), _run(model, proc, b, [0, 1], use_cache=False, **kw))


def test_cfg_scale_one_equals_no_cfg(tiny):
    model, proc = tiny
    b = _prompts(proc, T2I[:1], start="image")
    plain = _run(model, proc, b, [4], mode="image", max_new_tokens=4, max_items=1)
    # force the guided path with scale 1: u + 1 * (c - u) == c
    head = model.heads["image"]
    original = head.sample

    def guided(cond, uncond=None, guidance_scale=1.0, **kw):
        return original(cond, uncond=cond * 0 + 1 if uncond is None else uncond, guidance_scale=1.0, **kw)

    head.sample = guided
    try:
        forced = _run(model, proc, b, [4], mode="image", max_new_tokens=4, max_items=1)
    finally:
        del head.sample
    _same(plain, forced, atol=1e-5)
    guided3 = _run(model, proc, b, [4], mode="image", max_new_tokens=4, max_items=1, guidance_scale=3.0)
    assert not torch.allclose(guided3.segments[0][0][1], plain.segments[0][0][1], atol=1e-3)


@pytest.mark.parametrize("mode", ["image", "text"])
def test_left_padded_batch_equals_each_alone(tiny, digit_image, mode):
    model, proc = tiny
    img, _ = digit_image
    prompts = ([[Message("user", "draw the digit seven")], [Message("user", "a 3 and then a 4, please")]]
               if mode == "image" else
               [[Message("user", [Image(img), "which digit is this?"])], [Message("user", "read this digit")]])
    start = "image" if mode == "image" else None
    kw = dict(mode=mode, guidance_scale=2.0, max_new_tokens=5, max_items=1, temperature=1.0)
    batch = _run(model, proc, _prompts(proc, prompts, start), [10, 11], **kw)
    assert batch.token_ids[0] != batch.token_ids[1] or mode == "image"
    for i in range(2):
        alone = _run(model, proc, _prompts(proc, prompts[i:i + 1], start), [10 + i], **kw)
        assert alone.token_ids[0] == batch.token_ids[i]
        for sa, sb in zip(alone.segments[0], batch.segments[i]):
            if isinstance(sa, str):
                assert sa == sb
            else:
                assert torch.allclose(sa[1], sb[1], atol=1e-5)


def test_text_mode_never_opens_an_item_and_stops_at_limit(tiny):
    model, proc = tiny
    start = proc.token_ids["image"]["start"]
    # make <|image_start|> the most likely token: text mode must still never pick it
    saved = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight[start] += 5.0
    try:
        out = _run(model, proc, _prompts(proc, [[Message("user", "draw a 3")]]), [0], mode="text",
                   max_new_tokens=5, temperature=0.0)
        auto = _run(model, proc, _prompts(proc, [[Message("user", "draw a 3")]]), [0], mode="auto",
                    max_new_tokens=5, temperature=0.0, max_items=2)
    finally:
        with torch.no_grad():
            model.lm_head.weight.copy_(saved)
    assert start not in out.token_ids[0] and len(out.token_ids[0]) <= 6
    assert all(isinstance(s, str) for s in out.segments[0])
    assert auto.token_ids[0].count(start) == 2  # auto mode follows the model, up to max_items
    assert sum(not isinstance(s, str) for s in auto.segments[0]) == 2


def test_mode_errors(tiny):
    model, proc = tiny
    b = _prompts(proc, [[Message("user", "draw a 3")]])
    with pytest.raises(ValueError, match="must end with the image start token"):
        _run(model, proc, b, [0], mode="image")
    with pytest.raises(ValueError, match="mode must be one of"):
        _run(model, proc, b, [0], mode="video")
    right = proc.collate([proc.encode([Message("user", "draw a 3")]), proc.encode([Message("user", "hi")])])
    with pytest.raises(ValueError, match="left padding"):
        generate(model, right["input_ids"], right["attention_mask"])


def test_pipeline_matches_sampler_and_decodes(tiny_dir, tiny):
    pipe = MMARPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["draw the digit seven"], mode="image", guidance_scale=2.0, max_items=1,
               generator=[torch.Generator().manual_seed(0)], max_new_tokens=3)
    img = out.images[0][0]
    assert img.size == (8, 8) and img.mode == "L"
    _, proc = tiny
    ref = _run(pipe.model, proc, _prompts(proc, [[Message("user", "draw the digit seven")]], "image"), [0],
               mode="image", guidance_scale=2.0, max_items=1, max_new_tokens=3,
               suppress_ids=proc.tokenizer.all_special_ids)
    expected = proc.decode_item("image", ref.segments[0][0][1])
    assert np.array_equal(np.asarray(img), np.asarray(expected))
    with pytest.raises(ValueError, match="empty prompt"):
        pipe("  ")
