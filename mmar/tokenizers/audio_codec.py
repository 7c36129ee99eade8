"""``audio-codec``: discrete audio tokens from a neural codec (transformers' ``EncodecModel``).

A clip is resampled, padded / cropped to ``max_seconds`` (exactly as ``audio-mel`` does) and encoded
by EnCodec into ``num_codebooks`` residual-VQ codes per frame (``[Q, T]``). The LLM reads one flat
sequence, so the codes are laid out in one of two ways:

* ``"frame"`` (AnyGPT): frame by frame, ``t0q0 t0q1 ... t1q0 t1q1 ...`` -> ``T * Q`` tokens;
* ``"delay"`` (MusicGen): codebook ``q`` is shifted right by ``q`` steps, so step ``s`` holds
  ``(s, q0), (s-1, q1), ...``; the ``Q - 1`` corners the shift leaves empty hold a dedicated
  ``pad`` id -> ``(T + Q - 1) * Q`` tokens.

All codebooks share one id space through offsets: code ``c`` of codebook ``q`` is id
``q * codebook_size + c``; the delay pattern adds the pad id ``Q * codebook_size``. Decoding reads
each position as the codebook it belongs to: an id of another codebook keeps its code index
(``id % codebook_size``), a pad or out-of-range id counts as a missing code, which adds nothing
to the frame's residual sum. Any id tensor of the right length decodes.

The codec is a local checkpoint (``codec_path``, a directory saved with ``save_pretrained``;
safetensors only) or a small one built from ``codec_config`` and trained with :meth:`fit`:
transformers' quantizer is inference-only, so training runs the encoder, a straight-through
residual VQ (commitment loss, EMA codebooks initialised by k-means, dead codes replaced by
encoder outputs) and the decoder, under an L1 waveform + multi-resolution log-mel loss.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from .audio_mel import AudioMelTokenizer
from ..types import Audio
from .base import ModalityTokenizer, register_tokenizer

CODEC_DIR = "codec"
PATTERNS = ("delay", "frame")
DEFAULT_CODEC = {  # ~0.4 M parameters: 8 kHz, one frame per 128 samples, codebooks of 256
    "num_filters": 16, "hidden_size": 64, "upsampling_ratios": [8, 4, 4], "num_residual_layers": 1,
    "num_lstm_layers": 1, "codebook_size": 256, "kernel_size": 7, "last_kernel_size": 7,
}
LOSS_FFTS = (256, 512, 1024)  # multi-resolution log-mel loss, n_fft at 8 kHz (scaled with the rate)
LOSS_MELS = (16, 32, 64)
KMEANS_ITERS = 10
KMEANS_VECTORS = 8192
LOG_EVERY = 10


def flatten_codes(codes: torch.Tensor, codebook_size: int, pattern: str) -> torch.Tensor:
    """Codes ``[B, Q, T]`` -> ids ``[B, num_tokens]`` (offset per codebook; see the module doc)."""
    b, q, t = codes.shape
    ids = codes.long() + codebook_size * torch.arange(q, device=codes.device)[None, :, None]
    if pattern == "frame":
        return rearrange(ids, "b q t -> b (t q)")
    grid = torch.full((b, t + q - 1, q), q * codebook_size, dtype=torch.long, device=codes.device)
    for k in range(q):  # codebook k delayed by k steps
        grid[:, k: k + t, k] = ids[:, k]
    return rearrange(grid, "b s q -> b (s q)")


def unflatten_ids(ids: torch.Tensor, codebook_size: int, num_codebooks: int, pattern: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids ``[B, num_tokens]`` -> codes ``[B, Q, T]`` and a mask of the valid ones. Ids of another
    codebook keep their code index; pad / out-of-range ids are invalid (their code reads as 0)."""
    n, q = ids.shape[1], num_codebooks
    grid = rearrange(ids.long(), "b (s q) -> b s q", q=q)
    if pattern == "delay":
        t = n // q - q + 1
        grid = torch.stack([grid[:, k: k + t, k] for k in range(q)], dim=2)
    valid = (grid >= 0) & (grid < q * codebook_size)
    codes = torch.where(valid, grid.remainder(codebook_size), torch.zeros_like(grid))
    return rearrange(codes, "b t q -> b q t"), rearrange(valid, "b t q -> b q t")


@register_tokenizer("audio-codec")
class AudioCodecTokenizer(ModalityTokenizer):
    modality = "audio"
    kind = "discrete"
    value_range = 2.0  # waveforms in [-1, 1]

    def __init__(self, codec_path: str | None = None, codec_config: dict | None = None,
                 sampling_rate: int | None = None, max_seconds: float = 0.768, num_codebooks: int = 2,
                 flatten: str = "delay", allow_untrained: bool = False):
        from transformers import EncodecConfig, EncodecModel

        if flatten not in PATTERNS:
            raise ValueError(f"audio-codec: flatten must be one of {PATTERNS}, got {flatten!r}")
        if codec_path is not None and codec_config is not None:
            raise ValueError("audio-codec: give codec_path (a trained codec) or codec_config (a new one), not both")
        if int(num_codebooks) < 1:
            raise ValueError(f"audio-codec: num_codebooks must be at least 1, got {num_codebooks}")
        self.num_codebooks, self.flatten, self.allow_untrained = int(num_codebooks), flatten, allow_untrained
        self.codec_path = None if codec_path is None else os.fspath(codec_path)
        if self.codec_path is not None:
            if not os.path.isdir(self.codec_path):
                raise FileNotFoundError(f"{self.codec_path}: no codec directory here (save one with "
                                        "EncodecModel.save_pretrained)")
            if not any(f.endswith(".safetensors") for f in os.listdir(self.codec_path)):
                raise FileNotFoundError(f"{self.codec_path}: no .safetensors weights (codecs load from "
                                        "safetensors only)")
            self.codec = EncodecModel.from_pretrained(self.codec_path, use_safetensors=True)
            self.codec_config = None
            if sampling_rate is not None and int(sampling_rate) != self.codec.config.sampling_rate:
                raise ValueError(f"{self.codec_path}: the codec runs at {self.codec.config.sampling_rate} Hz, "
                                 f"not sampling_rate={sampling_rate}")
        else:
            sr = int(sampling_rate or (codec_config or {}).get("sampling_rate") or 8000)
            cfg = {**DEFAULT_CODEC, **(codec_config or {}), "sampling_rate": sr}
            frame_rate = math.ceil(sr / math.prod(cfg["upsampling_ratios"]))
            bits = math.ceil(math.log2(cfg["codebook_size"]))
            # half a codebook of slack keeps the floor() in transformers' bandwidth -> n_q exact
            cfg.setdefault("target_bandwidths", [(self.num_codebooks + 0.5) * bits * frame_rate / 1000])
            self.codec_config = cfg
            self.codec = EncodecModel(EncodecConfig(**cfg))
        self.codec.eval()
        c = self.codec.config
        if c.audio_channels != 1 or c.chunk_length_s is not None or c.normalize:
            raise ValueError("audio-codec: only mono codecs without chunking or normalisation are supported "
                             f"(got audio_channels={c.audio_channels}, chunk_length_s={c.chunk_length_s}, "
                             f"normalize={c.normalize})")
        self.trained = self.codec_path is not None
        self.sampling_rate, self.max_seconds = int(c.sampling_rate), float(max_seconds)
        self.codebook_size, self.hop = int(c.codebook_size), int(c.hop_length)
        usable = [b for b in c.target_bandwidths
                  if self.codec.quantizer.get_num_quantizers_for_bandwidth(b) >= self.num_codebooks]
        if not usable:
            raise ValueError(f"audio-codec: the codec has {c.num_quantizers} codebooks, fewer than "
                             f"num_codebooks={self.num_codebooks}")
        self.bandwidth = min(usable)
        n_fft = 2 ** round(math.log2(self.sampling_rate / 16))  # 512 at 8 kHz: the audio-mel defaults
        self.mel = AudioMelTokenizer(self.sampling_rate, max_seconds, n_fft=n_fft, hop_length=n_fft // 4,
                                     frames_per_token=1)  # preprocess + log_mel
        self.num_samples = self.mel.num_samples
        self.num_frames = math.ceil(self.num_samples / self.hop)
        self.pad_id = self.num_codebooks * self.codebook_size
        self.vocab_size = self.pad_id + (1 if flatten == "delay" else 0)
        self.token_dim = None
        self._loss_mels = None

    def config(self) -> dict[str, Any]:
        return dict(codec_path=self.codec_path, codec_config=self.codec_config, sampling_rate=self.sampling_rate,
                    max_seconds=self.max_seconds, num_codebooks=self.num_codebooks, flatten=self.flatten)

    def num_tokens(self, item: Any = None) -> int:
        steps = self.num_frames + (self.num_codebooks - 1 if self.flatten == "delay" else 0)
        return steps * self.num_codebooks

    def preprocess(self, raw: Any) -> torch.Tensor:
        """Same input forms and checks as ``audio-mel``: -> float32 ``[num_samples]``."""
        return self.mel.preprocess(raw)

    def log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        """``[B, num_samples]`` -> normalised log-mel ``[B, n_mels, frames]`` (for pictures and metrics)."""
        return self.mel.log_mel(waves)

    # -- waveform <-> codes <-> ids ------------------------------------------------------------
    def _check_waves(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 2 or batch.shape[1] != self.num_samples:
            raise ValueError(f"audio-codec: expected preprocessed waveforms [B, {self.num_samples}], "
                             f"got shape {tuple(batch.shape)}")
        return batch.float()

    @torch.no_grad()
    def encode_codes(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, num_samples]`` -> codes ``[B, num_codebooks, num_frames]``."""
        if not (self.trained or self.allow_untrained):
            raise ValueError("audio-codec: the codec is untrained; run `mmar train-tokenizer --config "
                             "configs/codec-spoken-digits.yaml`, load one with codec_path=, or pass "
                             "allow_untrained=True (tests)")
        out = self.codec.encode(self._check_waves(batch)[:, None], bandwidth=self.bandwidth)
        return out.audio_codes[0, :, : self.num_codebooks]

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, num_samples]`` -> token ids ``[B, num_tokens]``."""
        return flatten_codes(self.encode_codes(batch), self.codebook_size, self.flatten)

    def ids_to_codes(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.as_tensor(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] != self.num_tokens():
            raise ValueError(f"audio-codec: expected token ids [B, {self.num_tokens()}], got shape {tuple(ids.shape)}")
        if ids.is_floating_point():
            ids = ids.nan_to_num(-1).round()
        return unflatten_ids(ids.cpu(), self.codebook_size, self.num_codebooks, self.flatten)

    def dequantize(self, codes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Codes ``[B, Q, T]`` -> the summed codebook vectors ``[B, D, T]``; invalid codes add nothing."""
        out = 0.0
        for k in range(codes.shape[1]):
            vec = self.codec.quantizer.layers[k].decode(codes[:, k])  # B, D, T
            out = out + (vec if valid is None else vec * valid[:, k, None].to(vec.dtype))
        return out

    @torch.no_grad()
    def decode_waveforms(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, num_tokens]`` -> waveforms ``[B, num_samples]`` in [-1, 1]."""
        codes, valid = self.ids_to_codes(ids)
        if bool(valid.all()):  # the codec's own decode path
            wave = self.codec.decode(codes[None], [None]).audio_values
        else:
            wave = self.codec.decoder(self.dequantize(codes, valid))
        return wave[:, 0, : self.num_samples].clamp(-1.0, 1.0)

    def decode(self, tokens: torch.Tensor) -> list:
        return [Audio(waveform=w.numpy(), sampling_rate=self.sampling_rate) for w in self.decode_waveforms(tokens)]

    @torch.no_grad()
    def reconstruct(self, items: torch.Tensor) -> torch.Tensor:
        """Encode then decode: waveforms ``[B, num_samples]`` -> the same shape."""
        return self.decode_waveforms(self.encode(items))

    # -- training ------------------------------------------------------------------------------
    def spectral_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L1 on the waveform plus L1 between normalised log-mels at several resolutions."""
        if self._loss_mels is None:
            scale = self.sampling_rate / 8000
            self._loss_mels = [AudioMelTokenizer(self.sampling_rate, self.max_seconds, n_fft=round(n * scale),
                                                 hop_length=round(n * scale) // 4, n_mels=m, frames_per_token=1)
                               for n, m in zip(LOSS_FFTS, LOSS_MELS)]
        loss = F.l1_loss(recon, target)
        for mel in self._loss_mels:
            loss = loss + F.l1_loss(mel.log_mel(recon), mel.log_mel(target)) / len(self._loss_mels)
        return loss

    @torch.no_grad()
    def evaluate(self, items: torch.Tensor, batch_size: int = 64) -> float:
        """The mean :meth:`spectral_loss` of the encode -> decode round trip on ``items``."""
        losses = [self.spectral_loss(self.reconstruct(items[i: i + batch_size]), items[i: i + batch_size]) * len(
            items[i: i + batch_size]) for i in range(0, len(items), batch_size)]
        return float(sum(losses) / len(items))

    def _codebooks(self):
        return [layer.codebook for layer in self.codec.quantizer.layers[: self.num_codebooks]]

    @torch.no_grad()
    def _kmeans_init(self, latents: torch.Tensor, generator: torch.Generator) -> None:
        """Each codebook <- k-means centroids of the residuals the previous codebooks leave."""
        residual = latents
        for cb in self._codebooks():
            k = cb.embed.shape[0]
            centroids = residual[torch.randperm(len(residual), generator=generator)[:k]].clone()
            if len(centroids) < k:  # fewer vectors than codes: repeat them with a little noise
                reps = centroids[torch.randint(0, len(centroids), (k - len(centroids),), generator=generator)]
                centroids = torch.cat([centroids, reps + 1e-3 * torch.randn(reps.shape, generator=generator)])
            for _ in range(KMEANS_ITERS):
                assign = torch.cdist(residual, centroids).argmin(1)
                counts = torch.bincount(assign, minlength=k).float()
                sums = torch.zeros_like(centroids).index_add_(0, assign, residual)
                centroids = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centroids)
            cb.embed.copy_(centroids)
            cb.embed_avg.copy_(centroids)
            cb.cluster_size.fill_(1.0)
            residual = residual - centroids[torch.cdist(residual, centroids).argmin(1)]

    def _quantize_train(self, latents: torch.Tensor, decay: float, dead_threshold: float,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Straight-through residual VQ of ``[B, D, T]`` with EMA codebook updates; returns the
        quantized latents (gradients pass to the encoder unchanged) and the commitment loss."""
        flat = rearrange(latents, "b d t -> (b t) d")
        residual, quantized, commit = flat, torch.zeros_like(flat), flat.new_zeros(())
        for cb in self._codebooks():
            with torch.no_grad():
                r = residual.detach()
                assign = torch.cdist(r, cb.embed).argmin(1)
                k = cb.embed.shape[0]
                counts = torch.bincount(assign, minlength=k).float()
                sums = torch.zeros_like(cb.embed).index_add_(0, assign, r)
                cb.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
                cb.embed_avg.mul_(decay).add_(sums, alpha=1 - decay)
                n = cb.cluster_size.sum()
                smoothed = (cb.cluster_size + 1e-5) / (n + k * 1e-5) * n
                cb.embed.copy_(cb.embed_avg / smoothed[:, None])
                vec = cb.embed[assign]
                dead = (cb.cluster_size < dead_threshold).nonzero().squeeze(1)
                if len(dead):  # restart unused codes on this batch's residuals
                    fresh = r[torch.randint(0, len(r), (len(dead),), generator=generator)]
                    cb.embed[dead], cb.embed_avg[dead], cb.cluster_size[dead] = fresh, fresh, 1.0
            commit = commit + F.mse_loss(residual, vec)
            quantized = quantized + vec
            residual = residual - vec
        quantized = flat + (quantized - flat).detach()
        return rearrange(quantized, "(b t) d -> b d t", b=latents.shape[0]), commit

    def fit(self, items: torch.Tensor, steps: int = 1500, batch_size: int = 16, seed: int = 0, lr: float = 2e-3,
            decay: float = 0.95, commitment_weight: float = 1.0, dead_threshold: float = 0.05,
            crop_seconds: float | None = 0.256, progress: bool = True) -> list[float]:
        """Train the codec on waveforms ``items [n, num_samples]``: Adam with a cosine decay to a tenth of
        ``lr``, on random ``crop_seconds`` windows (whole frames, overlapping the sound; None = whole
        clips). Returns the mean training loss of every ``LOG_EVERY`` steps."""
        from tqdm.auto import tqdm

        items = self._check_waves(items)
        frames = self.num_frames if crop_seconds is None else round(crop_seconds * self.sampling_rate / self.hop)
        frames = max(1, frames)
        crop = min(frames * self.hop, self.num_samples)
        g = torch.Generator().manual_seed(seed)
        codec = self.codec.train()
        with torch.no_grad():
            sample = items[torch.randperm(len(items), generator=g)[: max(batch_size, 64)]]
            lat = codec.encoder(sample[:, None])
            lat = rearrange(lat, "b d t -> (b t) d")
            self._kmeans_init(lat[torch.randperm(len(lat), generator=g)[:KMEANS_VECTORS]], g)
        params = list(codec.encoder.parameters()) + list(codec.decoder.parameters())
        opt = torch.optim.Adam(params, lr=lr, betas=(0.8, 0.99))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
        history, window = [], []
        bar = tqdm(range(steps), desc="fitting audio-codec", disable=not progress)
        try:
            for step in bar:
                batch = items[torch.randint(0, len(items), (min(batch_size, len(items)),), generator=g)]
                if crop < self.num_samples:  # a random window per clip, aligned to frames, overlapping the sound
                    last = (batch != 0).int().cumsum(1).argmax(1)  # the last non-padding sample
                    room = ((last - crop // 2).clamp(0, self.num_samples - crop) // self.hop + 1).float()
                    starts = (torch.rand(len(batch), generator=g) * room).long() * self.hop
                    batch = torch.stack([w[a: a + crop] for w, a in zip(batch, starts.tolist())])
                q, commit = self._quantize_train(codec.encoder(batch[:, None]), decay, dead_threshold, g)
                recon = codec.decoder(q)[:, 0, : batch.shape[1]]
                loss = self.spectral_loss(recon, batch) + commitment_weight * commit
                opt.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                window.append(loss.item())
                if len(window) == LOG_EVERY or step == steps - 1:
                    history.append(sum(window) / len(window))
                    bar.set_postfix(loss=f"{history[-1]:.3f}")
                    window = []
        finally:
            codec.eval()
        self.trained = True
        return history

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``tokenizer_config.json`` plus the codec (``codec/``: config.json + model.safetensors)."""
        if not (self.trained or self.allow_untrained):
            raise ValueError("audio-codec: refusing to save an untrained codec (fit it first, or pass "
                             "allow_untrained=True)")
        os.makedirs(directory, exist_ok=True)
        self.codec.save_pretrained(os.path.join(directory, CODEC_DIR), safe_serialization=True)
        spec = {k: v for k, v in self.config().items() if k not in ("codec_path", "codec_config")}
        self.write_config(directory, spec)

    @classmethod
    def from_config(cls, spec: dict[str, Any], directory: str | os.PathLike) -> AudioCodecTokenizer:
        spec = {k: v for k, v in spec.items() if k not in ("codec_path", "codec_config")}
        return cls(codec_path=os.path.join(os.fspath(directory), CODEC_DIR), **spec)
