"""Model outputs to files and uploads to segments, for the front doors (chat, demo): images as PNG,
audio as 16-bit mono WAV (standard library only)."""

from __future__ import annotations

import mimetypes
import os
import wave
from typing import Any

import numpy as np

from .types import Audio, Image, modality_of


def is_audio_file(path: str | os.PathLike) -> bool:
    kind, _ = mimetypes.guess_type(os.fspath(path))
    return bool(kind and kind.startswith("audio/"))


def save_wav(audio: Audio, path: str | os.PathLike) -> str:
    """Write ``audio`` (a float waveform in [-1, 1] and its sampling rate) as a 16-bit PCM WAV file."""
    if not audio.sampling_rate:
        raise ValueError("cannot write a WAV file without a sampling rate")
    samples = np.asarray(audio.waveform, dtype=np.float32).reshape(-1)
    pcm = (np.clip(np.nan_to_num(samples), -1.0, 1.0) * 32767).round().astype("<i2")
    with wave.open(os.fspath(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(audio.sampling_rate))
        f.writeframes(pcm.tobytes())
    return os.fspath(path)


def save_output(item: Any, stem: str) -> str:
    """Save a generated item next to ``stem`` (a path without extension): ``.wav`` for audio, ``.png`` for
    images. Returns the path written."""
    if isinstance(item, Audio):
        return save_wav(item, stem + ".wav")
    if isinstance(item, Image):
        item = item.image
    item.save(stem + ".png")
    return stem + ".png"


def kind_of(item: Any) -> str:
    """The modality of a generated item (a PIL image is an image); ``"item"`` when nothing claims it."""
    return modality_of(item) or "item"
