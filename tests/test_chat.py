"""The command line's front doors: `mmar chat` driven through its prompt (piped stdin, and a real
terminal with pexpect), `mmar generate`'s files, and clear errors with exit code 2."""

import io
import json
import os
import re
import subprocess
import sys
import wave

import pytest
from PIL import Image as PILImage

from mmar.datasets.digits import load_digit_split
from mmar.eval.digits import parse_digit

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _chat(args, stdin="", timeout=300):
    return subprocess.run([sys.executable, "-m", "mmar.cli", "chat", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def _digit_png(path, index):
    x, y = load_digit_split("test")
    PILImage.fromarray(x[index]).save(path)
    return int(y[index])


def _replies(stdout):
    return [line[len("mmar> "):] for line in stdout.splitlines() if line.startswith("mmar> ")]


def test_chat_session_with_commands(trained_digits, tmp_path):
    first, second = _digit_png(tmp_path / "a.png", 0), _digit_png(tmp_path / "b.png", 1)
    script = "\n".join(["which digit is this?",             # about --image a.png
                        "!image " + str(tmp_path / "b.png"),
                        "which digit is this?",
                        "draw the digit seven",
                        "!image " + str(tmp_path / "missing.png"),
                        "!save " + str(tmp_path / "saved" / "talk.json"),
                        "!clear",
                        "!exit",
                        "never read"]) + "\n"
    r = _chat(["--model", trained_digits, "--image", tmp_path / "a.png", "--temperature", 0,
               "--output_dir", tmp_path / "out"], script)
    assert r.returncode == 0, r.stderr
    replies = _replies(r.stdout)
    assert [parse_digit(a) for a in replies[:2]] == [first, second], r.stdout
    drawn = [line.split("[image: ")[1].rstrip("]") for line in r.stdout.splitlines() if "[image: " in line]
    assert len(drawn) == 1 and os.path.isfile(drawn[0]) and str(tmp_path / "out") in drawn[0]
    assert PILImage.open(drawn[0]).size == (8, 8)
    assert "missing.png: image file not found" in r.stdout  # an error, and the chat goes on
    assert "never read" not in r.stdout  # !exit stopped reading

    saved = json.loads((tmp_path / "saved" / "talk.json").read_text())
    roles = [m["role"] for m in saved["messages"]]
    assert roles == ["user", "assistant"] * 3
    images = [p["path"] for m in saved["messages"] for p in m["content"] if p["type"] == "image"]
    assert images == ["talk_1.png", "talk_2.png", "talk_3.png"]  # two uploads, one drawing, next to the JSON
    assert all((tmp_path / "saved" / name).is_file() for name in images)
    assert saved["messages"][1]["content"] == [{"type": "text", "text": replies[0]}]


@pytest.mark.parametrize("command", ["chat", "generate", "demo"])
def test_errors_exit_2_naming_the_file(command, trained_digits, tmp_path, capsys):
    from mmar.cli import main

    extra = ["--prompt", "which digit is this?"] if command == "generate" else []
    assert main([command, "--model", str(tmp_path / "nowhere"), *extra]) == 2
    assert "nowhere: no such model directory" in capsys.readouterr().err
    if command == "demo":
        return
    assert main([command, "--model", str(trained_digits), "--image", str(tmp_path / "missing.png"), *extra]) == 2
    assert "missing.png: image file not found" in capsys.readouterr().err
    (tmp_path / "bad.png").write_text("not a png")
    assert main([command, "--model", str(trained_digits), "--image", str(tmp_path / "bad.png"), *extra]) == 2
    assert "bad.png: not a readable image" in capsys.readouterr().err


def test_chat_refuses_audio_for_an_image_model(trained_digits, tmp_path, capsys):
    from mmar.cli import main

    (tmp_path / "clip.wav").write_bytes(b"RIFF")
    assert main(["chat", "--model", str(trained_digits), "--audio", str(tmp_path / "clip.wav")]) == 2
    assert "clip.wav: this model has no audio tokenizer (it handles image)" in capsys.readouterr().err


def test_chat_in_a_terminal(trained_digits, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    from mmar.pipeline import MMARPipeline

    _digit_png(tmp_path / "a.png", 2)
    # the terminal owns the conversation, not the model's accuracy: its answer must be the pipeline's own
    pipe = MMARPipeline.from_pretrained(trained_digits)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe.chat([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "a.png")},
                                                      {"type": "text", "text": "which digit is this?"}]}],
                         temperature=0.0)[0]
    child = pexpect.spawn(sys.executable, ["-m", "mmar.cli", "chat", "--model", str(trained_digits),
                                           "--temperature", "0", "--output_dir", str(tmp_path / "out")],
                          env=ENV, encoding="utf-8", timeout=120)
    try:
        child.expect("you> ")
        child.sendline(f"!image {tmp_path / 'a.png'}")
        child.expect("attached")
        child.expect("you> ")
        child.sendline("which digit is this?")
        child.expect(r"mmar> (.*)\r\n")
        assert child.match.group(1).strip() == expected.strip()
        child.expect("you> ")
        child.sendline("!exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_generate_writes_images_and_a_sidecar(tiny_dir, tmp_path, capsys):
    from mmar.cli import main

    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "draw a 3", "--mode", "image", "--num", "2",
                 "--seed", "4", "--num_inference_steps", "2", "--max_new_tokens", "2", "--output", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["seed"] == 4 and record["num_inference_steps"] == 2 and record["guidance_scale"] == 3.0
    files = [f for o in record["outputs"] for f in o["files"]]
    assert len(record["outputs"]) == 2 and len(files) >= 2
    assert all(PILImage.open(f).size == (8, 8) for f in files)
    assert files[0] in capsys.readouterr().out


AUDIO = {"audio": {"tokenizer": {"name": "audio-mel", "sampling_rate": 8000, "max_seconds": 0.128, "n_fft": 256,
                                 "hop_length": 128, "n_mels": 16, "frames_per_token": 4, "griffin_lim_iters": 4},
                   "head": {"width": 32, "depth": 2, "num_inference_steps": 2}}}


def test_chat_saves_generated_audio_as_wav(tmp_path):
    from tests.conftest import make_tiny

    from mmar.chat import ChatSession
    from mmar.pipeline import MMARPipeline

    pipe = MMARPipeline(*make_tiny(modalities=AUDIO))
    pipe.set_progress_bar_config(disable=True)
    out = io.StringIO()
    session = ChatSession(pipe, str(tmp_path / "out"), out=out, mode="audio", max_items=1, max_new_tokens=2)
    session.reply("say the digit three")
    clip = re.search(r"\[audio: (.+\.wav)\]", out.getvalue()).group(1)
    with wave.open(clip) as f:
        assert (f.getframerate(), f.getnframes(), f.getsampwidth()) == (8000, 1024, 2)
    files = session.save(str(tmp_path / "talk.json"))
    assert [os.path.basename(f) for f in files] == ["talk.json", "talk_1.wav"]
    saved = json.loads((tmp_path / "talk.json").read_text())
    assert {"type": "audio", "path": "talk_1.wav"} in saved["messages"][1]["content"]
    with pytest.raises(ValueError, match="this model takes no images"):
        session.command("!image x.png")


def test_generate_takes_and_writes_audio(tmp_path, capsys):
    """mmar generate --audio clip.wav: the clip goes in before the prompt; a generated clip comes out as WAV."""
    import numpy as np
    from tests.conftest import make_tiny

    from mmar.cli import main
    from mmar.media import save_wav
    from mmar.sequence import Audio

    model, proc = make_tiny(modalities=AUDIO)
    model.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    clip = save_wav(Audio(np.sin(np.arange(1024) / 5.0) * 0.5, 8000), tmp_path / "in.wav")
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", "say it again", "--audio", clip,
                 "--mode", "audio", "--num_inference_steps", "2", "--max_new_tokens", "4", "--output", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert record["audio"] == [clip] and record["mode"] == "audio"
    files = record["outputs"][0]["files"]
    assert files and all(f.endswith(".wav") for f in files)  # the untrained model may say more than one
    for path in files:
        with wave.open(path) as f:
            assert (f.getframerate(), f.getnframes()) == (8000, 1024)
    assert main(["generate", "--model", str(tmp_path / "model"), "--prompt", "x", "--audio",
                 str(tmp_path / "missing.wav"), "--output", str(out)]) == 2
    assert "missing.wav" in capsys.readouterr().err
