"""Round trip of every tokenizer on its built-in data's held-out split: encode, decode, measure.

Images (pixels in [0, 1]): MSE and PSNR of ``decode_pixels(encode(x))`` against ``x``. Audio: the
phase is not kept by ``audio-mel`` (Griffin-Lim invents one), so waveform errors say little; both audio
tokenizers are scored on the decoded waveform's log-mel spectrogram against the input's (RMSE in dB,
the ``audio-mel`` analysis of configs/spoken-digits.yaml) and its spectral convergence
(``||S - S'|| / ||S||`` on STFT magnitudes); the codec, which keeps phase, also gets the waveform MSE
and SNR (clip power over error power). Times are one encode + decode pass over the split.

Trained tokenizers come from ``runs/`` and are trained first (``mmar train-tokenizer``) when their
directory is missing. The table goes into BENCHMARKS.md (section "roundtrip").

    python benchmarks/roundtrip.py [--num_threads 1] [--runs runs]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import ROOT, machine, update_section  # noqa: E402

BATCH = 256
SPOKEN_MEL = {"name": "audio-mel", "sampling_rate": 8000, "max_seconds": 0.768, "n_fft": 512, "hop_length": 128,
              "n_mels": 32, "frames_per_token": 4}  # configs/spoken-digits.yaml
DB_PER_UNIT = 10 * 1.5  # one normalised log-mel unit (log10 power / std 1.5) in dB
EXACT = 1e-12  # float round-off of an exact tokenizer (image-patch normalises and back)


def ensure_tokenizer(config: str, out: str) -> str:
    """Train ``config`` into ``out`` unless it already holds a tokenizer."""
    from mmar.cli import main as cli

    if not os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        print(f"training {out} from {config}", flush=True)
        assert cli(["train-tokenizer", "--config", os.path.join(ROOT, config), "--output_dir", out]) == 0
    return out


def timed(fn, items: torch.Tensor) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = torch.cat([fn(items[i:i + BATCH]) for i in range(0, len(items), BATCH)])
    return out, time.perf_counter() - start


def per_token(tok) -> str:
    if tok.kind == "discrete":
        return f"1 id of {tok.vocab_size} ({math.log2(tok.vocab_size):.1f} bits)"
    return f"{tok.token_dim} floats"


def image_row(label: str, tok, dataset: str) -> dict:
    from mmar.training.tokenizer_trainer import dataset_items

    x = dataset_items(dataset, "test", tok)
    recon, secs = timed(lambda b: tok.decode_pixels(tok.encode(b)).clamp(0, 1), x)
    mse = float((recon - x).pow(2).mean())
    return {"tokenizer": label, "data": f"{dataset} ({len(x)})", "tokens": tok.num_tokens(),
            "per_token": per_token(tok),
            "mse": f"{mse:.2g}" if mse > EXACT else f"{mse:.0e} (exact)",
            "psnr": f"{10 * math.log10(1 / mse):.1f}" if mse > EXACT else "∞", "seconds": secs}


def spectral_scores(mel, waves: torch.Tensor, recon: torch.Tensor) -> tuple[float, float]:
    """(log-mel RMSE in dB, spectral convergence) of ``recon`` against ``waves``, both ``[n, samples]``."""
    d_db = (mel.log_mel(recon) - mel.log_mel(waves)) * DB_PER_UNIT
    s, r = mel._stft(waves).abs(), mel._stft(recon).abs()
    convergence = torch.linalg.norm((s - r).flatten(1), dim=1) / torch.linalg.norm(s.flatten(1), dim=1).clamp(min=1e-8)
    return float(d_db.pow(2).mean().sqrt()), float(convergence.mean())


def audio_row(label: str, tok, waves: torch.Tensor, mel, roundtrip) -> dict:
    recon, secs = timed(roundtrip, waves)
    db, conv = spectral_scores(mel, waves, recon)
    row = {"tokenizer": label, "data": f"spoken-digits ({len(waves)})", "tokens": tok.num_tokens(),
           "per_token": per_token(tok), "mse": "–", "psnr": "–", "snr": "–", "logmel_db": f"{db:.2f}",
           "convergence": f"{conv:.3f}", "seconds": secs}
    if tok.name != "audio-mel":  # a codec keeps the phase: the waveform error means something
        mse = float((recon - waves).pow(2).mean())
        row.update(mse=f"{mse:.2g}", snr=f"{10 * math.log10(float(waves.pow(2).mean()) / mse):.1f}")
    return row


def spoken_waves(tok) -> torch.Tensor:
    from mmar.training.tokenizer_trainer import raw_items

    return torch.stack([tok.preprocess(x) for x in raw_items("spoken-digits", "test")])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs"), help="where trained tokenizers live / are trained")
    ap.add_argument("--num_threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    from mmar.tokenizers import ModalityTokenizer, available_tokenizers, build_tokenizer

    runs = args.runs
    rows = [image_row("image-patch 2x2", build_tokenizer({"name": "image-patch", "image_size": 8, "patch_size": 2,
                                                           "channels": 1}), "digits"),
            image_row("image-patch 4x4", build_tokenizer({"name": "image-patch", "image_size": 16, "patch_size": 4,
                                                           "channels": 3}), "shapes")]
    for name, dataset in (("vae", "digits"), ("vae", "shapes"), ("vq", "digits"), ("vq", "shapes")):
        path = ensure_tokenizer(f"configs/{name}-{dataset}.yaml", os.path.join(runs, f"{name}-{dataset}"))
        tok = ModalityTokenizer.from_pretrained(path)
        rows.append(image_row(f"image-{name} (`{os.path.relpath(path, ROOT)}`)", tok, dataset))

    mel = build_tokenizer(SPOKEN_MEL)
    waves = spoken_waves(mel)
    rows.append(audio_row("audio-mel + Griffin-Lim", mel, waves, mel, lambda b: mel.decode_waveforms(mel.encode(b))))
    codec_config = os.path.join(ROOT, "configs", "codec-spoken-digits.yaml")
    if "audio-codec" in available_tokenizers() and os.path.isfile(codec_config):
        path = ensure_tokenizer("configs/codec-spoken-digits.yaml", os.path.join(runs, "codec-spoken-digits"))
        codec = ModalityTokenizer.from_pretrained(path)
        codec_waves = spoken_waves(codec)
        if codec_waves.shape != waves.shape:
            raise ValueError(f"audio-codec clips are {tuple(codec_waves.shape)}, audio-mel's {tuple(waves.shape)}: "
                             "the two must read the same clips to be compared")
        rows.append(audio_row(f"audio-codec (`{os.path.relpath(path, ROOT)}`)", codec, codec_waves, mel,
                              codec.reconstruct))

    header = ("| tokenizer | data (held-out items) | tokens / item | per token | MSE | PSNR (dB) | waveform SNR (dB) "
              "| log-mel RMSE (dB) | spectral conv. | encode + decode |")
    table = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['tokenizer']} | {r['data']} | {r['tokens']} | {r['per_token']} | {r['mse']} | {r['psnr']} "
                     f"| {r.get('snr', '–')} | {r.get('logmel_db', '–')} | {r.get('convergence', '–')} "
                     f"| {r['seconds']:.2f} s |")
    body = [
        "## Tokenizer round trips (held-out splits)",
        "",
        f"`python benchmarks/roundtrip.py{' --num_threads ' + str(args.num_threads) if args.num_threads else ''}` "
        f"on {machine()}.",
        "",
        *table,
        "",
        "Images: MSE and PSNR of pixels in [0, 1] after encode + decode (image-patch is exact up to float "
        "round-off). Audio: the decoded waveform's log-mel spectrogram (32 bands, 8 kHz, floor 1e-5) against the "
        "input's, RMSE in dB, and the spectral convergence `||S - S'|| / ||S||` of its STFT magnitude (0 is "
        "perfect, 1 is as far as silence); `audio-mel` keeps no phase (Griffin-Lim makes one up), so it has no "
        "waveform MSE / SNR, while the codec's are measured against the clip's power. Per token: floats for "
        "continuous tokens, for discrete ones the id space the model predicts over (the codec's ids cover its "
        "codebooks through offsets, plus a pad id). Trained tokenizers: `mmar train-tokenizer --config "
        "configs/<name>.yaml`, read from `runs/` as they are when the script runs. Times: one pass over the split, "
        "batches of 256.",
    ]
    update_section("roundtrip", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
