"""Spoken digits: "zero".."nine" synthesised by espeak-ng, as interleaved chat samples.

Every clip is one word spoken with one *setting* (voice + variant, speed in words per minute,
pitch 0..99). The split is by setting: the held-out clips use variants, speeds and pitches that
no training clip uses, so the evaluator measures generalisation to unseen speakers / prosody.

Two kinds of sample:

* text-to-audio: "say seven" -> audio
* audio-to-text: audio + "which digit is said?" -> "7"

Clips are generated once with ``espeak-ng -w FILE -v VOICE -s SPEED -p PITCH WORD`` into a cache
directory (``~/.cache/mmar/spoken_digits`` by default), then trimmed of silence, peak-normalised
and resampled to ``SAMPLING_RATE``. espeak-ng is a system package: ``apt-get install espeak-ng``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from ..types import Audio, Message
from ..tokenizers.audio_mel import read_audio, resample
from .digits import DIGIT_WORDS
from .task import TaskDataset

SAMPLING_RATE = 16000  # clips are stored at this rate; the audio tokenizer resamples to its own
PEAK = 0.5  # peak amplitude after normalisation
SILENCE = 0.02  # samples below this share of the peak count as silence when trimming
MARGIN_S = 0.01  # silence kept before and after the word
DEFAULT_CACHE = os.path.join("~", ".cache", "mmar", "spoken_digits")

VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
SPLITS = {  # (variants, speeds, pitches); the held-out values never occur in training
    "train": (("", "+m3", "+f2", "+f4"), (130, 170, 210), (30, 50, 70)),
    "test": (("+m5", "+f1"), (150, 190), (40, 60)),
}
T2A_PROMPTS = ("say {w}", "say the digit {d}", "speak the number {w}", "pronounce {d}", "read out {w}")
A2T_PROMPTS = ("which digit is said?", "what number do you hear?", "what digit is spoken?", "transcribe the digit")
ESPEAK_TIMEOUT_S = 30


def espeak_binary() -> str:
    """The espeak-ng executable, or a clear error saying how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise RuntimeError("the spoken-digits dataset needs espeak-ng, which is not on PATH: "
                           "install it with `apt-get install espeak-ng` (Debian / Ubuntu)")
    return path


def settings(split: str) -> list[tuple[str, int, int]]:
    """The ``(voice, speed, pitch)`` settings of a split, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    variants, speeds, pitches = SPLITS[split]
    return [(v + var, s, p) for v, var, s, p in itertools.product(VOICES, variants, speeds, pitches)]


def clip_path(cache_dir: str, voice: str, speed: int, pitch: int, digit: int) -> str:
    name = f"{voice.replace('+', '_')}_s{speed}_p{pitch}"
    return os.path.join(os.path.expanduser(cache_dir), name, f"{DIGIT_WORDS[digit]}.wav")


def synthesize(path: str, voice: str, speed: int, pitch: int, digit: int) -> str:
    """Write one clip with espeak-ng (atomically: a killed run leaves no half-written file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    cmd = [espeak_binary(), "-w", tmp, "-v", voice, "-s", str(speed), "-p", str(pitch), DIGIT_WORDS[digit]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=ESPEAK_TIMEOUT_S)
    if done.returncode != 0 or not os.path.isfile(tmp):
        raise RuntimeError(f"espeak-ng failed for voice {voice!r} ({' '.join(cmd)}): {done.stderr.strip()}")
    os.replace(tmp, path)
    return path


def clean(wave: np.ndarray, sr: int) -> np.ndarray:
    """Trim leading / trailing silence, normalise the peak and resample to ``SAMPLING_RATE``."""
    peak = float(np.abs(wave).max())
    if peak == 0.0:
        raise ValueError("the clip is silent")
    loud = np.flatnonzero(np.abs(wave) > SILENCE * peak)
    margin = round(MARGIN_S * sr)
    wave = wave[max(loud[0] - margin, 0): loud[-1] + margin + 1] * (PEAK / peak)
    return resample(wave.astype(np.float32), sr, SAMPLING_RATE)


@lru_cache(maxsize=4)
def load_split(split: str, cache_dir: str = DEFAULT_CACHE) -> tuple[tuple[np.ndarray, ...], np.ndarray, tuple]:
    """All clips of a split (generated on first use): waveforms at ``SAMPLING_RATE``, digit labels and
    the ``(voice, speed, pitch)`` setting of each clip. Ordered by setting, then digit."""
    waves, labels, used = [], [], []
    for setting in settings(split):
        for digit in range(10):
            path = clip_path(cache_dir, *setting, digit)
            if not os.path.isfile(path):
                synthesize(path, *setting, digit)
            try:
                wave, sr = read_audio(path)
            except ValueError:  # a damaged cache file: make it again
                wave, sr = read_audio(synthesize(path, *setting, digit))
            waves.append(clean(wave, sr))
            labels.append(digit)
            used.append(setting)
    return tuple(waves), np.array(labels, dtype=np.int64), tuple(used)


def t2a_prompt(d: int, i: int = 0) -> str:
    return T2A_PROMPTS[i % len(T2A_PROMPTS)].format(w=DIGIT_WORDS[d], d=d)


def a2t_prompt(i: int = 0) -> str:
    return A2T_PROMPTS[i % len(A2T_PROMPTS)]


def all_texts() -> list[str]:
    """Every string the task uses, for training its text tokenizer."""
    texts = [str(d) for d in range(10)] + [a2t_prompt(i) for i in range(len(A2T_PROMPTS))]
    return texts + [t2a_prompt(d, i) for d in range(10) for i in range(len(T2A_PROMPTS))]


@dataclass
class SpokenDigitsDataset(TaskDataset):
    """Chat samples over one split: per clip a text-to-audio and an audio-to-text sample.
    Deterministic given ``seed``."""

    split: str = "train"
    seed: int = 0
    cache_dir: str = DEFAULT_CACHE
    kinds: tuple[str, ...] = ("t2a", "a2t")

    def __post_init__(self):
        self.check_kinds(self.kinds, ("t2a", "a2t"))
        self.waves, self.labels, self.settings = load_split(self.split, self.cache_dir)
        self.index = self.seeded_index(len(self.labels), self.kinds, self.seed)

    texts = staticmethod(all_texts)

    def audio(self, i: int) -> Audio:
        return Audio(self.waves[i], SAMPLING_RATE)

    def __getitem__(self, idx: int) -> list[Message]:
        kind, i, v = self.index[idx]
        digit = int(self.labels[i])
        if kind == "t2a":
            return [Message("user", t2a_prompt(digit, v)), Message("assistant", [self.audio(i)])]
        return [Message("user", [self.audio(i), a2t_prompt(v)]), Message("assistant", str(digit))]
