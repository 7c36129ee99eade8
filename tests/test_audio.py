"""The audio-mel tokenizer, the spoken-digits dataset and its evaluator."""

import shutil
import struct

import numpy as np
import pytest
import torch

from mmar import Message, build_tokenizer
from mmar.sequence import Audio
from tests.conftest import assert_learns, make_tiny

sf = pytest.importorskip("soundfile")
from mmar.tokenizers.audio_mel import AudioMelTokenizer, write_wav  # noqa: E402

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not on PATH (install it with `apt-get install espeak-ng`)")
SR_IN = 16000
AUDIO_MODALITIES = {"audio": {"tokenizer": {"name": "audio-mel", "max_seconds": 0.256, "n_mels": 16},
                              "head": {"width": 32, "depth": 2, "num_inference_steps": 5}}}


def vowel(seconds=0.5, sr=SR_IN, f0=140.0, seed=0):
    """A vowel-like test signal: harmonics of a gliding pitch under a smooth envelope, plus a little noise."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.2 * t / seconds)) / sr
    wave = sum(np.sin(k * phase) / k for k in range(1, 12)) * np.hanning(len(t))
    wave += 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.4 * wave / np.abs(wave).max()).astype(np.float32)


@pytest.fixture(scope="module")
def tok():
    return AudioMelTokenizer()


def test_registry_shapes_and_persistence(tok, tmp_path):
    built = build_tokenizer({"name": "audio-mel"})
    assert (built.modality, built.kind) == ("audio", "continuous")
    assert built.num_tokens() == 12 and built.token_dim == 4 * 32  # 0.768 s at 8 kHz, hop 128: 48 frames
    tokens = tok.encode(tok.preprocess((vowel(), SR_IN))[None])
    assert tokens.shape == (1, 12, 128)
    assert -2.0 < tokens.min() and tokens.max() < 3.0  # roughly unit scale; silence sits at the floor
    tok.save_pretrained(tmp_path)
    again = type(tok).from_pretrained(tmp_path)
    assert again.config() == tok.config()
    assert torch.equal(again.encode(tok.preprocess((vowel(), SR_IN))[None]), tokens)


def test_preprocess_resamples_pads_and_crops(tok):
    sr, hz = 22050, 440.0
    t = np.arange(int(0.3 * sr)) / sr
    wave = tok.preprocess((0.5 * np.sin(2 * np.pi * hz * t), sr)).numpy()
    assert wave.shape == (tok.num_samples,) and wave.dtype == np.float32
    n = int(0.3 * tok.sampling_rate)
    assert np.all(wave[n + 2:] == 0)  # padded with silence
    peak = np.argmax(np.abs(np.fft.rfft(wave[:n]))) * tok.sampling_rate / n
    assert abs(peak - hz) < 5  # the tone keeps its pitch through resampling
    long = tok.preprocess((vowel(2.0), SR_IN))
    assert long.shape == (tok.num_samples,)  # cropped
    stereo = np.stack([vowel(), vowel()], 1)
    assert torch.allclose(tok.preprocess((stereo, SR_IN)), tok.preprocess((vowel(), SR_IN)), atol=1e-6)
    pcm = (vowel() * 32767).astype(np.int16)
    assert torch.allclose(tok.preprocess((pcm, SR_IN)), tok.preprocess((vowel(), SR_IN)), atol=1e-3)


def test_griffin_lim_round_trip_error(tok):
    """waveform -> log-mel tokens -> Griffin-Lim waveform -> tokens: the measured errors stay small."""
    waves = torch.stack([tok.preprocess((vowel(f0=f0, seed=i), SR_IN)) for i, f0 in enumerate((110, 150, 220))])
    tokens = tok.encode(waves)
    audio = tok.decode(tokens)
    assert all(isinstance(a, Audio) and a.sampling_rate == 8000 and a.waveform.dtype == np.float32
               and a.waveform.shape == (tok.num_samples,) for a in audio)
    again = tok.encode(torch.stack([torch.from_numpy(a.waveform) for a in audio]))
    log_mel_mae_db = float((again - tokens).abs().mean()) * tok.std * 10  # tokens are log10 power / std
    assert log_mel_mae_db < 2.5, log_mel_mae_db  # measured: 1.4 dB here, 0.5 dB on espeak speech
    power, power_again = (tok.mel_power(tok.tokens_to_log_mel(t)) for t in (tokens, again))
    mel_distance = float((power_again - power).norm() / power.norm())
    assert mel_distance < 0.25, mel_distance  # measured: 0.13
    # spectral convergence of the Griffin-Lim output against the magnitude it was asked for
    target = tok.linear_magnitude(tok.mel_power(tok.tokens_to_log_mel(tokens)))
    got = tok._stft(tok.griffin_lim(target))[..., : tok.num_frames].abs()
    convergence = float((got - target).norm() / target.norm())
    assert convergence < 0.3, convergence  # measured: 0.16
    # the mel -> linear inversion is consistent: projecting back to mel recovers the mel power
    back = tok.mel_basis @ target.pow(2)
    assert float((back - power).norm() / power.norm()) < 0.05


def test_write_wav_round_trip(tok, tmp_path):
    clip = tok.decode(tok.encode(tok.preprocess((vowel(), SR_IN))[None]))[0]
    path = write_wav(tmp_path / "out" / "clip.wav", clip)
    data, sr = sf.read(path, dtype="float32")
    assert sr == 8000 and data.shape == clip.waveform.shape
    assert np.abs(data - clip.waveform).max() < 2 / 32768  # 16-bit quantisation only
    with pytest.raises(ValueError, match="sampling rate"):
        write_wav(tmp_path / "x.wav", clip.waveform)


@pytest.fixture
def wav_file(tmp_path):
    path = tmp_path / "good.wav"
    sf.write(path, vowel(), SR_IN, subtype="PCM_16")
    return path


def test_reads_files_and_rejects_bad_ones(tok, wav_file, tmp_path):
    assert torch.allclose(tok.preprocess(wav_file), tok.preprocess((vowel(), SR_IN)), atol=1e-3)
    assert torch.allclose(tok.preprocess((str(wav_file), None)), tok.preprocess(wav_file))
    with pytest.raises(FileNotFoundError, match="missing.wav: audio file not found"):
        tok.preprocess(tmp_path / "missing.wav")
    data = wav_file.read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.wav: truncated WAV: its header declares \d+ bytes"):
        tok.preprocess(tmp_path / "cut.wav")
    (tmp_path / "junk.wav").write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(ValueError, match="junk.wav: not a readable audio file"):
        tok.preprocess(tmp_path / "junk.wav")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR_IN)
    with pytest.raises(ValueError, match="empty.wav: the audio file holds no samples"):
        tok.preprocess(empty)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(100, np.nan, np.float32), SR_IN, subtype="FLOAT")
    with pytest.raises(ValueError, match="nan.wav: the audio contains NaN or inf"):
        tok.preprocess(nan)
    with pytest.raises(ValueError, match="is at 16000 Hz but sampling_rate=8000"):
        tok.preprocess((wav_file, 8000))
    # a streaming header (data size 0xFFFFFFFF) is not truncation
    stream = bytearray(data)
    at = stream.index(b"data") + 4
    stream[at: at + 4] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "stream.wav").write_bytes(bytes(stream))
    assert tok.preprocess(tmp_path / "stream.wav").abs().max() > 0.1


def test_rejects_bad_arrays(tok):
    with pytest.raises(ValueError, match="NaN or inf"):
        tok.preprocess((np.array([0.1, np.nan, 0.2], np.float32), SR_IN))
    with pytest.raises(ValueError, match="NaN or inf"):
        tok.preprocess((np.array([0.1, np.inf], np.float32), SR_IN))
    with pytest.raises(ValueError, match="no samples"):
        tok.preprocess((np.zeros(0, np.float32), SR_IN))
    with pytest.raises(ValueError, match=r"shape \(2, 3, 400\); expected 1-D"):
        tok.preprocess((np.zeros((2, 3, 400), np.float32), SR_IN))
    with pytest.raises(ValueError, match="needs its sampling rate"):
        tok.preprocess(vowel())
    with pytest.raises(TypeError, match="cannot read audio from dict"):
        tok.preprocess(({"x": 1}, SR_IN))


def test_processor_names_the_bad_file(tmp_path):
    model, proc = make_tiny(modalities=AUDIO_MODALITIES)
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        proc.encode([Message("user", [Audio(str(tmp_path / "nope.wav")), "which digit is said?"])])


def test_tiny_model_trains_and_generates_audio(monkeypatch):
    from mmar.pipeline import MMARPipeline

    model, proc = make_tiny(modalities=AUDIO_MODALITIES)
    tok = proc.modality_tokenizers["audio"]
    assert tok.num_tokens() == 4 and tok.token_dim == 64
    samples = [[Message("user", "say seven"), Message("assistant", [Audio(vowel(0.3), SR_IN)])],
               [Message("user", [Audio(vowel(0.2, f0=200), SR_IN), "which digit is said?"]),
                Message("assistant", "7")]]
    batch = proc(samples)
    assert batch["values"]["audio"].shape == (8, 64)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.modality_losses["audio"] > 0 and out.text_loss > 0
    out.loss.backward()
    before = model.projections["audio"][0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.projections["audio"][0].weight)
    # it learns: 100 more AdamW steps on these 2 samples. Losses read with the same noise and timesteps
    # (seed 123); the text loss ends far below a fresh model's ln(vocabulary), the audio loss below that of
    # a head whose output is zero. Measured (make_tiny seeds 0-2, from the start): text 5.61-5.81 -> 0.04-0.05,
    # audio 6.7-8.3 -> 0.52-0.55 against 1.217 for the zero output.
    assert abs(out.text_loss.item() - np.log(model.lm_head.out_features)) < 0.3, out.text_loss
    # with the condition zeroed the same head does far worse (measured, seeds 0-2: 1.09-1.66 against 0.52-0.55)
    assert_learns(model, batch, "audio", monkeypatch, zero_ratio=0.75)
    pipe = MMARPipeline(model.eval(), proc)
    pipe.set_progress_bar_config(disable=True)
    res = pipe("say seven", mode="audio", guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    clip = res.audios[0][0]
    assert isinstance(clip, Audio) and clip.waveform.shape == (tok.num_samples,) and clip.sampling_rate == 8000
    # audio= puts clips before the prompt's text, exactly as a conversation that holds them
    wave = vowel(0.2, f0=200)
    ask = dict(mode="text", temperature=0.0, max_new_tokens=3)
    by_kwarg = pipe("which digit is said?", audio=[(wave, SR_IN)], **ask)
    by_messages = pipe([Message("user", [Audio(wave, SR_IN), "which digit is said?"])], **ask)
    assert by_kwarg.segments == by_messages.segments
    batch_out = pipe(["which digit is said?", "say seven"], audio=[[(wave, SR_IN)], None], **ask)
    assert batch_out.segments[0] == by_kwarg.segments[0]
    with pytest.raises(ValueError, match="2 prompts but 1 audio lists"):
        pipe(["a", "b"], audio=[[(wave, SR_IN)]], **ask)
    with pytest.raises(ValueError, match="go with a string prompt"):
        pipe([Message("user", "which digit is said?")], audio=[(wave, SR_IN)], **ask)


# -- spoken digits (espeak-ng) -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    """Shrink the settings grid (12 training settings, 2 held-out ones with an unseen variant, speed
    and pitch) so the clips are synthesised once, in a few seconds."""
    from mmar.datasets import spoken_digits as sd

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sd, "VOICES", ("en-us", "en-gb"))
        mp.setattr(sd, "SPLITS", {"train": (("", "+f2", "+m3"), (150,), (35, 65)), "test": (("+m5",), (170,), (40,))})
        sd.load_split.cache_clear()
        yield str(tmp_path_factory.mktemp("spoken_digits_cache"))
    sd.load_split.cache_clear()


def test_missing_espeak_is_a_clear_error(monkeypatch):
    from mmar.datasets import spoken_digits as sd

    monkeypatch.setattr(sd.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        sd.espeak_binary()


def test_split_settings_are_disjoint():
    from mmar.datasets.spoken_digits import settings

    train, test = settings("train"), settings("test")
    assert len(train) == 180 and len(test) == 40
    for k in range(1, 3):  # speeds and pitches of the held-out clips never occur in training
        assert not {s[k] for s in train} & {s[k] for s in test}
    train_variants = {s[0].partition("+")[2] for s in train}
    assert not train_variants & {s[0].partition("+")[2] for s in test}
    with pytest.raises(ValueError, match="split must be one of"):
        settings("valid")


@needs_espeak
def test_spoken_digits_dataset(small_split):
    from mmar.datasets.spoken_digits import SAMPLING_RATE, SpokenDigitsDataset, all_texts

    train = SpokenDigitsDataset("train", seed=0, cache_dir=small_split)
    again = SpokenDigitsDataset("train", seed=0, cache_dir=small_split)
    test = SpokenDigitsDataset("test", seed=0, cache_dir=small_split)
    assert len(train) == 2 * 120 and len(test) == 2 * 20
    assert train.index == again.index
    assert all(np.array_equal(a, b) for a, b in zip(train.waves, again.waves))
    assert not set(train.settings) & set(test.settings)
    assert sorted(set(train.labels.tolist())) == list(range(10))
    for wave in train.waves:  # trimmed, peak-normalised speech of a plausible length
        assert 0.15 < len(wave) / SAMPLING_RATE < 0.9 and abs(np.abs(wave).max() - 0.5) < 0.05
    kinds = {train.index[i][0]: train[i] for i in range(4)}
    user, answer = kinds["a2t"]
    assert isinstance(user.content[0], Audio) and answer.content[0].text in {str(d) for d in range(10)}
    prompt, clip = kinds["t2a"]
    assert prompt.content[0].text in all_texts() and isinstance(clip.content[0], Audio)


class _ScriptedPipe:
    """A tiny real pipeline whose outputs are scripted: a clip is answered with its digit (digit + 1 for the
    digits in ``wrong``), and "say seven" gets a real training clip of seven that the judge reads right
    (of digit + 1 for the digits in ``wrong``)."""

    def __init__(self, pipe, clf, cache_dir, wrong=()):
        from mmar.datasets.spoken_digits import SAMPLING_RATE, load_split

        self.pipe, self.wrong, self.asked = pipe, set(wrong), []
        waves, labels, _ = load_split("test", cache_dir)
        self.label = {np.asarray(w, np.float32).tobytes(): int(y) for w, y in zip(waves, labels)}
        waves, labels, _ = load_split("train", cache_dir)
        clips = [Audio(w, SAMPLING_RATE) for w in waves]
        read = clf.predict(clips)
        self.clip = {d: clips[int(np.flatnonzero((labels == d) & (read == d))[0])] for d in range(10)}

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def _shift(self, d):
        return (d + 1) % 10 if d in self.wrong else d

    def __call__(self, prompts, mode, **_):
        from types import SimpleNamespace

        from mmar.eval.digits import parse_digit

        if mode == "text":
            labels = [self.label[np.asarray(msg.content[0].waveform, np.float32).tobytes()] for (msg,) in prompts]
            return SimpleNamespace(text=[str(self._shift(y)) for y in labels])
        assert mode == "audio"
        self.asked += prompts
        return SimpleNamespace(audios=[[self.clip[self._shift(parse_digit(p))]] for p in prompts])


@needs_espeak
def test_classifier_and_evaluator_on_real_clips(small_split, tmp_path):
    import json

    from mmar.datasets.spoken_digits import SAMPLING_RATE, load_split
    from mmar.eval.spoken_digits import DigitClassifier, evaluate_spoken_digits
    from mmar.pipeline import MMARPipeline

    clf = DigitClassifier(small_split)
    waves, labels, _ = load_split("test", small_split)
    assert np.mean(clf.predict([Audio(w, SAMPLING_RATE) for w in waves]) == labels) >= 0.9  # unseen setting
    whole_words = {"audio": {**AUDIO_MODALITIES["audio"], "tokenizer": {  # 0.768 s: a whole word, 6 tokens
        "name": "audio-mel", "n_mels": 16, "frames_per_token": 8}}}
    model, proc = make_tiny(modalities=whole_words)
    pipe = MMARPipeline(model, proc)
    out = tmp_path / "m" / "metrics.json"
    oracle = _ScriptedPipe(pipe, clf, small_split)
    m = evaluate_spoken_digits("tiny", output=str(out), per_digit=2, pipeline=oracle, cache_dir=small_split,
                               guidance_scale=1.0)
    assert json.loads(out.read_text())["n_generated"] == 20 == m["n_generated"] == len(oracle.asked)
    assert m["audio_to_text_accuracy"] == 1.0 and m["text_to_audio_accuracy"] == 1.0
    assert all(v == 1.0 for v in m["text_to_audio_per_digit"].values())
    assert m["classifier_heldout_accuracy"] >= 0.9 and m["classifier_round_trip_accuracy"] >= 0.8
    assert m["judge_features"]["n_mels"] != proc.modality_tokenizers["audio"].n_mels  # its own features
    assert (tmp_path / "m" / "metrics_grid.png").is_file()
    assert len(list((tmp_path / "m" / "metrics_audio").iterdir())) == 20
    # digit 3 always wrong: each figure drops by exactly digit 3's share
    bad = evaluate_spoken_digits("tiny", per_digit=2, pipeline=_ScriptedPipe(pipe, clf, small_split, wrong=[3]),
                                 cache_dir=small_split, guidance_scale=1.0)
    assert bad["audio_to_text_accuracy"] == pytest.approx(1 - np.mean(labels == 3))
    assert bad["text_to_audio_accuracy"] == pytest.approx(0.9) and bad["text_to_audio_per_digit"]["3"] == 0.0
    # the real tiny model runs through the same evaluator (its figures are whatever an untrained model gets)
    real = evaluate_spoken_digits("tiny", per_digit=1, pipeline=pipe, cache_dir=small_split, guidance_scale=1.0)
    assert real["n_generated"] == 10 and real["classifier_round_trip_accuracy"] == m["classifier_round_trip_accuracy"]
