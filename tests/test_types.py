"""The one reader and writer of chat content parts (mmar.types), and the segment registry."""

import os

import numpy as np
import pytest
from PIL import Image as PILImage

from mmar.types import (Audio, Image, Item, Message, Text, modality_of, modality_of_file, parse_content, parse_message,
                        parse_part, register_segment, segment_class, segment_modalities, to_messages, to_part)


@pytest.fixture
def files(tmp_path):
    PILImage.new("L", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "b.wav").write_bytes(b"RIFF")
    return tmp_path


def test_every_part_form_reads_to_a_segment(files):
    pil, arr = PILImage.new("L", (2, 2)), np.zeros((2, 2), np.uint8)
    png, wav = str(files / "a.png"), str(files / "b.wav")
    assert parse_part("hi") == Text("hi") and parse_part(Text("x")) == Text("x")
    assert parse_part(pil) == Image(pil) and isinstance(parse_part(arr), Image)
    assert parse_part({"type": "text", "text": "hi"}) == Text("hi")
    assert parse_part({"type": "image", "image": pil}) == Image(pil)
    assert parse_part({"type": "image", "path": png}) == Image(png)
    assert parse_part({"type": "image", "image": png}) == Image(png)  # a string item is a path
    assert parse_part({"type": "audio", "path": wav, "sampling_rate": 8000}) == Audio(wav, 8000)
    assert parse_part({"type": "audio", "audio": (arr, 16)}) == Audio(arr, 16)
    # gradio's file parts: the modality from the file's type
    assert parse_part({"type": "file", "file": {"path": wav}}) == Audio(wav)
    assert parse_part({"path": png}) == Image(png)
    assert parse_part({"path": wav, "mime_type": "image/png"}) == Image(wav)


def test_paths_are_relative_to_root_and_must_exist(files):
    assert parse_part({"type": "image", "path": "a.png"}, root=str(files)) == Image(os.path.join(files, "a.png"))
    with pytest.raises(FileNotFoundError, match="gone.png: image file not found"):
        parse_part({"type": "image", "path": "gone.png"}, root=str(files))


@pytest.mark.parametrize("part, message", [
    ({"type": "text", "text": 5}, "needs a string"),
    ({"type": "text", "text": "  "}, "empty text part"),
    ("", "empty text part"),
    ({"type": "video", "path": "x"}, "chat content part of type 'video'"),
    ({"type": "image"}, "needs a 'image'"),
    ({"type": "image", "image": [1, 2]}, "needs a 'image'"),  # JSON lists are no item
    ({"path": "notes.txt"}, "cannot tell what this file holds"),
    (5, "cannot read a chat content part"),
    (None, "cannot read a chat content part"),
])
def test_bad_parts_raise_clear_errors(part, message):
    with pytest.raises(ValueError, match=message):
        parse_part(part)


def test_messages_and_content():
    assert parse_content("hi") == [Text("hi")]
    msg = parse_message({"role": "user", "content": ["a", {"type": "text", "text": "b"}]})
    assert msg == Message("user", [Text("a"), Text("b")])
    assert parse_message({"role": "assistant"}) == Message("assistant", [])
    with pytest.raises(ValueError, match="needs a 'role'"):
        parse_message({"content": "x"})
    with pytest.raises(ValueError, match="unknown role"):
        parse_message({"role": "robot", "content": "x"})


def test_writer_round_trips_through_the_reader(files):
    pil = PILImage.new("L", (2, 2), 7)
    saved = []

    def save(item):
        saved.append(item)
        item.image.save(files / "out.png")
        return str(files / "out.png")

    msgs = [Message("user", [Image(str(files / "a.png")), "which digit?"]), Message("assistant", [Image(pil)])]
    record = to_messages(msgs, save=save)
    assert record[0] == {"role": "user", "content": [{"type": "image", "path": str(files / "a.png")},
                                                     {"type": "text", "text": "which digit?"}]}
    assert record[1]["content"] == [{"type": "image", "path": str(files / "out.png")}] and saved == [Image(pil)]
    back = [parse_message(m) for m in record]
    assert back[0] == msgs[0] and isinstance(back[1].content[0], Image)
    with pytest.raises(ValueError, match="held in memory"):
        to_part(Image(pil))


def test_segments_know_their_modality():
    assert segment_modalities()[:2] == ["image", "audio"]
    assert segment_class("audio") is Audio and Image.modality == "image"
    assert Audio(np.zeros(3), 8).raw()[1] == 8 and Image("x.png").path == "x.png"
    assert modality_of(PILImage.new("L", (1, 1))) == "image" and modality_of(Audio("x")) == "audio"
    assert modality_of(("audio", None)) == "audio" and modality_of("s") == "text" and modality_of(3) is None
    assert modality_of_file("x.flac") == "audio"
    with pytest.raises(ValueError, match="unknown modality"):
        segment_class("smell")
    with pytest.raises(ValueError, match="already has the segment"):
        register_segment(type("Other", (Item,), {"modality": "image"}))
    with pytest.raises(ValueError, match="subclasses Item"):
        register_segment(Text)
