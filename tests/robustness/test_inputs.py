"""Hostile and unusual inputs at the one image / audio loader (mmar.io) and the pipeline's caps
(mmar.limits), through every door that uses them: the tokenizers (so training data), the pipeline,
``mmar chat`` and the CLI. Issue 10, items 2, 6, 7, 9 (CLI) and 10; the demo's share is in
test_inputs_demo.py. Every file here is small on disk and cheap to refuse: a bomb's header is enough.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image as PILImage

from mmar import Audio, Image, Message
from mmar.io import MAX_SAMPLING_RATE, MIN_SAMPLING_RATE, load_image, pixel_limit, read_audio
from mmar.pipeline import MMARPipeline

# -- files ---------------------------------------------------------------------------------------------------


def png_header(width: int, height: int, bit_depth: int = 8, colour: int = 3) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels (a palette image by default) and whose data
    is one short zlib stream: all a decoder reads before it allocates the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    plte = chunk(b"PLTE", bytes(3 * 2)) if colour == 3 else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + plte + chunk(b"IDAT", zlib.compress(bytes(4096), 9))
            + chunk(b"IEND", b""))


def wav_bytes(samples: int, rate: int) -> bytes:
    data = struct.pack(f"<{samples}h", *([1000] * samples))
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16) + b"data" + struct.pack("<I", len(data)) + data)


@pytest.fixture
def bomb(tmp_path):
    """The issue's decompression bomb: a 30000 x 30000 palette PNG (over Pillow's own hard limit)."""
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(30000, 30000))
    return path


@pytest.fixture
def big(tmp_path):
    """A real 4096 x 4096 palette PNG (a few KB on disk): under Pillow's limit, over the tiny model's."""
    path = tmp_path / "big.png"
    PILImage.new("P", (4096, 4096)).save(path)
    return path


@pytest.fixture
def pipe(tiny):
    model, proc = tiny
    p = MMARPipeline(model, proc)
    p.set_progress_bar_config(disable=True)
    return p


# -- item 6: decompression bombs and a pixel limit that fits the model -----------------------------------------
def test_a_decompression_bomb_is_a_clear_error_at_every_door(pipe, bomb):
    for read in (load_image, pipe.load_image, pipe.processor.modality_tokenizers["image"].preprocess,
                 lambda p: pipe.processor.encode([Message("user", [Image(p), "which digit?"])])):
        with pytest.raises(ValueError, match="bomb.png") as e:
            read(str(bomb))
        assert "megapixels" in str(e.value) or "decompression bomb" in str(e.value)
    with pytest.raises(ValueError, match="bomb.png"):  # the pipeline itself refuses it as an input too
        pipe("which digit is this?", images=[str(bomb)], max_new_tokens=1)


def test_the_pixel_limit_fits_the_model(pipe, big, tmp_path):
    assert pixel_limit(8) == 2048**2 and pixel_limit(256) == 4096**2 and pixel_limit(1024) == 16384**2
    with pytest.raises(ValueError, match=r"big.png: the image is 4096x4096 pixels \(16.8 megapixels\)"):
        pipe.load_image(str(big))
    ok = tmp_path / "ok.png"
    PILImage.new("L", (2048, 2048), 255).save(ok)  # at the limit: accepted and fitted
    assert pipe.load_image(str(ok)).size == (8, 8)
    assert load_image(str(big), max_pixels=None).size == (4096, 4096)  # a caller may lift our limit


def test_a_bomb_in_training_data_is_a_skipped_and_counted_record(tiny, tmp_path, bomb, big):
    from mmar.data.jsonl import ChatDataset
    from mmar.data.registry import Collator, SafeDataset

    _, proc = tiny
    PILImage.new("L", (8, 8), 128).save(tmp_path / "good.png")

    def record(name):
        return json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "path": name},
                                                                     {"type": "text", "text": "which digit?"}]},
                                        {"role": "assistant", "content": "3"}]})

    (tmp_path / "data.jsonl").write_text("\n".join(record(n) for n in ("good.png", "bomb.png", "big.png")) + "\n")
    ds = SafeDataset(ChatDataset(str(tmp_path / "data.jsonl")))
    collator = Collator(proc)
    batch = collator([ds[i] for i in range(len(ds))])
    assert batch["input_ids"].shape[0] == 1 and collator.skipped == 2
    assert any("bomb.png" in r for r in collator.reasons) and any("big.png" in r for r in collator.reasons)


def test_a_bomb_in_mmar_chat_is_a_message(pipe, bomb, tmp_path):
    from mmar.app.chat import ChatSession

    out = io.StringIO()
    session = ChatSession(pipe, str(tmp_path / "chat"), out=out, max_new_tokens=2)
    assert session.run(io.StringIO(f"!image {bomb}\n!help\n")) == 0  # the session goes on after the error
    said = out.getvalue()
    assert "error: " in said and "bomb.png" in said and "commands:" in said and "Traceback" not in said


# -- item 10: 16-bit, EXIF orientation, transparency -------------------------------------------------------
def test_a_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    path = tmp_path / "ramp16.png"
    PILImage.fromarray(ramp).save(path)
    assert PILImage.open(path).mode == "I;16"
    out = np.asarray(load_image(str(path), mode="L"), dtype=np.float64)
    assert out.min() == 0 and out.max() == 255
    assert abs(out.mean() - 127.5) < 1.0  # clipping made it about 251
    assert np.abs(out - ramp / 257.0).max() <= 1.0
    rgb = np.asarray(load_image(str(path), mode="RGB"))
    assert rgb.shape == (64, 64, 3) and abs(rgb.mean() - 127.5) < 1.0


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((2, 4), np.uint8)
    arr[0, 0] = 255  # the top-left pixel of the stored image
    img = PILImage.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=100)
    shown = np.asarray(load_image(str(path), mode="L"))
    assert shown.shape == (4, 2)  # portrait, as a viewer shows it
    assert shown[0, 1] > 128 and shown[0, 0] < 128  # the stored top-left pixel is now top-right


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P-transparency", "PA"])
def test_transparency_is_composited_onto_white(tmp_path, kind):
    path = tmp_path / f"{kind}.png"
    if kind == "RGBA":
        PILImage.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    elif kind == "LA":
        PILImage.new("LA", (4, 4), (0, 0)).save(path)
    elif kind == "PA":  # no PNG holds PA: an in-memory image, as a caller may pass one
        path = PILImage.new("RGBA", (4, 4), (0, 0, 0, 0)).convert("PA")
    else:
        img = PILImage.new("P", (4, 4), 0)
        img.putpalette([0, 0, 0, 255, 0, 0])
        img.save(path, transparency=0)
    for mode in ("L", "RGB"):
        raw = path if isinstance(path, PILImage.Image) else str(path)
        assert np.asarray(load_image(raw, mode=mode)).min() == 255, (kind, mode)
    half = PILImage.new("RGBA", (2, 2), (0, 0, 0, 128))  # half transparent black: half grey
    assert abs(int(np.asarray(load_image(half, mode="L")).mean()) - 127) <= 1


def test_the_tokenizer_sees_what_the_loader_gives(tiny, tmp_path):
    """Training data (Image segments with paths) and the pipeline go through the same loader."""
    _, proc = tiny
    PILImage.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    pixels = proc.modality_tokenizers["image"].preprocess(str(tmp_path / "clear.png"))
    assert float(pixels.min()) == 1.0  # white, not black


# -- item 7: WAVs with a tiny declared rate; crop before resampling ---------------------------------------------
def test_a_wav_with_a_tiny_sample_rate_is_refused(tmp_path):
    from mmar.tokenizers.audio_mel import AudioMelTokenizer

    tok = AudioMelTokenizer()
    path = tmp_path / "slow.wav"
    path.write_bytes(wav_bytes(16000, 1))  # 32 KB declaring 1 Hz: 16000 s of audio
    with pytest.raises(ValueError, match=f"slow.wav: sampling rate 1 Hz is outside {MIN_SAMPLING_RATE}"):
        tok.preprocess(str(path))
    with pytest.raises(ValueError, match="outside"):
        tok.preprocess((np.zeros(16000, np.float32), 1))
    with pytest.raises(ValueError, match="outside"):
        tok.preprocess((np.zeros(16, np.float32), MAX_SAMPLING_RATE + 1))
    with pytest.raises(ValueError, match="sampling rate"):
        tok.preprocess((np.zeros(16, np.float32), float("nan")))


def test_long_audio_is_cropped_before_resampling(tmp_path):
    import soundfile as sf

    from mmar.tokenizers.audio_mel import AudioMelTokenizer, resample

    tok = AudioMelTokenizer()  # keeps 0.768 s at 8 kHz
    rate, rng = 44100, np.random.default_rng(0)
    wave = (0.3 * rng.standard_normal(rate * 20)).astype(np.float32)  # 20 s
    path = tmp_path / "long.wav"
    sf.write(path, wave, rate, subtype="FLOAT")
    head, sr = read_audio(str(path), max_seconds=tok.max_seconds)
    assert sr == rate and len(head) <= (tok.max_seconds + 0.06) * rate  # a second, not twenty
    full = resample(wave, rate, tok.sampling_rate)[: tok.num_samples]
    cropped = resample(wave, rate, tok.sampling_rate, max_samples=tok.num_samples)
    assert cropped.shape == full.shape and np.allclose(cropped, full, atol=1e-5)  # same samples, less work
    assert np.allclose(tok.preprocess(str(path)).numpy(), full, atol=1e-5)


def test_a_rate_coprime_with_the_target_costs_little():
    """40787 Hz -> 8 kHz exactly would need a polyphase filter of 815,741 taps; the ratio is approximated
    (61/311, off by 2 parts in a million) instead."""
    import tracemalloc

    import scipy.signal  # noqa: F401 - imported before measuring

    from mmar.tokenizers.audio_mel import AudioMelTokenizer

    tok = AudioMelTokenizer()
    tone = np.sin(2 * np.pi * 440 * np.arange(40787) / 40787).astype(np.float32)
    tracemalloc.start()
    try:
        out = tok.preprocess((tone, 40787))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (tok.num_samples,) and peak < 8 * 2**20, peak
    spectrum = np.abs(np.fft.rfft(out.numpy()))
    assert abs(np.argmax(spectrum) * tok.sampling_rate / tok.num_samples - 440) < 2  # still a 440 Hz tone


def test_one_wav_writer(tmp_path):
    import mmar.io
    import mmar.tokenizers.audio_mel as audio_mel

    assert audio_mel.write_wav is mmar.io.write_wav and audio_mel.read_audio is mmar.io.read_audio
    clip = Audio(np.sin(np.arange(800) / 5.0).astype(np.float32) * 0.5, 8000)
    a, b = mmar.io.save_wav(clip, tmp_path / "a.wav"), mmar.io.write_wav(tmp_path / "b" / "b.wav", clip)
    assert open(a, "rb").read() == open(b, "rb").read()


# -- item 2: prompts, histories and items capped against the backbone's positions -------------------------------
def test_prompts_are_capped_in_tokens(pipe):
    positions = pipe.model.config.backbone_config.max_position_embeddings
    assert positions == 128
    with pytest.raises(ValueError, match="tokens long; at most 127 fit .*max_position_embeddings is 128"):
        pipe("x" * 100_000, max_new_tokens=1)  # refused before it is even tokenized
    emoji = "\U0001f600" * 40  # 40 characters, a few tokens each: a character cap lets it through
    assert len(pipe.processor.tokenizer.encode(emoji)) > positions
    with pytest.raises(ValueError, match="tokens long"):
        pipe(emoji, max_new_tokens=1)
    with pytest.raises(ValueError, match="tokens long"):
        pipe.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "seven " * 200},
                   {"role": "user", "content": "and again"}], max_new_tokens=1)
    # a forced image needs its own positions too
    n = pipe.limits.item_positions["image"]
    assert pipe.limits.answer_positions("image") == n - 1
    out = pipe("draw a 3", mode="image", max_new_tokens=1)
    assert len(out.images[0]) == 1


def test_items_are_capped_against_their_positions(pipe):
    img = np.zeros((8, 8), np.uint8)
    per_item = pipe.limits.item_positions["image"]  # 16 tokens + start + end
    fits = 127 // per_item
    with pytest.raises(ValueError, match=rf"holds 50 image items, which take {50 * per_item} positions"):
        pipe("which digit is this?", images=[img] * 50, max_new_tokens=1)
    with pytest.raises(ValueError, match="image items"):
        pipe([{"role": "user", "content": [{"type": "image", "image": img}] * (fits + 1)}], max_new_tokens=1)
    out = pipe("which digit?", images=[img] * (fits - 1), max_new_tokens=1, mode="text")
    assert len(out.text) == 1


# -- item 9, the CLI's part: user errors are one line and exit code 2 ---------------------------------------
def _bad_command_lines(model, tmp_path):
    long_prompt = "x" * 100_000
    return {
        "num 0": ["generate", "--model", model, "--prompt", "x", "--num", "0"],
        "num not a number": ["generate", "--model", model, "--prompt", "x", "--num", "two"],
        "missing model": ["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"],
        "missing image": ["generate", "--model", model, "--prompt", "x", "--image", str(tmp_path / "no.png")],
        "bomb image": ["generate", "--model", model, "--prompt", "x", "--image", str(tmp_path / "bomb.png")],
        "missing audio": ["generate", "--model", model, "--prompt", "x", "--audio", str(tmp_path / "no.wav")],
        "prompt too long": ["generate", "--model", model, "--prompt", long_prompt, "--max_new_tokens", "1"],
        "bad mode": ["generate", "--model", model, "--prompt", "x", "--mode", "video"],
        "auth without a colon": ["demo", "--model", model, "--auth", "secret"],
        "negative port": ["demo", "--model", model, "--port", "-1"],
        "unknown task": ["eval", "--model", model, "--task", "nope"],
        "missing config": ["train", "--config", str(tmp_path / "none.yaml")],
        "unknown command": ["fly"],
    }


def test_cli_user_errors_are_one_line_and_exit_2(tiny_dir, tmp_path, capsys):
    from mmar.cli import main

    (tmp_path / "bomb.png").write_bytes(png_header(30000, 30000))
    for name, argv in _bad_command_lines(str(tiny_dir), tmp_path).items():
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2, (name, code, err)
        # (a model's loading bar may come first: progress, not an error)
        lines = [line for line in err.strip().splitlines() if "Loading weights" not in line]
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, (name, err)
        assert len(lines[0]) < 700, name
