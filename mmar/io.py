"""Media I/O: the one place where images and audio files are read and written.

Training data, the pipeline, ``mmar chat``, ``mmar generate`` and the demo all read images through
:func:`load_image` and audio through :func:`read_audio`, so every bound and every conversion rule holds
at every front door:

* images: a pixel limit checked on the header, before any pixel is decoded (decompression bombs are a
  clear ``ValueError``, i.e. a bad record in training); EXIF orientation applied; 16-bit greyscale scaled
  (not clipped) to 8 bits; transparency (RGBA, LA, PA, P or RGB / L with a transparent colour)
  composited onto white; any other mode converted.
* audio: sampling rates bounded (``MIN_SAMPLING_RATE`` .. ``MAX_SAMPLING_RATE``), truncated WAVs named,
  and only the seconds a model needs read (``max_seconds``), so a tiny declared rate cannot make a
  resampler allocate gigabytes.
* writing: :func:`write_wav` (16-bit PCM, standard library only) and :func:`save_output`.

A leaf: numpy and Pillow only (soundfile is imported when an audio file is read: it is the optional
``audio`` extra).
"""

from __future__ import annotations

import math
import mimetypes
import os
import struct
import warnings
import wave
from typing import Any

import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps, UnidentifiedImageError

from .types import Audio, Image, modality_of

# -- images ------------------------------------------------------------------------------------------
MAX_IMAGE_PIXELS = 4096 * 4096  # the limit when no model image size is known (about 50 MB as RGB)
MIN_LIMIT_SIDE = 2048  # a model's limit is never below 2048 x 2048 pixels (photos of a few megapixels) ...
LIMIT_SIDE_PER_MODEL_SIDE = 16  # ... and is (16 x its image side)^2 for larger models
WHITE = (255, 255, 255, 255)
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16 / 32-bit integer greyscale
_TRANSPARENT = ("RGBA", "LA", "PA", "RGBa", "La")


def pixel_limit(image_size: int | None = None) -> int:
    """The most pixels an input image may have for a model that takes ``image_size`` x ``image_size``
    images: ``max(2048, 16 * image_size) ** 2`` (``MAX_IMAGE_PIXELS`` when the size is unknown). Larger
    files would cost memory and time only to be shrunk to a few thousand pixels."""
    if not image_size:
        return MAX_IMAGE_PIXELS
    return max(MIN_LIMIT_SIDE, LIMIT_SIDE_PER_MODEL_SIDE * int(image_size)) ** 2


def _check_pixels(size: tuple[int, int], max_pixels: int, where: str) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ValueError(f"{where}the image is {w}x{h} pixels ({w * h / 1e6:.1f} megapixels); this model accepts at "
                         f"most {max_pixels / 1e6:.1f} megapixels per image: downscale it first")


def _open(path: str, max_pixels: int) -> PILImage.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with warnings.catch_warnings():  # our own limit (checked next, on the header) is the one that counts
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            with PILImage.open(path) as img:
                _check_pixels(img.size, max_pixels, f"{path}: ")
                img.load()
                return img.copy()
    except PILImage.DecompressionBombError as e:  # over Pillow's own hard limit: neither OSError nor ValueError
        raise ValueError(f"{path}: refused as a decompression bomb ({e})") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e


def _to_8bit_grey(img: PILImage.Image) -> PILImage.Image:
    """16-bit (or 32-bit integer) greyscale scaled to 0..255, never clipped; float images: [0, 1] or 0..255."""
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr * 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else arr
        return PILImage.fromarray(np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8), "L")
    arr = arr.astype(np.int64)
    # 'I' holds any integer range: values above 255 mean 16-bit data (a PNG's or a TIFF's), else 8-bit
    if img.mode != "I" or arr.max(initial=0) > 255:
        arr = np.clip(arr, 0, 65535) * 255 // 65535
    return PILImage.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")


def _has_alpha(img: PILImage.Image) -> bool:
    return img.mode in _TRANSPARENT or (img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def convert_image(img: PILImage.Image, mode: str | None = None) -> PILImage.Image:
    """EXIF orientation applied, then ``img`` as ``mode`` ('L' or 'RGB'; None: 'L' for greyscale inputs,
    else 'RGB'): 16-bit greyscale scaled to 8 bits, transparent pixels composited onto white."""
    img = ImageOps.exif_transpose(img)
    grey = img.mode in ("1", "L", "LA", "La", "F", *_WIDE_GREY)
    mode = mode or ("L" if grey else "RGB")
    if mode not in ("L", "RGB"):
        raise ValueError(f"images convert to 'L' or 'RGB', not {mode!r}")
    if img.mode in _WIDE_GREY or img.mode == "F":
        img = _to_8bit_grey(img)
    if _has_alpha(img):
        rgba = img.convert("RGBA")
        img = PILImage.alpha_composite(PILImage.new("RGBA", rgba.size, WHITE), rgba)
    if img.mode == mode:
        return img
    try:
        return img.convert(mode)
    except ValueError as e:
        raise ValueError(f"cannot convert a {img.mode!r} image to {mode!r} ({e})") from e


def load_image(raw: Any, mode: str | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Any:
    """Open a path (or take a PIL image) as a PIL image in ``mode`` (see :func:`convert_image`), refusing
    images over ``max_pixels`` (None: no limit of ours) with a ``ValueError`` before decoding them; a
    missing file is a ``FileNotFoundError``, an unreadable one a ``ValueError`` naming it. Arrays and
    tensors pass through unchanged (the tokenizers check their shapes)."""
    limit = max_pixels or math.inf
    if isinstance(raw, (str, os.PathLike)):
        path = os.fspath(raw)
        img = _open(path, limit)
        where = f"{path}: "
    elif isinstance(raw, PILImage.Image):
        img, where = raw, ""
        _check_pixels(img.size, limit, where)
    else:
        return raw
    try:
        return convert_image(img, mode)
    except (ValueError, OSError) as e:
        raise ValueError(f"{where}{e}") from e


# -- audio -------------------------------------------------------------------------------------------
MIN_SAMPLING_RATE, MAX_SAMPLING_RATE = 1000, 384_000  # Hz; outside this a declared rate is a broken or hostile file
RESAMPLE_MARGIN_SECONDS = 0.05  # read this much past what a model keeps: the resampling filter's support
STREAMING_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)  # data sizes written by streaming encoders, not truncation


def check_sampling_rate(sampling_rate: Any, where: str = "") -> int:
    """``sampling_rate`` as an int within [MIN_SAMPLING_RATE, MAX_SAMPLING_RATE], or a ValueError."""
    try:
        sr = int(sampling_rate)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{where}sampling rate must be a number of Hz, got {sampling_rate!r}") from e
    if sr <= 0:
        raise ValueError(f"{where}sampling rate must be positive, got {sampling_rate}")
    if not MIN_SAMPLING_RATE <= sr <= MAX_SAMPLING_RATE:
        raise ValueError(f"{where}sampling rate {sr} Hz is outside {MIN_SAMPLING_RATE}..{MAX_SAMPLING_RATE} Hz")
    return sr


def _wav_truncation(path: str) -> str | None:
    """For a RIFF/WAVE file whose data chunk promises more bytes than the file holds, say so."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        at = 12
        while at + 8 <= size:
            f.seek(at)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                held = size - at - 8
                if chunk_size not in STREAMING_SIZES and chunk_size > held:
                    return f"truncated WAV: its header declares {chunk_size} bytes of audio, the file holds {held}"
                return None
            at += 8 + chunk_size + (chunk_size & 1)
    return None


def read_audio(path: str | os.PathLike, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file with soundfile as float32 ``[samples]`` (channels averaged) and its rate.
    With ``max_seconds`` only that much (plus the resampler's margin) is read. The rate is bounded
    (:func:`check_sampling_rate`); bad files raise errors naming the file and the problem."""
    import soundfile as sf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: audio file not found")
    problem = _wav_truncation(path)
    if problem:
        raise ValueError(f"{path}: {problem}")
    try:
        with sf.SoundFile(path) as f:
            sr = check_sampling_rate(f.samplerate, f"{path}: ")
            frames = -1 if max_seconds is None else math.ceil((max_seconds + RESAMPLE_MARGIN_SECONDS) * sr)
            data = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path}: not a readable audio file ({e})") from e
    if data.shape[0] == 0:
        raise ValueError(f"{path}: the audio file holds no samples (zero length)")
    return data.mean(axis=1), sr


def is_audio_file(path: str | os.PathLike) -> bool:
    kind, _ = mimetypes.guess_type(os.fspath(path))
    return bool(kind and kind.startswith("audio/"))


def write_wav(path: str | os.PathLike, audio: Any, sampling_rate: int | None = None) -> str:
    """Write an :class:`Audio` (or a 1-D waveform plus its rate) as a 16-bit PCM mono WAV file (samples
    clipped to [-1, 1], NaN as silence); creates the folder. Returns the path."""
    waveform = getattr(audio, "waveform", audio)
    sr = sampling_rate or getattr(audio, "sampling_rate", None)
    if not sr:
        raise ValueError("cannot write a WAV file without a sampling rate: give an Audio item or sampling_rate=")
    if hasattr(waveform, "detach"):  # a torch tensor, without importing torch here
        waveform = waveform.detach().cpu().float().numpy()
    samples = np.asarray(waveform, dtype=np.float32).reshape(-1)
    pcm = (np.clip(np.nan_to_num(samples), -1.0, 1.0) * 32767).round().astype("<i2")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with wave.open(path, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(sr))
        f.writeframes(pcm.tobytes())
    return path


def save_wav(audio: Audio, path: str | os.PathLike) -> str:
    """:func:`write_wav` with the arguments the other way round (the front doors' older name)."""
    return write_wav(path, audio)


def save_output(item: Any, stem: str) -> str:
    """Save a generated item next to ``stem`` (a path without extension): ``.wav`` for audio, ``.png`` for
    images. Returns the path written."""
    if isinstance(item, Audio):
        return write_wav(stem + ".wav", item)
    if isinstance(item, Image):
        item = item.image
    item.save(stem + ".png")
    return stem + ".png"


def kind_of(item: Any) -> str:
    """The modality of a generated item (a PIL image is an image); ``"item"`` when nothing claims it."""
    return modality_of(item) or "item"
