"""``audio-mel``: a waveform becomes log-mel frames grouped into tokens; Griffin-Lim turns them back.

No learned weights. A clip is resampled to ``sampling_rate``, padded with silence or cropped to
``max_seconds`` (the model needs a fixed number of tokens per item), turned into a log-mel power
spectrogram (``n_mels`` bands, one frame every ``hop_length`` samples) and normalised to roughly
unit scale. Every ``frames_per_token`` consecutive frames become one token of
``frames_per_token * n_mels`` values (frame-major). Decoding undoes the normalisation, maps mel
power back to linear frequencies (non-negative least squares) and recovers a phase with fast
Griffin-Lim (torch STFT / ISTFT), giving :class:`mmar.sequence.Audio` items.

Paths are read by :func:`mmar.io.read_audio` (only the seconds a clip keeps); bad files (missing,
unreadable, truncated WAV, no samples, NaN / inf, a sampling rate out of bounds) raise errors naming the
file and the problem.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Any

import numpy as np
import torch

# reading and writing audio files live in mmar.io (the one place); the old names stay importable here
from ..io import RESAMPLE_MARGIN_SECONDS, check_sampling_rate, read_audio, write_wav  # noqa: F401
from ..types import Audio
from .base import ModalityTokenizer, register_tokenizer
from .layout import frames_to_tokens, tokens_to_frames

INT_SCALES = {np.dtype(np.int16): 32768.0, np.dtype(np.int32): 2147483648.0, np.dtype(np.uint8): 128.0}
MAX_CHANNELS = 8  # a 2-D array with more than this many "channels" is a mistake, not multichannel audio
MAX_POLYPHASE = 1000  # resampling ratios are kept to up / down factors of about this size (filter length)
NNLS_ITERS = 30  # multiplicative updates of the mel -> linear inversion
EPS = 1e-10


def to_mono(waveform: Any) -> np.ndarray:
    """A 1-D float32 waveform from a 1-D array or ``[samples, channels]`` / ``[channels, samples]``."""
    if isinstance(waveform, torch.Tensor):
        waveform = waveform.detach().cpu().numpy()
    arr = np.asarray(waveform)
    if arr.dtype in INT_SCALES:
        arr = arr.astype(np.float32) / INT_SCALES[arr.dtype] - (1.0 if arr.dtype == np.uint8 else 0.0)
    elif not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"waveform must hold floats or int16/int32 PCM, got dtype {arr.dtype}")
    if arr.ndim == 2 and min(arr.shape) <= MAX_CHANNELS:
        arr = arr.mean(axis=int(np.argmin(arr.shape)))
    if arr.ndim != 1:
        raise ValueError(f"waveform has shape {tuple(arr.shape)}; expected 1-D samples "
                         f"(or [samples, channels] with at most {MAX_CHANNELS} channels)")
    return arr.astype(np.float32, copy=False)


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int, max_samples: int | None = None) -> np.ndarray:
    """Polyphase resampling (scipy) from ``orig_sr`` to ``target_sr``. With ``max_samples`` the input is
    cropped first to what those output samples need (plus the filter's support), so the work and memory
    follow the output, never the input's length."""
    if max_samples is not None:
        needed = math.ceil(max_samples * orig_sr / target_sr) + math.ceil(RESAMPLE_MARGIN_SECONDS * orig_sr)
        waveform = waveform[:needed]
    if orig_sr == target_sr:
        return waveform[:max_samples]
    from scipy.signal import resample_poly

    ratio = Fraction(int(target_sr), int(orig_sr))
    if max(ratio.numerator, ratio.denominator) > MAX_POLYPHASE:
        # a rate coprime with the target (say 40787 Hz) would need a filter of 10 x 40787 x 2 taps: the
        # nearest ratio with a small denominator is off by about one part in a million, inaudible
        ratio = ratio.limit_denominator(MAX_POLYPHASE)
    return resample_poly(waveform, ratio.numerator, ratio.denominator).astype(np.float32)[:max_samples]


@register_tokenizer("audio-mel")
class AudioMelTokenizer(ModalityTokenizer):
    modality = "audio"
    kind = "continuous"

    def __init__(self, sampling_rate: int = 8000, max_seconds: float = 0.768, n_fft: int = 512,
                 hop_length: int = 128, n_mels: int = 32, frames_per_token: int = 4, f_min: float = 0.0,
                 f_max: float | None = None, log_floor: float = 1e-5, mean: float = -2.5, std: float = 1.5,
                 griffin_lim_iters: int = 32, momentum: float = 0.99):
        if hop_length > n_fft:
            raise ValueError(f"hop_length {hop_length} is larger than n_fft {n_fft}")
        self.sampling_rate, self.max_seconds = int(sampling_rate), float(max_seconds)
        self.n_fft, self.hop_length, self.n_mels = n_fft, hop_length, n_mels
        self.frames_per_token, self.f_min, self.f_max = frames_per_token, f_min, f_max
        self.log_floor, self.mean, self.std = log_floor, mean, std
        self.griffin_lim_iters, self.momentum = griffin_lim_iters, momentum
        self.num_samples = round(self.max_seconds * self.sampling_rate)
        self.num_frames = (self.num_samples // hop_length) // frames_per_token * frames_per_token
        if self.num_frames == 0:
            raise ValueError(f"max_seconds {max_seconds} gives fewer than frames_per_token={frames_per_token} "
                             f"frames at hop_length {hop_length} and {sampling_rate} Hz")
        self.token_dim = frames_per_token * n_mels
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels, min_frequency=f_min,
                             max_frequency=f_max or sampling_rate / 2, sampling_rate=sampling_rate,
                             norm="slaney", mel_scale="slaney")
        self.mel_basis = torch.from_numpy(fb.T.astype(np.float32))  # [n_mels, n_freq]
        self.window = torch.hann_window(n_fft)

    def config(self) -> dict[str, Any]:
        return dict(sampling_rate=self.sampling_rate, max_seconds=self.max_seconds, n_fft=self.n_fft,
                    hop_length=self.hop_length, n_mels=self.n_mels, frames_per_token=self.frames_per_token,
                    f_min=self.f_min, f_max=self.f_max, log_floor=self.log_floor, mean=self.mean, std=self.std,
                    griffin_lim_iters=self.griffin_lim_iters, momentum=self.momentum)

    def num_tokens(self, item: Any = None) -> int:
        return self.num_frames // self.frames_per_token

    # -- raw <-> waveform ----------------------------------------------------------------------
    def preprocess(self, raw: Any) -> torch.Tensor:
        """A path, ``(path_or_waveform, sampling_rate)``, an :class:`Audio`-like object or a 1-D
        waveform already at ``sampling_rate`` -> float32 ``[num_samples]`` (resampled, padded / cropped)."""
        sr = None
        if hasattr(raw, "waveform"):
            raw, sr = raw.waveform, raw.sampling_rate
        elif isinstance(raw, tuple) and len(raw) == 2:
            raw, sr = raw
        where = ""
        if isinstance(raw, (str, os.PathLike)):
            where = f"{os.fspath(raw)}: "
            raw, file_sr = read_audio(raw, max_seconds=self.max_seconds)  # never more than a clip holds
            if sr is not None and sr != file_sr:
                raise ValueError(f"{where}the file is at {file_sr} Hz but sampling_rate={sr} was given")
            sr = file_sr
        elif not isinstance(raw, (np.ndarray, torch.Tensor, list)):
            raise TypeError(f"cannot read audio from {type(raw).__name__}; give a path, or a waveform "
                            "with its sampling rate")
        elif sr is None:
            raise ValueError("a waveform needs its sampling rate: give Audio(waveform, sampling_rate)")
        sr = check_sampling_rate(sr, where)
        wave = to_mono(raw)
        if wave.size == 0:
            raise ValueError(f"{where}the audio has no samples (zero length)")
        # crop before checking and resampling: the cost follows the clip a model keeps, not the input
        wave = resample(wave, sr, self.sampling_rate, max_samples=self.num_samples)
        if not np.isfinite(wave).all():
            raise ValueError(f"{where}the audio contains NaN or inf samples")
        out = torch.zeros(self.num_samples)
        out[: wave.shape[0]] = torch.from_numpy(np.ascontiguousarray(wave))
        return out

    # -- waveform <-> log-mel ------------------------------------------------------------------
    def _stft(self, wave: torch.Tensor) -> torch.Tensor:
        return torch.stft(wave, self.n_fft, self.hop_length, window=self.window.to(wave.device),
                          center=True, return_complex=True)

    def log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        """``[B, num_samples]`` -> normalised log-mel ``[B, n_mels, num_frames]``."""
        power = self._stft(waves.float()).abs().pow(2)[..., : self.num_frames]
        mel = self.mel_basis.to(power.device) @ power
        return (mel.clamp(min=self.log_floor).log10() - self.mean) / self.std

    def mel_power(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel -> mel power, with the floor mapped back to silence."""
        log_power = log_mel.float() * self.std + self.mean
        floor = math.log10(self.log_floor)
        return torch.where(log_power <= floor, torch.zeros_like(log_power), 10.0 ** log_power)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, num_samples]`` -> ``[B, num_tokens, frames_per_token * n_mels]``."""
        return frames_to_tokens(self.log_mel(batch), self.frames_per_token)

    def tokens_to_log_mel(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens_to_frames(tokens.float(), self.frames_per_token)

    # -- log-mel -> waveform -------------------------------------------------------------------
    def linear_magnitude(self, mel_power: torch.Tensor) -> torch.Tensor:
        """Mel power ``[B, n_mels, T]`` -> linear magnitude ``[B, n_freq, T]`` (non-negative least squares
        by multiplicative updates, started from the clamped pseudo-inverse)."""
        basis = self.mel_basis.to(mel_power.device)
        spec = (torch.linalg.pinv(basis) @ mel_power).clamp(min=EPS)
        gram, target = basis.T @ basis, basis.T @ mel_power
        for _ in range(NNLS_ITERS):
            spec = spec * target / (gram @ spec + EPS)
        return spec.sqrt()

    def griffin_lim(self, magnitude: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Fast Griffin-Lim (Perraudin et al. 2013): a phase for ``magnitude [B, n_freq, T]`` -> waveforms."""
        extra = self._stft(torch.zeros(1, self.num_samples)).shape[-1] - magnitude.shape[-1]
        mag = torch.cat([magnitude, magnitude[..., -1:].expand(*magnitude.shape[:-1], extra)], -1)
        gen = generator or torch.Generator().manual_seed(0)
        angles = torch.polar(torch.ones_like(mag), 2 * math.pi * torch.rand(mag.shape, generator=gen))
        window = self.window.to(mag.device)
        previous = torch.zeros_like(angles)
        for _ in range(self.griffin_lim_iters):
            wave = torch.istft(mag * angles, self.n_fft, self.hop_length, window=window, length=self.num_samples)
            rebuilt = self._stft(wave)
            angles = rebuilt - (self.momentum / (1 + self.momentum)) * previous
            angles = angles / (angles.abs() + EPS)
            previous = rebuilt
        return torch.istft(mag * angles, self.n_fft, self.hop_length, window=window, length=self.num_samples)

    @torch.no_grad()
    def decode_waveforms(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[B, num_tokens, token_dim]`` -> waveforms ``[B, num_samples]`` in [-1, 1]."""
        magnitude = self.linear_magnitude(self.mel_power(self.tokens_to_log_mel(tokens.cpu())))
        return self.griffin_lim(magnitude).clamp(-1.0, 1.0)

    def decode(self, tokens: torch.Tensor) -> list:
        return [Audio(waveform=w.numpy().astype(np.float32), sampling_rate=self.sampling_rate)
                for w in self.decode_waveforms(tokens)]
