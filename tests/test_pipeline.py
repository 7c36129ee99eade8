"""MMARPipeline: streaming equals the plain call, chat, generation defaults, image fitting."""

import json

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from mmar import Image, Message
from mmar.pipeline import GENERATION_CONFIG_NAME, GenerationDefaults, MMARPipeline, _TextStream


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    p = MMARPipeline.from_pretrained(tiny_dir)
    p.set_progress_bar_config(disable=True)
    return p


def _collapse(pieces):
    """Stream pieces -> segments: consecutive text pieces joined, images kept."""
    segs = []
    for p in pieces:
        if isinstance(p, str) and segs and isinstance(segs[-1], str):
            segs[-1] += p
        else:
            segs.append(p)
    return segs


def _assert_same_segments(streamed, called):
    assert len(streamed) == len(called)
    for a, b in zip(streamed, called):
        assert type(a) is type(b)
        if isinstance(a, str):
            assert a == b
        else:
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_stream_equals_call_for_text(pipe, digit_image):
    img, _ = digit_image
    kw = dict(images=[img], mode="text", temperature=1.0, max_new_tokens=12)
    called = pipe("which digit is this?", generator=torch.Generator().manual_seed(3), **kw).segments[0]
    pieces = list(pipe.stream("which digit is this?", generator=torch.Generator().manual_seed(3), **kw))
    assert all(isinstance(p, str) for p in pieces) and len(pieces) > 1  # really token by token
    _assert_same_segments(_collapse(pieces), called)


def test_stream_equals_call_for_images(pipe):
    kw = dict(mode="image", guidance_scale=2.0, max_items=2, max_new_tokens=6, num_inference_steps=4)
    called = pipe("a 3 and then a 4:", generator=torch.Generator().manual_seed(1), **kw).segments[0]
    pieces = list(pipe.stream("a 3 and then a 4:", generator=torch.Generator().manual_seed(1), **kw))
    assert any(isinstance(p, PILImage.Image) for p in pieces)
    _assert_same_segments(_collapse(pieces), called)


def test_stream_equals_call_for_interleaved_output(pipe):
    kw = dict(mode="auto", guidance_scale=2.0, max_items=2, max_new_tokens=6, num_inference_steps=2)
    for seed in range(8):  # the untrained model opens an image now and then: find a text-image-text answer
        called = pipe("a 3 and then a 4:", generator=torch.Generator().manual_seed(seed), **kw).segments[0]
        if len(called) >= 3 and isinstance(called[0], str) and not isinstance(called[1], str):
            break
    else:
        pytest.fail("no interleaved answer in 8 seeds")
    pieces = list(pipe.stream("a 3 and then a 4:", generator=torch.Generator().manual_seed(seed), **kw))
    _assert_same_segments(_collapse(pieces), called)


def test_stream_latents_and_early_close(pipe):
    it = pipe.stream("draw a 3", mode="image", output_type="latent", max_items=3, num_inference_steps=3)
    first = next(it)
    assert first[0] == "image" and first[1].shape == (16, 4)
    it.close()  # stops the background thread (the sampler's callback raises) without hanging
    with pytest.raises(ValueError, match="one prompt"):
        next(pipe.stream(["draw a 3", "draw a 4"]))


def test_stream_reraises_errors(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        list(pipe.stream("which digit is this?", images=[str(tmp_path / "missing.png")]))


def test_concurrent_calls_equal_sequential_ones(pipe):
    import threading

    jobs = [dict(num_inference_steps=2, seed=0), dict(num_inference_steps=7, seed=1)] * 2
    run = lambda j: pipe("draw a 3", mode="image", max_items=1, max_new_tokens=2,  # noqa: E731
                         num_inference_steps=j["num_inference_steps"],
                         generator=torch.Generator().manual_seed(j["seed"])).latents[0][0][1]
    alone = [run(j) for j in jobs]
    together = [None] * len(jobs)

    def work(i):
        together[i] = run(jobs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_text_stream_holds_incomplete_multibyte_characters(tiny):
    _, proc = tiny
    text = "naïve 漢字 ok"
    ids = proc.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) - 3  # byte-level: the CJK characters span several tokens
    stream = _TextStream(proc.decode_text)
    pieces = [stream.add(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == proc.decode_text(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_chat_takes_messages_and_dicts(pipe, digit_image):
    img, _ = digit_image
    kw = dict(temperature=0.0, max_new_tokens=4, mode="text")
    as_message = pipe.chat([Message("user", [Image(img), "which digit is this?"])], **kw)
    as_dicts = pipe.chat([{"role": "user", "content": [{"type": "image", "image": img},
                                                       {"type": "text", "text": "which digit is this?"}]}], **kw)
    assert as_message == as_dicts and all(isinstance(s, str) for s in as_message)
    pil = PILImage.fromarray(img)
    turns = [{"role": "user", "content": "draw a 3"}, {"role": "assistant", "content": pil},
             {"role": "user", "content": [pil, "which digit is this?"]}]
    streamed = "".join(pipe.chat(turns, stream=True, **kw))
    assert streamed == "".join(pipe.chat(turns, **kw))
    with pytest.raises(ValueError, match="last message must be the user's"):
        pipe.chat(turns[:2])
    with pytest.raises(ValueError, match="chat content part"):
        pipe.chat([{"role": "user", "content": [{"type": "video", "video": "x"}]}])


def test_output_views(pipe):
    out = pipe(["draw a 3"], mode="image", max_items=1, max_new_tokens=3, num_inference_steps=2)
    assert out.audios == [[]] and len(out.images[0]) == 1
    assert out.text[0] == "".join(s for s in out.segments[0] if isinstance(s, str))


def test_generation_defaults_round_trip(tiny_dir, tmp_path):
    pipe = MMARPipeline.from_pretrained(tiny_dir)
    assert pipe.generation_config.guidance_scale == 3.0  # trained with condition dropout: CFG on by default
    pipe.generation_config.temperature = 0.0
    pipe.generation_config.num_inference_steps = 3
    pipe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / GENERATION_CONFIG_NAME).read_text())
    assert saved["temperature"] == 0.0 and saved["num_inference_steps"] == 3
    again = MMARPipeline.from_pretrained(tmp_path)
    assert again.generation_config == pipe.generation_config
    again.set_progress_bar_config(disable=True)
    # greedy by default now: two calls agree without a generator
    a = again("which digit is this?", mode="text", max_new_tokens=5).text
    assert a == again("which digit is this?", mode="text", max_new_tokens=5).text
    (tmp_path / GENERATION_CONFIG_NAME).write_text('{"temperature": 0.5, "do_sample": true}')
    with pytest.warns(UserWarning, match="do_sample"):
        loaded = GenerationDefaults.from_pretrained(tmp_path)
    assert loaded.temperature == 0.5
    (tmp_path / GENERATION_CONFIG_NAME).write_text("{oops")
    with pytest.raises(ValueError, match=GENERATION_CONFIG_NAME):
        MMARPipeline.from_pretrained(tmp_path)


def test_load_image_fits_any_upload(pipe, tmp_path):
    big = PILImage.new("RGBA", (64, 48), (255, 255, 255, 255))
    big.save(tmp_path / "big.png")
    with pytest.warns(UserWarning, match="resized to 6x8 and padded to 8x8"):
        img = pipe.load_image(tmp_path / "big.png")
    # 48x64 (height x width) fits as 6x8 and is padded, never stretched or cropped: one black row above and below
    arr = np.asarray(img)
    assert img.size == (8, 8) and img.mode == "L" and arr[1:7].min() == 255 and arr[[0, 7]].max() == 0
    # a nearest-upscaled digit comes back exactly (what the demo shows and users may upload again)
    small = PILImage.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    assert np.array_equal(np.asarray(pipe.load_image(small.resize((128, 128), PILImage.NEAREST))), np.asarray(small))
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="bad.png"):
        pipe.load_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError, match="nope.png"):
        pipe.load_image(tmp_path / "nope.png")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        MMARPipeline.from_pretrained(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MMARPipeline.from_pretrained(tmp_path)
