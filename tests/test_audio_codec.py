"""The audio-codec tokenizer: EnCodec codes flattened (delay / frame), decoding any ids, training, persistence,
and an MMAR model that reads and writes codec tokens."""

import shutil

import numpy as np
import pytest
import torch

from mmar import Message, MMARProcessor, build_model, build_tokenizer
from mmar.sequence import Audio
from mmar.tokenizers import add_modality_tokens, train_bpe_tokenizer
from mmar.tokenizers.audio_codec import AudioCodecTokenizer, flatten_codes, unflatten_ids
from tests.conftest import TINY_BACKBONE
from tests.test_audio import vowel as audio_vowel

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not on PATH (install it with `apt-get install espeak-ng`)")
SR_IN = 16000
# 8 kHz, 0.128 s = 1024 samples, one frame per 32 samples -> 32 frames; 2 codebooks of 16 codes
TINY_CODEC = {"num_filters": 4, "hidden_size": 8, "upsampling_ratios": [8, 4], "codebook_size": 16,
              "num_lstm_layers": 1}


def tiny(flatten="delay", **kw):
    torch.manual_seed(0)
    return AudioCodecTokenizer(codec_config=dict(TINY_CODEC), max_seconds=0.128, num_codebooks=2, flatten=flatten,
                               **{"allow_untrained": True, **kw})


def vowel(seconds=0.2, sr=SR_IN, f0=140.0, seed=0):
    return audio_vowel(seconds, sr, f0, seed)


@pytest.fixture(scope="module")
def clips():
    tok = tiny()
    return torch.stack([tok.preprocess((vowel(0.1 + 0.01 * i, f0=110 + 15 * i, seed=i), SR_IN)) for i in range(8)])


@pytest.fixture(scope="module")
def fitted(clips):
    tok = tiny(allow_untrained=False)
    before = tok.codec.decoder.layers[-1].conv.bias.detach().clone()
    history = tok.fit(clips, steps=40, batch_size=8, seed=0, lr=3e-3, crop_seconds=None, progress=False)
    assert not torch.equal(before, tok.codec.decoder.layers[-1].conv.bias)
    return tok, history


# -- flattening ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["delay", "frame"])
def test_codes_round_trip_through_flattening(pattern):
    codes = torch.randint(0, 16, (3, 4, 7), generator=torch.Generator().manual_seed(0))
    ids = flatten_codes(codes, 16, pattern)
    assert ids.shape == (3, (7 + (3 if pattern == "delay" else 0)) * 4)
    back, valid = unflatten_ids(ids, 16, 4, pattern)
    assert torch.equal(back, codes) and bool(valid.all())
    q_of = (torch.arange(ids.shape[1]) % 4).expand_as(ids)  # each position holds one codebook's ids (or pad)
    real = ids != 4 * 16
    assert torch.equal(ids[real] // 16, q_of[real])


def test_layouts_match_anygpt_and_musicgen():
    codes = torch.tensor([[[1, 2], [3, 4]]])  # codebook 0: frames 1, 2; codebook 1: frames 3, 4
    assert flatten_codes(codes, 10, "frame").tolist() == [[1, 13, 2, 14]]
    pad = 20
    assert flatten_codes(codes, 10, "delay").tolist() == [[1, pad, 2, 13, pad, 14]]


def test_delay_pads_sit_in_the_corners():
    q, t, k = 3, 5, 8
    ids = flatten_codes(torch.randint(0, k, (2, q, t)), k, "delay").reshape(2, t + q - 1, q)
    for s in range(t + q - 1):
        for c in range(q):
            is_pad = bool((ids[:, s, c] == q * k).all())
            assert is_pad == (s < c or s >= c + t), (s, c)
    assert int((ids == q * k).sum()) == 2 * q * (q - 1)


# -- encode / decode -----------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", ["delay", "frame"])
def test_encode_decode_shapes(pattern, clips):
    tok = tiny(pattern)
    assert (tok.modality, tok.kind, tok.value_range) == ("audio", "discrete", 2.0)
    assert tok.num_samples == 1024 and tok.num_frames == 32
    assert tok.vocab_size == 2 * 16 + (pattern == "delay")
    ids = tok.encode(clips[:3])
    assert ids.shape == (3, tok.num_tokens()) == (3, (33 if pattern == "delay" else 32) * 2)
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
    assert torch.equal(unflatten_ids(ids, 16, 2, pattern)[0], tok.encode_codes(clips[:3]))
    out = tok.decode(ids)
    assert len(out) == 3 and all(isinstance(a, Audio) and a.sampling_rate == 8000 for a in out)
    assert all(a.waveform.shape == (1024,) and a.waveform.dtype == np.float32 for a in out)
    assert tok.reconstruct(clips[:3]).shape == clips[:3].shape


def test_decode_survives_any_ids(fitted):
    tok, _ = fitted
    g = torch.Generator().manual_seed(1)
    for ids in (torch.randint(-50, 200, (4, tok.num_tokens()), generator=g),
                torch.full((1, tok.num_tokens()), tok.pad_id), torch.full((2, tok.num_tokens()), 10 ** 9),
                torch.rand(2, tok.num_tokens(), generator=g) * 40):
        waves = tok.decode_waveforms(ids)
        assert waves.shape == (len(ids), tok.num_samples) and bool(torch.isfinite(waves).all())
        assert float(waves.abs().max()) <= 1.0


def test_wrong_codebook_ids_keep_their_code_and_pads_count_as_missing(fitted, clips):
    tok, _ = fitted
    ids = tok.encode(clips[:2])
    codes, _ = tok.ids_to_codes(ids)
    swapped = ids.clone()
    second = torch.arange(ids.shape[1]) % 2 == 1  # codebook-1 positions get codebook-0 ids, same code
    swapped[:, second] = torch.where(ids[:, second] == tok.pad_id, ids[:, second], ids[:, second] - 16)
    assert torch.equal(tok.decode_waveforms(swapped), tok.decode_waveforms(ids))
    dropped = torch.where(second, torch.full_like(ids, tok.pad_id), ids)  # pad where codebook 1 should be
    valid = torch.ones_like(codes, dtype=torch.bool)
    valid[:, 1] = False
    expect = tok.codec.decoder(tok.dequantize(codes, valid))[:, 0, : tok.num_samples].clamp(-1, 1)
    assert torch.allclose(tok.decode_waveforms(dropped), expect, atol=1e-6)
    assert not torch.allclose(tok.decode_waveforms(dropped), tok.decode_waveforms(ids), atol=1e-4)


# -- training and persistence --------------------------------------------------------------------------
def test_fit_lowers_the_reconstruction_loss(clips, fitted):
    tok, history = fitted
    assert len(history) == 4 and history[-1] < 0.8 * history[0]
    untrained = tiny()  # same init, zero codebooks
    assert tok.evaluate(clips) < 0.8 * untrained.evaluate(clips)
    assert tok.trained


def test_untrained_codec_is_refused(clips, tmp_path):
    tok = tiny(allow_untrained=False)
    with pytest.raises(ValueError, match="untrained"):
        tok.encode(clips[:1])
    with pytest.raises(ValueError, match="untrained"):
        tok.save_pretrained(tmp_path)


def test_save_and_load_give_identical_codes(fitted, clips, tmp_path):
    tok, _ = fitted
    tok.save_pretrained(tmp_path / "tok")
    assert (tmp_path / "tok" / "codec" / "model.safetensors").is_file()
    again = build_tokenizer({"path": str(tmp_path / "tok")})
    assert isinstance(again, AudioCodecTokenizer) and again.trained
    assert {k: v for k, v in again.config().items() if k not in ("codec_path", "codec_config")} == \
        {k: v for k, v in tok.config().items() if k not in ("codec_path", "codec_config")}
    assert torch.equal(again.encode(clips), tok.encode(clips))
    assert torch.equal(again.decode_waveforms(tok.encode(clips)), tok.decode_waveforms(tok.encode(clips)))
    direct = AudioCodecTokenizer(codec_path=str(tmp_path / "tok" / "codec"), max_seconds=0.128, num_codebooks=1,
                                 flatten="frame")  # a local EnCodec checkpoint, fewer codebooks
    assert torch.equal(direct.encode(clips), tok.encode_codes(clips)[:, 0])


def test_reconstruction_report_has_a_log_mel_distance(fitted, clips):
    from mmar.training.tokenizer_trainer import log_mel_distance_db, reconstruction

    tok, _ = fitted
    report = reconstruction(tok, clips)
    assert set(report) == {"mse", "psnr_db", "psnr_peak", "waveform_snr_db", "log_mel_distance_db"}
    recon = tok.reconstruct(clips)
    mse = float((recon - clips).pow(2).mean())
    assert report["mse"] == pytest.approx(mse, rel=1e-6)
    # PSNR against the clips' real range (peak to peak, 0.8 for these 0.4-peak vowels), not the nominal 2
    peak = float(clips.max() - clips.min())
    assert report["psnr_peak"] == pytest.approx(peak) and peak < 1.0
    assert report["psnr_db"] == pytest.approx(10 * np.log10(peak ** 2 / mse), rel=1e-6)
    assert report["waveform_snr_db"] == pytest.approx(10 * np.log10(float(clips.pow(2).mean()) / mse), rel=1e-6)
    assert report["log_mel_distance_db"] > 0
    assert log_mel_distance_db(clips, clips, 8000) == 0.0
    noisy = clips + 0.05 * torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    slightly = clips + 0.005 * (noisy - clips)
    assert 0 < log_mel_distance_db(slightly, clips, 8000) < log_mel_distance_db(noisy, clips, 8000)


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_inputs_are_named(tmp_path, clips):
    tok = tiny()
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        tok.preprocess(str(tmp_path / "nope.wav"))
    with pytest.raises(ValueError, match="NaN"):
        tok.preprocess((np.full(800, np.nan, dtype=np.float32), 8000))
    with pytest.raises(ValueError, match="sampling rate"):
        tok.preprocess(np.zeros(800, dtype=np.float32))
    with pytest.raises(ValueError, match="no samples"):
        tok.preprocess((np.zeros(0, dtype=np.float32), 8000))
    with pytest.raises(ValueError, match=r"\[B, 1024\]"):
        tok.encode(clips[:, :500])
    with pytest.raises(ValueError, match=f"token ids \\[B, {tok.num_tokens()}\\]"):
        tok.decode(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="flatten must be one of"):
        tiny("interleave")
    with pytest.raises(ValueError, match="num_codebooks=5"):
        AudioCodecTokenizer(codec_path=None, codec_config={**TINY_CODEC, "target_bandwidths": [2.0]},
                            max_seconds=0.128, num_codebooks=5)
    with pytest.raises(ValueError, match="not both"):
        AudioCodecTokenizer(codec_path=str(tmp_path), codec_config=dict(TINY_CODEC))
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        AudioCodecTokenizer(codec_path=str(tmp_path / "pickled"))


# -- an MMAR model on codec tokens -----------------------------------------------------------------------
def test_tiny_model_trains_and_generates_audio(fitted):
    from mmar.datasets.digits import all_texts
    from mmar.pipeline import MMARPipeline

    tok, _ = fitted
    torch.manual_seed(0)
    text = train_bpe_tokenizer(all_texts() + ["which digit is said?"], vocab_size=300)
    add_modality_tokens(text, ["audio"])
    modalities = {"audio": {"tokenizer": tok, "head": {"width": 32}}}
    model = build_model({**TINY_BACKBONE, "max_position_embeddings": 160}, text, modalities)
    assert model.config.modalities["audio"].head["name"] == "codebook"
    assert model.config.modalities["audio"].vocab_size == tok.vocab_size == 33
    proc = MMARProcessor(text, {"audio": tok})
    samples = [[Message("user", "say seven"), Message("assistant", [Audio(vowel(0.3), SR_IN)])],
               [Message("user", [Audio(vowel(0.2, f0=200), SR_IN), "which digit is said?"]),
                Message("assistant", "7")]]
    batch = proc(samples)
    assert batch["values"]["audio"].shape == (2 * tok.num_tokens(),) and batch["values"]["audio"].dtype == torch.long
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.modality_losses["audio"] > 0 and out.text_loss > 0
    out.loss.backward()
    before = model.projections["audio"].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.projections["audio"].weight)
    pipe = MMARPipeline(model.eval(), proc)
    pipe.set_progress_bar_config(disable=True)
    res = pipe("say seven", mode="audio", guidance_scale=1.5, generator=torch.Generator().manual_seed(0))
    clip = res.audios[0][0]
    assert isinstance(clip, Audio) and clip.waveform.shape == (tok.num_samples,) and clip.sampling_rate == 8000
    assert np.isfinite(clip.waveform).all()


# -- spoken digits (espeak-ng) -----------------------------------------------------------------------------
@pytest.fixture
def one_voice(monkeypatch):
    """Ten training and ten held-out clips, settings of the full grid (so a warm cache is reused)."""
    from mmar.datasets import spoken_digits as sd

    monkeypatch.setattr(sd, "VOICES", ("en-us",))
    monkeypatch.setattr(sd, "SPLITS", {"train": (("",), (130,), (50,)), "test": (("+m5",), (150,), (40,))})
    sd.load_split.cache_clear()
    yield
    sd.load_split.cache_clear()


@needs_espeak
def test_evaluator_decodes_generated_codec_audio(fitted, one_voice, tmp_path):
    from mmar.datasets.digits import all_texts
    from mmar.datasets.spoken_digits import all_texts as spoken_texts
    from mmar.eval.spoken_digits import evaluate_spoken_digits
    from mmar.pipeline import MMARPipeline

    tok, _ = fitted
    torch.manual_seed(0)
    text = train_bpe_tokenizer(all_texts() + spoken_texts(), vocab_size=300)
    add_modality_tokens(text, ["audio"])
    model = build_model({**TINY_BACKBONE, "max_position_embeddings": 160}, text,
                        {"audio": {"tokenizer": tok, "head": {"width": 32}}}, cond_dropout_prob=0.1)
    pipe = MMARPipeline(model.eval(), MMARProcessor(text, {"audio": tok}))
    out = tmp_path / "m" / "metrics.json"
    # num_inference_steps: the evaluator reads it from a diffusion head's config when left out
    m = evaluate_spoken_digits("tiny", output=str(out), per_digit=1, pipeline=pipe, guidance_scale=2.0,
                               num_inference_steps=1)
    assert m["n_generated"] == 10 and (tmp_path / "m" / "metrics_grid.png").is_file()
    # the score is the judge's reading of the decoded codec clips it saved: read the WAVs back and score them
    import soundfile as sf

    from mmar.eval.spoken_digits import DigitClassifier
    from mmar.sequence import Audio as Clip

    clf = DigitClassifier()
    wavs = sorted((tmp_path / "m" / "metrics_audio").iterdir())
    assert [w.name for w in wavs] == [f"{d}_0.wav" for d in range(10)]
    clips_back = [Clip(*sf.read(w, dtype="float32")) for w in wavs]
    assert all(c.sampling_rate == 8000 and c.waveform.shape == (tok.num_samples,) for c in clips_back)
    read = clf.predict(clips_back)
    assert m["text_to_audio_accuracy"] == pytest.approx(np.mean(read == np.arange(10)), abs=0.1 + 1e-9)
    assert m["text_to_audio_per_digit"] == {str(d): m["text_to_audio_per_digit"][str(d)] for d in range(10)}
    assert set(m["text_to_audio_per_digit"].values()) <= {0.0, 1.0}
    assert sum(m["text_to_audio_per_digit"].values()) == pytest.approx(10 * m["text_to_audio_accuracy"])


@needs_espeak
def test_train_tokenizer_on_spoken_digits(tmp_path, one_voice):
    import json

    from mmar.training.tokenizer_trainer import train_tokenizer

    report = train_tokenizer({"tokenizer": {"name": "audio-codec", "codec_config": dict(TINY_CODEC),
                                            "max_seconds": 0.128},
                              "dataset": "spoken-digits", "steps": 20, "batch_size": 10,
                              "fit": {"progress": False, "crop_seconds": None}, "output_dir": str(tmp_path / "codec")})
    assert report["tokenizer"] == "audio-codec" and len(report["fit_history"]) == 2
    for split in ("train", "heldout"):
        r = report[split]
        assert r["log_mel_distance_db"] > 0 and np.isfinite(r["psnr_db"])
        # espeak clips are peak-normalised to 0.5: the PSNR's peak is their real range (about 1), not 2
        assert 0.7 < r["psnr_peak"] <= 1.0 + 1e-6
        assert r["psnr_db"] == pytest.approx(10 * np.log10(r["psnr_peak"] ** 2 / r["mse"]), rel=1e-6)
    saved = json.loads((tmp_path / "codec" / "reconstruction.json").read_text())
    assert saved["heldout"] == report["heldout"]
    assert build_tokenizer({"path": str(tmp_path / "codec")}).trained
