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


# -- what the unconditional branch of CFG really receives ----------------------------------------
def _record_backbone(model, monkeypatch):
    """Wrap the backbone's forward: every call's attention mask, positions and input embeddings."""
    calls, original = [], model.decoder.forward

    def recording(*args, **kw):
        calls.append({k: kw[k].detach().clone() for k in ("attention_mask", "position_ids", "inputs_embeds")})
        return original(*args, **kw)

    monkeypatch.setattr(model.decoder, "forward", recording)
    return calls


def _reference_uncond(prompt_ids, prompt_mask, generated, bos, start, ph):
    """The design's unconditional row, written independently of the sampler: the columns it attends to
    before each backbone call. BOS is always visible; the prompt's text never; an item the row is drawing
    is visible from its start token on (a start resets the row to BOS + start); end and text are not."""
    P = len(prompt_ids)
    first = prompt_mask.index(1)
    base = [first] if prompt_ids[first] == bos else []
    seen = base + ([P - 1] if prompt_ids[-1] == start else [])
    out = [list(seen)]
    for i, tok in enumerate(generated):
        if tok == start:
            seen = base + [P + i]
        elif tok == ph:
            seen = seen + [P + i]
        out.append(list(seen))
    return out


@pytest.mark.parametrize("mode", ["image", "auto"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_unconditional_rows_see_bos_and_the_drawn_item_only(tiny, monkeypatch, mode, use_cache):
    """Single CFG: read off the backbone's forward, the unconditional rows (B..2B) attend to BOS, the
    open item's start token and the latents drawn so far, never to the prompt's text, to an item's end
    token or to earlier generated items; their positions count only what they see (the layout condition
    dropout trains on) and they get the same embeddings as the conditional rows. ``auto``: the model
    opens two images itself (start boosted), so the second image's uncond row must forget the first."""
    model, proc = tiny
    ids = proc.token_ids["image"]
    n = proc.modality_tokenizers["image"].num_tokens()
    b = _prompts(proc, T2I, start="image" if mode == "image" else None)
    if mode == "auto":
        original = model.lm_head.forward
        boost = torch.zeros(model.lm_head.out_features)
        boost[ids["start"]] = 50.0
        monkeypatch.setattr(model.lm_head, "forward", lambda h: original(h) + boost)
    calls = _record_backbone(model, monkeypatch)
    out = _run(model, proc, b, [0, 1], mode=mode, guidance_scale=3.0, max_new_tokens=2,
               max_items=1 if mode == "image" else 2, use_cache=use_cache)
    B, P = b["input_ids"].shape
    # columns fed before each call: one more per call, or two where an item's end token came with its last token
    widths = [c["attention_mask"].shape[1] - P for c in calls]
    assert widths[0] == 0 and all(c["attention_mask"].shape[0] == 2 * B for c in calls)
    steps = [w - v for v, w in zip(widths, widths[1:])]
    assert set(steps) <= {1, 2} and 2 in steps
    for r in range(B):
        gen = out.token_ids[r]
        assert gen.count(ids["token"]) == n * (1 if mode == "image" else 2)
        for v, w in zip(widths, widths[1:]):
            if w - v == 2:  # only ever the last latent of an item and its (certain) end token
                assert gen[w - 2] == ids["token"] and gen[w - 1] == ids["end"], (r, v, w)
        prompt_ids, prompt_mask = b["input_ids"][r].tolist(), b["attention_mask"][r].tolist()
        want = _reference_uncond(prompt_ids, prompt_mask, gen, proc.bos_id, ids["start"], ids["token"])
        real = [j for j, m in enumerate(prompt_mask) if m]
        hidden_text = [j for j in real if prompt_ids[j] not in (proc.bos_id, ids["start"])]
        assert hidden_text  # the prompt has text to hide
        for i, (c, cols) in enumerate(zip(calls, widths)):
            mask = c["attention_mask"]
            seen = mask[B + r].nonzero().flatten().tolist()
            assert seen == want[min(cols, len(gen))], f"row {r}, call {i}"
            assert mask[r].nonzero().flatten().tolist() == real + list(range(P, P + min(cols, len(gen))))
            assert mask[B + r, hidden_text].eq(0).all()
            pos, emb = c["position_ids"], c["inputs_embeds"]
            if pos.shape[1] == mask.shape[1]:  # the whole sequence in this call: check every seen column
                assert pos[B + r, seen].tolist() == list(range(len(seen)))
                assert torch.equal(emb[B + r, seen], emb[r, seen])
            elif i > 0 and mask[B + r, -1]:  # one new column the row sees
                assert pos[B + r, -1].item() == len(seen) - 1
                assert torch.equal(emb[B + r], emb[r])
        # at the end: exactly BOS, the (last) image's start and its n latents; the conditional row saw the end
        last = calls[-1]["attention_mask"]
        visible = (prompt_ids + gen)[:last.shape[1]]
        assert [visible[j] for j in last[B + r].nonzero().flatten().tolist()] == \
            [proc.bos_id, ids["start"]] + [ids["token"]] * n
        # which is what condition dropout lays out for a text-to-image sample
        sample = [Message("user", "draw a 3"), Message("assistant", [Image(np.zeros((8, 8), np.uint8))])]
        dropped = proc.encode(sample, drop_prompt=True).input_ids
        assert dropped[:n + 2] == [proc.bos_id, ids["start"]] + [ids["token"]] * n
