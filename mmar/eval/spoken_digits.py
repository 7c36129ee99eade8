"""Evaluate a model on the held-out spoken digits (voices, speeds and pitches unseen in training).

* audio-to-text: accuracy of the greedy answer to "which digit is said?" on every held-out clip;
* text-to-audio: ``per_digit`` clips per digit, generated with CFG and decoded to waveforms;
  accuracy = the share that an independent judge assigns to the prompted digit: an RBF SVC on
  MFCCs computed by librosa with analysis settings of its own (:data:`JUDGE`: 13 cepstra of a
  40-band mel at a 256-sample window and a 96-sample hop, 60-3800 Hz, with their deltas), not the
  model's tokenizer's log-mel (32 bands, window 512, hop 128), fitted on the training clips. The
  judge's own accuracy is reported on the real held-out clips and on the same clips after the model's
  tokenizer round trip (e.g. log-mel -> Griffin-Lim), the ceiling for generated audio.
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
SVC_C = 10.0
GRID_SCALE = 2
# the judge's features, chosen apart from any model's tokenizer settings: 8 kHz (the band every model
# here keeps), clips cut or padded to 0.768 s
JUDGE = {"sampling_rate": 8000, "seconds": 0.768, "n_mfcc": 13, "n_fft": 256, "hop_length": 96, "n_mels": 40,
         "fmin": 60.0, "fmax": 3800.0}


def mfcc_features(clips: list[Audio]) -> np.ndarray:
    """Per clip the flattened MFCCs and their deltas (librosa, :data:`JUDGE` settings): the judge's features."""
    import librosa

    sr, n = JUDGE["sampling_rate"], round(JUDGE["seconds"] * JUDGE["sampling_rate"])
    out = []
    for clip in clips:
        wave = np.asarray(clip.waveform, dtype=np.float32).reshape(-1)
        if clip.sampling_rate != sr:
            wave = librosa.resample(wave, orig_sr=clip.sampling_rate, target_sr=sr)
        wave = librosa.util.fix_length(wave, size=n)
        mfcc = librosa.feature.mfcc(y=wave, sr=sr, n_mfcc=JUDGE["n_mfcc"], n_fft=JUDGE["n_fft"],
                                    hop_length=JUDGE["hop_length"], n_mels=JUDGE["n_mels"], fmin=JUDGE["fmin"],
                                    fmax=JUDGE["fmax"])
        out.append(np.concatenate([mfcc, librosa.feature.delta(mfcc)]).reshape(-1))
    return np.stack(out)


class DigitClassifier:
    """Standardised MFCC features (:func:`mfcc_features`) + an RBF SVC, fitted on the training clips."""

    def __init__(self, cache_dir: str = DEFAULT_CACHE, seed: int = 0):
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        waves, labels, _ = load_split("train", cache_dir)
        self.model = make_pipeline(StandardScaler(), SVC(C=SVC_C, gamma="scale", random_state=seed))
        self.model.fit(self.features([Audio(w, SAMPLING_RATE) for w in waves]), labels)

    def features(self, clips: list[Audio]) -> np.ndarray:
        return mfcc_features(clips)

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


def judge_ceilings(clf: DigitClassifier, tokenizer, real: list[Audio], labels: np.ndarray) -> dict[str, float]:
    """The judge's accuracy on the real held-out clips and on the same clips after the tokenizer's round trip."""
    items = torch.stack([tokenizer.preprocess((c.waveform, c.sampling_rate)) for c in real])
    return {"classifier_heldout_accuracy": float(np.mean(clf.predict(real) == labels)),
            "classifier_round_trip_accuracy": float(np.mean(clf.predict(tokenizer.decode(tokenizer.encode(items)))
                                                            == labels))}


def answer_clips(pipe: MMARPipeline, clips: list[Audio]) -> list[str]:
    """The greedy answer to an audio-to-text prompt ("which digit is said?") for each clip."""
    answers = []
    for chunk in _batches(list(range(len(clips)))):
        prompts = [[Message("user", [clips[i], a2t_prompt(i)])] for i in chunk]
        answers += pipe(prompts, mode="text", temperature=0.0, max_new_tokens=4).text
    return answers


def generate_clips(pipe: MMARPipeline, digits: list[int], seed: int, **gen_kw) -> list[Audio]:
    """One clip per digit from its text-to-audio prompt, each from its own seeded generator."""
    clips: list[Audio] = []
    for k, chunk in enumerate(_batches(digits)):
        gens = [torch.Generator().manual_seed(seed * 100_003 + k * BATCH + i) for i in range(len(chunk))]
        out = pipe([t2a_prompt(d, i) for i, d in enumerate(chunk)], generator=gens, mode="audio", max_items=1,
                   **gen_kw)
        clips += [row[0] for row in out.audios]
    return clips


def _save(metrics: dict[str, Any], output: str | None, grid: str | None, audio_dir: str | None, tokenizer,
          clips: list[Audio], digits: list[int], per_digit: int) -> None:
    """``metrics`` as JSON to ``output``; the clips' spectrograms as a grid and the clips as WAV files
    (both next to ``output`` by default)."""
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
    answers = answer_clips(pipe, real)  # audio -> text (greedy)
    digits = [d for d in range(10) for _ in range(per_digit)]  # text -> audio (CFG)
    clips = generate_clips(pipe, digits, seed, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                           image_temperature=image_temperature)
    pred, target = clf.predict(clips), np.array(digits)
    head = pipe.model.config.modalities["audio"].head
    metrics = {
        "task": "spoken-digits", "model": str(model_dir),
        "audio_to_text_accuracy": float(np.mean([parse_digit(a) == y for a, y in zip(answers, labels)])),
        "text_to_audio_accuracy": float(np.mean(pred == target)),
        "text_to_audio_per_digit": {str(d): float(np.mean(pred[target == d] == d)) for d in range(10)},
        **judge_ceilings(clf, tokenizer, real, labels), "judge_features": dict(JUDGE),
        "n_heldout": int(len(labels)), "n_generated": len(clips), "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps or head["num_inference_steps"],
        "image_temperature": image_temperature or pipe.generation_config.image_temperature,
        "seed": seed, "eval_seconds": round(time.time() - t0, 1),
    }
    _save(metrics, output, grid, audio_dir, tokenizer, clips, digits, per_digit)
    return metrics
