"""Evaluate a model on the held-out spoken digits (voices, speeds and pitches unseen in training).

* audio-to-text: accuracy of the greedy answer to "which digit is said?" on every held-out clip;
* text-to-audio: ``per_digit`` clips per digit, generated with CFG and decoded to waveforms;
  accuracy = the share that an independent classifier (an RBF SVC on log-mel features, fitted on
  the training clips) assigns to the prompted digit. The classifier's own accuracy is reported on
  the real held-out clips and on the same clips after the model's tokenizer round trip
  (log-mel -> Griffin-Lim), the ceiling for generated audio.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from ..datasets.spoken_digits import DEFAULT_CACHE, SAMPLING_RATE, a2t_prompt, load_split, t2a_prompt
from ..pipeline import MMARPipeline
from ..sequence import Audio, Message
from ..tokenizers.audio_mel import AudioMelTokenizer, write_wav
from ..training.pictures import image_grid
from .digits import parse_digit

BATCH = 100
POOL_FRAMES = 2  # classifier features: log-mel frames averaged in pairs
SVC_C = 10.0
GRID_SCALE = 2


def _features(clips: list[Audio], extractor: AudioMelTokenizer) -> np.ndarray:
    """Flattened, time-pooled log-mel of each clip (a fixed feature extractor, not the model's)."""
    waves = torch.stack([extractor.preprocess((c.waveform, c.sampling_rate)) for c in clips])
    mel = torch.nn.functional.avg_pool1d(extractor.log_mel(waves), POOL_FRAMES)
    return mel.reshape(len(clips), -1).numpy()


class DigitClassifier:
    """Standardised log-mel features + an RBF SVC, fitted on the training clips."""

    def __init__(self, cache_dir: str = DEFAULT_CACHE, seed: int = 0):
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        self.extractor = AudioMelTokenizer()
        waves, labels, _ = load_split("train", cache_dir)
        self.model = make_pipeline(StandardScaler(), SVC(C=SVC_C, gamma="scale", random_state=seed))
        self.model.fit(self.features([Audio(w, SAMPLING_RATE) for w in waves]), labels)

    def features(self, clips: list[Audio]) -> np.ndarray:
        return _features(clips, self.extractor)

    def predict(self, clips: list[Audio]) -> np.ndarray:
        return self.model.predict(self.features(clips))


def spectrogram_image(tokenizer: AudioMelTokenizer, clip: Audio) -> PILImage.Image:
    """The clip's normalised log-mel as a greyscale picture (low frequencies at the bottom)."""
    wave = tokenizer.preprocess((clip.waveform, clip.sampling_rate))
    mel = tokenizer.log_mel(wave[None])[0].flip(0)
    lo, hi = float(mel.min()), float(mel.max())
    pixels = ((mel - lo) / max(hi - lo, 1e-6) * 255).round().to(torch.uint8).numpy()
    return PILImage.fromarray(pixels, "L")


def _batches(items: list, size: int = BATCH):
    for i in range(0, len(items), size):
        yield items[i: i + size]


def evaluate_spoken_digits(model_dir: str, output: str | None = None, grid: str | None = None,
                           guidance_scale: float | None = None, num_inference_steps: int | None = None, seed: int = 0,
                           image_temperature: float | None = None, per_digit: int = 10,
                           pipeline: MMARPipeline | None = None, cache_dir: str = DEFAULT_CACHE,
                           audio_dir: str | None = None, **_) -> dict[str, Any]:
    """Metrics as a dict (also written to ``output`` as JSON); ``grid`` gets a PNG of the generated
    clips' spectrograms (one row per digit) and ``audio_dir`` the generated clips as WAV files
    (both default to files next to ``output``). ``image_temperature`` is the diffusion head's sampling
    temperature (the pipeline's name for it, used for audio latents too; default: the model's)."""
    t0 = time.time()
    pipe = pipeline or MMARPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if guidance_scale is None:  # the model's own setting (generation_config.json)
        guidance_scale = pipe.generation_config.guidance_scale
    tokenizer = pipe.processor.modality_tokenizers.get("audio")
    if tokenizer is None:
        raise ValueError(f"{model_dir}: this model has no audio tokenizer; spoken-digits needs one")
    clf = DigitClassifier(cache_dir, seed)
    waves, labels, _ = load_split("test", cache_dir)
    real = [Audio(w, SAMPLING_RATE) for w in waves]
    clf_real = float(np.mean(clf.predict(real) == labels))
    items = torch.stack([tokenizer.preprocess((c.waveform, c.sampling_rate)) for c in real])
    clf_round_trip = float(np.mean(clf.predict(tokenizer.decode(tokenizer.encode(items))) == labels))

    # audio -> text (greedy)
    answers = []
    for chunk in _batches(list(range(len(labels)))):
        prompts = [[Message("user", [real[i], a2t_prompt(i)])] for i in chunk]
        answers += pipe(prompts, mode="text", temperature=0.0, max_new_tokens=4).text
    a2t = float(np.mean([parse_digit(a) == y for a, y in zip(answers, labels)]))

    # text -> audio (CFG)
    digits = [d for d in range(10) for _ in range(per_digit)]
    clips: list[Audio] = []
    for k, chunk in enumerate(_batches(digits)):
        gens = [torch.Generator().manual_seed(seed * 100_003 + k * BATCH + i) for i in range(len(chunk))]
        out = pipe([t2a_prompt(d, i) for i, d in enumerate(chunk)], generator=gens, mode="audio", max_items=1,
                   guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                   image_temperature=image_temperature)
        clips += [row[0] for row in out.audios]
    pred = clf.predict(clips)
    target = np.array(digits)
    head = pipe.model.config.modalities["audio"].head
    metrics = {
        "task": "spoken-digits", "model": str(model_dir),
        "audio_to_text_accuracy": a2t, "text_to_audio_accuracy": float(np.mean(pred == target)),
        "text_to_audio_per_digit": {str(d): float(np.mean(pred[target == d] == d)) for d in range(10)},
        "classifier_heldout_accuracy": clf_real, "classifier_round_trip_accuracy": clf_round_trip,
        "n_heldout": int(len(labels)), "n_generated": len(clips), "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps or head["num_inference_steps"],
        "image_temperature": image_temperature or pipe.generation_config.image_temperature,
        "seed": seed, "eval_seconds": round(time.time() - t0, 1),
    }
    stem = os.path.splitext(output)[0] if output else None
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            json.dump(metrics, f, indent=2)
    grid = grid or (stem + "_grid.png" if stem else None)
    if grid:
        image_grid([spectrogram_image(tokenizer, c) for c in clips], cols=per_digit, scale=GRID_SCALE).save(grid)
        metrics["grid"] = grid
    audio_dir = audio_dir or (stem + "_audio" if stem else None)
    if audio_dir:
        for i, (d, clip) in enumerate(zip(digits, clips)):
            write_wav(os.path.join(audio_dir, f"{d}_{i % per_digit}.wav"), clip)
        metrics["audio_dir"] = audio_dir
    return metrics
