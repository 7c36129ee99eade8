"""``mmar train-tokenizer``: learn a tokenizer's weights (the ``image-vq`` codebook, a small ``image-vae``,
an ``audio-codec``) on a built-in dataset, save it where a model config can point
(``tokenizer: {path: DIR}``), and report its reconstruction error on the training and held-out splits.

A trainable tokenizer implements two methods:

* ``fit(items, steps=..., batch_size=..., seed=..., **options) -> list[float]``: learn from preprocessed
  items ``[n, ...]``; returns a loss / error history (plotted to ``fit_curve.png``);
* ``reconstruct(items) -> items``: encode then decode, in the preprocessed space; the error is measured
  against the input (MSE and PSNR over the tokenizer's value range, see :func:`reconstruction`).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from ..tokenizers import build_tokenizer
from ..types import Audio, Item, parse_part

DEFAULTS = {"output_dir": "runs/tokenizer", "dataset": "digits", "steps": 300, "batch_size": 512, "seed": 0,
            "fit": {}}
DATASETS = ("digits", "shapes", "scenes", "spoken-digits")


def raw_items(name: str, split: str) -> list:
    """The raw items (images as arrays, waveforms with their rate) of a built-in dataset's split."""
    if name == "digits":
        from ..datasets.digits import load_digit_split

        return list(load_digit_split(split)[0])
    if name == "shapes":
        from ..datasets.shapes import load_split

        return list(load_split(split)[1])
    if name == "scenes":
        from ..data.scenes import load_split as load_scenes

        return list(load_scenes(split)[1])
    if name == "spoken-digits":
        from ..datasets.spoken_digits import SAMPLING_RATE, load_split

        return [(w, SAMPLING_RATE) for w in load_split(split)[0]]
    raise ValueError(f"train-tokenizer: unknown dataset {name!r} (built in: {', '.join(DATASETS)})")


def dataset_items(name: str, split: str, tok) -> torch.Tensor:
    """A split preprocessed by ``tok``: ``[n, ...]``."""
    items = [_segment(x) for x in raw_items(name, split)]
    if items[0].modality != tok.modality:
        raise ValueError(f"train-tokenizer: dataset {name!r} has no {tok.modality} for tokenizer {tok.name!r}")
    return torch.stack([tok.preprocess(x.raw()) for x in items])


def _segment(x) -> Item:
    """A raw dataset item as its segment: a ``(waveform, rate)`` pair is an audio clip, an array an image."""
    return Audio.from_value(x) if isinstance(x, tuple) else parse_part(np.asarray(x))


def reconstruct(tok, items: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    if hasattr(tok, "reconstruct"):
        fn = tok.reconstruct
    else:  # image tokenizers: pixels in [0, 1] through decode_pixels
        def fn(x):
            return tok.decode_pixels(tok.encode(x)).clamp(0, 1)
    with torch.no_grad():
        return torch.cat([fn(items[i:i + batch_size]) for i in range(0, len(items), batch_size)])


def log_mel_distance_db(recon: torch.Tensor, items: torch.Tensor, sampling_rate: int) -> float:
    """Mean absolute difference of the two waveforms' log-mel spectrograms (32 bands, audio-mel's
    analysis at ``sampling_rate``), in dB; quiet bins sit at audio-mel's -50 dB floor."""
    from ..tokenizers.audio_mel import AudioMelTokenizer

    mel = AudioMelTokenizer(sampling_rate, max_seconds=items.shape[1] / sampling_rate, frames_per_token=1)
    diffs = [(mel.log_mel(recon[i:i + 256]) - mel.log_mel(items[i:i + 256])).abs().sum()
             for i in range(0, len(items), 256)]
    frames = mel.log_mel(items[:1]).numel() * len(items)
    return float(sum(diffs) / frames * mel.std * 10)


def reconstruction(tok, items: torch.Tensor) -> dict[str, float]:
    """MSE and PSNR. For pixels the peak is their value range (1 for [0, 1]); for audio it is the signal's
    real range, the peak-to-peak amplitude of the held-out waveforms (``psnr_peak``; not the nominal 2 of
    [-1, 1], which flatters quiet speech), and the report adds the waveform SNR and the log-mel spectral
    distance in dB (PSNR says little about how audio sounds)."""
    recon = reconstruct(tok, items)
    mse = float((recon - items).pow(2).mean())
    peak = float(getattr(tok, "value_range", 1.0))
    if tok.modality == Audio.modality:
        peak = float(items.max() - items.min())
    report = {"mse": mse, "psnr_db": float(10 * np.log10(peak ** 2 / max(mse, 1e-12))), "psnr_peak": peak}
    if tok.modality == Audio.modality:
        snr = float(items.pow(2).mean()) / max(mse, 1e-12)
        report["waveform_snr_db"] = float(10 * np.log10(max(snr, 1e-12)))
        report["log_mel_distance_db"] = log_mel_distance_db(recon, items, tok.sampling_rate)
    return report


def plot_fit_curve(history: list[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(history)
    ax.set_yscale("log")
    ax.set_xlabel("logged step")
    ax.set_ylabel("fit loss")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_tokenizer(config: dict) -> dict:
    cfg = {**DEFAULTS, **config}
    unknown = set(cfg) - set(DEFAULTS) - {"tokenizer"}
    if unknown:
        raise ValueError(f"train-tokenizer: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: tokenizer, {', '.join(DEFAULTS)}")
    if "tokenizer" not in cfg:
        raise ValueError("train-tokenizer: the config needs a 'tokenizer' spec, e.g. {name: image-vq}")
    torch.manual_seed(cfg["seed"])
    tok = build_tokenizer(cfg["tokenizer"])
    if not hasattr(tok, "fit"):
        raise ValueError(f"tokenizer {tok.name!r} has nothing to train")
    start = time.time()
    train = dataset_items(cfg["dataset"], "train", tok)
    history = tok.fit(train, steps=cfg["steps"], batch_size=cfg["batch_size"], seed=cfg["seed"], **cfg["fit"])
    tok.save_pretrained(cfg["output_dir"])
    report = {"tokenizer": tok.name, "dataset": cfg["dataset"], "train": reconstruction(tok, train),
              "heldout": reconstruction(tok, dataset_items(cfg["dataset"], "test", tok)),
              "fit_history": history, "seconds": round(time.time() - start, 1)}
    with open(os.path.join(cfg["output_dir"], "reconstruction.json"), "w") as f:
        json.dump(report, f, indent=2)
    if history:
        plot_fit_curve(history, os.path.join(cfg["output_dir"], "fit_curve.png"), f"{tok.name} on {cfg['dataset']}")
    return report
